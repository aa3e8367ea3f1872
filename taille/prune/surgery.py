"""Weight surgery: slice a model in place to a smaller standard shape.

`prune_width_` keeps chosen hidden channels, query heads (and KV groups) and MLP neurons; `drop_layers_`
removes layers. Both work through the architecture table only, so every supported family (biases,
q/k norms, Gemma's sandwich norms and embedding scale, tied or untied heads) goes down one path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from taille.models.arch import get_arch, head_dim, kv_heads, tied
from taille.prune.shape import Shape, pruned_config, shape_of

log = logging.getLogger(__name__)


@dataclass
class WidthPlan:
    """Indices to keep, each sorted ascending (query heads: group by group)."""

    hidden: list[int]
    heads: list[list[int]]
    """Per layer: kept query heads, the heads of kept KV group 0 first, then group 1, ..."""
    kv_groups: list[list[int]]
    """Per layer: kept KV heads."""
    neurons: list[list[int]]
    """Per layer: kept MLP neurons."""

    def to_dict(self) -> dict:
        return {"hidden": self.hidden, "heads": self.heads, "kv_groups": self.kv_groups, "neurons": self.neurons}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (ties broken by lower index)."""
    order = torch.argsort(-scores.float(), stable=True)[:k]
    return sorted(order.tolist())


def select_width(scores, config, s: Shape) -> WidthPlan:
    """The kept indices for shape `s` given importance `scores` (heads (L, nh), neurons (L, ffn),
    hidden (H,)). GQA: KV groups are ranked by the summed score of their query heads, and query heads
    are ranked inside their own group, so every kept group keeps the same number of heads."""
    base = shape_of(config)
    group, new_group = base.heads // base.kv_heads, s.heads // s.kv_heads
    heads, kv_groups = [], []
    for layer_scores in scores.heads:  # (nh,)
        by_group = layer_scores.view(base.kv_heads, group)  # (kv, group)
        kept_groups = _top(by_group.sum(dim=1), s.kv_heads)
        kv_groups.append(kept_groups)
        heads.append([k * group + h for k in kept_groups for h in _top(by_group[k], new_group)])
    return WidthPlan(
        hidden=_top(scores.hidden, s.hidden),
        heads=heads,
        kv_groups=kv_groups,
        neurons=[_top(n, s.ffn) for n in scores.neurons],
    )


def _head_rows(heads: list[int], hd: int) -> torch.Tensor:
    """Row indices of whole heads in a (heads * head_dim, ...) projection."""
    return (torch.tensor(heads)[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


def _slice_linear_(linear: torch.nn.Linear, rows=None, cols=None) -> None:
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows]
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data[rows].clone(), requires_grad=linear.bias.requires_grad)
    if cols is not None:
        weight = weight[:, cols]
    linear.weight = torch.nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def _slice_vector_(module, idx) -> None:
    module.weight = torch.nn.Parameter(module.weight.data[idx].clone(), requires_grad=module.weight.requires_grad)


@torch.no_grad()
def prune_width_(model, plan: WidthPlan) -> Shape:
    """Slice `model` in place to the plan's widths; updates the config; returns the new shape."""
    config, arch = model.config, get_arch(model.config)
    hd = head_dim(config)
    old_hidden = config.hidden_size
    hidden = torch.tensor(plan.hidden)
    was_tied = tied(config)
    layers = model.get_submodule(arch.layers)
    for i, layer in enumerate(layers):
        q_rows, kv_rows = _head_rows(plan.heads[i], hd), _head_rows(plan.kv_groups[i], hd)
        neurons = torch.tensor(plan.neurons[i])
        _slice_linear_(layer.get_submodule(arch.q_proj), rows=q_rows, cols=hidden)
        _slice_linear_(layer.get_submodule(arch.k_proj), rows=kv_rows, cols=hidden)
        _slice_linear_(layer.get_submodule(arch.v_proj), rows=kv_rows, cols=hidden)
        _slice_linear_(layer.get_submodule(arch.o_proj), rows=hidden, cols=q_rows)
        _slice_linear_(layer.get_submodule(arch.gate_proj), rows=neurons, cols=hidden)
        _slice_linear_(layer.get_submodule(arch.up_proj), rows=neurons, cols=hidden)
        _slice_linear_(layer.get_submodule(arch.down_proj), rows=hidden, cols=neurons)
        for norm in arch.layer_norms:
            _slice_vector_(layer.get_submodule(norm), hidden)
        # q_norm / k_norm act on head_dim, which never changes.
        layer.get_submodule(arch.q_proj.rpartition(".")[0]).num_key_value_groups = len(plan.heads[i]) // len(plan.kv_groups[i])
    embed = model.get_submodule(arch.embed)
    embed.weight = torch.nn.Parameter(embed.weight.data[:, hidden].clone())
    embed.embedding_dim = len(plan.hidden)
    _slice_vector_(model.get_submodule(arch.final_norm), hidden)
    lm_head = model.get_submodule(arch.lm_head)
    if was_tied:
        lm_head.weight = embed.weight
        lm_head.in_features = len(plan.hidden)
    else:
        _slice_linear_(lm_head, cols=hidden)
    new = Shape(len(plan.hidden), len(plan.neurons[0]), len(plan.heads[0]), len(plan.kv_groups[0]), len(layers))
    new_config = pruned_config(config, new, kept_layers=list(range(len(layers))))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        setattr(config, key, getattr(new_config, key))
    if arch.embed_scale_sqrt_hidden and new.hidden != old_hidden:
        # Gemma multiplies embeddings by sqrt(hidden_size), recomputed from the config on load; match it
        # here so the in-memory model equals the saved one.
        embed.embed_scale = torch.tensor(math.sqrt(new.hidden), dtype=embed.embed_scale.dtype,
                                         device=embed.embed_scale.device)
    return new


def drop_layers_(model, drop: list[int]) -> list[int]:
    """Remove layers in place; renumber the rest (KV-cache slots) and the config; return the kept indices."""
    config, arch = model.config, get_arch(model.config)
    parent_name, _, attr = arch.layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    drop_set = set(drop)
    kept = [i for i in range(len(layers)) if i not in drop_set]
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in kept]))
    for j, layer in enumerate(getattr(parent, attr)):
        layer.get_submodule(arch.q_proj.rpartition(".")[0]).layer_idx = j
    new_config = pruned_config(config, Shape(config.hidden_size, config.intermediate_size,
                                              config.num_attention_heads, kv_heads(config), len(kept)), kept)
    config.num_hidden_layers = new_config.num_hidden_layers
    if getattr(config, "layer_types", None):
        config.layer_types = new_config.layer_types
    return kept
