"""SLEB (Song et al., 2024): remove whole decoder blocks, chosen greedily on calibration data.

At each step every block left is tried out (the model run without it on the calibration samples) and the one
whose removal raises the next-token cross-entropy least is removed, until `blocks` are gone. The blocks are
really removed (ModelState.remove_blocks): the model has fewer layers, its config says so, the forward and a saved
checkpoint are that much smaller and faster with no kernel, and later stages see only the blocks left.

A structured pruner that keeps every earlier constraint (what is left is untouched), so it is feasible in every
order. The removed blocks' weights count as pruned: zeros in `sparsity`, removed in `coverage`, 0 bytes in
`size_bytes`; the rows' `blocks_removed` says how many, run_stats.json which.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress_order.core.errors import UserError
from compress_order.modeling.batches import model_forward
from compress_order.modeling.blocks import decoder_blocks
from compress_order.modeling.targets import ModelState, text_config
from compress_order.stages.base import Stage

log = logging.getLogger(__name__)


class Sleb(Stage):
    kind = "prune"
    needs = "loss"  # the model's loss on the calibration samples, from whole forwards
    whole_model = True
    model_kinds = ("causal_lm",)

    def __init__(self, blocks: float = 0.2, **kw: Any):
        """blocks: how many decoder blocks to remove: a count (a whole number ≥ 1) or a share of the blocks the
        model was loaded with (0 < blocks < 1, rounded to the nearest count, at least 1)."""
        super().__init__(**kw)
        bad = f"sleb blocks={blocks} is not a count (a whole number >= 1) or a share in (0, 1)"
        if isinstance(blocks, bool) or not isinstance(blocks, (int, float)) or not math.isfinite(blocks):
            raise UserError(bad)
        if blocks <= 0 or (isinstance(blocks, float) and blocks >= 1):
            raise UserError(bad)
        self.blocks = blocks

    def count(self, loaded: int) -> int:
        """Blocks to remove from a model loaded with `loaded` blocks."""
        return self.blocks if isinstance(self.blocks, int) else max(1, round(self.blocks * loaded))

    def model_checks(self) -> list[str]:
        return [*super().model_checks(), f"{self.label}: blocks={self.blocks} leaves at least one decoder block"]

    def _blocks(self, state: ModelState) -> nn.ModuleList:
        return decoder_blocks(state.model, state.targets, f"stage '{self.label}'")

    def validate_model(self, state: ModelState) -> None:
        n = len(self._blocks(state))
        k = self.count(n)
        if k >= n:
            raise UserError(
                f"sleb blocks={self.blocks} removes {k} of the model's {n} decoder blocks; at most {n - 1} "
                f"(or a share below {(n - 0.5) / n:.3g}) leave one"
            )
        step = getattr(text_config(state.model), "decoder_sparse_step", 1)
        if isinstance(step, int) and step > 1:
            raise UserError(
                f"stage '{self.label}': the config places MoE layers every {step} blocks (decoder_sparse_step), "
                f"which a model with blocks removed cannot keep; sleb needs decoder_sparse_step=1"
            )

    @torch.no_grad()
    def compress_model(self, state: ModelState, batches: list[Any] | None) -> None:
        if not batches:
            raise UserError(f"stage '{self.label}' needs calibration data but calibration.nsamples=0; set it >= 1")
        blocks = self._blocks(state)
        loaded = len(state.blocks.original) if state.blocks is not None else len(blocks)
        k = self.count(loaded)
        if k >= len(blocks):
            raise UserError(f"sleb blocks={self.blocks} removes {k} blocks; the model has {len(blocks)} left")
        for _ in range(k):
            losses = []
            for position in range(len(blocks)):
                with state.without_block(blocks, position):
                    losses.append(_loss(state.model, batches))
            best = min(range(len(losses)), key=lambda p: (losses[p], p))
            index = state.blocks.kept[best] if state.blocks is not None else best
            log.info("%s: removing block %d (calibration loss %.4f without it)", self.label, index, losses[best])
            state.remove_blocks(blocks, [best], self.label)


def _loss(model: nn.Module, batches: list[Any]) -> float:
    """Mean next-token cross-entropy over the calibration samples (token tensors)."""
    total, tokens = 0.0, 0
    for batch in batches:
        ids: Tensor = batch if isinstance(batch, Tensor) else batch["input_ids"]
        ids = ids.to(model.get_input_embeddings().weight.device)
        logits = model_forward(model, ids).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        tokens += ids[:, 1:].numel()
    return total / max(tokens, 1)
