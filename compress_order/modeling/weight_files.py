"""A loaded model's weights where its safetensors files hold them: a checkpoint of a weight that still equals its
bytes on disk reads it back from there instead of keeping a copy in memory (the dense weights are the largest copy
an order sweep would otherwise hold). Each read maps the file only while one tensor is copied out of it, so it adds
one weight, for a moment, to the resident set."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import Tensor, nn

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class FileSpan:
    """One tensor of a safetensors file, with the file's size and time when indexed (a file rewritten since is
    refused, not read)."""

    path: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stamp: tuple[int, int]

    def _tensor(self) -> Tensor:
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise RuntimeError(f"{self.path} changed during the run: the dense weights it held are gone")
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(self.name)

    def read_into(self, out: Tensor) -> None:
        """The tensor's values into `out` (its dtype and shape)."""
        out.copy_(self._tensor())

    def equals(self, w: Tensor) -> bool:
        """Whether `w` holds exactly these bytes (bit for bit: -0.0 and NaN payloads included)."""
        if w.dtype != self.dtype or tuple(w.shape) != self.shape:
            return False
        t = self._tensor()
        return torch.equal(t.view(-1).view(torch.uint8), w.detach().reshape(-1).view(torch.uint8).cpu())


def safetensors_spans(folder: str) -> dict[str, FileSpan]:
    """Every tensor of the folder's *.safetensors files by its name (a dtype without a torch match is left out)."""
    spans: dict[str, FileSpan] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        st = os.stat(path)
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                if part.get_dtype() in DTYPES:
                    spans[name] = FileSpan(
                        path, name, DTYPES[part.get_dtype()], tuple(part.get_shape()), (st.st_size, st.st_mtime_ns)
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
