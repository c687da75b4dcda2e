"""One way to compress a model: load it as a run does, build its stages, apply them, evaluate a node.

The runner (every node of the trie), `compress-order export` (one full order of a finished run) and the tests go
through this module, so a rebuilt order is the order the run evaluated: same targets, same activation scheme
(static ranges observed on the current weights before each calibrated stage), same invariant checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from compress_order.config.stages import build_stage, stage_class
from compress_order.core.instantiate import build
from compress_order.core.schema import SIMULATED, NodeRecord
from compress_order.core.settings import Calibration, Loader, RunSettings, StageSpec
from compress_order.evaluation.backends import Backend, latency_entries
from compress_order.evaluation.measure import compression_metrics, peak_memory_mb, shape_signature
from compress_order.evaluation.metrics import METRICS
from compress_order.evaluation.tasks import Task, build_task
from compress_order.loaders.models import LoadedModel
from compress_order.modeling.act import ActQuant
from compress_order.modeling.act import paused as act_paused
from compress_order.modeling.coverage import Coverage, load_targets
from compress_order.modeling.targets import ModelState, Snapshot, Target, find_targets
from compress_order.modeling.weight_files import model_folder, safetensors_spans
from compress_order.numerics.constraints import check_layers
from compress_order.stages.base import Stage


def apply_stage(
    stage: Stage,
    state: ModelState,
    task: Task,
    calibration: Calibration,
    act: ActQuant | None = None,
    report: dict | None = None,
) -> str | None:
    """Apply one stage to every target layer, then check the invariants of every layer it could change. Returns
    why the stage cannot follow what the layers hold (then nothing is changed), else None. With static activation
    ranges (`act`), a calibrated stage reads statistics of activations quantized with ranges observed on the current
    weights. `report` receives the calibration tokens per expert of each MoE layer."""
    why = stage.feasible(state.targets)
    if why is not None:
        return why
    if act is not None and stage.needs is not None:
        act.observe(state.model, task.calibration_batches())
    live = {n: t for n, t in state.targets.items() if not t.constraint.dropped}  # a removed expert stays removed
    if stage.whole_model:
        stage.compress_model(state, None if stage.needs is None else task.calibration_batches())
    elif stage.needs is None:
        for t in live.values():
            stage.compress(t, None)
    else:
        from compress_order.stages.calibration import calibrate_and_compress

        calibrate_and_compress(state.model, live, task.calibration_batches(), stage, calibration, report=report)
    # The layers the stage could change: a layer-wise stage gets the live targets only (a removed expert's weights
    # and constraint are untouched); the flags of all layers are read with one host sync.
    touched = state.targets if stage.whole_model else live
    check_layers((t.name, lambda t=t: t.weight, t.constraint) for t in touched.values())
    return None


@dataclass
class RunContext:
    """A run's model on its device with its compressible layers, their constraints, and the activation quantizer
    (`act_bits`: on for the whole run, every evaluation and every later calibration)."""

    lm: LoadedModel
    data: Any
    targets: dict[str, Target]
    state: ModelState
    act: ActQuant | None
    device: torch.device
    coverage: Coverage | None = None  # which weight matrices the targets are, which model.skip leaves dense
    probed: set[str] = field(default_factory=set)  # labels of stages `check_model` has probed on this model
    # The dense-simulated latency by shape signature: timed once per distinct (shapes, dtype, removed layers), as
    # the weights' values do not change a dense kernel's time; every node of that signature reports the figure.
    latency: dict[tuple, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: RunSettings) -> RunContext:
        device = torch.device(settings.device)
        data = build(settings.data.node())
        lm = build(settings.model.node(), data=data)  # the loader tokenizes a text before the weights take memory
        lm.model.to(device)
        targets, coverage = load_targets(lm.model, lm.skip)  # every weight matrix a target or skipped on purpose
        whole = any(stage_class(spec).rewrites_all for spec in settings.stages + settings.joint)
        state = ModelState(lm.model, targets, whole=whole)
        folder = model_folder(lm.model)
        if folder is not None:  # checkpoints read dense weights back from the files instead of copying them
            state.share_files(safetensors_spans(folder))
        act = None
        if settings.act is not None:
            act = ActQuant(settings.act.bits, settings.act.granularity, settings.act.format).install(targets)
        return cls(lm, data, targets, state, act, device, coverage)

    @property
    def static_act(self) -> ActQuant | None:
        """The quantizer when its ranges are observed (static), which stages and evaluations must refresh."""
        return self.act if self.act is not None and self.act.static else None

    def fresh_dense(self, model: Loader) -> Snapshot:
        """The dense weights from a fresh load (the loaded model may already be compressed)."""
        fresh = build(model.node())
        return ModelState(fresh.model, find_targets(fresh.model, self.lm.skip), whole=self.state.whole).snapshot()

    def build_stages(self, specs: dict[str, StageSpec]) -> dict[str, Stage]:
        """Each stage by label, checked against the layers before any work."""
        stages = {lab: build_stage(spec) for lab, spec in specs.items()}
        for s in stages.values():
            s.validate(self.targets)
            s.validate_model(self.state)
        return stages

    def check_model(self, stages: dict[str, Stage], task: Task, calibration: Calibration) -> None:
        """What the model's structure decides beyond the layer shapes `validate` sees: a stage that rescales
        inputs needs a producer in the model's first unit. Probed once per stage, on one calibration sample and
        the loaded weights, before any node is evaluated (calibration would find it only when the stage runs)."""
        from compress_order.stages.calibration import check_scaling

        for label, stage in stages.items():
            if stage.scales_inputs and label not in self.probed:
                check_scaling(self.lm.model, self.targets, task.calibration_batches(), stage, calibration)
                self.probed.add(label)

    def input_scales(self, task: Task) -> dict[str, torch.Tensor] | None:
        """Static activations: each layer's input scale observed on the weights the model holds now (what a
        checkpoint of this node stores); None for dynamic or full-precision activations."""
        if self.static_act is None:
            return None
        self.static_act.observe(self.lm.model, task.calibration_batches())
        return self.static_act.input_scales(self.targets)

    def task(self, settings: RunSettings) -> Task:
        return build_task(self.lm, self.data, settings)

    def apply(self, stage: Stage, task: Task, calibration: Calibration, report: dict | None = None) -> str | None:
        return apply_stage(stage, self.state, task, calibration, self.static_act, report)

    def evaluate(self, task: Task, dense_bits: int, backends: list[Backend]) -> NodeRecord:
        """The node the model holds now: the task's metrics, its compression and peak memory (since the last
        `reset_peak`), and latency, simulated and on each backend's kernels (a packed copy of the node's codes)."""
        model = self.lm.model
        if self.static_act is not None:  # static ranges of this node's activations
            self.static_act.observe(model, task.calibration_batches())
        metrics, samples = task.evaluate(model)
        metrics.update(compression_metrics(model, self.targets, dense_bits))
        if self.state.blocks is not None and self.state.blocks.removed:
            metrics["blocks_removed"] = len(self.state.blocks.removed)
        with act_paused():  # fake activation rounding is no kernel: time what the weights cost
            signature = shape_signature(model, self.targets)
            if signature not in self.latency:
                self.latency[signature] = task.latency(model)
            metrics.update(self.latency[signature])
            metrics["peak_mem_mb"] = peak_memory_mb(self.device)
            packed = latency_entries(backends, model, self.targets, task, self.device)
        entries = [
            {"metric": m, "value": v, "backend": SIMULATED, "higher_is_better": METRICS[m].higher_is_better}
            for m, v in metrics.items()
        ]
        return NodeRecord(
            entries + packed, {k: v.tolist() for k, v in samples.items()}, task.primary_metric, task.protocol
        )


def infeasible_record(why: str, primary: str, protocol: str) -> NodeRecord:
    """A node that could not be computed (a stage could not follow what the layers held): its primary metric NaN."""
    return NodeRecord(
        [
            {
                "metric": primary,
                "value": float("nan"),
                "backend": SIMULATED,
                "higher_is_better": METRICS[primary].higher_is_better,
                "status": "infeasible",
                "error": why,
            }
        ],
        primary=primary,
        protocol=protocol,
    )
