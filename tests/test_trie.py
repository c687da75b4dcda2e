"""The order trie: distinct permutations, shared prefixes, bit-exact restores."""

from __future__ import annotations

import math

import torch
from torch import nn

from compress_order.modeling.targets import ModelState, find_targets
from compress_order.run.trie import build_trie, count_applications, full_orders, run_trie


def test_counts_for_two_and_three_stages():
    for n in (1, 2, 3, 4):
        labels = [f"s{i}" for i in range(n)]
        trie = build_trie(labels)
        expected = sum(math.factorial(n) // math.factorial(n - k) for k in range(1, n + 1))
        assert count_applications(trie) == expected
        assert len(full_orders(trie)) == math.factorial(n)
    assert count_applications(build_trie(["a", "b", "c"])) == 15


def test_repeated_stage_gives_deduplicated_orders():
    trie = build_trie(["prune", "quant", "prune"])
    orders = sorted(n.order for n in full_orders(trie))
    assert orders == [("prune", "prune", "quant"), ("prune", "quant", "prune"), ("quant", "prune", "prune")]
    assert count_applications(trie) == 2 + 3 + 3


def test_joint_stage_is_an_extra_full_order():
    trie = build_trie(["a", "b"], joint=["a+b"])
    full = [n.label for n in full_orders(trie)]
    assert full == ["a > b", "b > a", "a+b"] and count_applications(trie) == 5


def _state(seed: int = 0) -> ModelState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return ModelState(model, find_targets(model))


def test_walk_shares_prefixes_and_restores_bit_exactly():
    state = _state()
    trie = build_trie(["a", "b", "c"])
    seen: dict[tuple, dict] = {}
    applied: list[tuple] = []
    effects = {"a": lambda w: w * 0.5, "b": lambda w: w + 1.0, "c": lambda w: w.round()}

    def apply(node):
        applied.append(node.order)
        for t in state.targets.values():
            t.set_weight(effects[node.stage](t.weight))

    def visit(node):
        # Every node's state must equal the stages of its order applied to the dense weights, bit-exactly.
        seen[node.order] = state.snapshot()

    run_trie(trie, state, apply, visit)
    assert len(applied) == 15 and len(set(applied)) == 15  # each prefix computed once
    fresh = _state()
    for order, snap in seen.items():
        ref = fresh.snapshot()
        fresh.restore(ref)
        for lab in order:
            for t in fresh.targets.values():
                t.set_weight(effects[lab](t.weight))
        assert fresh.equal(snap), order
        fresh.restore(ref)
        for n, t in fresh.targets.items():  # restore puts the dense weights back exactly
            assert torch.equal(t.module.weight.data, ref[n][0])


def test_finished_subtrees_are_not_applied():
    state = _state()
    trie = build_trie(["a", "b"])
    applied, visited = [], []
    run_trie(
        trie, state, apply=lambda n: applied.append(n.order), visit=lambda n: visited.append(n.order),
        needed=lambda n: n.order[:1] != ("a",),
    )  # fmt: skip
    assert ("a",) not in applied and ("a", "b") not in applied and applied == [("b",), ("b", "a")]
    assert len(visited) == 5  # finished nodes are still reported
