"""Layer-input statistics for calibrated stages: H = 2/n Σ xᵀx over the n input rows a layer has seen.

Columns match the stage's 2-D weight view (out, in·kh·kw): a Linear sees its last input dimension, a Conv2d
the unfolded patches of its input. Wanda needs only diag(H) = 2/n ‖X_j‖², SparseGPT and GPTQ the full matrix.
Everything is accumulated in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress_order.modeling.targets import Target


def layer_columns(module: nn.Module, inp: Tensor) -> Tensor:
    """The layer's input as rows of the weight's column space: (n, in) for Linear and Conv1D, (n, in·kh·kw) for
    Conv2d."""
    if isinstance(module, nn.Conv2d):
        if inp.dim() == 3:  # unbatched (C, H, W)
            inp = inp.unsqueeze(0)
        pad = module.padding
        if isinstance(pad, str):  # 'valid' or 'same' (odd kernels: symmetric padding)
            same = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
            pad = (0, 0) if pad == "valid" else same
        patches = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=pad, stride=module.stride)
        g = module.groups
        # (B, C·kh·kw, L) -> (B·g·L, C/g·kh·kw): with groups every group's patches are extra samples of the
        # shared column space of weight.flatten(1) (an average over groups, exact when groups == 1).
        b, ck, length = patches.shape
        return patches.reshape(b, g, ck // g, length).permute(0, 1, 3, 2).reshape(-1, ck // g)
    return inp.reshape(-1, inp.shape[-1])


ROW_BLOCK = 256  # columns per block row of H's accumulation


class HessianStats:
    """Running H = 2/n Σ xᵀx (or just its diagonal) of one layer's inputs; `add_batch` from a forward hook."""

    def __init__(self, target: Target | nn.Module, device: torch.device | str | None = None, diag_only: bool = False):
        if isinstance(target, nn.Module):  # a layer's own .weight
            target = Target("", target)
        self.module = target.module
        self.cols = target.shape[1]  # columns of the stages' view (a Conv1D stores its weight transposed)
        self.device = torch.device(device) if device is not None else target.device
        self.diag_only = diag_only
        self.n = 0  # input rows (tokens, or conv patches) seen so far
        self._h: Tensor | None = None
        self._d: Tensor | None = None
        self._u: dict[tuple[float, torch.device], Tensor] = {}  # damped_inverse_cholesky, per damping and device
        self._mirrored = True  # whether H's lower blocks hold the upper ones' transpose (add_batch writes above)
        # Per-column max and mean of |x|: what input-rescaling stages (SmoothQuant, AWQ) read, at O(n·in) cost.
        self.absmax = torch.zeros(self.cols, dtype=torch.float32, device=self.device)
        self._abssum = torch.zeros(self.cols, dtype=torch.float32, device=self.device)
        if diag_only:
            self._d = torch.zeros(self.cols, dtype=torch.float32, device=self.device)
        else:
            self._h = torch.zeros(self.cols, self.cols, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def add_batch(self, inp: Tensor) -> None:
        x = layer_columns(self.module, inp.detach()).to(self.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        a = x.abs()
        torch.maximum(self.absmax, a.amax(0), out=self.absmax)
        self._abssum.add_(a.sum(0))
        del a
        # Rescale the old mean before adding, so H stays an average (no overflow over many samples).
        keep = self.n / total
        if self.diag_only:
            self._d.mul_(keep).add_(x.square().sum(0), alpha=2.0 / total)
        else:
            # H is symmetric: only the block rows' upper parts are accumulated (about (1 + 1/k)/2 of the
            # products with k block rows), the rest mirrored when H is read.
            x = x * math.sqrt(2.0 / total)
            for a0 in range(0, self.cols, ROW_BLOCK):
                a1 = min(a0 + ROW_BLOCK, self.cols)
                self._h[a0:a1, a0:].mul_(keep).addmm_(x[:, a0:a1].T, x[:, a0:])
            self._mirrored = self.cols <= ROW_BLOCK
        self.n = total
        self._u.clear()

    @property
    def H(self) -> Tensor:
        if self._h is None:
            raise RuntimeError("these statistics keep only the diagonal of H (diag_only=True)")
        if not self._mirrored:  # the blocks below the diagonal ones from those above
            for a0 in range(0, self.cols, ROW_BLOCK):
                a1 = min(a0 + ROW_BLOCK, self.cols)
                self._h[a1:, a0:a1] = self._h[a0:a1, a1:].T
            self._mirrored = True
        return self._h

    def diag(self) -> Tensor:
        """2/n ‖X_j‖² per input column."""
        return self._d if self._h is None else self._h.diagonal()

    def absmean(self) -> Tensor:
        """mean |x_j| per input column over every input row seen."""
        return self._abssum / max(self.n, 1)

    def inverse_cholesky(self, percdamp: float, device: torch.device | str | None = None) -> Tensor:
        """`damped_inverse_cholesky(H, percdamp)` on `device`, factored once for all the layers sharing these
        statistics (q, k and v; gate and up) and the same damping."""
        dev = torch.device(device) if device is not None else self.H.device
        key = (float(percdamp), dev)
        if key not in self._u:
            self._u[key] = damped_inverse_cholesky(self.H.to(dev), percdamp)
        return self._u[key]

    def free(self) -> None:
        self._h = self._d = None
        self._u.clear()


def damped_inverse_cholesky(H: Tensor, percdamp: float, tries: int = 6) -> Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp · mean(diag H); U's rows drive the OBS updates.

    Dead inputs (never non-zero in calibration) get H_jj = 1 so the inverse exists; their rows and columns of H
    are zero, so they neither send nor receive error feedback. If the damped H is still not positive definite
    (rank-deficient X in float32), λ grows tenfold, a few times.

    Without forming H⁻¹: with J the reversal permutation and JHJ = LLᵀ, U = J L⁻¹ J is upper triangular with a
    positive diagonal and UᵀU = J (LLᵀ)⁻¹ J = H⁻¹, so it is H⁻¹'s Cholesky factor: one factorization and one
    triangular inverse instead of a factorization, an inverse and a second factorization.
    """
    H = H.detach().to(torch.float32).flip(0, 1)  # a copy, reversed: JHJ
    d = H.diagonal()
    d[d == 0] = 1.0
    lam = percdamp * float(d.mean())
    if lam <= 0:
        lam = 1e-8 * float(d.mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            U = lower_inverse(L).flip(0, 1)
            if bool(torch.isfinite(U).all()):
                return U
        lam *= 10
    raise RuntimeError(f"the damped Hessian ({H.shape[0]} columns) is not positive definite even with damping {lam:g}")


def lower_inverse(L: Tensor, leaf: int = 128) -> Tensor:
    """Inverse of a lower-triangular L by halves, [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹CA⁻¹, D⁻¹]]: the work in
    matrix products (a triangular solve against the identity costs 1.5x the flops, at lower speed)."""
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    h = n // 2
    A, D = lower_inverse(L[:h, :h], leaf), lower_inverse(L[h:, h:], leaf)
    out = torch.zeros_like(L)
    out[:h, :h] = A
    out[h:, h:] = D
    out[h:, :h] = -(D @ (L[h:, :h] @ A))
    return out
