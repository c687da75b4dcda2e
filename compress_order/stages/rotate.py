"""Rotate: an orthogonal rotation of the residual stream fused into the weights (QuaRot's first half; a quantizer
after it is the second). A transform: the model computes the same function (checked on a probe input), while
outliers of the stream's channels are spread over all of them, so weights and activations round with less error.

Q is a randomised Hadamard matrix diag(±1)·H/√n (`matrix: hadamard`, numerics/hadamard.py), or a Haar-random
orthogonal matrix (`matrix: random`, any width), drawn from the stage's own `seed`. `heads: true` also rotates
every value head and the o_proj columns that read it. `online: true` adds QuaRot's rotation of down_proj's input
at run time (x ← x·H by a pre-hook, before activation quantization sees it; W_down ← W_down·H): what `act_bits`
needs, and a model no saved checkpoint here can express (save refuses it). The fused layers are
modeling/rotation.py's.

Order: rotating a layer that is already pruned or on a grid would refill its zeros and move it off the grid, so
rotate after a pruner or quantizer is infeasible (reported, not run). After sleb or expert_prune it is feasible:
what was removed stays removed (a removed expert's zero weights rotate to zeros). Tied embeddings are untied
(the final norm's γ folds into lm_head alone): size_bytes counts the second copy, as a deployment of it would.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn

from compress_order.core.errors import UserError
from compress_order.modeling.act import paused as act_paused
from compress_order.modeling.batches import model_forward
from compress_order.modeling.blocks import decoder_blocks
from compress_order.modeling.rotation import SUPPORTED, Along, online_sites, residual_map, rotate_along, rotate_residual
from compress_order.modeling.targets import ModelState, Target
from compress_order.numerics.hadamard import hadamard_orders, random_orthogonal, randomized_hadamard
from compress_order.stages.base import Stage

log = logging.getLogger(__name__)
PROBE_TOKENS = 32
PROBE_TOLERANCE = 1e-4  # relative change of the probe's logits, computed in float32


class Rotate(Stage):
    kind = "transform"
    whole_model = True
    rewrites_all = True  # embeddings and lm_head change too: snapshots keep every parameter
    model_kinds = ("causal_lm",)

    def __init__(
        self,
        matrix: Literal["hadamard", "random"] = "hadamard",
        heads: bool = False,
        online: bool = False,
        seed: int = 0,
        **kw: Any,
    ):
        """matrix: hadamard (randomised Hadamard, QuaRot) | random (Haar-random orthogonal, any width);
        heads: also rotate each value head and o_proj's matching columns; seed: draws the random signs / matrix."""
        super().__init__(**kw)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"rotate seed={seed} must be an integer")
        self.matrix, self.heads, self.online, self.seed = matrix, heads, online, seed

    @classmethod
    def unsavable(cls, params: dict[str, Any]) -> str | None:
        if params.get("online"):
            return (
                "rotate online=true applies a Hadamard to down_proj's input at run time, which no checkpoint format "
                "written here expresses (a saved model would compute something else); save without online"
            )
        return None

    def model_checks(self) -> list[str]:
        return [
            *super().model_checks(),
            f"{self.label}: the model is an RMSNorm decoder whose residual stream it can rotate ({SUPPORTED})",
            f"{self.label}: a {self.matrix} matrix exists for the hidden size"
            + (" and head width" if self.heads else ""),
        ]

    def _blocks(self, state: ModelState) -> nn.ModuleList:
        return decoder_blocks(state.model, state.targets, f"stage '{self.label}'")

    def _rotation(self, n: int, seed: int, what: str) -> Tensor:
        if self.matrix == "random":
            return random_orthogonal(n, seed)
        if hadamard_orders(n) is None:
            raise UserError(
                f"stage '{self.label}': no Hadamard matrix of order {n} (the {what}) is known here (orders m·2^k, m "
                f"from Paley's constructions: 12, 20, 28, 36, 44, 60, ...); use matrix=random"
            )
        return randomized_hadamard(n, seed)

    def validate_model(self, state: ModelState) -> None:
        rmap = residual_map(state.model, self._blocks(state), heads=self.heads)
        self._rotation(rmap.hidden, self.seed, "hidden size")
        if self.heads:
            self._rotation(rmap.values[0][1], self.seed + 1, "head width")
        if self.online:
            sites = online_sites(state.model, self._blocks(state))
            self._rotation(next(iter(sites.values())).in_features, self.seed + 2, "intermediate size")

    def feasible(self, targets: dict[str, Target]) -> str | None:
        done = next(
            (
                t
                for t in targets.values()
                if not t.constraint.dropped and (t.constraint.mask is not None or t.constraint.grid is not None)
            ),
            None,
        )
        if done is None:
            return None
        return (
            f"{self.label} after {' > '.join(done.constraint.applied)}: rotating a pruned or quantized layer "
            f"({done.name}) would refill its zeros and move it off its grid; rotate first, or after sleb/expert_prune"
        )

    @torch.no_grad()
    def compress_model(self, state: ModelState, batches: list[Any] | None) -> None:
        model = state.model
        dtype = model.get_input_embeddings().weight.dtype
        # Rotated and checked in float32 at least: in 16 bits the check could not tell a layer left unrotated
        # (a change of ~1% on a random model) from rounding, nor a router's flipped choices from an error. The
        # model takes its float32 size meanwhile, then is rounded back to its dtype once.
        wide = dtype in (torch.float32, torch.float64)
        if not wide:
            model.float()
        before = _probe_logits(model)
        state.untie()  # the final norm's γ folds into lm_head, not into the embedding
        rmap = residual_map(model, self._blocks(state), heads=self.heads)
        q = self._rotation(rmap.hidden, self.seed, "hidden size")
        head_q = self._rotation(rmap.values[0][1], self.seed + 1, "head width") if self.heads else None
        rotate_residual(rmap, q, head_q)
        if self.online:  # x ← x·H before each down_proj at run time, W ← W·H: the product is unchanged
            if state.online is not None:
                raise UserError(f"stage '{self.label}': the model already holds an online rotation")
            sites = online_sites(model, self._blocks(state))
            h = self._rotation(next(iter(sites.values())).in_features, self.seed + 2, "intermediate size")
            for down in sites.values():
                rotate_along(Along(down.weight.data, 1), h)
            state.set_online((h.float(), tuple(sites)))
        change = float((_probe_logits(model) - before).norm() / before.norm().clamp_min(1e-12))
        if not wide:
            model.to(dtype)
        log.info("%s: rotated the residual stream (%s, width %d)", self.label, self.matrix, rmap.hidden)
        if not change <= PROBE_TOLERANCE:
            raise UserError(
                f"stage '{self.label}' changed {type(model).__name__}'s output by {change:.3g} (relative, in float32; "
                f"rounding stays below {PROBE_TOLERANCE:g}): its structure is not one rotate knows (supported: "
                f"{SUPPORTED})"
            )
        for t in state.targets.values():
            if not t.constraint.dropped:
                t.constraint.applied.append(self.label)


def _probe_logits(model: torch.nn.Module) -> Tensor:
    """The model's logits on a fixed token sequence (the same before and after the rotation)."""
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, emb.shape[0], (1, PROBE_TOKENS), generator=g).to(emb.device)
    with act_paused():  # static activation ranges were observed before the rotation
        return model_forward(model, ids).logits.float()
