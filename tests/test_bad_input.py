"""Every bad input gives one line on stderr, exit code 2, no traceback, and no result files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import exit_code

from compress_order.cli.main import main

BAD = [
    (["stages=[foo]"], "unknown stage 'foo'; valid stages: "),
    (["model=foo"], "unknown model 'foo'; valid: "),
    (["data=bar"], "unknown data 'bar'; valid: "),
    (["bits=9"], "bits=9 is outside 2-8"),
    (["bits=1"], "bits=1 is outside 2-8"),
    (["sparsity=1.0"], "sparsity=1.0 is outside [0, 1)"),
    (["sparsity=-0.1"], "sparsity=-0.1 is outside [0, 1)"),
    (["stages=[]"], "the stage list is empty; choose from: "),
    (["stages=rtn"], "stages=rtn must be a list, e.g. stages=[rtn]"),  # was read letter by letter: unknown stage 'r'
    (["joint=sparsegpt_gptq"], "joint=sparsegpt_gptq must be a list, e.g. joint=[sparsegpt_gptq]"),
    # a model setting the load would refuse or misread is refused before it (seqlen=0 was a ZeroDivisionError)
    (["model.seqlen=0"], "model.seqlen=0 must be an integer ≥ 1 or null"),
    (["model.seqlen=abc"], "model.seqlen=abc must be an integer ≥ 1 or null"),
    (["model.dtype=float64"], "model.dtype=float64 is unknown; valid: float32, float16, bfloat16, auto"),
    (["model.skip=lm_head"], "model.skip=lm_head must be a list of regexes, e.g. model.skip=[lm_head]"),
    (["model.skip=['[']"], "model.skip: '[' is not a regex"),
    (["group_size=96"], "group_size=96 does not divide the 128 input features"),
    (["stages=[{name:magnitude,nm:'4:4'}]"], "needs 0 < N < M"),
    (["-m", "bits=3,9"], "bits=9 is outside 2-8"),  # every sweep point is checked before the first runs
    (["model.path=/nonexistent/dir"], "local path '/nonexistent/dir' does not exist"),
    (["data=wikipedia", "data.train=/nonexistent/train.txt"], "train file '/nonexistent/train.txt' does not exist; prepare it with: python scripts/get_wikipedia.py"),
    (["stages=[{name:magnitude,nm:'2:4',sparsity:0.7}]"], "contradicts N:M 2:4"),
    (["stages=[{name:gptq,act_order:true}]", "group_size=32"], "act_order"),
    (["group_size=0"], "group_size=0 must be a positive integer or -1"),
    (["eval.backends=[turbo]"], "unknown backend 'turbo'"),
    # an enumerated stage option is checked, never read as its default (scope=rwo once ran as layer scope)
    (["stages=[{name:magnitude,scope:rwo}]"], "magnitude scope=rwo is unknown; valid: row, layer"),
    (["stages=[{name:wanda,scope:rwo}]"], "wanda scope=rwo is unknown; valid: row, layer"),
    (["stages=[{name:rtn,sym:maybe}]"], "rtn sym=maybe must be true or false"),  # a declared bool takes booleans only
    (["stages=[{name:sparsegpt,grid:bogus},rtn]"], "sparsegpt grid=bogus is unknown; valid: keep, refit"),
    # `grid` (keep or refit an earlier grid) belongs to pruners that update weights: refused on those that do not,
    # and on the joint schedule, which fits its own grid
    (["stages=[{name:magnitude,grid:refit},rtn]"], "unknown parameter 'grid' for stage 'magnitude'"),
    (["stages=[{name:wanda,grid:keep},rtn]"], "unknown parameter 'grid' for stage 'wanda'"),
    (["stages=[{name:expert_prune,grid:refit},rtn]"], "unknown parameter 'grid' for stage 'expert_prune'"),
    (["joint=[{name:sparsegpt_gptq,grid:refit}]"], "unknown parameter 'grid' for stage 'sparsegpt_gptq'"),
    # orders= names full orders of the stages by label; anything else names the valid ones
    (["orders=[[rtn,foo]]"], "orders: [rtn, foo] is not an order of the stages [magnitude, rtn]; valid: [magnitude, rtn], [rtn, magnitude]"),
    (["orders=[[rtn]]"], "orders: [rtn] is not an order of the stages [magnitude, rtn]"),
    (["orders=[]"], "orders=[] must be null (every order) or a list of orders, e.g. [[magnitude, rtn]]"),
    (["orders=rtn"], "orders=rtn must be null (every order) or a list of orders"),
    (["orders=[[rtn,magnitude]]", "predict_only=true"], "orders= lists full orders, which predict_only=true does not compute"),
    # an explicit setting that cannot apply is refused (its default adapts): float codebooks have no zero-point
    (["format=mxfp4", "stages=[{name:rtn,sym:false}]"], "stage 'rtn(sym=False)': sym=false cannot apply: format=mxfp4 is a symmetric codebook"),
    (["format=nvfp4", "joint=[{name:sparsegpt_gptq,sym:false}]"], "stage 'sparsegpt+gptq': sym=false cannot apply"),
    # A typo never runs with the default value: unknown keys name the closest valid one.
    (["stages=[{name:magnitude,spars:0.3},rtn]"], "unknown parameter 'spars' for stage 'magnitude'; did you mean 'sparsity'? valid: label, nm, scope, sparsity"),
    (["joint=[{name:sparsegpt_gptq,bitz:3}]"], "unknown parameter 'bitz' for stage 'sparsegpt_gptq'; did you mean 'bits'?"),
    (["spartsity=0.5"], "unknown key 'spartsity'; did you mean 'sparsity'? valid: "),
    (["+spartsity=0.5"], "unknown key 'spartsity'; did you mean 'sparsity'? valid: "),
    (["eval.max_windowz=3"], "unknown key 'eval.max_windowz'; did you mean 'max_windows'?"),
    (["calibration.nsample=3"], "unknown key 'calibration.nsample'; did you mean 'nsamples'?"),
    (["+eval.latency.repeat=3"], "unknown key 'eval.latency.repeat'; did you mean 'repeats'?"),
    (["+model.pth=/x"], "unknown key 'model.pth'; did you mean 'path'?"),
    # a loader's declared bool takes true/false only (once ran as bos=true); a key its yaml leaves out says how to add it
    (["model.bos=maybe"], "model.bos=maybe must be true or false"),
    (["model.bos=2"], "model.bos=2 must be true or false"),
    (["+model.trust_remote_code=yes"], "model.trust_remote_code=yes must be true or false"),
    (["+model.bos=true"], "'model.bos' is in the config already: set it with model.bos=... (+ adds a key it lacks)"),
    (["model.revision=main"], "'model.revision' is not set by this model config (its loader's default applies); to set it: +model.revision=..."),
    # Numbers are checked before any model is loaded.
    (["calibration.nsamples=0"], "calibration.nsamples=0 must be an integer ≥ 1"),
    (["calibration.nsamples=-1"], "calibration.nsamples=-1 must be an integer ≥ 1"),
    (["calibration.seqlen=0"], "calibration.seqlen=0 must be an integer ≥ 1 or null"),
    (["eval.max_windows=-5"], "eval.max_windows=-5 must be an integer ≥ 1 or null (null: all windows)"),
    (["eval.max_windows=0"], "eval.max_windows=0 must be an integer ≥ 1 or null (null: all windows)"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be an integer ≥ 1"),
    (["eval.latency.repeats=0"], "eval.latency.repeats=0 must be an integer ≥ 1"),
    (["threads=-1"], "threads=-1 must be an integer ≥ 1 or null"),
    (["seed=-3"], "seed=-3 must be an integer ≥ 0"),
    (["state_cache.max_gb=0"], "state_cache.max_gb=0 must be a number > 0"),
    (["force=maybe"], "force=maybe must be true or false"),
    (["bits=${oc.env:COMPRESS_ORDER_NO_SUCH_VAR}"], "cannot resolve bits: "),
    (["save_format=gguf"], "save_format=gguf is unknown; valid: auto, compressed-tensors, dense"),
    (["replicates=0"], "replicates=0 must be an integer ≥ 1 (calibration seeds per run)"),
    (["seeds=[0,1,0]"], "seeds=[0, 1, 0] repeats a seed"),
    (["seeds=[1,-2]"], "seeds=[1, -2] must hold integers ≥ 0 only"),
    (["seeds=[1,2]", "replicates=3"], "replicates=3 contradicts seeds=[1, 2]"),
    (["--cfg", "bogus"], "--cfg takes one of: job, hydra, all (got 'bogus')"),
    (["--cfg", "job", "bits=3,4"], "bits=3,4 gives 2 values without -m: for a list write bits=[3,4]"),
    (["--config-name", "other"], "--config-name is not supported: a run composes compress_order/conf"),  # was checked
    (["--config-dir", "/tmp"], "--config-dir is not supported"),  # against the default config, then run unchecked
    (["act_bits=1"], "act_bits=1 is outside 2-16"),
    (["act_bits=17"], "act_bits=17 is outside 2-16"),
    (["act_bits=8", "act_granularity=channel"], "act_granularity=channel is unknown; valid: token, tensor, static"),
    # A setting read only when another is on is checked with that one off too (act_bits, save, state_cache.dir,
    # a calibrated stage and eval.tasks are off in these runs), so a bad value is never run and saved.
    (["act_granularity=channel"], "act_granularity=channel is unknown; valid: token, tensor, static"),
    (["save=false", "save_format=gguf"], "save_format=gguf is unknown"),
    # nothing to pack: was a StopIteration traceback after every node had been computed
    (["save=true", "save_format=compressed-tensors", "stages=[magnitude]"], "save_format=compressed-tensors packs quantization grids, and the order magnitude quantizes nothing"),
    (["state_cache.dir=null", "state_cache.max_gb=-1"], "state_cache.max_gb=-1 must be a number > 0"),
    (["state_cache.dir=5"], "state_cache.dir=5 must be a folder or null (no cache)"),
    (["expert_sparsity=1.5"], "expert_sparsity=1.5 is outside [0, 1)"),
    (["expert_sparsity=abc"], "expert_sparsity=abc is not a number; valid: [0, 1)"),  # not "outside [0, 1)"
    (["sparsity=true"], "sparsity=true is not a number; valid: [0, 1)"),
    (["bits=3.5"], "bits=3.5 is not an integer; valid: 2-8"),
    (["calibration.true_sequential=maybe"], "calibration.true_sequential=maybe must be true or false"),
    (["calibration.moe_all_experts=2"], "calibration.moe_all_experts=2 must be true or false"),
    (["calibration.device=tpu"], "calibration.device=tpu is unknown; valid: auto, cpu, cuda, cuda:N"),
    (["eval.word_perplexity=yes please"], "eval.word_perplexity=yes please must be true or false"),
    (["eval.tasks=arc_easy"], "eval.tasks=arc_easy must be a list of lm-eval task names"),
    (["eval.lm_eval.num_fewshot=-1"], "eval.lm_eval.num_fewshot=-1 must be an integer ≥ 0 or null"),
    (["eval.lm_eval.limit=0"], "eval.lm_eval.limit=0 must be a number > 0"),
    (["eval.lm_eval.batch_size=0"], "eval.lm_eval.batch_size=0 must be an integer ≥ 1"),
    (["eval.lm_eval.max_length=0"], "eval.lm_eval.max_length=0 must be an integer ≥ 1 or null"),
    (["eval.lm_eval.bootstrap_iters=-1"], "eval.lm_eval.bootstrap_iters=-1 must be an integer ≥ 0"),
    (["eval.lm_eval.model_args=3"], "eval.lm_eval.model_args=3 must be a mapping"),
    (["eval.lm_eval.include_path=/nonexistent/tasks"], "eval.lm_eval.include_path '/nonexistent/tasks' does not exist"),
    # What the model's structure decides is refused once it is loaded, before the dense node is evaluated.
    (["stages=[{name:sparsegpt,nm:'2:3',sparsity:0}]"], "N:M 2:3: M does not divide the inputs of "),
    (["stages=[{name:wanda,nm:'1:3',sparsity:0}]"], "N:M 1:3: M does not divide the inputs of "),
    (["stages=[{name:awq,group_size:96}]"], "group_size=96 does not divide the 128 input features"),
    (["joint=[{name:sparsegpt_gptq,group_size:96}]"], "group_size=96 does not divide the 128 input features"),
    (["stages=[expert_prune,rtn]"], "stage 'expert_prune' removes experts, but the model has no MoE layer"),
    (["stages=[{name:smoothquant,alpha:1.5}]"], "smoothquant alpha=1.5 is outside [0, 1]"),
    (["stages=[{name:awq,min_clip:0}]"], "awq min_clip=0 is outside (0, 1]"),
    # rotate and sleb (issue #39): settings before any model loads, the model's structure before the first node
    (["stages=[{name:rotate,matrix:foo},rtn]"], "rotate matrix=foo is unknown; valid: hadamard, random"),
    (["stages=[{name:rotate,heads:maybe},rtn]"], "rotate heads=maybe must be true or false"),
    (["save=true", "stages=[{name:rotate,online:true},rtn]"], "save=true: rotate online=true applies a Hadamard to down_proj's input at run time"),
    (["stages=[{name:sleb,blocks:0},rtn]"], "sleb blocks=0 is not a count (a whole number >= 1) or a share in (0, 1)"),
    (["stages=[{name:sleb,blocks:-1},rtn]"], "sleb blocks=-1 is not a count"),
    (["stages=[{name:sleb,blocks:2.5},rtn]"], "sleb blocks=2.5 is not a count"),
    (["stages=[{name:sleb,blocks:1.0},rtn]"], "sleb blocks=1.0 is not a count"),  # a share must be below 1
    (["stages=[{name:sleb,blocks:abc},rtn]"], "sleb blocks=abc is not a count"),
    (["stages=[{name:sleb,blocks:2},rtn]"], "sleb blocks=2 removes 2 of the model's 2 decoder blocks; at most 1"),
    (["stages=[{name:sleb,blocks:0.9},rtn]"], "sleb blocks=0.9 removes 2 of the model's 2 decoder blocks"),
    (["hydra.run.dir=/proc/compress-order"], "hydra.run.dir '/proc/compress-order' is not writable"),
    (["store_dir=/proc/compress-order"], "store_dir '/proc/compress-order' is not writable"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, message, tiny_overrides, tmp_path, capsys):
    keys = {a.split("=", 1)[0] for a in args}
    base = [o for o in tiny_overrides if o.split("=", 1)[0] not in keys]
    rc = exit_code(["run", *base, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "results.parquet").exists() and not (tmp_path / "sweep").exists()
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]  # no node was stored


@pytest.mark.parametrize("stage", ["awq", "smoothquant"])
def test_stage_without_scaling_producer_is_refused_before_the_first_node(stage, tmp_path, capsys):
    # ResNet's first layers are convolutions fed through batch norm, ReLU and residual sums: nothing can absorb
    # input scales. The probe runs once the model is loaded, not when calibration first reaches the stage.
    rc = exit_code(["run", "model=mnist_resnet", "data=mnist", f"stages=[{stage},rtn]", "calibration.nsamples=4",
                    "eval.latency.repeats=2", "eval.latency.warmup=1", f"store_dir={tmp_path / 'store'}",
                    f"hydra.run.dir={tmp_path / 'run'}", "threads=1"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert (f"stage '{stage}' rescales input channels, but no layer group of ResNet (first: layer1.0.conv1) has a "
            "producer (norm or linear layer) that can absorb the scales; use a stage that does not rescale") in err[0]
    assert not (tmp_path / "run" / "results.parquet").exists()
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]



@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_overrides, capsys):
    assert exit_code(["run", *tiny_overrides, "device=cuda"]) == 2
    assert "device=cuda but CUDA is not available here; valid: auto, cpu" in capsys.readouterr().err


def test_unknown_command_and_validate(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'; valid: " in capsys.readouterr().err
    assert main(["validate", "-m", "bits=3,4", "sparsity=0.5"]) == 0  # a sweep needs -m (issue #41: was without)
    out = capsys.readouterr().out
    assert out.count("ok: ") == 2 and "2 orders, 4 stage applications" in out and "at most" not in out


def test_validate_says_its_counts_are_at_most_when_a_stage_may_not_follow_another(capsys):
    """rotate cannot follow a pruner or quantizer, which only the loaded layers tell: validate's counts are the most
    a run applies, and say so."""
    assert main(["validate", "experiment=mini_rotation"]) == 0
    out = capsys.readouterr().out
    assert "6 orders, 15 stage applications at most (rotate: whether it can follow the stages before it" in out


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "compress_order", "run", "stages=[wanda_typo]", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "unknown stage 'wanda_typo'" in out.stderr


# What `run` refuses, `validate` refuses too, before any model loads and for every point of a sweep (issue #41).
BOTH = [
    (["data=wikipedia"], "data 'wikipedia': train file '/nonexistent/wikipedia/wikipedia/train.txt' does not exist"),
    (["data=news"], "data 'news': train file '/nonexistent/wikipedia/news/train.txt' does not exist"),
    (["-m", "data=shakespeare,wikipedia"], "data 'wikipedia': train file"),  # job 0 once ran, then job 1 failed
    (["model=resnet18", "data=mnist", "model.checkpoint=/no/such.pth"], "checkpoint '/no/such.pth' does not exist"),
    (["model=gemma3_270m"], "fetch it with: python scripts/get_gemma3.py"),
    # data settings a load would refuse (line_rows once only when the files were read)
    (["data=wikitext2", "data.line_rows=maybe"], "data.line_rows=maybe is unknown; valid: keep, strip"),
    (["data=c4", "data.train_docs=-1"], "data.train_docs=-1 must be an integer ≥ 1 or null"),
    (["model=mnist_resnet", "data=mnist", "data.test_size=0"], "data.test_size=0 must be an integer ≥ 1"),
    (["model=mnist_resnet", "data=image_folder"], "data 'image_folder': set data.path to a hub dataset name or a local image folder"),
    (["model=mnist_resnet", "data=image_folder", "data.path=/nope"], "image folder '/nope' does not exist"),
    (["model=mnist_resnet", "data=image_folder", "data.path=/tmp", "data.holdout=5"], "data.holdout=5 must be in (0, 1)"),
    # a comma value without -m is neither a list nor a sweep: one line naming both (was Hydra's five lines, exit 1,
    # after a plan for 2 jobs; validate called it a 2-point sweep)
    (["eval.metrics=perplexity,kld"], "eval.metrics=perplexity,kld gives 2 values without -m: for a list write eval.metrics=[perplexity,kld], to sweep over them add -m"),
    (["bits=3,4"], "bits=3,4 gives 2 values without -m: for a list write bits=[3,4], to sweep over them add -m"),
    # what the model's task refuses is known from its loader, before it loads; the hint is what it does report
    (["model=mnist_resnet", "data=mnist", "eval.metrics=[kld]"], "kld compare next-token distributions of a language model; model 'mnist-resnet' is an image classifier; it reports top1, top5, nll for every node; drop eval.metrics"),
    (["model=mnist_resnet", "data=mnist", "eval.metrics=[top1_agree]"], "top1_agree compare next-token"),
    (["model=mnist_resnet", "data=shakespeare"], "model 'mnist-resnet' is an image classifier but data 'shakespeare' is not an image dataset"),
    (["data=mnist"], "model 'charllama' is a language model but data 'mnist' is not a text dataset"),
    (["model=mnist_resnet", "data=mnist", "eval.max_windows=4"], "eval.max_windows=4 caps a language model's text windows (images: eval.max_examples)"),
    (["model=mnist_resnet", "data=mnist", "eval.word_perplexity=true"], "eval.word_perplexity=true scores a language model's text"),
    (["model=mnist_resnet", "data=mnist", "stages=[rotate,rtn]"], "stage 'rotate' applies to a language model only; model 'mnist-resnet' is an image classifier"),
    (["model=mnist_resnet", "data=mnist", "stages=[sleb,rtn]"], "stage 'sleb' applies to a language model only"),
    (["eval.max_examples=4"], "eval.max_examples=4 caps an image classifier's test images; model 'charllama' is a language model"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("args,message", BOTH, ids=[" ".join(a) for a, _ in BOTH])
def test_validate_refuses_what_run_refuses(command, args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COMPRESS_ORDER_CACHE", "/nonexistent")  # no prepared data or fetched weights
    out = [f"store_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    rc = exit_code([command, *args, *out])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert "valid" not in captured.out and "plan:" not in captured.out  # nothing planned or ran
    assert not list(tmp_path.rglob("*"))  # nothing written


def test_validate_says_what_only_the_loaded_model_can_tell(capsys):
    """expert_prune on a dense model is refused by `run` once the model is loaded; `validate` cannot know, and says
    so instead of a plain "valid"."""
    assert main(["validate", "stages=[expert_prune,rtn]", "expert_sparsity=0.75"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "configuration(s) valid" in ln)
    assert line.startswith("1 configuration(s) valid as far as can be checked without loading the model: ")
    n = int(line.split("model: ", 1)[1].split(" checks need the model", 1)[0])
    assert n == len(line.split(": ", 2)[2].split("; ")) >= 4
    assert "expert_prune: the model has MoE layers" in line and "expert_sparsity=0.75 leaves every MoE layer" in line
    assert "rtn: group_size=128 divides every layer's inputs" in line


@pytest.mark.parametrize("command", ["validate", "list"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_does_nothing_else(command, flag, capsys):
    assert main([command, flag]) == 0  # validate --help once validated the default config
    out = capsys.readouterr().out
    assert out.startswith(f"usage: compress-order {command}") and "ok: " not in out and "model:" not in out


@pytest.mark.parametrize("args,message", [
    (["validate", "--cfg", "job"], "validate takes overrides and -m only, not --cfg"),
    (["validate", "--config-name", "other"], "validate takes overrides and -m only, not --config-name"),
    (["list", "models"], "list takes no arguments (got models)"),
])  # fmt: skip
def test_flags_a_command_does_not_read_are_refused(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
