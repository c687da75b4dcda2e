"""Which of the model's weight matrices the stages compress: nothing is left dense without saying so.

A weight matrix is every parameter with two or more dimensions, except biases (transformers keeps fused experts'
biases as (E, out)) and embeddings (nn.Embedding tables, and parameters with a leading dimension of 1 that are
added to activations: ViT's position embedding and class token). A fused experts parameter counts as its E
experts. Each one is a target (targets.py), skipped on purpose (a `model.skip` regex matches its name), or
uncovered: then the run stops before any work, naming the largest such tensors and how to skip them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compress_order.core.errors import UserError
from compress_order.modeling.targets import COMPRESSIBLE, Target, expert_params, find_targets, is_skipped


@dataclass(frozen=True)
class Matrix:
    name: str  # the name a target or a `model.skip` regex uses: the module's, or `<experts>.<e>.<param>`
    owner: str  # class of the module holding it
    numel: int


def weight_matrices(model: nn.Module) -> list[Matrix]:
    """The model's weight matrices (see the module docstring), each once (tied parameters too)."""
    seen: set[int] = set()
    out: list[Matrix] = []
    for mname, mod in model.named_modules():
        experts = expert_params(mod)
        for pname, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            additive = p.shape[0] == 1 and not isinstance(mod, COMPRESSIBLE)  # (1, N, D) added to activations
            if p.dim() < 2 or pname.endswith("bias") or isinstance(mod, nn.Embedding) or additive:
                continue
            cls = type(mod).__name__
            if pname in experts:
                out += [Matrix(f"{mname}.{e}.{pname}", cls, p[e].numel()) for e in range(p.shape[0])]
            else:
                out.append(Matrix(mname if pname == "weight" else f"{mname}.{pname}".lstrip("."), cls, p.numel()))
    return out


@dataclass
class Coverage:
    """The model's weight matrices split into compressed targets and those `model.skip` leaves dense."""

    targeted: int = 0  # elements
    skipped: list[Matrix] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.targeted + sum(m.numel for m in self.skipped)

    def line(self, compressed: float | None = None) -> str:
        """One line for the summary: what was compressed, and what stays dense on purpose."""
        share = f"{compressed:.1%}" if compressed is not None else "100%"
        groups: dict[str, list[Matrix]] = {}
        for m in self.skipped:
            groups.setdefault(m.owner, []).append(m)
        left = "; ".join(
            f"{len(ms)} {cls} ({sum(m.numel for m in ms) / self.total:.1%})"
            for cls, ms in sorted(groups.items(), key=lambda kv: -sum(m.numel for m in kv[1]))
        )
        return (
            f"coverage: {share} of the {self.targeted:,} weights the stages target are compressed in the full "
            f"orders; the targets are {self.targeted / self.total:.1%} of the model's weight-matrix elements "
            f"(embeddings and biases excluded)" + (f"; left dense by model.skip: {left}" if left else "")
        )


def check_coverage(model: nn.Module, targets: dict[str, Target], skip: list[str] | tuple[str, ...]) -> Coverage:
    """Every weight matrix is a target or skipped; else a UserError naming the largest uncovered ones."""
    cov = Coverage()
    uncovered: list[Matrix] = []
    for m in weight_matrices(model):
        if m.name in targets:
            cov.targeted += m.numel
        elif is_skipped(m.name, skip):
            cov.skipped.append(m)
        else:
            uncovered.append(m)
    if uncovered:
        total = cov.total + sum(m.numel for m in uncovered)
        uncovered.sort(key=lambda m: -m.numel)
        by_cls: dict[str, int] = {}
        for m in uncovered:
            by_cls[m.owner] = by_cls.get(m.owner, 0) + m.numel
        largest = ", ".join(f"{m.name} ({m.owner})" for m in uncovered[:3])
        kinds = ", ".join(f"{c} {n / total:.1%}" for c, n in sorted(by_cls.items(), key=lambda kv: -kv[1]))
        raise UserError(
            f"{len(uncovered)} weight matrices of {type(model).__name__} are not layers any stage can compress "
            f"({kinds} of its weight-matrix elements), largest: {largest}; to leave them dense on purpose add a "
            f"regex to model.skip, e.g. \"model.skip=[lm_head,'{_suggest(uncovered[0].name)}']\""
        )
    return cov


def _suggest(name: str) -> str:
    """A skip regex for every layer like `name` (its last component, in any block)."""
    parts = name.split(".")
    tail = parts[-1] if not parts[-1].isdigit() else ".".join(parts[-2:])
    return rf"\.{tail}$" if len(parts) > 1 else rf"^{tail}$"


def load_targets(model: nn.Module, skip: list[str] | tuple[str, ...]) -> tuple[dict[str, Target], Coverage]:
    """The model's targets, checked to cover every weight matrix that `skip` does not leave dense."""
    targets = find_targets(model, skip)
    return targets, check_coverage(model, targets, skip)


def compressed(t: Target, kept: int | None = None) -> bool:
    """Whether a target holds anything compressed: weights on a quantization grid, at least one weight pruned, or
    the whole matrix removed (an expert). A stage that only transforms (smoothquant rescales input channels) leaves
    its layers uncompressed, so a node of transforms alone claims no coverage. `kept`: the mask's kept weights,
    when already counted."""
    c = t.constraint
    if c.dropped or c.grid is not None or c.packed_mask is None:
        return c.dropped or c.grid is not None
    return (int(c.kept()) if kept is None else kept) < t.stored.numel()  # type: ignore[arg-type]


def compressed_share(targets: dict[str, Target], kept: dict[str, int] | None = None) -> float:
    """The share of the targets' weights that the node's stages compressed (the node's `coverage` metric): what
    `compressed` says of each target, not which stages ran on it. `kept`: each target's kept weights, if counted."""
    kept = kept or {}
    sizes = {n: t.shape[0] * t.shape[1] for n, t in targets.items()}
    total = sum(sizes.values())
    done = sum(sizes[n] for n, t in targets.items() if compressed(t, kept.get(n)))
    return done / total if total else 0.0
