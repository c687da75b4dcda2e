"""Orthogonal matrices for rotating a residual stream: randomised Hadamard matrices and Haar-random rotations.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H/√n is orthogonal and spreads every input
coordinate evenly over all outputs (what makes outliers vanish after a rotation). Orders 2^k come from Sylvester's
doubling; others as H_m ⊗ H_{2^k} with H_m from Paley's constructions over a prime field:
  * Paley I, q prime, q ≡ 3 (mod 4): order q + 1, H = I + [[0, 1ᵀ], [−1, J]],
  * Paley II, q prime, q ≡ 1 (mod 4): order 2(q + 1), from the symmetric conference matrix [[0, 1ᵀ], [1, J]],
with J the Jacobsthal matrix J_ij = χ(j − i), χ the quadratic character mod q. That covers e.g. 12·2^k, 20·2^k,
28·2^k, 36·2^k (hidden sizes 576, 640, 896, 3072, 3584, 5120); other sizes raise ValueError naming them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> Tensor:
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> Tensor:
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron((c == 0).double(), zero)


def _base(m: int) -> Tensor | None:
    """A Hadamard matrix of order m from Paley's constructions (or the trivial orders 1 and 2), else None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    if _prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if _prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def hadamard_orders(n: int) -> tuple[int, int] | None:
    """(m, 2^k) with m · 2^k = n and a Hadamard matrix of order m constructible here, largest power first."""
    k = (n & -n).bit_length() - 1 if n > 0 else 0
    for j in range(k, -1, -1):
        m = n >> j
        if m in (1, 2) or (
            m % 4 == 0 and (_prime(m - 1) and (m - 1) % 4 == 3 or _prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1)
        ):
            return m, 1 << j
    return None


def hadamard(n: int) -> Tensor:
    """An orthogonal Hadamard matrix H/√n of order n (float64); ValueError when none is constructible here."""
    orders = hadamard_orders(n)
    if orders is None:
        raise ValueError(f"no Hadamard matrix of order {n} (constructible: m·2^k with m = 1, 2 or a Paley order)")
    m, p = orders
    h = _base(m)
    assert h is not None
    while h.shape[0] < n:  # Sylvester doubling: H ⊗ [[1, 1], [1, −1]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def random_signs(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


def randomized_hadamard(n: int, seed: int) -> Tensor:
    """diag(s) · H/√n with random signs s: orthogonal, and a different rotation per seed (QuaRot's choice)."""
    return random_signs(n, torch.Generator().manual_seed(seed))[:, None] * hadamard(n)


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A Haar-distributed orthogonal matrix: Q of the QR decomposition of a Gaussian matrix, columns' signs fixed
    by R's diagonal (without the fix the distribution is not uniform)."""
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]
