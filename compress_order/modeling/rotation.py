"""Rotating a decoder's residual stream by an orthogonal Q, fused into the weights (QuaRot, Ashkboos et al. 2024).

In a pre-norm decoder every block reads the residual stream h through an RMSNorm and writes back by adding a
linear layer's output. RMSNorm(h) = h / rms(h) · γ, and rms(hQ) = rms(h) for an orthogonal Q, so once each norm's
γ is folded into the layers that read its output (W ← W·diag(γ), γ ← 1) the whole network computes the same
function on the rotated stream h' = hQ when
  * every layer reading the stream gets W ← W·Q (q/k/v, gate/up, routers, experts' gate_up, lm_head),
  * every layer writing it gets W ← Qᵀ·W and b ← b·Q (o_proj, down_proj, experts' down_proj and its bias),
  * the embedding's rows get E ← E·Q.
All of these are one operation: every vector along the axis that meets the stream (a reader's input axis, a
writer's output axis, an embedding row) becomes v·Q. `heads` adds a per-head rotation of each value head and the
matching o_proj columns (v_h ← v_h·H_d), exact as attention mixes whole value vectors.

Which layers read and write is known by name for the RMSNorm decoder families of transformers (LLaMA, Mistral,
Qwen2, Phi-3, and the MoE families' routers, fused experts and shared experts); anything else of the stream's width
in a block makes the model unsupported rather than half rotated. LayerNorm subtracts the mean, which does not
commute with a rotation, and Gemma2/3's norms after each sublayer scale what is written per channel: both refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from compress_order.core.errors import UserError
from compress_order.modeling.targets import expert_params, text_config

ATTN_NORM, MLP_NORM = "input_layernorm", "post_attention_layernorm"
READERS = {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa"}
READERS |= {"gate_proj", "up_proj", "gate_up_proj", "shared_expert_gate"}
ROUTERS = {"gate", "router"}  # a module with one weight row per expert over the stream
WRITERS = {"o_proj", "down_proj"}
INTERNAL = {"q_b_proj", "kv_b_proj"}  # MLA's up-projections read its low-rank codes, not the stream
SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_norm")
SUPPORTED = "LLaMA, Mistral, Qwen2, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS"


@dataclass
class Along:
    """A tensor whose vectors along `axis` meet the residual stream."""

    tensor: Tensor
    axis: int


@dataclass
class ResidualMap:
    hidden: int
    embedding: Along
    norms: list[tuple[nn.Module, list[Along]]]  # each norm with what reads its output (γ folds into those)
    writers: list[Along]
    values: list[tuple[Along, int]] = field(default_factory=list)  # v's output rows, by head width (heads)
    outputs: list[tuple[Along, int]] = field(default_factory=list)  # o_proj's input columns, by head width

    def readers(self) -> list[Along]:
        return [r for _, rs in self.norms for r in rs]


def _unsupported(model: nn.Module, why: str) -> UserError:
    return UserError(f"rotate cannot rotate {type(model).__name__}: {why} (supported: {SUPPORTED})")


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _sublayer_weights(model: nn.Module, sub: nn.Module, where: str, hidden: int) -> tuple[list[Along], list[Along]]:
    """The tensors of one sublayer (attention or MLP) that read and that write the stream."""
    readers: list[Along] = []
    writers: list[Along] = []
    for name, mod in sub.named_modules():
        leaf = _leaf(name)
        params = expert_params(mod)
        if params:  # fused experts: (E, out, in), or (E, in, out) when transposed
            t = bool(mod.is_transposed)
            for p in params:
                w = getattr(mod, p).data
                if p == "down_proj":
                    writers.append(Along(w, 1 if not t else 2))
                    bias = getattr(mod, "down_proj_bias", None)
                    if isinstance(bias, Tensor):
                        writers.append(Along(bias.data, 1))
                else:
                    readers.append(Along(w, 2 if not t else 1))
            continue
        if isinstance(mod, nn.Linear):
            if leaf in READERS:
                readers.append(Along(mod.weight.data, 1))
            elif leaf in WRITERS:
                writers.append(Along(mod.weight.data, 0))
                if mod.bias is not None:
                    writers.append(Along(mod.bias.data, 0))
            elif leaf not in INTERNAL and hidden in mod.weight.shape:
                raise _unsupported(
                    model,
                    f"{where}.{name} ({type(mod).__name__}) is of the stream's width, and rotate "
                    f"does not know whether it reads or writes the stream",
                )
        elif leaf in ROUTERS and isinstance(getattr(mod, "weight", None), Tensor) and mod.weight.dim() == 2:
            readers.append(Along(mod.weight.data, 1))
    return readers, writers


def rms_scale(norm: nn.Module, model: nn.Module, where: str) -> Tensor:
    """γ of an RMSNorm computing x / rms(x) · γ (checked on a probe vector: not LayerNorm, not Gemma's (1 + γ))."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise _unsupported(model, f"{where} ({type(norm).__name__}) is not an RMSNorm with one scale per channel")
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x = torch.linspace(-1.0, 3.0, w.numel(), dtype=torch.float32, device=w.device)  # mean ≠ 0: LayerNorm differs
    with torch.no_grad():
        got = norm(x.to(w.dtype)[None]).float()[0]
    want = x / torch.sqrt(x.pow(2).mean() + eps) * w.detach().float()
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
        raise _unsupported(model, f"{where} ({type(norm).__name__}) does not compute x / rms(x) · weight")
    return w.data


def residual_map(model: nn.Module, blocks: nn.ModuleList, heads: bool = False) -> ResidualMap:
    """What reads and writes the residual stream of a decoder LM, or UserError naming why it cannot be rotated."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is None or head is None:
        raise _unsupported(model, "it has no input and output embeddings")
    hidden = embed.weight.shape[1]
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    final = next((getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
    if final is None:
        raise _unsupported(model, "no final norm found")
    rmap = ResidualMap(hidden, Along(embed.weight.data, 1), [], [])
    config = text_config(model)
    for i, block in enumerate(blocks):
        where = f"block {i}"
        sandwich = [n for n in SANDWICH if hasattr(block, n)]
        if sandwich:
            raise _unsupported(
                model,
                f"{where} has {sandwich[0]}: norms after a sublayer scale what it writes per "
                f"channel, which no rotation fused into the weights commutes with",
            )
        if not hasattr(block, ATTN_NORM) or not hasattr(block, MLP_NORM):
            kind = next((type(m).__name__ for m in block.modules() if "Norm" in type(m).__name__), "none")
            raise _unsupported(model, f"{where} has no {ATTN_NORM}/{MLP_NORM} RMSNorms (its norms: {kind})")
        attn = getattr(block, "self_attn", None)
        mlp = getattr(block, "mlp", None) or getattr(block, "block_sparse_moe", None)
        if attn is None or mlp is None:
            raise _unsupported(model, f"{where} has no self_attn and mlp")
        for norm_name, sub, sub_name in ((ATTN_NORM, attn, "self_attn"), (MLP_NORM, mlp, "mlp")):
            readers, writers = _sublayer_weights(model, sub, f"{where}.{sub_name}", hidden)
            if not readers or not writers:
                raise _unsupported(model, f"{where}.{sub_name}: no layer found that reads or writes the stream")
            norm = getattr(block, norm_name)
            rms_scale(norm, model, f"{where}.{norm_name}")
            rmap.norms.append((norm, readers))
            rmap.writers += writers
        if heads:
            _head_parts(model, attn, config, rmap, where)
    rms_scale(final, model, "the final norm")
    rmap.norms.append((final, [Along(head.weight.data, 1)]))
    return rmap


def _head_parts(model: nn.Module, attn: nn.Module, config, rmap: ResidualMap, where: str) -> None:
    d = getattr(attn, "head_dim", None) or getattr(config, "head_dim", None)
    n_q = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    o = getattr(attn, "o_proj", None)
    if not isinstance(d, int) or not isinstance(n_q, int) or not isinstance(o, nn.Linear):
        raise _unsupported(model, f"{where}: heads=true needs the attention's head width and o_proj")
    if isinstance(getattr(attn, "v_proj", None), nn.Linear):
        v = attn.v_proj
        rmap.values.append((Along(v.weight.data, 0), d))
        if v.bias is not None:
            rmap.values.append((Along(v.bias.data, 0), d))
    elif isinstance(getattr(attn, "qkv_proj", None), nn.Linear):  # Phi-3: rows q, then k, then v
        qkv = attn.qkv_proj
        start = (n_q + n_kv) * d
        rmap.values.append((Along(qkv.weight.data[start:], 0), d))
        if qkv.bias is not None:
            rmap.values.append((Along(qkv.bias.data[start:], 0), d))
    else:
        raise _unsupported(
            model, f"{where}: heads=true needs a v_proj or qkv_proj (multi-head latent attention has none)"
        )
    rmap.outputs.append((Along(o.weight.data, 1), d))


def online_sites(model: nn.Module, blocks: nn.ModuleList) -> dict[str, nn.Linear]:
    """The down projections whose input an online rotation turns (by their names in the model), or UserError for
    a block whose down projection is inside a fused experts module (no input to turn from outside)."""
    names = {id(m): n for n, m in model.named_modules()}
    sites: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        down = getattr(mlp, "down_proj", None)
        if not isinstance(down, nn.Linear):
            raise _unsupported(
                model,
                f"block {i}: online=true turns a down_proj Linear's input at run time, and this "
                f"block's MLP has none (fused experts compute theirs inside)",
            )
        sites[names[id(down)]] = down
    return sites


@torch.no_grad()
def rotate_along(a: Along, q: Tensor) -> None:
    """Every vector of `a.tensor` along `a.axis` becomes v·Q, in float64, written back in place in its dtype; a
    Q smaller than the axis is applied block-diagonally (one per head)."""
    x = a.tensor.double().movedim(a.axis, -1)
    n = q.shape[0]
    shape = x.shape
    x = (x.reshape(*shape[:-1], shape[-1] // n, n) @ q.to(x.device)).reshape(shape)
    a.tensor.copy_(x.movedim(-1, a.axis).to(a.tensor.dtype))


@torch.no_grad()
def scale_along(a: Along, s: Tensor) -> None:
    shape = [1] * a.tensor.dim()
    shape[a.axis] = -1
    a.tensor.copy_((a.tensor.double() * s.double().to(a.tensor.device).view(shape)).to(a.tensor.dtype))


@torch.no_grad()
def rotate_residual(rmap: ResidualMap, q: Tensor, head_q: Tensor | None = None) -> None:
    """Fold every norm's γ into its readers (γ ← 1), then rotate the stream by `q` (and each value head by
    `head_q`): the model computes the same function."""
    for norm, readers in rmap.norms:
        for r in readers:
            scale_along(r, norm.weight.data)
        norm.weight.data.fill_(1.0)
    for a in [rmap.embedding, *rmap.readers(), *rmap.writers]:
        rotate_along(a, q)
    if head_q is not None:
        for a, d in rmap.values + rmap.outputs:
            rotate_along(a, head_q)
