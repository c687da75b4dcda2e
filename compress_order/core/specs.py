"""The type and range of every setting, declared once.

The root config's values are checked against `SETTINGS` before any model is loaded (validate.check_config); the
stage parameters bound to them (`bits: ${bits}` in conf/stage/*.yaml) are checked by the stage classes with the
same objects (`BITS`, `SPARSITY`, `GROUP_SIZE`), so a range and its message cannot drift apart. Defaults live in
the yaml files (root config) and the stage classes' `__init__` (stage parameters), not here.

A leaf module: it imports errors and schema only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from compress_order.core.errors import UserError
from compress_order.core.schema import SAVE_FORMATS


@dataclass(frozen=True)
class Spec:
    """A value's test, and the phrase that follows `key=value` when it fails: one line naming the key, the bad
    value and what is valid (`bits=9 is outside 2-8 (an integer)`)."""

    ok: Callable[[Any], bool]
    phrase: str
    kind: Callable[[Any], bool] | None = None  # the value's type (a number), tested first
    not_kind: str = ""  # the phrase when that fails (`expert_sparsity=abc is not a number`, not "outside [0, 1)")

    def check(self, value: Any, key: str) -> Any:
        """The value, if valid; else UserError naming `key` (a stage passes e.g. `expert_prune expert_sparsity`)."""
        shown = str(value).lower() if isinstance(value, bool) else value  # as the command line writes it
        if self.kind is not None and not self.kind(value):
            raise UserError(f"{key}={shown} {self.not_kind}")
        if not self.ok(value):
            raise UserError(f"{key}={shown} {self.phrase}")
        return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's true is no number of anything


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int, *, null: str | None = None, note: str = "") -> Spec:
    """An integer ≥ low. `null`: null is allowed too, and means this ("": without saying); `note`: what it is."""
    said = f"null: {null}" if null else note
    phrase = f"must be an integer ≥ {low}" + (" or null" if null is not None else "") + (f" ({said})" if said else "")
    return Spec(lambda v: (v is None and null is not None) or (_is_int(v) and v >= low), phrase)


def integer_range(low: int, high: int) -> Spec:
    return Spec(
        lambda v: _is_int(v) and low <= v <= high,
        f"is outside {low}-{high} (an integer)",
        _is_int,
        f"is not an integer; valid: {low}-{high}",
    )


def number(low: float, *, null: bool = False) -> Spec:
    """A number > low."""
    return Spec(
        lambda v: (v is None and null) or (_is_number(v) and v > low),
        f"must be a number > {low:g}" + (" or null" if null else ""),
    )


def fraction() -> Spec:
    """A number in [0, 1): a share of weights or experts removed (1 would remove all)."""
    return Spec(
        lambda v: _is_number(v) and 0 <= v < 1, "is outside [0, 1)", _is_number, "is not a number; valid: [0, 1)"
    )


def one_of(options: Sequence[str]) -> Spec:
    return Spec(lambda v: v in options, f"is unknown; valid: {', '.join(options)}")


FLAG = Spec(lambda v: isinstance(v, bool), "must be true or false")

# Shared by the root config and the stages that read them (stages/base.py, expert_prune.py, mixed.py).
BITS = integer_range(2, 8)  # weight bits; 1 bit has no grid with a zero, and the packers stop at 8
SPARSITY = fraction()
GROUP_SIZE = Spec(lambda v: _is_int(v) and (v > 0 or v == -1), "must be a positive integer or -1 (per-channel)")

# Every setting of conf/config.yaml and conf/eval/default.yaml with a type and range of its own, by dotted key,
# checked in this order (with the switch that reads it off too: a bad value must not run and be saved).
# Settings whose check needs another setting or a loader (format, seeds, device, act_*, eval.backends, eval.offload,
# eval.lm_eval.include_path, stages) are checked by validate.check_config.
SETTINGS: dict[str, Spec] = {
    "bits": BITS,
    "sparsity": SPARSITY,
    "expert_sparsity": SPARSITY,  # read by expert_prune only
    "group_size": GROUP_SIZE,
    "seed": integer(0),
    "replicates": integer(1, note="calibration seeds per run"),
    "threads": integer(1, null=""),
    "dense_bits": integer(1),
    "calibration.nsamples": integer(1),
    "calibration.seqlen": integer(1, null="the evaluation sequence length"),
    "calibration.true_sequential": FLAG,
    "calibration.moe_all_experts": FLAG,
    "eval.batch_size": integer(1),
    "eval.seqlen": integer(1, null="model.seqlen"),
    "eval.max_windows": integer(1, null="all windows"),
    "eval.max_examples": integer(1, null="all images"),
    "eval.latency.batch": integer(1),
    "eval.latency.seqlen": integer(1, null=""),
    "eval.latency.decode_tokens": integer(0),
    "eval.latency.warmup": integer(0),
    "eval.latency.repeats": integer(1),
    "state_cache.max_gb": number(0),  # checked with the cache off too
    "state_cache.dir": Spec(lambda v: v is None or isinstance(v, str), "must be a folder or null (no cache)"),
    "store_claim_timeout": number(0),
    "save_format": one_of(SAVE_FORMATS),
    "force": FLAG,
    "save": FLAG,
    "predict_only": FLAG,
    "eval.word_perplexity": FLAG,
    "eval.tasks": Spec(
        lambda v: isinstance(v, list) and all(isinstance(t, str) and t for t in v),
        "must be a list of lm-eval task names, e.g. [arc_easy,hellaswag]",
    ),
    "eval.lm_eval.num_fewshot": integer(0, null="each task's default"),
    "eval.lm_eval.limit": number(0, null=True),
    "eval.lm_eval.batch_size": integer(1),
    "eval.lm_eval.max_length": integer(1, null="the window length"),
    "eval.lm_eval.bootstrap_iters": integer(0),
    "eval.lm_eval.model_args": Spec(lambda v: isinstance(v, dict), "must be a mapping, e.g. {add_bos_token: true}"),
}

ABSENT = object()


def setting(config: dict, key: str) -> Any:
    """The value at a dotted key of a resolved config, or `ABSENT` where a section is missing or null."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def check_settings(config: dict) -> None:
    """Each declared setting of a resolved config against its spec (an absent section is not checked)."""
    for key, spec in SETTINGS.items():
        value = setting(config, key)
        if value is not ABSENT:
            spec.check(value, key)


def declared(annotation: Any) -> Spec | None:
    """The check a parameter's type annotation declares: `Literal[...]` its options (with None where the
    annotation allows it), `bool` true/false; None for the rest, which their owners check with ranges."""

    options = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and NoneType in options:
        inner = [a for a in options if a is not NoneType]
        spec = declared(inner[0]) if len(inner) == 1 else None
        return None if spec is None else Spec(lambda v: v is None or spec.ok(v), spec.phrase)
    if get_origin(annotation) is Literal:
        return one_of(options)
    if annotation is bool:
        return FLAG
    return None
