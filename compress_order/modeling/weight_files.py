"""A loaded model's weights where its safetensors files hold them: a checkpoint of a weight that still equals its
bytes on disk reads it back from there instead of keeping a copy in memory (the dense weights are the largest copy
an order sweep would otherwise hold). Reads go through the page cache into the weight itself, never through a
mapping, so they add nothing to the resident set."""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
CHUNK = 1 << 24  # bytes read at a time when comparing


@dataclass(frozen=True)
class FileSpan:
    """One tensor's bytes in a safetensors file, with the file's size and time when indexed (a file rewritten
    since is refused, not read)."""

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stamp: tuple[int, int]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    def _open(self):
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise RuntimeError(f"{self.path} changed during the run: the dense weights it held are gone")
        f = open(self.path, "rb", buffering=0)
        f.seek(self.offset)
        return f

    def read_into(self, out: Tensor) -> None:
        """The tensor's bytes into `out` (its dtype and shape), straight into its memory where it is a contiguous
        CPU tensor."""
        direct = out.device.type == "cpu" and out.is_contiguous()
        dst = out if direct else torch.empty(self.shape, dtype=self.dtype)
        buf = memoryview(dst.view(-1).view(torch.uint8).numpy()).cast("B")
        with self._open() as f:
            done = 0
            while done < len(buf):  # a read may return less than asked
                got = f.readinto(buf[done:])
                if not got:
                    raise RuntimeError(f"{self.path} ends inside a tensor")
                done += got
        if not direct:
            out.copy_(dst)

    def equals(self, w: Tensor) -> bool:
        """Whether `w` holds exactly these bytes (compared a chunk at a time)."""
        if w.dtype != self.dtype or tuple(w.shape) != self.shape:
            return False
        flat = w.detach().reshape(-1).view(torch.uint8)
        buf = torch.empty(min(CHUNK, self.nbytes), dtype=torch.uint8)
        with self._open() as f:
            for start in range(0, self.nbytes, CHUNK):
                part = buf[: min(CHUNK, self.nbytes - start)]
                if f.readinto(memoryview(part.numpy()).cast("B")) != part.numel():
                    return False
                if not torch.equal(part, flat[start : start + part.numel()].cpu()):
                    return False
        return True


def safetensors_spans(folder: str) -> dict[str, FileSpan]:
    """Every tensor of the folder's *.safetensors files by its name (a dtype without a torch match is left out)."""
    spans: dict[str, FileSpan] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        st = os.stat(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name == "__metadata__" or entry.get("dtype") not in DTYPES:
                continue
            start = 8 + n + entry["data_offsets"][0]
            spans[name] = FileSpan(
                path, start, DTYPES[entry["dtype"]], tuple(entry["shape"]), (st.st_size, st.st_mtime_ns)
            )
    return spans


def model_folder(model: nn.Module) -> str | None:
    """The local folder a Hugging Face model was loaded from (a hub id: its cached snapshot), else None."""
    where = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(where, str) or not where:
        return None
    if os.path.isdir(os.path.expanduser(where)):
        return os.path.expanduser(where)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(where, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    except Exception:  # noqa: BLE001  (not a hub id, or not cached: no files to read back)
        return None
