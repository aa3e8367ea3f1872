"""PNG figures of importance scores: what a person looks at before choosing what to cut."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_importance(scores, folder) -> list[Path]:
    """heads.png (layers x heads heatmap), neurons.png (per-layer neuron-score quantiles),
    layers.png (per-layer block importance and, when measured, loss without the layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    paths = []
    L = scores.heads.shape[0]

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * scores.heads.shape[1] + 2), max(3, 0.22 * L + 1.5)))
    image = ax.imshow(scores.heads.float().numpy(), aspect="auto", cmap="viridis", origin="upper")
    ax.set(xlabel="query head", ylabel="layer", title="attention head importance")
    fig.colorbar(image, ax=ax, label="L2 of mean |o_proj input|")
    paths.append(_save(fig, folder / "heads.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    q = torch.quantile(scores.neurons.float(), torch.tensor([0.1, 0.5, 0.9]), dim=1)  # (3, L)
    layers = range(L)
    ax.fill_between(layers, q[0], q[2], alpha=0.3, label="10th-90th percentile")
    ax.plot(layers, q[1], marker="o", label="median")
    ax.plot(layers, scores.neurons.float().max(dim=1).values, linestyle=":", label="max")
    ax.set(xlabel="layer", ylabel="neuron score", title="MLP neuron importance by layer", yscale="log")
    ax.legend()
    paths.append(_save(fig, folder / "neurons.png"))

    has_loss = scores.layer_loss is not None
    fig, axes = plt.subplots(2 if has_loss else 1, 1, figsize=(8, 6 if has_loss else 3.5), squeeze=False)
    axes[0, 0].bar(layers, scores.layer_bi.float().numpy(), color="tab:blue")
    axes[0, 0].set(ylabel="1 - cos(in, out)", title="layer importance: block importance (higher = keep)")
    if has_loss:
        delta = scores.layer_loss.float() - (scores.base_loss or 0.0)
        axes[1, 0].bar(layers, delta.numpy(), color="tab:red")
        axes[1, 0].set(ylabel="loss increase", title="held-out LM loss increase without the layer")
    axes[-1, 0].set_xlabel("layer")
    paths.append(_save(fig, folder / "layers.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
