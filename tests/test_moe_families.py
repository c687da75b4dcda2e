"""MoE families as a tested matrix: a tiny random checkpoint of each (transformers 5 fused experts) runs every order
of calibrated prune+quantize pairs, the joint schedule and expert pruning end to end with save; the saved weights of
every expert keep their constraints and the targets cover every weight matrix outside lm_head and the routers.

docs/how-it-works.md names exactly the families of `MOE_FAMILIES` (checked below).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import MOE_FAMILIES, readme_list, save_tiny_moe
from matrix_report import record

SPARSITY, BITS, GROUP = 0.5, 4, 32
ROUTERS = r"\.(gate|router|shared_expert_gate)$"
FAST = ("Mixtral", "DeepSeek-V3")  # expert pruning in the fast suite: a softmax top-k router and a grouped sigmoid one


def _overrides(ckpt: Path, text: dict[str, Path], tmp: Path, stages: str, out: str) -> list[str]:
    return [
        f"model.path={ckpt}", "model.name=tiny", "model.seqlen=64", "model.dtype=float32",
        f"data.train={text['train']}", f"data.valid={text['valid']}", "data.name=tiny",
        "calibration.nsamples=2", "calibration.seqlen=32", "eval.max_windows=2", "eval.backends=none",
        "eval.latency.repeats=1", "eval.latency.warmup=0", "device=cpu", "threads=1", "save=true",
        f"sparsity={SPARSITY}", f"bits={BITS}", f"group_size={GROUP}", "expert_sparsity=0.5", f"stages={stages}",
        f"store_dir={tmp / 'store'}", f"hydra.run.dir={tmp / out}",
    ]  # fmt: skip


def _experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every expert matrix of every fused experts module as (out, in), read independently of compress_order."""
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "is_transposed"):
            continue
        for pname in ("gate_up_proj", "up_proj", "down_proj"):
            p = getattr(mod, pname, None)
            if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                for e in range(p.shape[0]):
                    out[f"{name}.{e}.{pname}"] = (p[e].t() if mod.is_transposed else p[e]).detach()
    return out


def _levels(w: torch.Tensor) -> int:
    return max(len(torch.unique(g)) for g in w.reshape(-1, GROUP))


def _check_saved(folder: Path, prune: bool, quant: bool, experts_left: int | None, family: str) -> None:
    from transformers import AutoModelForCausalLM

    from compress_order.export.checkpoint import load_constraints

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    got = _experts(model)
    assert got, family
    per_module = Counter(n.rsplit(".", 2)[0] for n in got if n.endswith("down_proj"))
    if experts_left is not None:
        assert set(per_module.values()) == {experts_left}, (family, per_module)
    layers = load_constraints(folder)["layers"]
    for name, w in got.items():
        if prune:
            assert float((w == 0).float().mean()) >= SPARSITY - 1e-9, (family, folder.name, name)
        if quant:
            assert _levels(w) <= 2**BITS, (family, folder.name, name)
        entry = layers[name]  # the sidecar describes each saved expert, masks in its (out, in) view
        assert list(entry["shape"]) == list(w.shape), (family, name)
        if entry["mask"] is not None:
            assert torch.all(w[~entry["mask"]] == 0), (family, folder.name, name)


CASES = [  # (stages, joint, pruned, quantized, experts removed, slow)
    ("[wanda,gptq]", True, True, True, False, False),
    ("[expert_prune,gptq]", False, False, True, True, False),
    ("[sparsegpt,rtn]", True, True, True, False, True),
    ("[expert_prune,sparsegpt]", False, True, False, True, True),
]


def _params():
    out = []
    for family in MOE_FAMILIES:
        for stages, joint, prune, quant, removes, slow in CASES:
            # one family runs expert pruning in the fast suite; the matrix runs it on every family (slow)
            marks = [pytest.mark.slow] if slow or (stages.startswith("[expert_prune") and family not in FAST) else []
            out.append(pytest.param(family, stages, joint, prune, quant, removes, id=f"{family}-{stages}", marks=marks))
    return out


@pytest.mark.parametrize("family,stages,joint,prune,quant,removes", _params())
def test_moe_family_runs_every_order_and_compresses_every_expert(family, stages, joint, prune, quant, removes,
                                                                 tiny_text, tmp_path, caplog):  # fmt: skip
    from compress_order.config.compose import compose_config
    from helpers import run

    ckpt = save_tiny_moe(family, tmp_path / "ckpt")
    args = _overrides(ckpt, tiny_text, tmp_path, stages, "run") + (["joint=[sparsegpt_gptq]"] if joint else [])
    with caplog.at_level(logging.INFO, logger="compress_order"):
        df = run(compose_config(args), tmp_path / "out")
    a, b = stages.strip("[]").split(",")
    full = {f"{a} > {b}", f"{b} > {a}"} | ({"sparsegpt+gptq"} if joint else set())
    ok = df[(df.status == "ok") & (df.backend == "dense-simulated")]
    assert full <= set(ok["order"]), (family, set(ok["order"]))
    ppl = ok[ok.metric == "perplexity"].set_index("order")["value"]
    assert all(math.isfinite(v) for v in ppl), (family, ppl.to_dict())
    cov = ok[ok.metric == "coverage"].set_index("order")["value"]
    assert all(cov[o] == 1 for o in full), (family, cov.to_dict())
    experts = json.loads((ckpt / "config.json").read_text())
    experts = next(experts[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in experts)
    saved = sorted((tmp_path / "out" / "models").iterdir())
    assert len(saved) == len(full)
    for folder in saved:
        label = json.loads((folder / "compression.json").read_text())["label"]
        _check_saved(folder, prune or label == "sparsegpt+gptq", quant or label == "sparsegpt+gptq",
                     experts // 2 if removes else None, family)  # fmt: skip
    tokens = [r.getMessage() for r in caplog.records if "calibration tokens per expert" in r.getMessage()]
    assert tokens or removes, family
    blocks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoder blocks")]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(ckpt)
    counts = Counter(type(m).__name__ for n, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and "lm_head" not in n and not n.endswith(("gate", "router")))  # fmt: skip
    matrices = Counter(n.rsplit(".", 2)[0] for n in _experts(base))
    layers = {**counts, f"{type(base.model.layers[-1].mlp.experts).__name__} expert matrices": sum(matrices.values())}
    record("decoder", family, f"tiny random `{type(base).__name__}`, hidden 64, 2 layers, {experts} experts, top-2",
           layers, ["lm_head", "routers"], blocks[0].removeprefix("decoder blocks: ") if blocks else "",
           sorted(full))  # fmt: skip


def test_readme_names_exactly_the_tested_moe_families():
    assert readme_list("MoE families tested on tiny checkpoints of ") == MOE_FAMILIES
