"""The node store's claim protocol on a fake clock: claim, heartbeat, wait and takeover, without real sleeps."""

from __future__ import annotations

import json
import os

from helpers import FakeClock

from compress_order.core.schema import NodeRecord
from compress_order.run.store import NodeStore

KEY = "ab" + "0" * 62
RECORD = NodeRecord([{"metric": "perplexity", "value": 3.0, "backend": "dense-simulated"}], timestamp="t")


def _jobs(tmp_path, timeout: float = 10.0) -> tuple[FakeClock, NodeStore, NodeStore]:
    """Two jobs on one store, on different hosts (a claim is judged by its heartbeat), sharing one clock; each
    beats only when the test says so."""
    clock = FakeClock(1000.0)
    mine, other = (NodeStore(tmp_path, timeout, clock=clock, sleep=clock.sleep, host=h, beat=False)
                   for h in ("here", "there"))  # fmt: skip
    return clock, mine, other


def test_a_claimed_node_is_busy_for_another_job_until_it_is_stored(tmp_path):
    clock, mine, other = _jobs(tmp_path)
    assert mine.claim(KEY) == ("claimed", None)
    assert json.loads(mine._claim_path(KEY).read_text())["host"] == "here"
    assert other.claim(KEY) == ("busy", None)
    mine.put(KEY, RECORD)
    mine.release(KEY)
    assert other.claim(KEY) == ("stored", RECORD) and not other.claimed(KEY)
    mine.close()


def test_a_claim_without_heartbeat_goes_stale_and_is_taken_over(tmp_path, caplog):
    clock, mine, other = _jobs(tmp_path, timeout=10.0)
    assert mine.claim(KEY)[0] == "claimed"
    clock.now += 9
    mine.heartbeat()  # alive: its claim is as fresh as now
    clock.now += 9
    assert not other.stale(KEY) and other.claim(KEY) == ("busy", None)
    clock.now += 2  # 11 s since the last heartbeat
    assert other.stale(KEY)
    assert other.claim(KEY) == ("claimed", None)
    assert json.loads(other._claim_path(KEY).read_text())["host"] == "there"
    assert any("taking over" in r.getMessage() for r in caplog.records)
    mine.close()
    other.close()


def test_a_claim_of_this_process_is_stale_once_released_by_close(tmp_path):
    clock, mine, _ = _jobs(tmp_path)
    mine.claim(KEY)
    assert not mine.stale(KEY)
    mine._held.clear()  # as a job that crashed and restarted under the same pid would see it
    assert mine.stale(KEY)


def test_wait_yields_the_record_once_the_other_job_stores_it(tmp_path):
    clock, mine, other = _jobs(tmp_path)
    assert other.claim(KEY)[0] == "claimed"
    waited = mine.wait({"node": KEY}, poll=0.5)
    clock_before = clock.now

    def store_later(seconds: float) -> None:  # the other job finishes while we sleep
        clock.now += seconds
        other.heartbeat()
        if clock.now - clock_before >= 2:
            other.put(KEY, RECORD)
            other.release(KEY)

    mine.sleep = store_later
    assert list(waited) == [("node", RECORD)]
    assert clock.now - clock_before == 2.0
    other.close()


def test_wait_takes_over_a_node_whose_owner_stopped_its_heartbeat(tmp_path):
    clock, mine, other = _jobs(tmp_path, timeout=1.0)
    other.claim(KEY)
    assert list(mine.wait({"node": KEY}, poll=0.5)) == [("node", None)]  # ours now: the caller computes it
    assert clock.slept == [0.5, 0.5, 0.5]  # > 1 s without a heartbeat, and no real second passed
    assert mine.owner(KEY)["host"] == "here" and mine.owner(KEY)["pid"] == os.getpid()
    mine.release(KEY)
    assert not mine.claimed(KEY)


def test_without_a_store_every_node_is_ours(tmp_path):
    store = NodeStore(None)
    assert store.claim(KEY) == ("claimed", None) and store.get(KEY) is None
    store.release(KEY)
