"""File writes that readers never see half done, and the probes that tell whether a folder takes them.

Results, store records, cached states and checkpoints are shared (collaborators read a sweep on a cluster
filesystem while it runs): each is written beside its destination and renamed into place; a writer that died is
told apart from a live one by its pid.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

from compress_order.core.errors import UserError


def file_mode() -> int:
    """The mode a new ordinary file gets under the current umask (mkstemp's temp files are 0600, but results are
    shared: collaborators read a sweep on a cluster filesystem). Linux reports the umask without changing it."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        mask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder and rename: readers never see a half-written file."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, file_mode())
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"disk full while writing {path}; free space or set hydra.run.dir / store_dir elsewhere"
            ) from None
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(
                f"cannot write {path} ({e.strerror}); choose a writable hydra.run.dir / store_dir"
            ) from None
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (a writer or claimer that died left its files behind)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def check_writable(path: str, what: str) -> None:
    """Create and write a probe file in the folder (or its first existing ancestor, where it will be created).

    `os.access` says yes to root on any mounted filesystem (read-only, /proc, full disks), so only a real write
    tells whether results can be written there."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{what} '{path}' is not writable ({p} is a file, not a folder); choose another folder")
    try:
        with tempfile.NamedTemporaryFile(dir=p, prefix=".compress-order-probe-") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{what} '{path}': the disk is full (checked {p}); free space or choose another folder"
            ) from None
        raise UserError(f"{what} '{path}' is not writable (checked {p}: {e.strerror}); choose another folder") from None
