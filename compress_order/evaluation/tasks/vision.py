"""Image classifiers: top-1 / top-5 / mean cross-entropy on the test split, calibration images from train."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from compress_order.core.errors import UserError
from compress_order.core.settings import RunSettings
from compress_order.evaluation.divergence import reject_on
from compress_order.evaluation.measure import time_call
from compress_order.evaluation.tasks import register
from compress_order.loaders.image_data import ImageSplits
from compress_order.loaders.image_models import IMAGE_CLASSIFIER
from compress_order.loaders.models import LoadedModel

# Preprocessed test images are kept in memory below this size (MNIST: 3 MB); above it (ImageNet: 30 GB) every
# evaluation decodes and transforms again.
CACHE_BYTES = 1 << 30


@register(IMAGE_CLASSIFIER)
class VisionTask:
    primary_metric = "top1"

    metrics = ("top1", "top5", "nll")  # reported for every node (top-k: at most the number of classes)
    # settings only a language model's task reads, and what they do (each null or off by default)
    LM_ONLY = {
        "offload": "streams the blocks of a language model",
        "max_windows": "caps a language model's text windows (images: eval.max_examples)",
        "seqlen": "is a language model's window length",
        "word_perplexity": "scores a language model's text",
        "tasks": "are lm-eval tasks of a language model",
    }

    @classmethod
    def check(cls, settings: RunSettings, data_type: type | None) -> None:
        name = f"model '{settings.model.name}' is an image classifier"
        if data_type is not None and not issubclass(data_type, ImageSplits):
            raise UserError(f"{name} but data '{settings.data.name}' is not an image dataset")
        reject_on(settings.eval.metrics, name, f"it reports {', '.join(cls.metrics)} for every node; drop eval.metrics")
        for key, what in cls.LM_ONLY.items():
            value = getattr(settings.eval, key)
            if value not in (None, False, ()):
                shown = list(value) if isinstance(value, tuple) else "true" if value is True else value
                raise UserError(f"eval.{key}={shown} {what}; {name}; drop eval.{key}")

    @classmethod
    def model_checks(cls, settings: RunSettings) -> list[str]:
        return [
            f"data '{settings.data.name}' has labels on its evaluated split",
            f"model '{settings.model.name}' predicts as many classes as data '{settings.data.name}' has",
        ]

    def __init__(self, lm: LoadedModel, data: ImageSplits, settings: RunSettings):
        ev = settings.eval
        self.check(settings, type(data))
        if data.test_labels is None:
            raise UserError(
                f"data '{data.name}' has no labels on its evaluated split; top-1 needs them "
                f"(an image folder needs one sub-folder per class)"
            )
        n_model = int(lm.extra["num_classes"])
        if data.num_classes != n_model:
            raise UserError(
                f"model '{lm.name}' predicts {n_model} classes but data '{data.name}' has {data.num_classes}; "
                f"use a checkpoint trained on these classes (model.checkpoint=...)"
            )
        from timm.data import create_transform

        dc = lm.extra["data_config"]
        self.transform = create_transform(**dc)  # timm's eval transform: resize, center crop, normalize
        self.mode = "L" if dc["input_size"][0] == 1 else "RGB"
        self.data = data
        self.device = torch.device(settings.device)
        self.batch_size = ev.batch_size
        self.seed = settings.seed
        self.nsamples = settings.calibration.nsamples
        self.latency_settings = ev.latency
        n = len(data.test)
        if ev.max_examples:
            n = min(n, ev.max_examples)
        if n == 0:
            raise UserError(f"data '{data.name}' has no test images")
        self.n_test = n
        self.labels = torch.as_tensor(np.asarray(data.test_labels[:n]), dtype=torch.long)
        self.topk = min(5, n_model)
        self._test: Tensor | None = None
        self._cacheable: bool | None = None
        self._calib: list[Tensor] | None = None
        _, h, w = dc["input_size"]
        self.protocol = (
            f"top1: {n} images of {data.test_description}, one {h}×{w} center crop (timm eval transform, "
            f"crop_pct={dc.get('crop_pct')}, {dc.get('interpolation')}); top{self.topk} and mean cross-entropy (nll)"
        )

    def _tensors(self, images: Sequence[Image.Image], idx: Sequence[int]) -> Tensor:
        return torch.stack([self.transform(images[i].convert(self.mode)) for i in idx])

    def _test_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        bs = self.batch_size
        if self._test is None and self._cacheable is None:
            one = self._tensors(self.data.test, [0])
            self._cacheable = one.numel() * one.element_size() * self.n_test <= CACHE_BYTES
        if self._test is None and self._cacheable:
            self._test = torch.cat(
                [self._tensors(self.data.test, range(i, min(i + bs, self.n_test))) for i in range(0, self.n_test, bs)]
            )
        for i in range(0, self.n_test, bs):
            j = min(i + bs, self.n_test)
            x = self._test[i:j] if self._test is not None else self._tensors(self.data.test, range(i, j))
            yield x, self.labels[i:j]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        nll, correct, top5 = [], [], []
        for x, y in self._test_batches():
            logits = model(x.to(self.device)).float().cpu()
            nll.append(F.cross_entropy(logits, y, reduction="none").double())
            top = logits.topk(self.topk, dim=1).indices
            correct.append((top[:, 0] == y).double())
            top5.append((top == y[:, None]).any(1).double())
        nll_t, correct_t = torch.cat(nll).numpy(), torch.cat(correct).numpy()
        metrics = {
            "top1": 100.0 * float(correct_t.mean()),
            "top5": 100.0 * float(torch.cat(top5).mean()),
            "nll": float(nll_t.mean()),
        }
        return metrics, {"nll": nll_t, "correct": correct_t, "correct_top5": torch.cat(top5).numpy()}

    def calibration_batches(self) -> list[Tensor]:
        """`nsamples` train images (all of them if fewer), drawn once with the run's seed, in eval-size batches."""
        if self._calib is None:
            n = len(self.data.train)
            if n == 0:
                raise UserError(f"data '{self.data.name}' has no training images for calibration")
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(n, generator=g)[: self.nsamples].tolist()
            bs = self.batch_size
            self._calib = [self._tensors(self.data.train, idx[i : i + bs]) for i in range(0, len(idx), bs)]
        return self._calib

    @torch.no_grad()
    def latency(self, model: nn.Module) -> dict[str, float]:
        lat = self.latency_settings
        b = lat.batch
        x = next(self._test_batches())[0][:1].repeat(b, 1, 1, 1).to(self.device)
        med, iqr = time_call(lambda: model(x), self.device, lat.warmup, lat.repeats)
        return {"latency_ms": med, "latency_ms_iqr": iqr, "images_per_s": 1e3 * b / med}
