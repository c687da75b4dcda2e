"""Real text offline: Wikipedia articles and ABC news prose from the gensim wheel's test data (data=wikipedia,
data=news), split by document into train (calibration) and validation (evaluation) text files.

scripts/get_wikipedia.py fetches the wheel and calls `read_dump` / `read_news` and `write_splits`; runs then read the plain text files it wrote
(compress_order/conf/data/wikipedia.yaml, news.yaml), so the markup is parsed once, not on every run.

Markup is removed by mwparserfromhell's parser, node by node: links into the file and category namespaces and
reference / table / gallery tags are dropped, the trailing apparatus sections (See also, References, External
links, ...) are cut, and `strip_code` renders what is left (templates go, link text stays).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from compress_order.core.errors import UserError

# Level-2 sections that hold links and citations rather than prose.
APPARATUS = {
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
}
DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source"}
LINK_NAMESPACES = {"file", "image", "category", "media"}
JOIN = "\n\n"  # between documents, as the GPTQ loaders join WikiText rows


@dataclass(frozen=True)
class Article:
    id: int
    title: str
    text: str  # plain text


def _wiki():
    try:
        import mwparserfromhell
    except ImportError:
        raise UserError("stripping wiki markup needs mwparserfromhell: pip install mwparserfromhell") from None
    return mwparserfromhell


def strip_markup(wikitext: str) -> str:
    """Plain paragraphs of one article's wiki markup (see the module docstring for what is dropped)."""
    mw = _wiki()
    code = mw.parse(wikitext)
    for section in code.get_sections(levels=[2]):
        heads = section.filter_headings(recursive=False)
        if heads and heads[0].title.strip_code().strip().lower() in APPARATUS:
            _remove(code, section)
    for link in code.filter_wikilinks():
        title = str(link.title).strip()
        if ":" in title and title.split(":", 1)[0].strip().lower() in LINK_NAMESPACES:  # [[File:..|caption]]
            _remove(code, link)
    for tag in code.filter_tags():
        if str(tag.tag).strip().lower() in DROP_TAGS:
            _remove(code, tag)
    text = code.strip_code(normalize=True, collapse=True)
    paragraphs = [" ".join(p.split()) for p in text.split("\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # inside something removed already
        pass


def read_dump(path: Path) -> list[Article]:
    """The articles (main namespace, no redirects, some text left) of a MediaWiki XML dump (.xml or .xml.bz2)."""
    out = []
    with bz2.open(path) if str(path).endswith(".bz2") else open(path, "rb") as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if not el.tag.endswith("}page") and el.tag != "page":
                continue
            ns, title = _child(el, "ns"), _child(el, "title")
            redirect = any(c.tag.rsplit("}", 1)[-1] == "redirect" for c in el)
            rev = next((c for c in el if c.tag.rsplit("}", 1)[-1] == "revision"), None)
            markup = _child(rev, "text") if rev is not None else None
            if (ns or "0") == "0" and not redirect and markup:
                text = strip_markup(markup)
                if text:
                    out.append(Article(int(_child(el, "id") or len(out)), title or "", text))
            el.clear()
    return out


def _child(el, name: str) -> str | None:
    for c in el:
        if c.tag.rsplit("}", 1)[-1] == name:
            return c.text
    return None


def read_news(path: Path) -> list[Article]:
    """lee_background.cor: one news document per line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Article(i, f"doc {i}", " ".join(ln.split())) for i, ln in enumerate(lines) if ln.strip()]


def split(docs: list[Article], valid_fraction: float, seed: int) -> tuple[list[Article], list[Article]]:
    """Whole documents to validation (a seeded draw of round(fraction × n), at least one), the rest to train;
    both in their dump order."""
    n_valid = max(1, round(valid_fraction * len(docs)))
    if len(docs) < 2 or n_valid >= len(docs):
        raise UserError(f"{len(docs)} document(s) cannot be split into train and validation")
    valid = set(random.Random(seed).sample(range(len(docs)), n_valid))
    return [d for i, d in enumerate(docs) if i not in valid], [d for i, d in enumerate(docs) if i in valid]


def write_splits(docs: list[Article], dest: Path, valid_fraction: float, seed: int) -> dict:
    """dest/train.txt and dest/valid.txt (documents joined by a blank line); returns what was written."""
    train, valid = split(docs, valid_fraction, seed)
    dest.mkdir(parents=True, exist_ok=True)
    info: dict = {"valid_fraction": valid_fraction, "seed": seed}
    for name, part in (("train", train), ("valid", valid)):
        p = dest / f"{name}.txt"
        tmp = p.with_suffix(".txt.part")
        tmp.write_text(JOIN.join(d.text for d in part) + "\n", encoding="utf-8")
        tmp.replace(p)  # never a half-written file under the final name
        info[name] = {
            "documents": len(part),
            "characters": sum(len(d.text) for d in part),
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
    info["valid_titles"] = [d.title for d in valid]
    (dest / "split.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
