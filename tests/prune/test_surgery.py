"""Exactness of weight surgery on tiny models of every family."""

import copy

import pytest
import torch

from taille.models.arch import get_arch, head_dim
from taille.models.load import load_model
from taille.prune.importance import random_importance, without_layers
from taille.prune.shape import Shape, count_params, shape_of
from taille.prune.surgery import WidthPlan, drop_layers_, prune_width_, select_width
from tests.conftest import save_tiny


@pytest.fixture
def model(tmp_path, family):
    m, _ = load_model(str(save_tiny(tmp_path / family, family, tied=family == "gemma3")), dtype="fp32")
    return m


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def full_plan(config) -> WidthPlan:
    s = shape_of(config)
    return WidthPlan(hidden=list(range(s.hidden)), heads=[list(range(s.heads))] * s.layers,
                     kv_groups=[list(range(s.kv_heads))] * s.layers, neurons=[list(range(s.ffn))] * s.layers)


def test_pruning_nothing_is_identical(model):
    before = logits(model, IDS)
    prune_width_(model, full_plan(model.config))
    assert torch.equal(logits(model, IDS), before)


def test_mlp_neurons_equal_masking(model):
    arch, L = get_arch(model.config), model.config.num_hidden_layers
    plan = full_plan(model.config)
    plan.neurons = [[n for n in range(model.config.intermediate_size) if n % 3 != i % 3] for i in range(L)]
    masked = copy.deepcopy(model)
    for i, layer in enumerate(masked.get_submodule(arch.layers)):
        dropped = [n for n in range(model.config.intermediate_size) if n not in plan.neurons[i]]
        layer.get_submodule(arch.down_proj).weight.data[:, dropped] = 0  # the neurons' outputs vanish
    prune_width_(model, plan)
    assert model.config.intermediate_size == len(plan.neurons[0])
    torch.testing.assert_close(logits(model, IDS), logits(masked, IDS), atol=1e-5, rtol=0)


def test_query_heads_equal_masking(model):
    arch, hd, L = get_arch(model.config), head_dim(model.config), model.config.num_hidden_layers
    plan = full_plan(model.config)
    plan.heads = [[0, 3], [1, 2]][:L] * (L // 2)  # one head per KV group (groups are {0,1} and {2,3})
    masked = copy.deepcopy(model)
    for i, layer in enumerate(masked.get_submodule(arch.layers)):
        for h in set(range(4)) - set(plan.heads[i]):
            layer.get_submodule(arch.o_proj).weight.data[:, h * hd:(h + 1) * hd] = 0
    prune_width_(model, plan)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(model, IDS), logits(masked, IDS), atol=1e-5, rtol=0)


def test_whole_kv_groups_equal_masking(model):
    arch, hd = get_arch(model.config), head_dim(model.config)
    plan = full_plan(model.config)
    plan.kv_groups = [[1]] * model.config.num_hidden_layers
    plan.heads = [[2, 3]] * model.config.num_hidden_layers
    masked = copy.deepcopy(model)
    for layer in masked.get_submodule(arch.layers):
        layer.get_submodule(arch.o_proj).weight.data[:, : 2 * hd] = 0
    prune_width_(model, plan)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    torch.testing.assert_close(logits(model, IDS), logits(masked, IDS), atol=1e-5, rtol=0)


def test_dropping_layers_equals_skipping_them(model):
    model.config.num_hidden_layers  # 2 layers in the tiny models: drop the first
    with without_layers(model, [0]):
        expected = logits(model, IDS)
    kept = drop_layers_(model, [0])
    assert kept == [1] and model.config.num_hidden_layers == 1
    torch.testing.assert_close(logits(model, IDS), expected, atol=0, rtol=0)


def test_hidden_surgery_keeps_rows_and_columns_bit_identical(model):
    arch = get_arch(model.config)
    source = copy.deepcopy(model)
    plan = full_plan(model.config)
    plan.hidden = list(range(0, 64, 2))
    prune_width_(model, plan)
    h = torch.tensor(plan.hidden)
    assert torch.equal(model.get_submodule(arch.embed).weight, source.get_submodule(arch.embed).weight[:, h])
    assert torch.equal(model.get_submodule(arch.final_norm).weight, source.get_submodule(arch.final_norm).weight[h])
    for new, old in zip(model.get_submodule(arch.layers), source.get_submodule(arch.layers)):
        for name in (arch.q_proj, arch.k_proj, arch.v_proj, arch.gate_proj, arch.up_proj):
            assert torch.equal(new.get_submodule(name).weight, old.get_submodule(name).weight[:, h])
        for name in (arch.o_proj, arch.down_proj):
            assert torch.equal(new.get_submodule(name).weight, old.get_submodule(name).weight[h])
        for name in arch.layer_norms:
            assert torch.equal(new.get_submodule(name).weight, old.get_submodule(name).weight[h])
    if model.config.tie_word_embeddings:
        assert model.get_submodule(arch.lm_head).weight is model.get_submodule(arch.embed).weight
    else:
        assert torch.equal(model.get_submodule(arch.lm_head).weight, source.get_submodule(arch.lm_head).weight[:, h])
    logits(model, IDS)  # and it still runs


def test_counts_match_real_models(model):
    for s in [shape_of(model.config), Shape(32, 96, 2, 1, 1), Shape(64, 40, 2, 2, 2)]:
        from taille.prune.shape import pruned_config
        from taille.models.summary import meta_model
        expected = sum(p.numel() for p in meta_model(pruned_config(model.config, s)).parameters())
        assert count_params(model.config, s) == expected, s


def test_selection_keeps_groups_even(model):
    scores = random_importance(model.config, seed=3)
    plan = select_width(scores, model.config, Shape(32, 64, 2, 1, 2))
    for heads, groups in zip(plan.heads, plan.kv_groups):
        assert len(groups) == 1 and [h // 2 for h in heads] == groups * 2
