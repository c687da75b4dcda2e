"""Causal language models: token-level perplexity on the validation text, calibration segments from train.

Optional extras on the same in-memory model: lm-eval's word/byte perplexity of the validation text
(`eval.word_perplexity`) and lm-eval tasks (`eval.tasks`), each under its own metric names.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from typing import ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress_order.core.errors import UserError
from compress_order.core.settings import Eval, RunSettings, plain
from compress_order.evaluation.divergence import (
    DenseReference,
    compare,
    dense_reference,
    window_samples,
)
from compress_order.evaluation.measure import decode_ms_per_token, time_call
from compress_order.evaluation.metrics import Metric
from compress_order.evaluation.metrics import register as register_metric
from compress_order.evaluation.tasks import register
from compress_order.loaders.models import LoadedModel, token_ids
from compress_order.loaders.text import TextSplits
from compress_order.modeling.act import paused

# The GPTQ/SparseGPT number is `perplexity` (per token, fixed windows); these follow lm-eval's
# loglikelihood_rolling protocol and normalise the same total NLL by words or bytes instead of tokens.
for _m in (
    Metric("word_perplexity", False, "lm-eval protocol: exp(total NLL / words) of the validation text"),
    Metric("byte_perplexity", False, "lm-eval protocol: exp(total NLL / UTF-8 bytes) of the validation text"),
    Metric("bits_per_byte", False, "lm-eval protocol: total NLL / UTF-8 bytes / ln 2 of the validation text"),
):
    register_metric(_m)


def with_bos(rows: Tensor, bos: int | None) -> Tensor:
    """Rows of token ids, each led by `bos` when the model wants one (None: as they are)."""
    return rows if bos is None else torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], 1)


@register("causal_lm")
class LMTask:
    primary_metric = "perplexity"

    @classmethod
    def check(cls, settings: RunSettings, data_type: type | None) -> None:
        name = f"model '{settings.model.name}' is a language model"
        if data_type is not None and not issubclass(data_type, TextSplits):
            raise UserError(f"{name} but data '{settings.data.name}' is not a text dataset")
        if settings.eval.max_examples is not None:
            raise UserError(
                f"eval.max_examples={settings.eval.max_examples} caps an image classifier's test images; {name}: "
                f"eval.max_windows caps its windows"
            )

    @classmethod
    def model_checks(cls, settings: RunSettings) -> list[str]:
        data = f"data '{settings.data.name}'"
        return [
            f"the validation text of {data} fills one window of the model's tokens",
            f"the train text of {data} holds calibration.nsamples segments",
            *(["the tokenizer has a BOS token (model.bos)"] if settings.model.get("bos") else []),
        ]

    def __init__(self, lm: LoadedModel, data: TextSplits, settings: RunSettings):
        ev = settings.eval
        self.check(settings, type(data))
        self.device = torch.device(settings.device)
        self.seqlen = ev.seqlen or lm.seqlen
        self.batch_size = ev.batch_size
        ids = lm.encode(data.valid)
        self.bos = lm.bos
        span = self.seqlen - (self.bos is not None)  # text tokens per window
        full = ids.numel() // span
        n = min([full, *(c for c in (ev.max_windows, data.max_windows) if c)])
        if n == 0:
            raise UserError(
                f"validation text of '{data.name}' has {ids.numel()} tokens, fewer than seqlen={self.seqlen}"
            )
        self.windows = with_bos(ids[: n * span].view(n, span), self.bos)
        self.protocol = (
            f"perplexity: token level, {n} non-overlapping windows of {self.seqlen} tokens of {data.name} validation"
            + (" (each starts with BOS, which is not scored)" if self.bos is not None else "")
        )
        cal = settings.calibration
        self.nsamples, self.cal_seqlen = cal.nsamples, cal.seqlen or self.seqlen
        self.seed = settings.seed
        self.train_ids = lm.encode(data.train)
        if self.train_ids.numel() <= self.cal_seqlen:
            raise UserError(
                f"calibration seqlen={self.cal_seqlen} needs more than the {self.train_ids.numel()} tokens "
                f"of '{data.name}' train; lower calibration.seqlen"
            )
        if self.nsamples * self.cal_seqlen > self.train_ids.numel():
            raise UserError(
                f"calibration needs nsamples×seqlen = {self.nsamples}×{self.cal_seqlen} tokens but '{data.name}' "
                f"train has {self.train_ids.numel()}; lower calibration.nsamples or calibration.seqlen"
            )
        self.offload = self._offload_blocks(lm, ev.offload)
        self.reference: DenseReference | None = None
        if ev.reference_metrics:  # built while the model holds the dense weights (the runner builds tasks then)
            self.reference = self._dense_reference(lm, (ev.kld_topk, ev.kld_tail_samples))
            self.protocol += f"; kld, top1_agree: to the dense model on the same windows ({_topk_text(ev)})"
        self.latency_settings = ev.latency
        self._calib: list[Tensor] | None = None

        self.tokenizer = lm.tokenizer
        self.rolling: Tensor | None = None
        self.rolling_text = ""
        if ev.word_perplexity:
            # lm-eval scores a whole text; when windows are capped, the text they cover.
            text = data.valid if n == full else _text_prefix(lm.tokenizer, data.valid, n * self.seqlen)
            self.rolling_text = text
            self.rolling = torch.tensor(lm.tokenizer(text)["input_ids"], dtype=torch.long)  # encoded as lm-eval does
            what = "the whole validation text" if n == full else "the text of those windows"
            self.protocol += f"; word/byte perplexity: lm-eval rolling windows of {self.seqlen} tokens over {what}"
        self.lmeval = None
        if ev.tasks:
            from compress_order.evaluation.lmeval import LMEval

            opts = plain(ev.lm_eval)
            max_length = opts.pop("max_length", None) or self.seqlen
            self.lmeval = LMEval(list(ev.tasks), lm.tokenizer, max_length=max_length, **opts)
            self.protocol += f"; lm-eval tasks: {', '.join(ev.tasks)}"

    def _offload_blocks(self, lm: LoadedModel, offload: str | None) -> str | None:
        """With eval.offload=DEVICE, forwards compute on DEVICE one block at a time while the model stays where it
        is (device=cpu): the block list the calibration driver finds, or a one-line error when there is none."""
        if offload is None:
            return None
        from compress_order.modeling.blocks import find_blocks
        from compress_order.modeling.targets import find_targets

        self.device = torch.device(offload)
        found = find_blocks(lm.model, find_targets(lm.model, lm.skip))
        if found is None:
            raise UserError(f"eval.offload={offload}: model '{lm.name}' has no block list to stream; drop eval.offload")
        return found[0]

    @torch.no_grad()
    def _dense_reference(self, lm: LoadedModel, scheme: tuple[int | None, int]) -> DenseReference:
        """The dense distributions of the windows, computed once per loaded model (kept in lm.extra, so every
        seed of a run reuses them), with full-precision activations: KL to the uncompressed model."""
        key = (scheme, self.batch_size, str(self.device), self.offload)
        kept = lm.extra.get("dense_reference")
        if kept is not None and kept[0] == key and torch.equal(kept[1], self.windows):
            return kept[2]
        with self._placed(lm.model), paused():
            ref = dense_reference(lambda x: self._logits(lm.model, x), self.windows, self.batch_size, *scheme)
        lm.extra["dense_reference"] = (key, self.windows, ref)
        return ref

    def _logits(self, model: nn.Module, x: Tensor) -> Tensor:
        return model(input_ids=x.to(self.device), use_cache=False).logits.float()

    def _placed(self, model: nn.Module) -> ContextManager:
        """Where forwards run: as the model is, or streamed block by block onto the evaluation device."""
        from compress_order.modeling.offload import streamed

        return nullcontext() if self.offload is None else streamed(model, self.offload, self.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        with self._placed(model):
            return self._evaluate(model)

    def _evaluate(self, model: nn.Module) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        nll, kl, agree = [], [], []
        for i in range(0, len(self.windows), self.batch_size):
            x = self.windows[i : i + self.batch_size].to(self.device)
            logits = self._logits(model, x)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
            nll.append(loss.view(x.shape[0], -1).mean(1).double().cpu())
            if self.reference is not None:
                k, a = compare(self.reference, slice(i, i + x.shape[0]), logits[:, :-1])
                kl.append(k)
                agree.append(a)
        per_window = torch.cat(nll).numpy()
        ppl = math.exp(float(per_window.mean()))
        metrics = {"perplexity": ppl if math.isfinite(ppl) else float("inf")}
        samples = {"nll": per_window}
        if self.reference is not None:
            samples.update(window_samples(kl, agree))
            metrics.update({m: float(samples[m].mean()) for m in ("kld", "top1_agree")})
        if self.rolling is not None:
            metrics.update(self._rolling_metrics(model))
        if self.lmeval is not None:
            m, s = self.lmeval.evaluate(model)
            metrics.update(m)
            samples.update(s)
        return metrics, samples

    @torch.no_grad()
    def _rolling_metrics(self, model: nn.Module) -> dict[str, float]:
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        total = rolling_nll(model, self.rolling, prefix, self.seqlen, self.batch_size, self.device)
        words = len(re.split(r"\s+", self.rolling_text))  # lm-eval's count: split on whitespace runs
        nbytes = len(self.rolling_text.encode("utf-8"))
        return {
            "word_perplexity": _exp(total / words),
            "byte_perplexity": _exp(total / nbytes),
            "bits_per_byte": total / nbytes / math.log(2),
        }

    def calibration_batches(self) -> list[Tensor]:
        """`nsamples` random segments of `seqlen` train tokens, drawn once with the run's seed."""
        if self._calib is None:
            g = torch.Generator().manual_seed(self.seed)
            span = self.cal_seqlen - (self.bos is not None)
            hi = self.train_ids.numel() - span
            starts = torch.randint(0, hi, (self.nsamples,), generator=g)
            self._calib = [with_bos(self.train_ids[s : s + span].unsqueeze(0), self.bos) for s in starts.tolist()]
        return self._calib

    @torch.no_grad()
    def latency(self, model: nn.Module) -> dict[str, float]:
        with self._placed(model):  # streamed: the timings include moving each block onto the device
            return self._latency(model)

    def _latency(self, model: nn.Module) -> dict[str, float]:
        lat = self.latency_settings
        x = self.windows[:1].repeat(lat.batch, 1)[:, : lat.seqlen or self.seqlen]
        x = x.to(self.device)
        warmup, repeats = lat.warmup, lat.repeats
        med, iqr = time_call(lambda: model(input_ids=x, use_cache=False), self.device, warmup, repeats)
        out = {"latency_ms": med, "latency_ms_iqr": iqr}
        new = lat.decode_tokens
        if new:  # generation speed: one token at a time against a KV cache, after a prefill of the window
            prompt = x[:, : max(1, x.shape[1] - new)]
            out["decode_ms_per_token"] = decode_ms_per_token(model, prompt, new, self.device, 1, max(1, repeats // 3))
        return out


def _topk_text(ev: Eval) -> str:
    k, m = ev.kld_topk, ev.kld_tail_samples
    return "every token" if k is None else f"dense top-{k} tokens, the rest's mass and {m} tokens drawn from it"


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def _text_prefix(tokenizer, text: str, ntokens: int) -> str:
    """The characters covered by the first `ntokens` tokens of `text` (as `token_ids` splits it)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[: offsets[ntokens - 1][1]]
    return tokenizer.decode(token_ids(tokenizer, text)[:ntokens])


def rolling_windows(n_targets: int, seqlen: int) -> list[tuple[int, int, int]]:
    """lm-eval's loglikelihood_rolling windows (context 1) over a sequence s whose tokens s[1..n] are scored.

    Each window is (start, length, scored): input s[start:start+length] predicts s[start+1:start+length+1], of
    which the last `scored` count. Windows score disjoint runs of `seqlen` targets, each with as much left
    context as fits; the last, shorter run is right-aligned so it still sees a full window of context.
    """
    out, done = [], 0
    while done < n_targets:
        k = min(seqlen, n_targets - done)
        out.append((done, k, k) if done == 0 or k == seqlen else (n_targets - seqlen, seqlen, k))
        done += k
    return out


@torch.no_grad()
def rolling_nll(
    model: nn.Module, ids: Tensor, prefix: int | None, seqlen: int, batch_size: int, device: torch.device
) -> float:
    """Total NLL (nats) of every token of `ids`, the first predicted from `prefix` (lm-eval's BOS/EOS prefix; none:
    the first token is context only, as there is nothing to predict it from)."""
    s = ids if prefix is None else torch.cat([torch.tensor([prefix], dtype=torch.long), ids])
    windows = rolling_windows(s.numel() - 1, seqlen)
    total = 0.0
    for length in sorted({w[1] for w in windows}):  # batch windows of equal length
        same = [w for w in windows if w[1] == length]
        for i in range(0, len(same), batch_size):
            chunk = same[i : i + batch_size]
            x = torch.stack([s[a : a + length + 1] for a, _, _ in chunk]).to(device)
            logp = torch.log_softmax(model(input_ids=x[:, :-1], use_cache=False).logits.float(), -1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
            total += sum(float(nll[j, length - k :].double().sum()) for j, (_, _, k) in enumerate(chunk))
    return total
