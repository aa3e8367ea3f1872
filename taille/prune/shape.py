"""Pruned shapes: exact parameter counts, the rules a shape must follow, and the search for a shape that
meets a parameter target.

A shape keeps every layer the same width, so it is five numbers of a standard config. Counting is a
closed form over the architecture table (checked against real meta-device models in the tests), so the
search can try thousands of shapes in milliseconds.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass

from taille.errors import TailleError
from taille.options import parse_count
from taille.models.arch import flag, get_arch, head_dim, kv_heads, tied

AXES = ("mlp", "hidden", "heads", "kv_groups", "depth")
MLP_STEPS = (256, 128, 64, 32, 16, 8, 1)
"""Preferred MLP granularity, coarsest first: k-quant blocks (256), then smaller, as the target needs."""


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int

    def to_dict(self) -> dict:
        return asdict(self)


def shape_of(config) -> Shape:
    return Shape(config.hidden_size, config.intermediate_size, config.num_attention_heads, kv_heads(config),
                 config.num_hidden_layers)


def count_params(config, shape: Shape | None = None) -> int:
    """Exact parameter count of `config` reshaped to `shape` (tied embeddings counted once)."""
    arch, s = get_arch(config), shape or shape_of(config)
    hd, V = head_dim(config), config.vocab_size
    q, kv = s.heads * hd, s.kv_heads * hd
    attn = s.hidden * q + 2 * s.hidden * kv + q * s.hidden
    attn += (q + 2 * kv) * flag(config, arch.qkv_bias) + s.hidden * flag(config, arch.o_bias)
    attn += 2 * hd * arch.qk_norm
    mlp = 3 * s.hidden * s.ffn + (2 * s.ffn + s.hidden) * bool(getattr(config, "mlp_bias", False))
    norms = len(arch.layer_norms) * s.hidden
    embeddings = V * s.hidden * (1 if tied(config) else 2)
    return embeddings + s.hidden + s.layers * (attn + mlp + norms)


def hidden_step(config, heads: int) -> int:
    """Granularity of hidden_size: 32 (GGUF blocks), and a multiple of the head count where transformers
    requires it."""
    return math.lcm(heads, 32) if get_arch(config).hidden_multiple_of_heads else 32


def check_shape(config, s: Shape) -> None:
    """Raise a message naming the values that would work when `s` cannot be cut from `config`."""
    base = shape_of(config)
    for name in ("hidden", "ffn", "heads", "kv_heads", "layers"):
        value, limit = getattr(s, name), getattr(base, name)
        if value < 1:
            raise TailleError(f"--{name.replace('_', '-')} {value}: every axis keeps at least 1")
        if value > limit:
            raise TailleError(f"--{name.replace('_', '-')} {value} is larger than the model's {limit}; pruning only removes")
    group = base.heads // base.kv_heads
    if s.heads % s.kv_heads or s.heads // s.kv_heads > group:
        valid = [s.kv_heads * g for g in range(1, group + 1)]
        raise TailleError(
            f"--heads {s.heads} with --kv-heads {s.kv_heads} breaks KV grouping: each of the {s.kv_heads} KV groups "
            f"keeps the same number of query heads (at most its {group}); valid --heads: {', '.join(map(str, valid))}")
    if get_arch(config).hidden_multiple_of_heads and s.hidden % s.heads:
        lo, step = s.hidden - s.hidden % s.heads, hidden_step(config, s.heads)
        near = [v for v in (lo, lo + s.heads) if 0 < v <= base.hidden]
        gguf = [v for v in range(step, base.hidden + 1, step)]
        raise TailleError(
            f"--hidden {s.hidden} is not a multiple of {s.heads} attention heads, which transformers requires for "
            f"{config.model_type}; nearest valid: {', '.join(map(str, near))}; GGUF-friendly (multiple of {step}): "
            f"{', '.join(map(str, gguf)) or 'none'}")


def parse_params(text) -> int:
    """'90M', '8.4B', '134515008' -> an integer count."""
    return parse_count(text, "params")


def _balance(base: Shape, s: Shape, axes) -> float:
    """The largest fraction any chosen axis loses: the search prefers spreading the cut."""
    fields = {"mlp": "ffn", "hidden": "hidden", "heads": "heads", "kv_groups": "kv_heads", "depth": "layers"}
    return max(1 - getattr(s, fields[a]) / getattr(base, fields[a]) for a in axes)


def search_shape(config, target: int, axes=("mlp", "hidden"), tolerance: float = 0.01) -> Shape:
    """The shape within `tolerance` of `target` parameters that prunes the chosen axes most evenly
    (smallest largest cut), then the coarsest MLP step (256 before 128 ...), then closest to the target."""
    unknown = set(axes) - set(AXES)
    if unknown or not axes:
        raise TailleError(f"--axes {','.join(axes)}: choose among {', '.join(AXES)}")
    base, total = shape_of(config), count_params(config)
    if target >= total:
        raise TailleError(f"target {target:,} parameters is not smaller than the model ({total:,})")
    group = base.heads // base.kv_heads
    kv_options = range(1, base.kv_heads + 1) if "kv_groups" in axes else [base.kv_heads]
    per_group = range(1, group + 1) if "heads" in axes else [group]
    layer_options = range(1, base.layers + 1) if "depth" in axes else [base.layers]
    best, best_key = None, None
    for kv, g, layers in itertools.product(kv_options, per_group, layer_options):
        heads = kv * g
        step = hidden_step(config, heads)
        hiddens = range(step, base.hidden + 1, step) if "hidden" in axes else [base.hidden]
        for hidden in hiddens:
            if "hidden" not in axes and get_arch(config).hidden_multiple_of_heads and hidden % heads:
                continue
            for ffn, mlp_step in _ffn_options(config, Shape(hidden, base.ffn, heads, kv, layers), target, "mlp" in axes):
                s = Shape(hidden, ffn, heads, kv, layers)
                error = abs(count_params(config, s) - target) / target
                if error > tolerance:
                    continue
                key = (round(_balance(base, s, axes), 6), -mlp_step, error)
                if best_key is None or key < best_key:
                    best, best_key = s, key
    if best is None:
        smallest = count_params(config, Shape(
            hidden_step(config, base.kv_heads) if "hidden" in axes else base.hidden, 1 if "mlp" in axes else base.ffn,
            base.kv_heads if "heads" in axes else base.heads, 1 if "kv_groups" in axes else base.kv_heads,
            1 if "depth" in axes else base.layers))
        raise TailleError(
            f"no shape pruning {','.join(axes)} lands within {tolerance:.0%} of {target:,} parameters "
            f"(the model has {total:,}; the smallest shape on these axes has about {smallest:,}); "
            "add axes (--axes mlp,hidden,heads,depth) or change the target")
    return best


def _ffn_options(config, s: Shape, target: int, free: bool):
    """MLP widths to try for a shape whose other axes are fixed: the width that hits the target, rounded
    at each step of MLP_STEPS (count_params is linear in ffn)."""
    if not free:
        yield s.ffn, 0
        return
    at0 = count_params(config, Shape(s.hidden, 0, s.heads, s.kv_heads, s.layers))
    per_neuron = count_params(config, Shape(s.hidden, 1, s.heads, s.kv_heads, s.layers)) - at0
    exact = (target - at0) / per_neuron
    for step in MLP_STEPS:
        for ffn in {math.floor(exact / step) * step, math.ceil(exact / step) * step}:
            if 1 <= ffn <= s.ffn:
                yield ffn, step


def pruned_config(config, s: Shape, kept_layers: list[int] | None = None):
    """A copy of `config` with the new widths; head_dim is written out since it must not change."""
    new = copy.deepcopy(config)
    new.hidden_size, new.intermediate_size = s.hidden, s.ffn
    new.num_attention_heads, new.num_key_value_heads = s.heads, s.kv_heads
    new.head_dim = head_dim(config)
    new.num_hidden_layers = s.layers
    kept = kept_layers if kept_layers is not None else list(range(s.layers))
    if getattr(config, "layer_types", None):
        new.layer_types = [config.layer_types[i] for i in kept]
    return new
