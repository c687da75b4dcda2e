"""Fused mixture-of-experts modules: each expert's calibration inputs, from the tokens the router sends to it.

transformers 5 runs the experts of its MoE families through one module, called as
`experts(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`, whose 3-D parameters hold every
expert (targets.expert_params). A forward pre-hook on that module sees the router's choice for the model as it
stands, so each expert's statistics come from its own tokens: `gate_up_proj` (or `up_proj`) sees the routed
hidden states, `down_proj` the gated intermediate that the module itself computes from them (its `_apply_gate`,
its biases, its layout: the same attributes transformers' own batched kernels read). The module's real forward
still runs, so the block's output follows the router whatever the statistics are fed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from compress_order.core.errors import UserError
from compress_order.modeling.targets import Target, expert_params


def project(module: nn.Module, pname: str, e: int, x: Tensor) -> Tensor:
    """Expert e's projection `pname` of rows x, as the module computes it (layout and bias)."""
    w = getattr(module, pname)[e]
    y = x @ w if module.is_transposed else x @ w.t()
    bias = getattr(module, f"{pname}_bias", None) if getattr(module, "has_bias", False) else None
    return y if bias is None else y + bias[e]


def intermediate(module: nn.Module, first: str, e: int, x: Tensor) -> Tensor:
    """What expert e's down_proj reads for rows x: its gated (or plain) activation of the first projection."""
    h = project(module, first, e, x)
    h = module._apply_gate(h) if getattr(module, "has_gate", True) and first == "gate_up_proj" else module.act_fn(h)
    quant = getattr(module, "act_quant", None)  # act.py: down_proj's input rounded as every layer's input is
    return h if quant is None else quant(h)


def routed_forward(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """An experts module's call computed expert by expert from `project` and `intermediate` (the module's own
    layout, biases and gate), so that what down_proj reads is `intermediate`'s: Σ_k weight_k · expert_k(x)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    x, index, weights = routed_call(args, kwargs)
    first = next(p for p in expert_params(module) if p != "down_proj")
    out = torch.zeros_like(x)
    for e, rows in enumerate(routed_tokens(index, module.num_experts)):
        if rows.numel():
            y = project(module, "down_proj", e, intermediate(module, first, e, x[rows]))
            w = (weights[rows] * (index[rows] == e)).sum(-1, keepdim=True)  # the router's weight of e per token
            out.index_add_(0, rows, (y * w).to(out.dtype))
    return out.reshape(hidden.shape)


def routed_call(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """An experts module's call as (hidden rows (T, H), top-k expert indices (T, k), their router weights (T, k)):
    transformers passes them positionally, under family-specific keyword names otherwise."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "ind" in k)
    weights = args[2] if len(args) > 2 else next(v for k, v in kwargs.items() if "weight" in k)
    x = hidden.reshape(-1, hidden.shape[-1])
    return x, index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)


def routed_tokens(top_k_index: Tensor, num_experts: int) -> list[Tensor]:
    """Per expert, the indices of the tokens the router sent to it (an index == num_experts is padding)."""
    return [torch.nonzero((top_k_index == e).any(-1)).flatten() for e in range(num_experts)]


@dataclass
class ExpertUnit:
    """The targets of one fused experts module, by parameter (forward order) and expert."""

    name: str
    module: nn.Module
    by_param: dict[str, dict[int, Target]] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # calibration tokens routed to each expert, counted once

    @property
    def targets(self) -> list[Target]:
        return [t for by_e in self.by_param.values() for t in by_e.values()]

    def collect(
        self,
        params: list[str],
        make: Callable[[Target], Any],
        all_experts: bool,
        after: Callable[[], None] | None = None,
    ) -> tuple[dict[int, Any], RemovableHandle]:
        """A hook feeding statistics (`make(target)`, with `add_batch`) of the experts' `params` from each call,
        then calling `after`; `all_experts`: every token through every expert (for statistics only). The routed
        tokens per expert are counted anew. Returns ({id(target): stats}, handle)."""
        stats = {id(t): make(t) for p in params for t in self.by_param.get(p, {}).values()}
        first = next(p for p in expert_params(self.module) if p != "down_proj")
        self.tokens = [0] * self.module.num_experts

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x, index, _ = routed_call(args, kwargs)
            rows = routed_tokens(index, mod.num_experts)
            for e, r in enumerate(rows):
                self.tokens[e] += int(r.numel())
                xe = x if all_experts else x[r]
                if xe.shape[0] == 0:
                    continue
                for p in params:
                    t = self.by_param.get(p, {}).get(e)
                    if t is None:
                        continue
                    stats[id(t)].add_batch(xe if p == first else intermediate(mod, first, e, xe))
            if after is not None:
                after()

        return stats, self.module.register_forward_pre_hook(hook, with_kwargs=True)


def expert_units(targets: list[Target]) -> list[ExpertUnit]:
    """Expert targets grouped by their fused module, in the order given."""
    units: dict[int, ExpertUnit] = {}
    for t in targets:
        if t.index is None:
            continue
        u = units.setdefault(id(t.module), ExpertUnit(t.name.rsplit(".", 2)[0], t.module))
        u.by_param.setdefault(t.param, {})[t.index] = t
    for u in units.values():  # forward order: the first projection, then down_proj
        order = expert_params(u.module)
        u.by_param = {p: u.by_param[p] for p in order if p in u.by_param}
    return list(units.values())


def token_summary(tokens: list[int]) -> dict[str, float]:
    """min / median / max calibration tokens per expert, and how many experts got none."""
    return {
        "min": min(tokens),
        "median": float(statistics.median(tokens)),
        "max": max(tokens),
        "experts": len(tokens),
        "without_tokens": sum(n == 0 for n in tokens),
    }


# ---------------------------------------------------------------------------------------------------------
# Routing statistics and removed experts (the expert_prune stage)


@dataclass
class Routing:
    """Per expert of one MoE layer: how many calibration tokens the router sent to it, and the sum over those
    tokens of router weight × ‖expert output‖₂ (REAP's saliency, Lasby et al. 2025, is its mean)."""

    tokens: Tensor
    weighted_norm: Tensor

    def reap(self) -> Tensor:
        return self.weighted_norm / self.tokens.clamp_min(1)


def collect_routing(unit: ExpertUnit) -> tuple[Routing, RemovableHandle]:
    """A hook accumulating `Routing` from each call of the unit's experts module."""
    mod = unit.module
    r = Routing(torch.zeros(mod.num_experts, dtype=torch.float64), torch.zeros(mod.num_experts, dtype=torch.float64))
    params = expert_params(mod)

    def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        x, index, weights = routed_call(args, kwargs)
        for e in range(m.num_experts):
            hit = index == e
            rows = torch.nonzero(hit.any(-1)).flatten()
            if rows.numel() == 0:
                continue
            g = (weights * hit).sum(-1)[rows].float()
            out = project(m, "down_proj", e, intermediate(m, params[0], e, x[rows]))
            r.tokens[e] += rows.numel()
            r.weighted_norm[e] += float((g * out.float().norm(dim=-1)).sum())

    return r, mod.register_forward_pre_hook(hook, with_kwargs=True)


def router_of(root: nn.Module, experts: nn.Module) -> nn.Module | None:
    """The router feeding `experts`: the sibling module (in the MoE block holding both) whose 2-D weight has one
    row per expert."""
    for parent in root.modules():
        children = list(parent.children())
        if any(c is experts for c in children):
            for c in children:
                w = getattr(c, "weight", None)
                if c is not experts and isinstance(w, Tensor) and w.dim() == 2 and w.shape[0] == experts.num_experts:
                    return c
    return None


class _MaskedLogits(torch.overrides.TorchFunctionMode):
    """Inside a router's forward: the logits (its linear layer's output, one column per expert) of removed
    experts become -inf, so softmax, top-k and renormalisation run over the experts left — exactly what a
    checkpoint without those experts (router rows sliced) computes. A sigmoid router that picks by
    `sigmoid(logit) + correction bias` (DeepSeek-V3) would still see the bias of a removed expert, so the result of
    any operation on that bias is masked to -inf as well: removed experts then take no part in the groups' scores
    (each group's best two), the group choice or the top-k, and the weights gathered for the chosen experts are
    the ones the sliced checkpoint computes."""

    def __init__(self, removed: Tensor, bias: Tensor | None):
        super().__init__()
        self.removed, self.bias = removed, bias

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        n = self.removed.numel()
        by_bias = self.bias is not None and any(a is self.bias for a in args)
        if (func is torch.nn.functional.linear or by_bias) and isinstance(out, Tensor) and out.shape[-1] == n:
            out = out.masked_fill(self.removed.to(out.device), float("-inf"))
        return out


def correction_bias(router: nn.Module) -> Tensor | None:
    """The per-expert bias a sigmoid router adds to its scores to choose experts (not to weight them)."""
    b = getattr(router, "e_score_correction_bias", None)
    return b if isinstance(b, Tensor) else None


def mask_router(router: nn.Module, removed: Callable[[], Tensor]) -> None:
    """Route around removed experts from now on: `removed()` (bool per expert) is read at every call, so
    restoring a trie snapshot (which restores the experts' constraints) restores the routing too. Idempotent."""
    if getattr(router, "_removed_experts", None) is not None:
        router._removed_experts = removed
        return
    router._removed_experts = removed
    modes: list[_MaskedLogits | None] = []

    def enter(m: nn.Module, args: tuple) -> None:
        gone = m._removed_experts()
        mode = _MaskedLogits(gone, correction_bias(m)) if bool(gone.any()) else None
        modes.append(mode)
        if mode is not None:
            mode.__enter__()

    def leave(m: nn.Module, args: tuple, out: Any) -> None:
        mode = modes.pop() if modes else None
        if mode is not None:
            mode.__exit__(None, None, None)

    router.register_forward_pre_hook(enter)
    router.register_forward_hook(leave, always_call=True)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints without the removed experts

# What transformers' configs call the number of routed experts per MoE layer.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def removed_experts(targets: dict[str, Target]) -> dict[str, list[int]]:
    """Per fused experts module (by name), the experts every one of whose targets was removed."""
    out: dict[str, list[int]] = {}
    for u in expert_units(list(targets.values())):
        per_e: dict[int, list[bool]] = {}
        for t in u.targets:
            per_e.setdefault(t.index, []).append(t.constraint.dropped)
        gone = sorted(e for e, flags in per_e.items() if all(flags))
        if gone:
            out[u.name] = gone
    return out


def renamed_after_removal(targets: dict[str, Target]) -> dict[str, Target]:
    """The targets a checkpoint without the removed experts holds, by their names there (experts renumbered)."""
    gone = removed_experts(targets)
    out: dict[str, Target] = {}
    for name, t in targets.items():
        unit = name.rsplit(".", 2)[0] if t.index is not None else None
        if unit in gone:
            if t.index in gone[unit]:
                continue
            name = f"{unit}.{t.index - sum(e < t.index for e in gone[unit])}.{t.param}"
        out[name] = t
    return out


@contextmanager
def without_removed_experts(model: nn.Module, targets: dict[str, Target]) -> Iterator[None]:
    """The model with its removed experts really gone, for saving: every per-expert parameter and the router's
    rows sliced, the expert count in the modules and the config lowered. Restored on exit."""
    gone = removed_experts(targets)
    if not gone:
        yield
        return
    counts = {model.get_submodule(n).num_experts - len(g) for n, g in gone.items()}
    moe_layers = [n for n, m in model.named_modules() if expert_params(m)]
    if len(counts) != 1 or len(gone) != len(moe_layers):
        raise UserError(
            f"the MoE layers keep different numbers of experts ({sorted(counts)}), which one "
            f"config.json cannot describe; save needs expert_prune to remove as many from each layer"
        )
    undo: list[tuple[nn.Module, str, Any]] = []

    def swap(mod: nn.Module, attr: str, value: Any) -> None:
        undo.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, value)

    try:
        for name, g in gone.items():
            experts = model.get_submodule(name)
            e = experts.num_experts
            keep = torch.tensor([i for i in range(e) if i not in g], device=next(experts.parameters()).device)
            router = router_of(model, experts)
            for mod in (experts, router):
                if mod is None:
                    continue
                for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                    if p is not None and p.dim() >= 1 and p.shape[0] == e:
                        value = p.data.index_select(0, keep.to(p.device))
                        swap(
                            mod,
                            pname,
                            nn.Parameter(value, requires_grad=False) if isinstance(p, nn.Parameter) else value,
                        )
                if isinstance(getattr(mod, "num_experts", None), int):
                    swap(mod, "num_experts", e - len(g))
        config = getattr(model, "config", None)
        for key in EXPERT_COUNT_KEYS:
            if config is not None and isinstance(getattr(config, key, None), int):
                swap(config, key, next(iter(counts)))
                break
        yield
    finally:
        for mod, attr, old in reversed(undo):
            setattr(mod, attr, old)
