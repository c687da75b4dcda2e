"""Expert pruning: remove a fraction of the experts of every MoE layer, scored on calibration tokens.

`criterion: frequency` removes the experts the router picks least often; `criterion: reap` those of least
router-weighted mean output norm, S_e = mean over the tokens routed to e of g_e(x)·‖f_e(x)‖₂ (REAP, Lasby et al.
2025). A removed expert is gone for every later stage: its weights are zero (mask all pruned), its router logit
is -inf so softmax and top-k run over the experts left (moe.mask_router), quantizers and pruners skip it, and a
saved checkpoint holds only the experts left. `expert_sparsity` is the share of each layer's experts removed in
total: after an earlier expert_prune only the difference is removed.
"""

from __future__ import annotations

from typing import Any

import torch

from compress_order.errors import UserError, choices
from compress_order.moe import ExpertUnit, Routing, mask_router, router_of, top_k_of
from compress_order.settings import SPARSITY
from compress_order.stages.base import Stage, set_pruned
from compress_order.targets import Target

CRITERIA = ("frequency", "reap")


class ExpertPrune(Stage):
    kind = "prune"
    needs = "routing"

    def __init__(self, expert_sparsity: float, criterion: str = "frequency", **kw: Any):
        """expert_sparsity: share of each MoE layer's experts removed, in [0, 1); criterion: frequency (least
        often routed to) | reap (least router-weighted mean output norm)."""
        super().__init__(**kw)
        SPARSITY.check(expert_sparsity, "expert_prune expert_sparsity")
        if criterion not in CRITERIA:
            raise UserError(f"expert_prune criterion={criterion} is unknown; valid: {choices(CRITERIA)}")
        self.expert_sparsity, self.criterion = float(expert_sparsity), criterion

    def validate(self, targets: dict[str, Target]) -> None:
        experts = [t for t in targets.values() if t.index is not None]
        if not experts:
            raise UserError(f"stage '{self.label}' removes experts, but the model has no MoE layer (fused experts "
                            f"module) among its targets; use it on a mixture-of-experts model")  # fmt: skip
        seen: set[int] = set()
        for t in experts:
            if id(t.module) in seen:
                continue
            seen.add(id(t.module))
            e = t.module.num_experts
            left = e - self.removed_count(e)
            config = getattr(t.module, "config", None)  # transformers' experts interface keeps the model config
            if config is not None and hasattr(config, "n_group"):
                raise UserError(f"stage '{self.label}': {type(t.module).__name__} is routed by grouped sigmoid scores "
                                f"with a correction bias, where masking removed experts is not yet exact; "
                                f"expert_prune supports softmax top-k routers (Mixtral, Qwen-MoE, OLMoE, GPT-OSS)")  # fmt: skip
            k = getattr(config, "num_experts_per_tok", None)
            if isinstance(k, int) and left < k:
                raise UserError(f"expert_prune expert_sparsity={self.expert_sparsity:g} leaves {left} of {e} experts "
                                f"in {t.name.rsplit('.', 2)[0]}, fewer than the router's top-k={k}")  # fmt: skip

    def removed_count(self, num_experts: int) -> int:
        return int(round(self.expert_sparsity * num_experts))

    def scores(self, routing: Routing) -> torch.Tensor:
        return routing.tokens.clone() if self.criterion == "frequency" else routing.reap()

    def compress_experts(self, unit: ExpertUnit, routing: Routing, block: torch.nn.Module) -> None:
        mod = unit.module
        router = router_of(block, mod)
        if router is None:
            raise UserError(f"stage '{self.label}': no router (a module with one weight row per expert) found beside "
                            f"{unit.name}")  # fmt: skip
        experts = {e: [t for by_e in unit.by_param.values() if (t := by_e.get(e)) is not None]
                   for e in range(mod.num_experts)}  # fmt: skip
        gone = [e for e, ts in experts.items() if ts and all(t.constraint.dropped for t in ts)]
        more = self.removed_count(mod.num_experts) - len(gone)
        if more > 0:
            score = self.scores(routing)
            alive = [e for e in range(mod.num_experts) if e not in gone]
            # lowest score first; ties (e.g. experts that saw no token) by index, so the choice is deterministic
            for e in sorted(alive, key=lambda e: (float(score[e]), e))[:more]:
                for t in experts[e]:
                    w = t.weight
                    set_pruned(t, w, torch.zeros_like(w, dtype=torch.bool), 1.0, None, self.label)
                    t.constraint.dropped = True
        targets = [t for ts in experts.values() for t in ts]

        def removed() -> torch.Tensor:
            flags = torch.zeros(mod.num_experts, dtype=torch.bool)
            for t in targets:
                flags[t.index] |= t.constraint.dropped
            return flags

        mask_router(router, removed)
