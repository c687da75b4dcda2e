"""The node store: finished nodes by key, shared by every run and every job of a sweep.

One JSON file a node, written atomically (a reader never sees half a record) with a schema version and a
checksum; a record that fails either on read is moved to `quarantine/` with a warning and its node recomputed.

Jobs running at the same time (a joblib or Slurm sweep) share the store without computing a node twice: before
evaluating a node a job *claims* it by creating `<key>.claim` exclusively (O_EXCL), holding its host, pid and
start time; a heartbeat thread touches the claims it holds. Another job that finds the claim goes on with other
nodes and picks the record up at the end; a claim whose owner died (same host, pid gone) or whose heartbeat
stopped for `claim_timeout` seconds (another host) is stale and taken over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from compress_order.core.errors import UserError
from compress_order.core.files import pid_alive, write_text
from compress_order.core.schema import RECORD_VERSION, NodeRecord
from compress_order.core.schema import record_problem as schema_problem

QUARANTINE = "quarantine"
T = TypeVar("T")
log = logging.getLogger("compress_order.run.store")


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def record_problem(record: Any) -> str | None:
    """Why a stored record cannot be trusted (None: it can): schema first, then the checksum written with it."""
    why = schema_problem(record)
    if why is None and record["checksum"] != _checksum(record):
        return "checksum mismatch (the file was changed after it was written)"
    return why


Status = Literal["stored", "claimed", "busy"]


class NodeStore:
    """Finished nodes by key (a NodeRecord with its version and checksum) and claims on nodes in flight.

    `clock` and `sleep` (wall-clock seconds) decide when a claim is stale and how long `wait` pauses: a test passes
    a fake pair, so that whether a node is waited for or taken over never depends on how loaded the machine is.
    `beat`: a thread calls `heartbeat` while claims are held (a test without it calls `heartbeat` itself)."""

    def __init__(
        self,
        root: str | Path | None,
        claim_timeout: float = 120.0,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        host: str | None = None,
        beat: bool = True,
    ):
        self.root = Path(root) if root else None
        self.claim_timeout = float(claim_timeout)
        self.clock, self.sleep, self.beat = clock, sleep, beat
        self.host = host or socket.gethostname()
        self._held: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def _claim_path(self, key: str) -> Path:
        return self._path(key).with_suffix(".claim")

    # --- records
    def has(self, key: str) -> bool:
        """A record file exists (validated only when read with `get`)."""
        return self.root is not None and self._path(key).is_file()

    def get(self, key: str) -> NodeRecord | None:
        if self.root is None:
            return None
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            record = json.loads(p.read_bytes().decode("utf-8"))
            why = record_problem(record)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = f"not JSON ({type(e).__name__})"
        except FileNotFoundError:  # quarantined by a parallel job between the check and the read
            return None
        except OSError as e:
            raise UserError(f"cannot read store record {p} ({e.strerror}); check store_dir") from None
        if why is None:
            return NodeRecord.from_json(record)
        self.quarantine(p, why)
        return None

    def quarantine(self, path: Path, why: str) -> Path:
        assert self.root is not None
        dest = self.root / QUARANTINE / f"{path.name}.{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%f')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, dest)
        except FileNotFoundError:  # a parallel job moved it first
            pass
        log.warning("store record %s is damaged (%s): moved to %s; the node is recomputed", path, why, dest)
        return dest

    def put(self, key: str, node: NodeRecord) -> None:
        if self.root is not None:
            record = {**node.to_json(), "version": RECORD_VERSION}
            record["checksum"] = _checksum(record)
            write_text(self._path(key), json.dumps(record))

    # --- claims
    def claim(self, key: str) -> tuple[Status, NodeRecord | None]:
        """("stored", record) if the store has the node, ("claimed", None) if it is ours to compute (release it
        when done), else ("busy", None): another live job is computing it."""
        rec = self.get(key)
        if rec is not None:
            return "stored", rec
        if not self._take(key):
            return "busy", None
        rec = self.get(key)  # finished and released by another job between our read and our claim
        if rec is not None:
            self.release(key)
            return "stored", rec
        return "claimed", None

    def _take(self, key: str) -> bool:
        """Create the claim file exclusively, taking over a stale one: True if the node is ours (no store: always)."""
        if self.root is None:
            return True
        path = self._claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self.takeover(key):
                    return False
                continue
            now = self.clock()
            with os.fdopen(fd, "w") as f:
                json.dump({"host": self.host, "pid": os.getpid(), "started": now}, f)
            os.utime(path, (now, now))
            with self._lock:
                self._held.add(path)
            self._start_heartbeat()
            return True
        return False

    def takeover(self, key: str) -> bool:
        """Remove the node's claim if it is stale (its owner is gone), so that it can be claimed: True if removed."""
        if not self.stale(key):
            return False
        log.warning("taking over node %s from a stale claim (%s)", key[:12], self.owner(key))
        self._claim_path(key).unlink(missing_ok=True)
        return True

    def wait(self, keys: dict[T, str], poll: float = 0.5) -> Iterator[tuple[T, NodeRecord | None]]:
        """Each node (keys: node -> store key) another job was computing, with its record once stored, or with None
        once its claim went stale and became ours (the caller computes it and releases the claim)."""
        pending = dict(keys)
        while pending:
            for node, key in list(pending.items()):
                status, rec = self.claim(key)
                if status != "busy":
                    del pending[node]
                    yield node, rec
            if pending:
                self.sleep(poll)

    def release(self, key: str) -> None:
        if self.root is None:
            return
        path = self._claim_path(key)
        with self._lock:
            self._held.discard(path)
        path.unlink(missing_ok=True)

    def owner(self, key: str) -> dict | None:
        try:
            return json.loads(self._claim_path(key).read_text())
        except (OSError, ValueError):
            return None

    def claimed(self, key: str) -> bool:
        return self.root is not None and self._claim_path(key).exists()

    def stale(self, key: str) -> bool:
        """The claim's owner is gone: a dead pid on this host, or no heartbeat for `claim_timeout` seconds."""
        path = self._claim_path(key)
        try:
            age = self.clock() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        owner = self.owner(key)
        if owner and owner.get("host") == self.host and isinstance(owner.get("pid"), int):
            if owner["pid"] == os.getpid():
                return path not in self._held
            if not pid_alive(owner["pid"]):
                return True
        return age > self.claim_timeout

    def heartbeat(self) -> None:
        """Mark every claim this process holds as alive now."""
        now = self.clock()
        with self._lock:
            held = list(self._held)
        for p in held:
            try:
                os.utime(p, (now, now))
            except FileNotFoundError:
                pass

    def _start_heartbeat(self) -> None:
        if not self.beat or (self._beat is not None and self._beat.is_alive()):
            return
        self._stop.clear()
        self._beat = threading.Thread(target=self._beat_loop, name="store-heartbeat", daemon=True)
        self._beat.start()

    def _beat_loop(self) -> None:
        interval = max(0.5, self.claim_timeout / 6)
        while not self._stop.wait(interval):
            self.heartbeat()

    def close(self) -> None:
        """Release every claim still held (an interrupted run) and stop the heartbeat."""
        self._stop.set()
        with self._lock:
            held, self._held = list(self._held), set()
        for p in held:
            p.unlink(missing_ok=True)
