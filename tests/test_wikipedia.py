"""data=wikipedia and data=news: the markup parser, the split by document and the preparation script, offline on a
tiny fake dump; the real gensim wheel's data when it has been prepared."""

from __future__ import annotations

import bz2
import json
import zipfile
from pathlib import Path

import pytest

from compress_order.config.compose import compose_config
from compress_order.core.instantiate import build
from compress_order.loaders.wikipedia import Article, read_dump, read_news, split, strip_markup, write_splits
from helpers import load_script

NS = "http://www.mediawiki.org/xml/export-0.10/"

ARTICLE = """{{Infobox person|name=Ada|born=1815}}
'''Ada Lovelace''' was an English [[mathematician]] and [[Writer|writer]].<ref>{{cite book|title=Ada}}</ref>
[[File:Ada.jpg|thumb|A portrait caption]]
== Work ==
She wrote the first published [[algorithm]] for the [[Analytical Engine]].
{| class="wikitable"
|-
| table cell || other cell
|}
== See also ==
* [[Charles Babbage]]
== References ==
{{reflist}}
[[Category:English mathematicians]]
"""


def _page(title: str, pid: int, text: str, ns: int = 0, redirect: bool = False) -> str:
    red = f'<redirect title="{title} (x)" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{pid}</id>{red}<revision><id>{pid}0</id>"
            f'<text xml:space="preserve">{text.replace("&", "&amp;").replace("<", "&lt;")}</text></revision></page>')  # fmt: skip


def fake_dump(path: Path, n_articles: int = 6) -> Path:
    pages = [_page("Ada Lovelace", 1, ARTICLE), _page("AdaL", 2, "#REDIRECT [[Ada Lovelace]]", redirect=True),
             _page("Talk:Ada Lovelace", 3, "A talk page.", ns=1)]  # fmt: skip
    pages += [_page(f"Article {i}", 10 + i, f"Paragraph {i} about [[topic {i}|things]].\n\nMore prose {i}.")
              for i in range(n_articles - 1)]  # fmt: skip
    xml = f'<mediawiki xmlns="{NS}"><siteinfo><sitename>Wikipedia</sitename></siteinfo>{"".join(pages)}</mediawiki>'
    path.write_bytes(bz2.compress(xml.encode()))
    return path


def test_markup_is_stripped_by_the_parser():
    text = strip_markup(ARTICLE)
    assert text.startswith("Ada Lovelace was an English mathematician and writer.")
    assert "She wrote the first published algorithm for the Analytical Engine." in text
    for gone in ("{{", "[[", "<ref", "cite", "thumb", "portrait caption", "table cell", "Category", "Charles Babbage",
                 "See also", "References", "'''", "Infobox"):
        assert gone not in text, gone
    assert "\n\n" in text and "\n\n\n" not in text  # paragraphs, one blank line apart


def test_dump_keeps_main_namespace_articles_only(tmp_path):
    docs = read_dump(fake_dump(tmp_path / "d.xml.bz2"))
    assert [d.title for d in docs] == ["Ada Lovelace", *[f"Article {i}" for i in range(5)]]
    assert docs[1].text == "Paragraph 0 about things.\n\nMore prose 0." and docs[1].id == 10


def test_split_is_by_document_seeded_and_complete(tmp_path):
    docs = [Article(i, f"t{i}", f"text {i}") for i in range(30)]
    train, valid = split(docs, 0.2, seed=0)
    assert len(valid) == 6 and len(train) == 24
    assert sorted(d.id for d in train + valid) == list(range(30))
    assert split(docs, 0.2, seed=0) == (train, valid) and split(docs, 0.2, seed=1)[1] != valid
    info = write_splits(docs, tmp_path / "out", 0.2, 0)
    assert (tmp_path / "out" / "valid.txt").read_text() == "\n\n".join(d.text for d in valid) + "\n"
    assert json.loads((tmp_path / "out" / "split.json").read_text())["valid"]["documents"] == 6 == info["valid"]["documents"]



def test_script_prepares_both_datasets_offline_and_configs_read_them(tmp_path, monkeypatch, capsys):
    mod = load_script("get_wikipedia")
    dump = fake_dump(tmp_path / "dump.bz2", n_articles=12)
    news = "\n".join(f"News story {i} said something about the weather today." for i in range(10)) + "\n"

    def fake_download(specs: list[str], wheels: Path) -> list[Path]:  # what pip would download, the two files inside
        assert specs == [mod.SPEC]
        whl = wheels / "gensim-4.4.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(mod.DATA + mod.DUMP, dump.read_bytes())
            z.writestr(mod.DATA + mod.NEWS, news)
        return [whl]

    monkeypatch.setattr(mod, "pip_download", fake_download)
    cache = tmp_path / "cache"
    assert mod.main(["--dest", str(cache / "wikipedia")]) == 0
    out = capsys.readouterr()
    assert "wikipedia: 11 train / 1 validation documents" in out.out and "news: 8 train / 2 validation" in out.out
    assert "differs from the pinned wheel's" in out.err  # a fake wheel is not the pinned data
    assert "CC BY-SA" in (cache / "wikipedia" / "ATTRIBUTION.md").read_text()
    assert not list((cache / "wikipedia").glob(".wheel-*"))  # the wheel is removed

    monkeypatch.setenv("COMPRESS_ORDER_CACHE", str(cache))
    wiki = build(compose_config(["data=wikipedia"]).data)
    assert wiki.name == "wikipedia" and "Ada Lovelace" in wiki.train + wiki.valid and "[[" not in wiki.train
    lee = build(compose_config(["data=news"]).data)
    assert lee.valid.count("News story") == 2 and lee.train.count("News story") == 8


@pytest.mark.parametrize("data", ["wikipedia", "news"])
def test_unprepared_data_is_one_line_naming_the_script(data, tmp_path, monkeypatch, capsys):
    from compress_order.cli.main import main

    monkeypatch.setenv("COMPRESS_ORDER_CACHE", str(tmp_path / "empty"))
    try:
        rc = main(["run", f"data={data}", "stages=[rtn]", f"hydra.run.dir={tmp_path / 'run'}",
                   f"store_dir={tmp_path / 'store'}"])  # fmt: skip
    except SystemExit as e:  # errors inside the Hydra job exit through SystemExit
        rc = int(e.code)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "prepare it with: python scripts/get_wikipedia.py" in err[0], err
    assert f"data '{data}': train file" in err[0]


def test_a_calibrated_run_on_news(tmp_path, monkeypatch, tiny_overrides):
    """Both splits in use: calibration segments from train, perplexity windows of the held-out documents."""
    from helpers import run

    d = tmp_path / "cache" / "wikipedia" / "news"
    write_splits(read_news(_news_file(tmp_path)), d, 0.2, 0)
    monkeypatch.setenv("COMPRESS_ORDER_CACHE", str(tmp_path / "cache"))
    over = [o for o in tiny_overrides if not o.startswith("data.")] + ["data=news", "stages=[wanda]",
                                                                        "sparsity=0.5", "eval.backends=none"]
    df = run(compose_config(over), tmp_path / "out")
    ppl = df[(df["metric"] == "perplexity")].set_index("order")["value"]
    assert set(df["dataset"]) == {"news"} and ppl["wanda"] > ppl["dense"] > 1


def _news_file(tmp_path: Path) -> Path:
    p = tmp_path / "lee.cor"
    p.write_text("".join(f"To be, or not to be, that is the question {i}: whether 'tis nobler.\n" * 3
                         for i in range(40)))  # fmt: skip
    return p


def _prepared() -> Path | None:
    cfg = compose_config(["data=wikipedia"])
    return Path(cfg.data.valid) if Path(cfg.data.valid).is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_prepared() is None, reason="data not prepared: python scripts/get_wikipedia.py")
def test_the_real_wheels_data():
    wiki, news = build(compose_config(["data=wikipedia"]).data), build(compose_config(["data=news"]).data)
    split_info = json.loads((_prepared().parent / "split.json").read_text())
    assert split_info["train"]["documents"] + split_info["valid"]["documents"] == 106
    assert len(wiki.train) > 2_000_000 and len(wiki.valid) > 100_000
    for junk in ("{{", "[[", "<ref", "|}"):
        assert wiki.train.count(junk) < 20, junk
    assert 200_000 < len(news.train) < 400_000 and len(news.valid) > 30_000
