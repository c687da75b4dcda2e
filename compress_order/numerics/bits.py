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
    """Sums of a tensor's raw bits (plain and position-weighted, int64, on the CPU): checkpoints compare it to
    catch a weight changed past Target.set_weight, which they would otherwise not have copied."""
    v = raw_bits(w).reshape(-1)
    total = torch.zeros(2, dtype=torch.int64, device=v.device)
    step = 1 << 22  # int64 temporaries of a chunk, not of a whole layer
    for start in range(0, v.numel(), step):
        part = v[start : start + step].to(torch.int64)
        pos = torch.arange(start + 1, start + part.numel() + 1, device=v.device, dtype=torch.int64) % 65521
        total[0] += part.sum()
        total[1] += (part * pos).sum()
    return total.cpu()
