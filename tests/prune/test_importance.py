"""Importance scores: the streaming aggregation against a brute-force computation over stored activations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taille.models.arch import get_arch, head_dim
from taille.models.load import load_model
from taille.prune.importance import accumulate_, activation_importance, load_importance, save_importance
from taille.errors import TailleError
from tests.conftest import save_tiny


def test_accumulation_is_mean_then_l2_over_batches():
    x = torch.randn(10, 7, 5)  # (samples, seq, channels)
    acc = torch.zeros(5)
    for chunk in x.split(3):  # uneven batches
        accumulate_(acc, chunk)
    expected = x.abs().mean(dim=1).norm(dim=0)  # mean over the sequence, then L2 over samples
    torch.testing.assert_close(acc.sqrt(), expected)


def brute_force(model, blocks):
    """Store every activation of every sample, then aggregate at once."""
    arch, config = get_arch(model.config), model.config
    layers = model.get_submodule(arch.layers)
    store = {}

    def keep(name):
        def hook(module, args, out=None):
            store.setdefault(name, []).append((args[0] if out is None else (out[0] if isinstance(out, tuple) else out)).detach())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles += [layer.get_submodule(arch.o_proj).register_forward_pre_hook(keep(f"o{i}")),
                    layer.get_submodule(arch.down_proj).register_forward_pre_hook(keep(f"d{i}")),
                    layer.register_forward_pre_hook(keep(f"in{i}")),
                    layer.register_forward_hook(keep(f"out{i}"))]
        for n in arch.block_norms:
            handles.append(layer.get_submodule(n).register_forward_hook(keep(f"norm{i}{n}")))
    handles.append(model.get_submodule(arch.final_norm).register_forward_hook(keep("final")))
    with torch.no_grad():
        for block in blocks:  # one sample at a time
            model(torch.tensor(block[None].astype(np.int64)))
    for h in handles:
        h.remove()
    cat = {k: torch.cat(v) for k, v in store.items()}  # (N, T, C)
    agg = lambda x: x.abs().mean(dim=1).pow(2).sum(dim=0).sqrt()  # noqa: E731
    L, nh, hd = len(layers), config.num_attention_heads, head_dim(config)
    heads = torch.stack([agg(cat[f"o{i}"]).view(nh, hd).norm(dim=-1) for i in range(L)])
    neurons = torch.stack([agg(cat[f"d{i}"]) for i in range(L)])
    hidden = sum(agg(v) for k, v in cat.items() if k.startswith("norm") or k == "final")
    bi = torch.stack([1 - F.cosine_similarity(cat[f"in{i}"], cat[f"out{i}"], dim=-1).mean() for i in range(L)])
    block2 = 1 - F.cosine_similarity(cat["in0"], cat[f"out{L - 1}"], dim=-1).mean()
    return heads, neurons, hidden, bi, block2


def test_streaming_equals_brute_force(tmp_path, family):
    model, _ = load_model(str(save_tiny(tmp_path / family, family)), dtype="fp32")
    blocks = np.random.default_rng(0).integers(0, model.config.vocab_size, (7, 16)).astype(np.uint16)
    scores = activation_importance(model, blocks, batch_size=3, progress=False)
    heads, neurons, hidden, bi, block2 = brute_force(model, blocks)
    torch.testing.assert_close(scores.heads, heads, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.neurons, neurons, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.hidden, hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores.layer_bi, bi, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(scores.block_bi[1, 0], block2, rtol=1e-3, atol=1e-5)  # the block of both layers
    assert torch.isnan(scores.block_bi[1, 1])  # no block of 2 starts at the last layer


def test_scores_refuse_another_model(tmp_path):
    small, _ = load_model(str(save_tiny(tmp_path / "a", "llama")))
    blocks = np.zeros((2, 8), dtype=np.uint16)
    save_importance(activation_importance(small, blocks, progress=False), tmp_path / "s", small.config)
    assert load_importance(tmp_path / "s", small.config).heads.shape == (2, 4)
    other, _ = load_model(str(save_tiny(tmp_path / "b", "qwen2")))
    with pytest.raises(TailleError, match="computed for another model: model_type llama in the scores vs qwen2"):
        load_importance(tmp_path / "s", other.config)
