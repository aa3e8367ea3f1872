"""What `taille info` reports: shape, parameters by part, weight sizes, prunable axes.

Counts come from the real modules, built on the meta device from the config when no weights are loaded
(so a Hub id or a 12B model costs nothing), and tied weights are counted once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from taille.models.arch import Arch, get_arch, head_dim, kv_heads, tied
from taille.models.quant import QUANTS

# Bits per weight of a 2-D tensor in the formats taille plans for (from models/quant.py); 1-D tensors
# (norms, biases) stay fp32 in GGUF.
QUANT_BITS = {name: QUANTS[name].bits for name in ("bf16", "q8_0", "q4_k_m", "q4_0")}
WEIGHT_BITS = {k: QUANT_BITS[k] for k in ("bf16", "q8_0", "q4_0")}
"""The formats `taille info` reports."""

PARTS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")


@dataclass
class Axis:
    name: str
    size: int
    granularity: int
    note: str


@dataclass
class ModelSummary:
    family: str
    model_type: str
    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    params: dict[str, int]
    """Parameters per part (PARTS) and 'total'."""
    weight_bytes: dict[str, int]
    """Weight size per format in WEIGHT_BITS."""
    axes: list[Axis] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def meta_model(config):
    """The model's modules on the meta device: shapes without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _part(arch: Arch, name: str) -> str:
    """Which part a parameter name belongs to, from the architecture table."""
    if name.startswith(arch.embed + "."):
        return "embeddings"
    if name.startswith(arch.lm_head + "."):
        return "lm_head"
    if name.startswith(arch.final_norm + "."):
        return "norms"
    if name.startswith(arch.layers + "."):
        inner = name[len(arch.layers) + 1:].split(".", 1)[1]  # drop the layer index
        attention = (arch.q_proj, arch.k_proj, arch.v_proj, arch.o_proj, arch.q_norm, arch.k_norm)
        for part, prefixes in (
            ("attention", attention),
            ("mlp", (arch.gate_proj, arch.up_proj, arch.down_proj)),
            ("norms", arch.layer_norms),
        ):
            if inner.startswith(tuple(p + "." for p in prefixes)):
                return part
    return "other"


def count_params(model) -> tuple[dict[str, int], dict[str, int]]:
    """(parameters per part with 'total', weight bytes per format). `named_parameters` yields a tied
    weight once, under the embedding's name."""
    arch = get_arch(model.config)
    params = dict.fromkeys(PARTS, 0)
    bits = dict.fromkeys(WEIGHT_BITS, 0.0)
    for name, p in model.named_parameters():
        n = p.numel()
        params[_part(arch, name)] += n
        for fmt, b in WEIGHT_BITS.items():
            bits[fmt] += n * (b if p.dim() >= 2 else 32.0)
    params["total"] = sum(params[p] for p in PARTS)
    return params, {fmt: math.ceil(b / 8) for fmt, b in bits.items()}


def prunable_axes(config) -> list[Axis]:
    arch = get_arch(config)
    heads, kv = config.num_attention_heads, kv_heads(config)
    hidden_step = math.lcm(heads, 32) if arch.hidden_multiple_of_heads else 32
    hidden_rule = (
        f"multiple of {heads} (transformers: hidden % heads == 0) and of 32 (GGUF blocks)"
        if arch.hidden_multiple_of_heads else "multiple of 32 keeps GGUF blocks whole"
    )
    return [
        Axis("depth", config.num_hidden_layers, 1, "drop whole layers (contiguous blocks score best)"),
        Axis("mlp", config.intermediate_size, 32, "any width loads; multiples of 32 (256 for k-quants) keep GGUF compact"),
        Axis("hidden", config.hidden_size, hidden_step, hidden_rule),
        Axis("heads", heads, kv, f"{heads // kv} query heads per KV group x {kv} groups, pruned evenly inside groups"),
        Axis("kv_groups", kv, 1, f"whole KV groups with their {heads // kv} query heads; head_dim {head_dim(config)} never changes"),
    ]


def summarize(config, model=None) -> ModelSummary:
    """Summary of a config (counts from a meta-device model) or of a loaded model."""
    arch = get_arch(config)
    params, weight_bytes = count_params(model if model is not None else meta_model(config))
    return ModelSummary(
        family=arch.family,
        model_type=config.model_type,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        mlp=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=kv_heads(config),
        head_dim=head_dim(config),
        vocab=config.vocab_size,
        tied_embeddings=tied(config),
        params=params,
        weight_bytes=weight_bytes,
        axes=prunable_axes(config),
    )
