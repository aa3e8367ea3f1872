"""Minitron importance: which heads, neurons, hidden channels and layers a model can lose.

Width scores come from one streaming pass of forward hooks over calibration blocks (no gradients):
  head h of layer l      the input of o_proj, split by head          (B, T, heads * head_dim)
  neuron n of layer l    the input of down_proj                      (B, T, ffn)
  hidden channel c       the output of every norm feeding a block, and of the final norm (B, T, hidden)
Each activation is aggregated as in Minitron: mean of |x| over the sequence, then L2 over the batch,
accumulated batch by batch as a running sum of squares (memory never grows with the sample count).
Head scores are the L2 norm of their channels' scores; hidden scores are summed over the norms.

Depth scores:
  block importance  BI(i, n) = 1 - cos(input of layer i, output of layer i + n - 1), averaged over tokens
                    (ShortGPT), for every block of n contiguous layers, from the same pass;
  ppl               the held-out LM loss of the model with layer i (or block i..i+n-1) removed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from taille.data.tokens import batches
from taille.errors import TailleError
from taille.models.arch import get_arch, head_dim, kv_heads
from taille.models.lm import token_nll
from taille.models.precision import autocast

log = logging.getLogger(__name__)

SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "num_hidden_layers", "vocab_size")


def shape_signature(config) -> dict:
    """What scores must match to apply to a model."""
    return {k: getattr(config, k, None) if k != "num_key_value_heads" else kv_heads(config) for k in SHAPE_KEYS}


@dataclass
class Importance:
    heads: torch.Tensor
    """(L, heads) query-head scores."""
    neurons: torch.Tensor
    """(L, ffn) MLP-neuron scores."""
    hidden: torch.Tensor
    """(H,) hidden-channel scores, summed over norms."""
    block_bi: torch.Tensor
    """(L, L): entry [n-1, i] is the BI of the block of n layers starting at i (NaN where i + n > L)."""
    layer_loss: torch.Tensor | None = None
    """(L,) held-out LM loss with layer i removed (depth metric 'ppl')."""
    block_loss: dict[int, torch.Tensor] = field(default_factory=dict)
    """n -> (L - n + 1,) held-out LM loss with layers i..i+n-1 removed."""
    base_loss: float | None = None
    """Held-out LM loss of the unpruned model."""
    criterion: str = "activation"
    meta: dict = field(default_factory=dict)

    @property
    def layer_bi(self) -> torch.Tensor:
        """(L,) BI of each single layer."""
        return self.block_bi[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"heads": self.heads, "neurons": self.neurons, "hidden": self.hidden, "block_bi": self.block_bi}
        if self.layer_loss is not None:
            out["layer_loss"] = self.layer_loss
        out.update({f"block_loss.{n}": v for n, v in self.block_loss.items()})
        return {k: v.float().contiguous().cpu() for k, v in out.items()}


def accumulate_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc (C,) += sum over the batch of (mean over the sequence of |x|)^2, for x (B, T, C).
    sqrt(acc) after the last batch is Minitron's (mean, L2) aggregation."""
    acc += x.detach().abs().float().mean(dim=1).pow(2).sum(dim=0)


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def activation_importance(model, blocks: np.ndarray, batch_size: int = 8, precision: str = "fp32",
                          progress: bool = True) -> Importance:
    """Width and block-importance scores from one pass over `blocks` (N, T) of calibration tokens."""
    from tqdm.auto import tqdm

    config, arch = model.config, get_arch(model.config)
    layers = model.get_submodule(arch.layers)
    L, H, nh, hd = len(layers), config.hidden_size, config.num_attention_heads, head_dim(config)
    device = next(model.parameters()).device
    head_acc = torch.zeros(L, nh * hd, device=device)  # (L, heads * head_dim) channel sums of squares
    neuron_acc = torch.zeros(L, config.intermediate_size, device=device)
    norm_names = [f"{arch.layers}.{i}.{n}" for i in range(L) for n in arch.block_norms] + [arch.final_norm]
    hidden_acc = torch.zeros(len(norm_names), H, device=device)
    cos_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64, device=device)  # [i, j]: sum over tokens of cos
    unit: torch.Tensor | None = None  # (L + 1, B, T, H): unit-norm input of each layer, then the last output

    def keep_state(i: int, x: torch.Tensor) -> None:
        nonlocal unit
        if unit is None or unit.shape[1] < x.shape[0]:
            unit = torch.empty((L + 1, *x.shape), dtype=torch.float32, device=x.device)
        unit[i, : x.shape[0]] = F.normalize(x.detach().float(), dim=-1)

    def on(acc_row):
        return lambda module, args: accumulate_(acc_row, args[0])

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.get_submodule(arch.o_proj).register_forward_pre_hook(on(head_acc[i])))
        handles.append(layer.get_submodule(arch.down_proj).register_forward_pre_hook(on(neuron_acc[i])))
        handles.append(layer.register_forward_pre_hook(lambda m, args, i=i: keep_state(i, args[0])))
    handles.append(layers[L - 1].register_forward_hook(lambda m, args, out: keep_state(L, _layer_output(out))))
    for k, name in enumerate(norm_names):
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, args, out, k=k: accumulate_(hidden_acc[k], out)))

    n_tokens, start = 0, time.perf_counter()
    try:
        for ids in tqdm(batches(blocks, batch_size, device), total=-(-len(blocks) // batch_size), desc="importance",
                        unit="batch", disable=not progress):  # ids: (B, T)
            with autocast(precision, device.type):
                model.get_submodule(arch.base)(input_ids=ids, use_cache=False)
            # Sum over tokens of cos(state i, state j) for all pairs at once: one (L+1, L+1) Gram matrix.
            states = unit[:, : ids.shape[0]].reshape(L + 1, -1)  # (L + 1, B * T * H)
            cos_sum += (states @ states.T).double()
            n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        unit = None

    head_scores = head_acc.sqrt().view(L, nh, hd).norm(dim=-1)  # (L, heads)
    block_bi = torch.full((L, L), float("nan"))  # [n-1, i]: block of n layers from layer i
    bi = (1 - cos_sum / n_tokens).float().cpu()
    for n in range(1, L + 1):
        block_bi[n - 1, : L - n + 1] = bi.diagonal(offset=n)  # (state i, state i + n)
    return Importance(
        heads=head_scores.cpu(), neurons=neuron_acc.sqrt().cpu(), hidden=hidden_acc.sqrt().sum(dim=0).cpu(),
        block_bi=block_bi, criterion="activation",
        meta={"samples": len(blocks), "seq_len": int(blocks.shape[1]), "tokens": n_tokens,
              "seconds": round(time.perf_counter() - start, 2), "precision": precision},
    )


def magnitude_importance(model) -> Importance:
    """Baseline: L2 norm of the weights that read or write each head, neuron and hidden channel."""
    config, arch = model.config, get_arch(model.config)
    layers = model.get_submodule(arch.layers)
    L, nh, hd = len(layers), config.num_attention_heads, head_dim(config)
    heads, neurons, hidden_sq = [], [], torch.zeros(config.hidden_size)
    for layer in layers:
        w = {p: layer.get_submodule(getattr(arch, p)).weight.detach().float().cpu()
             for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
        q_sq = w["q_proj"].pow(2).view(nh, hd, -1).sum(dim=(1, 2))  # (heads,)
        o_sq = w["o_proj"].pow(2).view(w["o_proj"].shape[0], nh, hd).sum(dim=(0, 2))  # (heads,)
        heads.append((q_sq + o_sq).sqrt())
        neurons.append((w["gate_proj"].pow(2).sum(1) + w["up_proj"].pow(2).sum(1) + w["down_proj"].pow(2).sum(0)).sqrt())
        for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            hidden_sq += w[p].pow(2).sum(0)  # columns read the hidden channel
        hidden_sq += w["o_proj"].pow(2).sum(1) + w["down_proj"].pow(2).sum(1)  # rows write it
    hidden_sq += model.get_submodule(arch.embed).weight.detach().float().cpu().pow(2).sum(0)
    return Importance(heads=torch.stack(heads), neurons=torch.stack(neurons), hidden=hidden_sq.sqrt(),
                      block_bi=_no_block_scores(L), criterion="magnitude")


def random_importance(config, seed: int = 0) -> Importance:
    """Baseline: seeded random scores (each axis a random permutation)."""
    g = torch.Generator().manual_seed(seed)
    L, nh, ffn = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    return Importance(heads=torch.rand(L, nh, generator=g), neurons=torch.rand(L, ffn, generator=g),
                      hidden=torch.rand(config.hidden_size, generator=g),
                      block_bi=torch.rand(L, L, generator=g).masked_fill(~block_mask(L), float("nan")),
                      criterion="random", meta={"seed": seed})


def block_mask(L: int) -> torch.Tensor:
    """(L, L) bool: [n-1, i] is a real block (i + n <= L)."""
    return torch.arange(L)[None, :] + torch.arange(L)[:, None] <= L - 1


def _no_block_scores(L: int) -> torch.Tensor:
    return torch.full((L, L), float("nan"))


@contextlib.contextmanager
def without_layers(model, drop: list[int]):
    """Run the model with some layers removed (restored on exit)."""
    arch = get_arch(model.config)
    parent_name, _, attr = arch.layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    layers = getattr(parent, attr)
    kept = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in set(drop)])
    setattr(parent, attr, kept)
    try:
        yield
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def mean_loss(model, blocks: np.ndarray, batch_size: int, precision: str) -> float:
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for ids in batches(blocks, batch_size, device):
        with autocast(precision, device.type):
            total += token_nll(model, ids).sum(dtype=torch.float64)
    return float(total) / (len(blocks) * (blocks.shape[1] - 1))


def depth_loss_(scores: Importance, model, blocks: np.ndarray, block_sizes=(1,), batch_size: int = 8,
                precision: str = "fp32", progress: bool = True) -> None:
    """Fill `scores` with the held-out loss of the model with each block of n layers removed."""
    from tqdm.auto import tqdm

    L = model.config.num_hidden_layers
    scores.base_loss = mean_loss(model, blocks, batch_size, precision)
    jobs = [(n, i) for n in block_sizes for i in range(L - n + 1)]
    losses = {n: torch.zeros(L - n + 1) for n in block_sizes}
    for n, i in tqdm(jobs, desc="depth (loss without each block)", disable=not progress):
        with without_layers(model, list(range(i, i + n))):
            losses[n][i] = mean_loss(model, blocks, batch_size, precision)
    scores.layer_loss = losses.pop(1) if 1 in losses else scores.layer_loss
    scores.block_loss.update(losses)


def save_importance(scores: Importance, folder, config, extra: dict | None = None) -> None:
    """scores.safetensors + importance.json (shape signature, settings, rankings a person can read)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(scores.tensors(), folder / "scores.safetensors", metadata={"criterion": scores.criterion})
    L = scores.heads.shape[0]
    summary = {
        "criterion": scores.criterion, "shape": shape_signature(config), **scores.meta, **(extra or {}),
        "base_loss": scores.base_loss,
        "layers_by_bi": [int(i) for i in torch.argsort(scores.layer_bi).tolist()] if not scores.layer_bi.isnan().all() else None,
        "layers_by_loss": [int(i) for i in torch.argsort(scores.layer_loss).tolist()] if scores.layer_loss is not None else None,
        "layer_bi": _round(scores.layer_bi), "layer_loss": _round(scores.layer_loss),
        "block_loss": {str(n): _round(v) for n, v in scores.block_loss.items()},
        "head_score_per_layer": _round(scores.heads.mean(dim=1)), "neuron_score_median": _round(scores.neurons.median(dim=1).values),
        "layers": L,
    }
    (folder / "importance.json").write_text(json.dumps(summary, indent=1))


def _round(t: torch.Tensor | None):
    return None if t is None else [None if math.isnan(x) else round(x, 6) for x in t.tolist()]


def load_importance(folder, config) -> Importance:
    """Scores saved by `save_importance`; raises when they were computed for a model of another shape."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    files = folder / "scores.safetensors", folder / "importance.json"
    if not all(f.is_file() for f in files):
        raise TailleError(f"--scores {folder}: expected scores.safetensors and importance.json from `taille importance`")
    summary = json.loads(files[1].read_text())
    if summary["shape"] != shape_signature(config):
        diff = {k: (summary["shape"].get(k), v) for k, v in shape_signature(config).items() if summary["shape"].get(k) != v}
        raise TailleError(f"--scores {folder} were computed for another model: "
                          + ", ".join(f"{k} {a} in the scores vs {b} in the model" for k, (a, b) in diff.items()))
    with safe_open(str(files[0]), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    block_loss = {int(k.split(".")[1]): v for k, v in t.items() if k.startswith("block_loss.")}
    return Importance(heads=t["heads"], neurons=t["neurons"], hidden=t["hidden"], block_bi=t["block_bi"],
                      layer_loss=t.get("layer_loss"), block_loss=block_loss, base_loss=summary.get("base_loss"),
                      criterion=summary["criterion"], meta=summary)
