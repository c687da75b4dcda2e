"""Model loaders named by `_target_` in compress_order/conf/model/*.yaml. Each returns a LoadedModel."""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress_order.core.errors import UserError
from compress_order.core.memory import apart, trim_heap
from compress_order.loaders.text import TextSplits

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


@dataclass
class LoadedModel:
    model: nn.Module
    kind: str  # selects the task: "causal_lm" or "image_classifier"
    name: str
    skip: list[str] = field(default_factory=list)  # regexes of layers left dense
    tokenizer: Any = None
    seqlen: int | None = None
    bos: int | None = None  # a token id every text window and calibration segment starts with
    extra: dict = field(default_factory=dict)
    token_ids: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # by text: `encode`

    def encode(self, text: str) -> torch.Tensor:
        """`text`'s token ids (`token_ids`), tokenized once per run: the tasks of every seed share them."""
        ids = self.token_ids.get(text)
        if ids is None:
            ids = self.token_ids[text] = apart(token_ids, self.tokenizer, text)
        return ids


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """The ids of `text` as one sequence, no special tokens (windows and segments add BOS themselves)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _dtype(name: str) -> Any:
    if name not in DTYPES:
        raise UserError(f"model.dtype={name} is unknown; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _decompressed(path: str) -> dict[str, Any]:
    """A compressed-tensors checkpoint (compress-order's own export) loads decompressed: transformers would keep its
    layers packed, with no `.weight` to compress further or to evaluate as the node was."""
    import json

    cfg = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(cfg):
        return {}
    try:
        qc = json.loads(open(cfg, encoding="utf-8").read()).get("quantization_config") or {}
    except (OSError, ValueError):
        return {}
    if qc.get("quant_method") != "compressed-tensors":
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(run_compressed=False)}


def _check_local(name: str, path: str, gguf_file: str | None, missing_hint: str | None) -> None:
    """A local path is there, and a folder (without a GGUF file named) holds a checkpoint's config.json."""
    local_file = os.path.join(path, gguf_file) if gguf_file else path
    if path.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(local_file)):
        hint = missing_hint or "pass model.path=/dir/with/config.json"
        raise UserError(f"model '{name}': local path '{local_file}' does not exist; {hint}")
    if (
        not gguf_file
        and os.path.isdir(os.path.expanduser(path))
        and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json"))
    ):
        raise UserError(
            f"model '{name}': folder '{path}' has no config.json; expected a Hugging Face checkpoint folder "
            f"(config.json, *.safetensors weights, tokenizer files) or model.gguf_file=<file in it>"
        )


def causal_lm(
    name: str,
    path: str,
    dtype: str = "auto",
    seqlen: int | None = None,
    skip: list[str] = ("lm_head",),
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    group_size: int | None = None,
    missing_hint: str | None = None,
    bos: bool = False,
    data: Any = None,
) -> LoadedModel:
    """A Hugging Face causal LM through from_pretrained: a hub id or a local directory.

    `bos`: every evaluation window and calibration segment starts with the tokenizer's BOS token, for models
    trained never to see text without it (Gemma's perplexity on prose is about 3× worse without it).

    `group_size` is the quantization group size that divides this model's layers: the top-level `group_size`
    defaults to it (compress_order/conf/config.yaml). `missing_hint` says how to obtain local weights that are not there.

    `data`: the run's data (the pipeline passes it, no yaml sets it). Its texts are tokenized before the weights
    load: the tokenizer's temporaries (~400 bytes per token, 0.39 GB for the embedded Shakespeare's training text)
    then come and go while the process holds no model, and are given back before the weights arrive.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (the order trie's) is enough

    _check_local(name, path, gguf_file, missing_hint)
    kw: dict[str, Any] = dict(revision=revision, trust_remote_code=trust_remote_code)
    if gguf_file:
        kw["gguf_file"] = gguf_file
    mkw = _decompressed(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        # on a thread of its own (apart), and trimmed: the tokenizer's freed temporaries go back before the weights
        # arrive, and leave no holes in the main heap for the run's tensors to stay resident in
        texts = (data.valid, data.train) if isinstance(data, TextSplits) else ()
        ids = {t: apart(token_ids, tok, t) for t in texts}
        trim_heap()
        with warnings.catch_warnings():  # "quantization_config from the model will be used": ours only decompresses
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype), **kw, **mkw)
    except (OSError, ValueError) as e:
        local = os.path.isdir(path) or os.path.isfile(path)
        why = str(e).strip().splitlines()[0][:160]
        hint = "" if local else "; download the weights and pass model.path=/dir/with/config.json"
        raise UserError(f"model '{name}': cannot load '{path}' ({type(e).__name__}: {why}){hint}") from None
    model.eval()
    if seqlen is None:
        seqlen = int(getattr(model.config, "max_position_embeddings", 2048))
    if bos and tok.bos_token_id is None:
        raise UserError(f"model '{name}': model.bos=true but its tokenizer has no BOS token; set model.bos=false")
    return LoadedModel(
        model=model,
        kind="causal_lm",
        name=name,
        skip=list(skip),
        tokenizer=tok,
        seqlen=int(seqlen),
        bos=tok.bos_token_id if bos else None,
        token_ids=ids,
    )


def check_skip(skip: Any) -> None:
    """`model.skip`: a list of regexes (a bare string would be read as one regex per character)."""
    if not isinstance(skip, (list, tuple)) or not all(isinstance(r, str) for r in skip):
        raise UserError(f"model.skip={skip} must be a list of regexes, e.g. model.skip=[lm_head]")
    for r in skip:
        try:
            re.compile(r)
        except re.error as e:
            raise UserError(f"model.skip: '{r}' is not a regex ({e})") from None


def _check_causal_lm_node(node: dict[str, Any]) -> None:
    """Config-time check (validate.check_config): the values a load would refuse or misread, and that local
    weights are there, before any model loads."""
    _dtype(node.get("dtype", "auto"))
    seqlen = node.get("seqlen")
    if seqlen is not None and (isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1):
        raise UserError(f"model.seqlen={seqlen} must be an integer ≥ 1 or null (the model's context length)")
    check_skip(node.get("skip", ["lm_head"]))
    path = node.get("path")
    if isinstance(path, str):
        _check_local(str(node.get("name")), path, node.get("gguf_file"), node.get("missing_hint"))


causal_lm.check_node = _check_causal_lm_node  # type: ignore[attr-defined]
causal_lm.kind = "causal_lm"  # type: ignore[attr-defined]  (the task that evaluates it, before it loads)
