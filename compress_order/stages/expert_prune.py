"""Expert pruning: remove a fraction of the experts of every MoE layer, scored on calibration tokens.

`criterion: frequency` removes the experts the router picks least often; `criterion: reap` those of least
router-weighted mean output norm, S_e = mean over the tokens routed to e of g_e(x)·‖f_e(x)‖₂ (REAP, Lasby et al.
2025). A removed expert is gone for every later stage: its weights are zero (mask all pruned), its router logit
is -inf so softmax and top-k run over the experts left (moe.mask_router), quantizers and pruners skip it, and a
saved checkpoint holds only the experts left. `expert_sparsity` is the share of each layer's experts removed in
total: after an earlier expert_prune only the difference is removed.

Routers that first choose groups of consecutive experts (DeepSeek-V3: the groups with the best two biased
sigmoid scores, then the top-k inside them) lose the same number of experts from every group, the lowest-scored
of each: a checkpoint keeps its `n_group` only if every group keeps the same size, and a group must keep two
experts for its score to exist.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from compress_order.core.errors import UserError
from compress_order.core.specs import SPARSITY
from compress_order.modeling.moe import ExpertUnit, Routing, mask_router, router_of
from compress_order.modeling.targets import Target
from compress_order.stages.base import Stage, set_pruned


class ExpertPrune(Stage):
    kind = "prune"
    needs = "routing"

    def __init__(self, expert_sparsity: float, criterion: Literal["frequency", "reap"] = "frequency", **kw: Any):
        """expert_sparsity: share of each MoE layer's experts removed, in [0, 1); criterion: frequency (least
        often routed to) | reap (least router-weighted mean output norm)."""
        super().__init__(**kw)
        SPARSITY.check(expert_sparsity, "expert_prune expert_sparsity")
        self.expert_sparsity, self.criterion = float(expert_sparsity), criterion

    def model_checks(self) -> list[str]:
        return [
            *super().model_checks(),
            f"{self.label}: the model has MoE layers",
            f"{self.label}: expert_sparsity={self.expert_sparsity:g} leaves every MoE layer its router's top-k experts",
        ]

    def validate(self, targets: dict[str, Target]) -> None:
        experts = [t for t in targets.values() if t.index is not None]
        if not experts:
            raise UserError(
                f"stage '{self.label}' removes experts, but the model has no MoE layer (fused experts "
                f"module) among its targets; use it on a mixture-of-experts model"
            )
        seen: set[int] = set()
        for t in experts:
            if id(t.module) in seen:
                continue
            seen.add(id(t.module))
            unit, e = t.name.rsplit(".", 2)[0], t.module.num_experts
            config = getattr(t.module, "config", None)  # transformers' experts interface keeps the model config
            groups = _config_groups(config)
            per_group = e // groups[0] if groups else e
            left = per_group - self.removed_count(per_group)
            k = getattr(config, "num_experts_per_tok", None)
            # the fewest experts a layer (or each router group) must keep, and the largest share that keeps them
            top_k = k if isinstance(k, int) else 1
            keep = max(2, -(-top_k // groups[1])) if groups else top_k  # a group scores with 2; ceil(k / groups)
            largest = f"the largest expert_sparsity that works here is {max(per_group - keep, 0) / per_group:g}"
            if groups and left < 2:
                raise UserError(
                    f"expert_prune expert_sparsity={self.expert_sparsity:g} leaves {left} of the "
                    f"{per_group} experts of each of the {groups[0]} router groups in {unit}; a group "
                    f"needs 2 for its score ({largest})"
                )
            reachable = groups[1] * left if groups else left  # the experts a token can still be routed to
            if isinstance(k, int) and reachable < k:
                where = (
                    f"{reachable} experts in the {groups[1]} router group(s) a token is sent to"
                    if groups
                    else f"{left} of {e} experts"
                )
                raise UserError(
                    f"expert_prune expert_sparsity={self.expert_sparsity:g} leaves {where} in {unit}, "
                    f"fewer than the router's top-k={k} ({largest})"
                )

    def removed_count(self, num_experts: int) -> int:
        """Experts removed from `num_experts` (a layer's, or one router group's)."""
        return int(round(self.expert_sparsity * num_experts))

    def scores(self, routing: Routing) -> torch.Tensor:
        return routing.tokens.clone() if self.criterion == "frequency" else routing.reap()

    def compress_experts(self, unit: ExpertUnit, routing: Routing, block: torch.nn.Module) -> None:
        mod = unit.module
        router = router_of(block, mod)
        if router is None:
            raise UserError(
                f"stage '{self.label}': no router (a module with one weight row per expert) found beside {unit.name}"
            )
        experts = {
            e: [t for by_e in unit.by_param.values() if (t := by_e.get(e)) is not None] for e in range(mod.num_experts)
        }
        gone = {e for e, ts in experts.items() if ts and all(t.constraint.dropped for t in ts)}
        groups = _config_groups(getattr(mod, "config", None))
        size = mod.num_experts // groups[0] if groups else mod.num_experts
        score = self.scores(routing)
        for start in range(0, mod.num_experts, size):  # the whole layer, or each router group alike
            members = range(start, start + size)
            more = self.removed_count(size) - sum(e in gone for e in members)
            alive = [e for e in members if e not in gone]
            # lowest score first; ties (e.g. experts that saw no token) by index, so the choice is deterministic
            for e in sorted(alive, key=lambda e: (float(score[e]), e))[: max(more, 0)]:
                for t in experts[e]:
                    w = t.weight
                    set_pruned(t, w, torch.zeros_like(w, dtype=torch.bool), 1.0, None, self.label)
                    t.constraint.dropped = True
        targets, count = [t for ts in experts.values() for t in ts], mod.num_experts

        def removed() -> torch.Tensor:  # by the experts the module was built with (a save slices them for a while)
            flags = torch.zeros(count, dtype=torch.bool)
            for t in targets:
                flags[t.index] |= t.constraint.dropped
            return flags

        mask_router(router, removed)


def _config_groups(config: Any) -> tuple[int, int] | None:
    """(groups, groups kept per token) from a model config whose router picks groups of experts first."""
    g, kept = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    return (g, kept) if isinstance(g, int) and isinstance(kept, int) and g > 1 else None
