"""Bool tensors packed eight to a byte, integer codes two to a byte, and floats by their raw bits: the exact,
compact forms checkpoints keep."""

from __future__ import annotations

import torch
from torch import Tensor

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as bits, eight to a byte (flat uint8, row-major): what `unpack_bits` turns back."""
    flat = mask.reshape(-1).to(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    flat = flat.view(-1, 8)
    out = flat[:, 0].clone()
    for i in range(1, 8):
        out |= flat[:, i] << i
    return out


def unpack_bits(bits: Tensor, shape: tuple[int, ...] | torch.Size, device: torch.device | str) -> Tensor:
    """The bool tensor of `shape` that `pack_bits` packed, on `device`."""
    n = 1
    for d in shape:
        n *= d
    bits = bits.to(device)
    out = torch.empty((bits.numel(), 8), dtype=torch.bool, device=device)
    for i in range(8):  # one bool column per bit: no uint8 temporary of the unpacked size
        torch.ne(bits & (1 << i), 0, out=out[:, i])
    return out.reshape(-1)[:n].reshape(shape)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes in [0, 2^bits) as flat uint8: two to a byte (low nibble first) for bits <= 4, else one each."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits > 4:
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_codes(packed: Tensor, bits: int, count: int) -> Tensor:
    """The first `count` codes that `pack_codes` packed with `bits`, as flat uint8."""
    if bits > 4:
        return packed[:count]
    out = torch.empty((packed.numel(), 2), dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 15, out=out[:, 0])
    torch.bitwise_right_shift(packed, 4, out=out[:, 1])
    return out.reshape(-1)[:count]


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)  # set bits of each byte


def count_bits(bits: Tensor) -> Tensor:
    """How many bits are set in packed bits (a bool mask's count_nonzero; the padding is zeros), as a 0-d int64
    tensor on their device."""
    return (torch.bincount(bits.reshape(-1), minlength=256) * _POPCOUNT.to(bits.device)).sum()


def raw_bits(w: Tensor) -> Tensor:
    """A float tensor's raw bits as integers of its width (bit-exact comparisons: -0.0 is not 0.0, NaN is itself)."""
    return w.contiguous().view(_INT_OF_WIDTH[w.element_size()])


def fingerprint(w: Tensor) -> Tensor:
    """Sums of a tensor's raw bits (all, and weighted by row and by column position; int64, on the CPU): checkpoints
    compare it to catch a weight changed past Target.set_weight, which they would otherwise not have copied. Any
    one entry changed, or two swapped, changes it. Row and column sums accumulate in int64 as they read, with no
    int64 copy of the tensor (a third of the time of summing one)."""
    x = raw_bits(w)
    x = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    rows, cols = x.sum(1, dtype=torch.int64), x.sum(0, dtype=torch.int64)
    r = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=x.device)
    c = torch.arange(1, cols.numel() + 1, dtype=torch.int64, device=x.device)
    return torch.stack([rows.sum(), (rows * r).sum(), (cols * c).sum()]).cpu()
