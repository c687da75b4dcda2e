"""lm-eval glue: score the in-memory (compressed) model on lm-eval tasks and turn the results into metrics.

The model is handed to lm-eval's HFLM as an object, so every trie node is evaluated as it stands, without a
save/reload. Metric names are `<task>/<metric>` (`<task>/<metric>:<filter>` for a filter other than lm-eval's
"none"), registered with the direction lm-eval's task reports; per-document scores become per-unit samples.
"""

from __future__ import annotations

import copy
import difflib
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from compress_order.core.errors import UserError
from compress_order.evaluation.metrics import METRICS, Metric, register

INSTALL_HINT = "eval.tasks needs lm-eval: pip install .[lmeval] (or: pip install 'lm-eval[hf]')"


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ModuleNotFoundError as e:
        if e.name != "lm_eval":  # lm-eval is there but one of its own imports is missing: show that one
            raise
        raise UserError(INSTALL_HINT) from None
    return lm_eval


@lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool) -> Any:
    """Indexing lm-eval's ~15k built-in task files takes seconds: once per process and path set."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def include_paths(value: Any) -> list[str]:
    """`eval.lm_eval.include_path` (a folder, a list of them, or null) as absolute folders that exist."""
    paths = [value] if isinstance(value, str) else list(value or [])
    paths = [str(Path(str(p)).expanduser().resolve()) for p in paths]
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"eval.lm_eval.include_path '{p}' does not exist; pass a folder of task yaml files")
    return paths


def metric_name(task: str, key: str) -> tuple[str, str] | None:
    """lm-eval result key 'acc,none' of `task` → ('arc_easy/acc', 'acc'); None for aliases and non-metrics."""
    metric, _, filt = key.partition(",")
    if not filt:
        return None
    return (f"{task}/{metric}" if filt == "none" else f"{task}/{metric}:{filt}"), metric


class LMEval:
    def __init__(
        self,
        tasks: list[str],
        tokenizer: Any,
        max_length: int,
        batch_size: int = 8,
        include_path: str | list[str] | None = None,
        num_fewshot: int | None = None,
        limit: int | float | None = None,
        bootstrap_iters: int = 0,
        model_args: dict | None = None,
    ):
        require_lm_eval()
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines would drown the run's log
        self.tasks = [str(t) for t in tasks]
        paths = include_paths(include_path)
        # Local task files alone index in a blink; the built-in tasks are indexed only when a name needs them.
        self.manager = _task_manager(tuple(paths), False) if paths else None
        if self.manager is None or not set(self.tasks) <= set(self.manager.all_tasks):
            self.manager = _task_manager(tuple(paths), True)
        unknown = [t for t in self.tasks if t not in self.manager.all_tasks]
        if unknown:
            near = difflib.get_close_matches(unknown[0], self.manager.all_tasks, n=5)
            raise UserError(
                f"unknown lm-eval task '{unknown[0]}'"
                + (f"; close: {', '.join(near)}" if near else "; see `lm-eval ls tasks`")
                + " (local tasks: eval.lm_eval.include_path=DIR)"
            )
        self._register_tasks()
        self.tokenizer = copy.deepcopy(tokenizer)  # HFLM may give it a pad token: keep the run's tokenizer intact
        # lm-eval's own default seeds, so few-shot draws match its command line and published numbers
        self.kw = dict(num_fewshot=num_fewshot, limit=limit, bootstrap_iters=int(bootstrap_iters))
        self.hflm_kw = dict(batch_size=int(batch_size), max_length=int(max_length), **(model_args or {}))

    def _register_tasks(self) -> None:
        """Load every task once before any compression: a dataset that cannot load fails the run now, and each
        metric name is known (with lm-eval's direction) before the first node's rows are written."""
        try:
            loaded = self.manager.load(self.tasks)
        except (OSError, ValueError) as e:  # offline hub datasets raise ConnectionError (an OSError)
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(
                f"lm-eval tasks {self.tasks}: cannot load ({why}); offline, write a task yaml over local data "
                f"files and pass eval.lm_eval.include_path=DIR"
            ) from None
        for name, task in loaded["tasks"].items():
            for metric, hib in task.higher_is_better().items():
                _register(f"{name}/{metric}", bool(hib), metric)

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        log = logging.getLogger("lm_eval")
        level = log.level
        log.setLevel(logging.ERROR)  # its warnings were shown once, when the tasks were loaded
        try:
            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, **self.hflm_kw)
            out = simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.manager, log_samples=True, **self.kw)
        finally:
            log.setLevel(level)
        return results_to_metrics(out)


def results_to_metrics(out: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """lm-eval's result dict → {name: value} and per-document samples {name: array in doc order}."""
    metrics: dict[str, float] = {}
    samples: dict[str, np.ndarray] = {}
    hib_all = out.get("higher_is_better", {})
    for task, res in out["results"].items():
        hib = hib_all.get(task, {})
        for key, value in res.items():
            named = metric_name(task, key)
            if named is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # "alias", "N/A" stderrs
            name, metric = named
            if metric.endswith("_stderr"):
                _register(name, False, f"{metric} (lm-eval standard error)")
            elif metric in hib:
                _register(name, bool(hib[metric]), metric)
            elif name not in METRICS:  # e.g. a group's aggregate: lm-eval's registry of metric directions
                from lm_eval.api.registry import is_higher_better

                _register(name, is_higher_better(metric) is not False, metric)
            metrics[name] = float(value)
    for task, docs in (out.get("samples") or {}).items():
        per: dict[str, list[tuple[int, float]]] = {}
        for d in docs:  # one entry per (document, filter); `metrics` names the per-document scores it holds
            for metric in d.get("metrics", []):
                named = metric_name(task, f"{metric},{d.get('filter', 'none')}")
                v = d.get(metric)
                if named and named[0] in metrics and isinstance(v, (int, float)) and not isinstance(v, bool):
                    per.setdefault(named[0], []).append((int(d["doc_id"]), float(v)))
        for name, pairs in per.items():  # tuples (rolling loglikelihood, words) are not per-unit scores: skipped
            samples[name] = np.asarray([v for _, v in sorted(pairs)], dtype=float)
    return metrics, samples


def _register(name: str, higher_is_better: bool, metric: str) -> None:
    task = name.split("/", 1)[0]
    # a per-document score is the unit sample whose mean is the task metric (stderrs have none)
    sample = None if "_stderr" in name.rsplit("/", 1)[-1] else name
    register(Metric(name, higher_is_better, f"lm-eval task {task}: {metric}", unit_sample=sample))
