"""Per-architecture facts, as data.

Every stage that touches weights (importance, prune, distill, export) finds modules through this table,
never through `if model_type == ...` chains. Module paths are relative to the `*ForCausalLM` module;
`{i}` in a layer path is the layer index.
"""

from __future__ import annotations

from dataclasses import dataclass

from taille.errors import TailleError


@dataclass(frozen=True)
class Arch:
    """Where a decoder-only family keeps its parts, and the rules its config follows."""

    family: str
    """Our name for the family (also the key of ARCHS)."""
    model_types: tuple[str, ...]
    """`config.model_type` values handled by this entry."""
    gguf_arch: str
    """`general.architecture` in GGUF files (llama.cpp's name)."""
    qkv_bias: str | bool
    """Whether q/k/v projections have biases: a fixed bool, or the config attribute that says so."""
    o_bias: str | bool
    """Whether o_proj has a bias: a fixed bool, or the config attribute that says so."""
    qk_norm: bool
    """Per-head RMSNorm on queries and keys (`q_norm`, `k_norm`, each of size head_dim)."""
    block_norms: tuple[str, ...]
    """Norms whose output feeds attention or the MLP (pre-norms), in order. Their outputs are the
    activations used for hidden-channel importance."""
    post_norms: tuple[str, ...] = ()
    """Norms applied to a sub-block's output before the residual add (Gemma's sandwich norms)."""
    head_dim_free: bool = False
    """True when `head_dim` is its own config field (Qwen3, Gemma3); False when it defaults to
    hidden_size // num_attention_heads and must be written out explicitly once widths change."""
    hidden_multiple_of_heads: bool = False
    """transformers refuses a config whose hidden_size is not a multiple of num_attention_heads, even
    with an explicit head_dim (checked with transformers 5.24)."""
    embed_scale_sqrt_hidden: bool = False
    """Embeddings are multiplied by sqrt(hidden_size) (Gemma). Pruning hidden changes the scale."""
    norm_weight_offset: float = 0.0
    """RMSNorm computes x * (offset + weight): 1.0 for Gemma, 0.0 for the rest."""
    logit_softcap: str | None = None
    """Config attribute holding a final-logit soft cap (tanh(x / c) * c), if the family has one."""
    tied_default: bool = False
    """The family's default for `tie_word_embeddings` (the config field decides for a given model)."""

    # Module paths, shared by every family supported today. They are fields so a family that names
    # things differently is one new row, not a new code path.
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    base: str = "model"
    """The decoder stack without the LM head (returns final-normed hidden states)."""

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """Every norm inside a layer (pre and post)."""
        return self.block_norms + self.post_norms


_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")

ARCHS: dict[str, Arch] = {
    "llama": Arch(
        family="llama", model_types=("llama",), gguf_arch="llama",
        qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=False, block_norms=_LLAMA_NORMS,
        hidden_multiple_of_heads=True,
    ),
    "mistral": Arch(
        family="mistral", model_types=("mistral",), gguf_arch="llama",
        qkv_bias=False, o_bias=False, qk_norm=False, block_norms=_LLAMA_NORMS,
    ),
    "qwen2": Arch(
        family="qwen2", model_types=("qwen2",), gguf_arch="qwen2",
        qkv_bias=True, o_bias=False, qk_norm=False, block_norms=_LLAMA_NORMS,
    ),
    "qwen3": Arch(
        family="qwen3", model_types=("qwen3",), gguf_arch="qwen3",
        qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True, block_norms=_LLAMA_NORMS,
        head_dim_free=True,
    ),
    "gemma3": Arch(
        family="gemma3", model_types=("gemma3_text",), gguf_arch="gemma3",
        qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True,
        block_norms=("input_layernorm", "pre_feedforward_layernorm"),
        post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        head_dim_free=True, hidden_multiple_of_heads=True, embed_scale_sqrt_hidden=True, norm_weight_offset=1.0,
        logit_softcap="final_logit_softcapping", tied_default=True,
    ),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHS.values() for t in a.model_types)


def get_arch(config) -> Arch:
    """The table row for a transformers config (or a `model_type` string)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    for arch in ARCHS.values():
        if model_type in arch.model_types:
            return arch
    hint = ""
    if model_type == "gemma3":
        hint = " (this is the multimodal Gemma 3; use its text-only checkpoint, model_type gemma3_text)"
    raise TailleError(
        f"unsupported architecture {model_type}{hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def flag(config, value: str | bool) -> bool:
    """Resolve a table entry that is either a fixed bool or the name of a config attribute."""
    return bool(getattr(config, value, False)) if isinstance(value, str) else value


def head_dim(config) -> int:
    """Attention head size: the explicit `head_dim` when the config has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def layer_path(arch: Arch, i: int, part: str) -> str:
    """Full module path of `part` (a table entry such as arch.q_proj) inside layer i."""
    return f"{arch.layers}.{i}.{part}"
