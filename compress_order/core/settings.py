"""A run's settings, typed: one frozen object tree that the configuration edge builds once (config/settings.py).

Every value here has been checked (its declared range in core/specs.py, the rules between settings, each stage's
own parameters) and resolved (the device, the calibration seeds) before any module below the edge sees it; those
modules read fields and never coerce, re-check or change a setting. A per-seed job is `settings.with_seed(s)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from types import MappingProxyType
from typing import Any, Mapping


def frozen_mapping(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of a plain mapping (nested mappings and lists frozen too)."""

    def freeze(v: Any) -> Any:
        if isinstance(v, Mapping):
            return MappingProxyType({k: freeze(x) for k, x in v.items()})
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        return v

    return freeze(dict(d))


def plain(v: Any) -> Any:
    """A settings value as plain data (dicts and lists), for keys, JSON and loaders."""
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if is_dataclass(v):
        return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
    return v


@dataclass(frozen=True)
class Loader:
    """A model or data group: the loader its `_target_` names and that loader's keyword arguments."""

    target: str
    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.params.get("name"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def node(self) -> dict[str, Any]:
        """The group as a config node: `_target_` and the arguments."""
        return {"_target_": self.target, **plain(self.params)}


@dataclass(frozen=True)
class StageSpec:
    """One entry of `stages` (or `joint`): its yaml's class with every parameter resolved, defaults filled in."""

    name: str  # the conf/stage file
    label: str  # how rows and orders name it (a name, or name(overrides), or the entry's own label)
    target: str  # the class
    params: Mapping[str, Any]  # the class's keyword arguments, naming keys excepted

    def node(self) -> dict[str, Any]:
        """The resolved stage config: `_target_`, `name`, `label` and the parameters."""
        return {"_target_": self.target, "name": self.name, "label": self.label, **plain(self.params)}

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


@dataclass(frozen=True)
class Calibration:
    nsamples: int = 128  # segments drawn with the seed from the calibration split
    seqlen: int | None = None  # tokens per segment (None: the evaluation window length)
    true_sequential: bool = False  # compress a block's layers group by group in forward order
    device: str | None = None  # where blocks are calibrated (None: the model's device)
    moe_all_experts: bool = False  # every token through every expert for the experts' statistics


@dataclass(frozen=True)
class Latency:
    batch: int = 1
    seqlen: int | None = None  # None: the window length
    decode_tokens: int = 16  # 0: no decode timing
    warmup: int = 2
    repeats: int = 10


@dataclass(frozen=True)
class LmEval:
    include_path: Any = None  # folder(s) of extra task yaml files
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 8
    max_length: int | None = None  # None: the window length
    bootstrap_iters: int = 0
    model_args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Eval:
    batch_size: int = 8
    seqlen: int | None = None  # LM window length (None: model.seqlen)
    max_windows: int | None = None
    metrics: tuple[str, ...] = ("perplexity",)
    kld_topk: int | None = 128
    kld_tail_samples: int = 64
    max_examples: int | None = None
    offload: str | None = None  # a resolved device that forwards stream the model onto, block by block
    backends: tuple[str, ...] = ()  # packed kernels timed on the run's device, resolved from auto/none/[names]
    latency: Latency = field(default_factory=Latency)
    word_perplexity: bool = False
    tasks: tuple[str, ...] = ()  # lm-eval tasks
    lm_eval: LmEval = field(default_factory=LmEval)

    @property
    def reference_metrics(self) -> tuple[str, ...]:
        """The metrics that compare with the dense model's next-token distributions (kld, top1_agree)."""
        return tuple(m for m in ("kld", "top1_agree") if m in self.metrics)


@dataclass(frozen=True)
class Activations:
    """`act_bits`: every compressed layer's inputs fake-quantized (None in RunSettings: full precision)."""

    bits: int
    granularity: str  # token | tensor | static
    format: str | None  # None: integer; fp8 | nvfp4


@dataclass(frozen=True)
class Store:
    dir: str | None = "outputs/store"  # None: no store (every node computed, nothing shared or resumed)
    claim_timeout: float = 120.0
    force: bool = False  # recompute nodes the store has
    cache_dir: str | None = None  # state_cache.dir: compressed states of inner trie nodes
    cache_max_gb: float = 20.0


@dataclass(frozen=True)
class Save:
    enabled: bool = False  # write each full order's model
    format: str = "auto"  # auto | compressed-tensors | dense


@dataclass(frozen=True)
class RunSettings:
    model: Loader
    data: Loader
    stages: tuple[StageSpec, ...]
    joint: tuple[StageSpec, ...] = ()
    eval: Eval = field(default_factory=Eval)
    calibration: Calibration = field(default_factory=Calibration)
    format: str = "int"
    bits: int = 3
    sparsity: float = 0.7
    expert_sparsity: float = 0.25
    group_size: int = 128
    act: Activations | None = None
    seeds: tuple[int, ...] = (0,)  # the run's calibration seeds
    seed: int = 0  # this job's seed (the first of `seeds` until `with_seed`)
    device: str = "cpu"  # resolved: cpu, cuda, cuda:N
    threads: int | None = None
    dense_bits: int = 16
    predict_only: bool = False
    orders: tuple[tuple[str, ...], ...] | None = None  # the full orders to compute (labels); None: every order
    store: Store = field(default_factory=Store)
    save: Save = field(default_factory=Save)

    def with_seed(self, seed: int) -> RunSettings:
        """The settings of one calibration seed's job."""
        return replace(self, seed=seed)

    @property
    def several_seeds(self) -> bool:
        return len(self.seeds) > 1
