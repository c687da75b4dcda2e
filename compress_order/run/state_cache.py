"""A bounded on-disk cache of compressed states (weights + constraints) of trie nodes.

For large models a resumed run would otherwise re-apply a finished prefix (say GPTQ on a 7B model) just to
reach its unfinished children. With `state_cache.dir` set, the state after each inner node is saved by the
node's key and reloaded instead; the least recently used files are evicted beyond `state_cache.max_gb`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from compress_order.core.files import atomic_write
from compress_order.modeling.targets import Snapshot

log = logging.getLogger("compress_order.run.state_cache")


class StateCache:
    def __init__(self, root: str | Path | None, max_gb: float = 20.0):
        self.root = Path(root) if root else None
        self.max_bytes = int(max_gb * 2**30)

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{key}.pt"

    def load(self, key: str) -> Snapshot | None:
        if self.root is None or not self._path(key).is_file():
            return None
        path = self._path(key)
        os.utime(path)  # mark as recently used
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001  (torch raises many types for a torn or foreign file)
            # A cached state is only a shortcut: a damaged one is dropped and its prefix re-applied.
            log.warning(
                "state cache file %s is unreadable (%s: %s); recomputing that prefix",
                path,
                type(e).__name__,
                str(e).strip().splitlines()[0][:120] if str(e).strip() else "",
            )
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, snap: Snapshot) -> None:
        if self.root is None:
            return
        atomic_write(self._path(key), lambda tmp: torch.save(snap, tmp))
        self._evict(keep=self._path(key))

    def _evict(self, keep: Path) -> None:
        files = sorted(self.root.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for p in files:
            if total <= self.max_bytes:
                break
            if p != keep:
                total -= p.stat().st_size
                p.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return 0 if self.root is None else sum(p.stat().st_size for p in self.root.glob("*.pt"))
