"""Causal language models: token-level perplexity on the validation text, calibration segments from train."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from compress_order.data import TextSplits
from compress_order.errors import UserError
from compress_order.measure import time_call
from compress_order.models import LoadedModel
from compress_order.tasks import register


def encode(tokenizer, text: str) -> Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@register("causal_lm")
class LMTask:
    primary_metric = "perplexity"

    def __init__(self, lm: LoadedModel, data: TextSplits, cfg: DictConfig):
        if not isinstance(data, TextSplits):
            raise UserError(f"model '{lm.name}' is a language model but data '{cfg.data.name}' is not a text dataset")
        self.device = torch.device(cfg.device)
        self.seqlen = int(cfg.eval.seqlen or lm.seqlen)
        self.batch_size = int(cfg.eval.batch_size)
        ids = encode(lm.tokenizer, data.valid)
        n = ids.numel() // self.seqlen
        if cfg.eval.max_windows:
            n = min(n, int(cfg.eval.max_windows))
        if n == 0:
            raise UserError(f"validation text of '{data.name}' has {ids.numel()} tokens, fewer than seqlen={self.seqlen}")
        self.windows = ids[: n * self.seqlen].view(n, self.seqlen)
        self.protocol = (
            f"perplexity: token level, {n} non-overlapping windows of {self.seqlen} tokens of {data.name} validation"
        )
        cal = cfg.calibration
        self.nsamples, self.cal_seqlen = int(cal.nsamples), int(cal.seqlen or self.seqlen)
        self.seed = int(cfg.seed)
        self.train_ids = encode(lm.tokenizer, data.train)
        if self.train_ids.numel() <= self.cal_seqlen:
            raise UserError(
                f"calibration seqlen={self.cal_seqlen} needs more than the {self.train_ids.numel()} tokens "
                f"of '{data.name}' train; lower calibration.seqlen"
            )
        lat = cfg.eval.latency
        self.lat_cfg = lat
        self._calib: list[Tensor] | None = None

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        nll = []
        for i in range(0, len(self.windows), self.batch_size):
            x = self.windows[i : i + self.batch_size].to(self.device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            nll.append(loss.view(x.shape[0], -1).mean(1).double().cpu())
        per_window = torch.cat(nll).numpy()
        ppl = math.exp(float(per_window.mean()))
        return {"perplexity": ppl if math.isfinite(ppl) else float("inf")}, {"nll": per_window}

    def calibration_batches(self) -> list[Tensor]:
        """`nsamples` random segments of `seqlen` train tokens, drawn once with the run's seed."""
        if self._calib is None:
            g = torch.Generator().manual_seed(self.seed)
            hi = self.train_ids.numel() - self.cal_seqlen
            starts = torch.randint(0, hi, (self.nsamples,), generator=g)
            self._calib = [self.train_ids[s : s + self.cal_seqlen].unsqueeze(0) for s in starts.tolist()]
        return self._calib

    @torch.no_grad()
    def latency(self, model: nn.Module) -> dict[str, float]:
        x = self.windows[:1].repeat(int(self.lat_cfg.batch), 1)[:, : int(self.lat_cfg.seqlen or self.seqlen)]
        x = x.to(self.device)
        med, iqr = time_call(
            lambda: model(input_ids=x, use_cache=False), self.device, int(self.lat_cfg.warmup), int(self.lat_cfg.repeats)
        )
        return {"latency_ms": med, "latency_ms_iqr": iqr}
