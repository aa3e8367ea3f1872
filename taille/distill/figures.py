"""Training curves as a PNG: loss, held-out perplexity and KL to the teacher against tokens."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    held = [r for r in records if "eval_loss" in r]
    if not train:
        return None
    panels = [("training loss", train, "loss")]
    if held:
        panels.append(("held-out perplexity", held, "eval_ppl"))
    if held and "eval_kl" in held[0]:
        panels.append(("held-out KL(teacher || student)", held, "eval_kl"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, rows, key) in zip(axes[0], panels):
        ax.plot([r["tokens"] for r in rows], [r[key] for r in rows], marker="o" if len(rows) < 30 else None)
        ax.set(title=title, xlabel="tokens")
        if key == "eval_ppl":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
