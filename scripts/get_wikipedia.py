"""Prepare data=wikipedia and data=news offline from the gensim 4.4.0 wheel's test data.

    python scripts/get_wikipedia.py [--dest DIR] [--spec gensim==4.4.0] [--force]

pip downloads the gensim wheel (no dependencies) into a scratch folder in DEST and extracts two files of its test
data (the wheel is then removed): 206 pages of the English Wikipedia dump in wiki markup (CC BY-SA) and
lee_background.cor, 300 ABC news documents of plain prose. Their sha256 is checked; the Wikipedia markup is
stripped by mwparserfromhell (compress_order/loaders/wikipedia.py) and both are split by document into
DEST/wikipedia/{train,valid}.txt and DEST/news/{train,valid}.txt, with DEST/ATTRIBUTION.md. DEST defaults to
$COMPRESS_ORDER_CACHE/wikipedia or ~/.cache/compress-order/wikipedia, where compress_order/conf/data/wikipedia.yaml
and news.yaml look. Runs are offline afterwards.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_wheels import cache_dir, fetch_args, pip_download, sha256  # noqa: E402  (what every fetch script shares)

SPEC = "gensim==4.4.0"  # pinned: results depend on these exact documents
DATA = "gensim/test/test_data/"
KNOWN_SHA256 = {
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
}  # fmt: skip
DUMP, NEWS = KNOWN_SHA256
# Whole documents held out for evaluation (seeded draw): ~10 of the 106 articles, 60 of the 300 news documents.
SPLITS = {"wikipedia": (0.1, 0), "news": (0.2, 0)}

ATTRIBUTION = """# Attribution

Both data sets come from the test data of the gensim {version} wheel on PyPI (`{data}`), extracted unchanged
(sha256 below) by scripts/get_wikipedia.py, then converted to plain text and split by document.

- `wikipedia/`: from `{dump}`, 206 pages of the English Wikipedia (a shortened early-2016 dump; 106 articles
  once redirects are dropped). Wikipedia text is licensed under the Creative Commons Attribution-ShareAlike
  license (CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/); authors: the Wikipedia contributors,
  see each article's history at https://en.wikipedia.org/wiki/<title>. Changes: wiki markup removed
  (mwparserfromhell), reference sections cut; the derived text is under the same license.
- `news/`: `{news}`, 300 news documents from the Australian Broadcasting Corporation's news service, the
  Lee et al. (2005) document-similarity corpus as gensim distributes it in its test data (gensim is LGPL-2.1).

sha256: {sums}
"""


def extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in KNOWN_SHA256:
            out = dest / name
            tmp = out.with_name(out.name + ".part")
            tmp.write_bytes(z.read(DATA + name))
            os.replace(tmp, out)  # never a half-written file under the final name


def main(argv: list[str] | None = None) -> int:
    args = fetch_args(argv, __doc__, cache_dir("wikipedia"), "data", SPEC)
    dest = args.dest.expanduser().resolve()
    raw = dest / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    if args.force or not all((raw / n).is_file() for n in KNOWN_SHA256):
        with tempfile.TemporaryDirectory(dir=dest, prefix=".wheel-") as scratch:
            extract(pip_download([args.spec], Path(scratch))[0], raw)
    else:
        print(f"already there: {raw}")
    sums = {n: sha256(raw / n) for n in KNOWN_SHA256}
    for n, digest in sums.items():
        if digest != KNOWN_SHA256[n]:
            print(f"warning: {n}: sha256 {digest} differs from the pinned wheel's {KNOWN_SHA256[n]}", file=sys.stderr)

    from compress_order.loaders.wikipedia import read_dump, read_news, write_splits

    for name, docs in (("wikipedia", read_dump(raw / DUMP)), ("news", read_news(raw / NEWS))):
        info = write_splits(docs, dest / name, *SPLITS[name])
        print(f"{name}: {info['train']['documents']} train / {info['valid']['documents']} validation documents "
              f"({info['train']['characters']:,} / {info['valid']['characters']:,} characters) → {dest / name}")
    (dest / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(
        version=args.spec.split("==")[-1], data=DATA, dump=DUMP, news=NEWS,
        sums="; ".join(f"`{n}` {d}" for n, d in sums.items())))  # fmt: skip
    print("run with:")
    for name in SPLITS:
        print(f"  compress-order run data={name} data.train={dest / name / 'train.txt'} "
              f"data.valid={dest / name / 'valid.txt'}")
    if dest == cache_dir("wikipedia").resolve():
        print("  (or just data=wikipedia / data=news: this is where their configs look)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
