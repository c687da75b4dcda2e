"""Every order of a stage list as a prefix tree: each prefix is computed once.

Orders are the distinct permutations of the labels (a repeated stage gives deduplicated orders). A depth-first
walk applies a node's stage on top of its parent's state; before the second and later children the parent's
weights and constraints are restored from a checkpoint (copy-on-write, closed after its last restore), so n stages
cost Σₖ n!/(n−k)! applications, not n·n!.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from compress_order.modeling.targets import ModelState


@dataclass(eq=False)
class Node:
    order: tuple[str, ...]  # labels from the root; () is the dense baseline
    children: list["Node"] = field(default_factory=list)
    covers: int | None = None  # stages a joint node stands for (it is one application but a full order)

    @property
    def depth(self) -> int:
        return self.covers if self.covers is not None else len(self.order)

    @property
    def label(self) -> str:
        return " > ".join(self.order) if self.order else "dense"

    @property
    def stage(self) -> str:
        return self.order[-1]

    def walk(self) -> Iterator["Node"]:
        yield self
        for c in self.children:
            yield from c.walk()


def build_trie(labels: list[str], joint: list[str] = ()) -> Node:
    """Trie of all distinct permutations of `labels`, plus one full-order node per joint stage label
    (a schedule that prunes and quantizes in one pass, compared beside the sequential orders)."""
    root = Node(())

    def grow(node: Node, left: Counter) -> None:
        for lab in sorted(left, key=labels.index):
            if left[lab]:
                child = Node(node.order + (lab,))
                node.children.append(child)
                grow(child, left - Counter({lab: 1}))

    grow(root, Counter(labels))
    for lab in joint:
        root.children.append(Node((lab,), covers=len(labels)))
    return root


def restrict(root: Node, orders: tuple[tuple[str, ...], ...]) -> Node:
    """The trie cut to the listed full orders and their prefixes (the dense root always): the nodes keep the orders
    they have in the whole trie, so their store keys are the same and a later full run reuses them."""
    keep = {o[:k] for o in orders for k in range(len(o) + 1)}

    def cut(node: Node) -> Node:
        return Node(node.order, [cut(c) for c in node.children if c.order in keep], node.covers)

    return cut(root)


def count_applications(root: Node) -> int:
    return sum(1 for n in root.walk() if n.order)


def full_orders(root: Node) -> list[Node]:
    top = max(n.depth for n in root.walk())
    return [n for n in root.walk() if n.depth == top]


def run_trie(
    root: Node,
    state: ModelState,
    apply: Callable[[Node], None],
    visit: Callable[[Node], None],
    needed: Callable[[Node], bool] = lambda n: True,
) -> None:
    """Depth-first: `apply(node)` mutates the state from the parent's, `visit(node)` evaluates it.

    `needed(node)` says whether a node or any descendant still has work (resume): a subtree with none
    is skipped without applying anything.
    """

    def go(node: Node) -> None:
        visit(node)
        todo = [c for c in node.children if needed(c)]
        # copy-on-write: a weight is copied when a child first overwrites it; closed after the last restore, so the
        # last child's subtree holds no copy for this node
        ck = state.checkpoint() if len(todo) > 1 else None
        try:
            for child in node.children:
                if child not in todo:  # finished subtree: report it, apply nothing
                    for n in child.walk():
                        visit(n)
                    continue
                if child is not todo[0]:
                    assert ck is not None
                    state.restore(ck)
                    if child is todo[-1]:
                        ck.close()
                        ck = None
                apply(child)
                go(child)
        finally:
            if ck is not None:
                ck.close()

    go(root)
