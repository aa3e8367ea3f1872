"""`taille search`: Minitron's architecture search. Importance once; the planner's shapes within the
tolerance of the target; each pruned and distilled briefly with the same budget from one top-K teacher
cache (the teacher runs once for all candidates); ranked by held-out loss.

OUT/cache/            the teacher's top-K distributions over the search's training blocks
OUT/cand-NN/pruned    each candidate, pruned
OUT/cand-NN/run       its short distillation (metrics.jsonl)
OUT/leaderboard.{json,md,png}, OUT/winner.yaml (a `prune:` section for a recipe)
OUT/search.json       what the search was asked (teacher, data, scores, settings)
Finished candidates are not redone when the search runs again with the same request; another request in the
same OUT is refused (its cache, shapes and runs would be reused for settings they were not made with).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from taille.errors import TailleError
from taille.options import Count, coerce

log = logging.getLogger(__name__)


@dataclass
class SearchSettings:
    params: Count
    """Parameter target (90M, 4.5B)."""
    tolerance: float = 0.05
    """How far from the target a shape may land."""
    candidates: int = 12
    """Shapes to try."""
    steps: int = 50
    """Distillation steps per candidate (the same for all)."""
    seq_len: int = 256
    """Tokens per block."""
    batch_size: int = 8
    """Blocks per step."""
    lr: float = 5e-4
    """Peak learning rate of each short distillation."""
    top_k: int = 128
    """Teacher-cache K."""
    depth_criterion: str = "block-importance"
    """Which layers a shape with fewer layers drops: block-importance, ppl or contiguous."""
    eval_data: str = "auto"
    """Held-out text the candidates are ranked on; auto = shakespeare's held-out plays when searching on
    shakespeare (alone or in a mixture)."""
    eval_tokens: int = 16384
    """Held-out tokens per candidate evaluation."""
    precision: str = "auto"
    """auto (bf16-mixed where the hardware has fast bf16, else fp32), bf16-mixed or fp32."""

    def __post_init__(self):
        from taille.models.precision import check_precision
        from taille.prune.config import DEPTH_CRITERIA

        coerce(self)
        if self.candidates < 2 or self.steps < 1:
            raise TailleError("--candidates must be at least 2 and --steps at least 1")
        if min(self.batch_size, self.top_k, self.eval_tokens) < 1 or self.seq_len < 2 or self.lr <= 0:
            raise TailleError("--batch-size, --top-k and --eval-tokens must be at least 1, --seq-len at least 2, "
                              "--lr positive")
        if not 0 < self.tolerance < 1:
            raise TailleError(f"--tolerance {self.tolerance}: a fraction between 0 and 1")
        if self.depth_criterion not in DEPTH_CRITERIA:
            raise TailleError(f"--depth-criterion {self.depth_criterion}: use one of {', '.join(DEPTH_CRITERIA)}")
        check_precision(self.precision)


def pick(config, s: SearchSettings, default_shape=None) -> list:
    """Up to `candidates` plan shapes, as different as possible: the most even cut of each (layers,
    heads, hidden) first, then the rest; the default width shape (what `prune --params` picks; None when it
    is not within the tolerance) is among them, so the search says whether it is beaten."""
    from taille.prune.shape import count_params
    from taille.search.plan import Candidate, plan

    # the most even cuts first, whatever order `taille plan` prints (there: Minitron's width shapes first)
    every = sorted(plan(config, params=s.params, tolerance=s.tolerance),
                   key=lambda c: (c.balance, abs(c.params - s.params)))
    chosen, seen = [], set()
    for c in every:
        key = (c.shape.layers, c.shape.heads, c.shape.hidden)
        if key not in seen:
            seen.add(key)
            chosen.append(c)
    chosen = chosen[: s.candidates]
    if len(chosen) < s.candidates:
        chosen += [c for c in every if c not in chosen][: s.candidates - len(chosen)]
    if default_shape is not None and default_shape not in [c.shape for c in chosen]:
        chosen = chosen[: s.candidates - 1] + [Candidate(default_shape, count_params(config, default_shape), {}, 0.0, -1.0)]
    return chosen


def default_shape(config, params: str, tolerance: float = 0.01):
    """What `prune --params P --axes mlp,hidden,heads` would pick (it allows 1%); None when nothing lands
    within 1%, or that shape is further than `tolerance` (a search's) from P: not one of its candidates."""
    from taille.prune.shape import count_params, parse_params, search_shape

    target = parse_params(params)
    try:
        shape = search_shape(config, target, ("mlp", "hidden", "heads"), 0.01)
    except TailleError:
        return None
    return shape if abs(count_params(config, shape) - target) <= tolerance * target else None


def check_same_request(out: Path, request: dict) -> None:
    """Keep OUT/search.json; a search in an OUT that holds another request's work is refused in one line."""
    path = out / "search.json"
    request = json.loads(json.dumps(request))
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in request.items() if before.get(k) != v]
        if changed:
            raise TailleError(f"--out {out} holds a search asked with other settings ({', '.join(changed)}): give a "
                              "new --out, or the same settings to go on with it")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(request, indent=1) + "\n")


def run_search(teacher: str, data: str, scores: Path, s: SearchSettings, out: Path) -> dict:
    from taille.distill.cache import build_cache
    from taille.data.mixture import auto_held_out
    from taille.distill.train import DistillConfig, distill
    from taille.models.load import load_config, load_model, resolve_device
    from taille.models.precision import frozen_weights_dtype, resolve_precision
    from taille.prune.prune import PruneConfig, Target, run_prune

    config = load_config(teacher)
    out = Path(out)
    where = {"teacher": str(Path(teacher).resolve()) if Path(teacher).exists() else teacher,
             "scores": str(Path(scores).resolve())}  # the same folders named from another directory are the same
    check_same_request(out, {**where, "data": data, **asdict(s)})
    default = default_shape(config, s.params, s.tolerance)
    candidates = pick(config, s, default)
    tokens = s.steps * s.batch_size * s.seq_len
    cache = out / "cache"
    if not (cache / "meta.json").is_file():
        precision = resolve_precision(s.precision, resolve_device("auto"))
        model, tokenizer = load_model(teacher, dtype=frozen_weights_dtype(precision))
        build_cache(model, tokenizer, data, cache, s.top_k, s.seq_len, tokens, s.batch_size, precision)
        del model
    results = []
    for i, c in enumerate(candidates):
        folder = out / f"cand-{i:02d}"
        if not (folder / "pruned" / "taille.json").is_file():
            run_prune(PruneConfig(model=teacher, out=str(folder / "pruned"), target=Target(**c.shape.to_dict()),
                                  scores=str(scores), depth_criterion=s.depth_criterion,
                                  dtype=frozen_weights_dtype(s.precision)))
        if not (folder / "run" / "taille.json").is_file():
            distill(DistillConfig(student=str(folder / "pruned"), data=None, out=str(folder / "run"),
                                  teacher_cache=str(cache),
                                  eval_data=s.eval_data if s.eval_data != "auto" else auto_held_out(data),
                                  tokens=tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr,
                                  min_lr=s.lr / 10, warmup=max(1, s.steps // 10), eval_every=max(1, s.steps // 5),
                                  eval_tokens=s.eval_tokens, save_every=s.steps, precision=s.precision, resume=True))
        metrics = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        held = [m for m in metrics if "eval_loss" in m]
        train = [m for m in metrics if "loss" in m]
        tail = train[-max(1, len(train) // 10):]
        results.append({"candidate": i, "shape": c.shape.to_dict(), "params": c.params,
                        "default": c.shape == default, "eval_loss": held[-1]["eval_loss"] if held else None,
                        "train_loss": sum(m["loss"] for m in tail) / len(tail), "metrics": str(folder / "run" / "metrics.jsonl")})
    key = "eval_loss" if all(r["eval_loss"] is not None for r in results) else "train_loss"
    results.sort(key=lambda r: r[key])
    return write_leaderboard(results, key, s, out)


def write_leaderboard(results: list[dict], key: str, s: SearchSettings, out: Path) -> dict:
    import yaml

    header = ["rank", "layers", "hidden", "MLP", "heads / KV", "params", "held-out loss", "held-out ppl",
              "train KL (last 10%)", ""]
    rows = []
    for rank, r in enumerate(results, 1):
        sh = r["shape"]
        loss = r["eval_loss"]
        rows.append([str(rank), str(sh["layers"]), str(sh["hidden"]), str(sh["ffn"]), f"{sh['heads']} / {sh['kv_heads']}",
                     f"{r['params'] / 1e6:.2f}M", f"{loss:.4f}" if loss is not None else "-",
                     f"{math.exp(loss):.2f}" if loss is not None else "-", f"{r['train_loss']:.4f}",
                     "default width shape" if r["default"] else ""])
    winner = results[0]
    default = next((r for r in results if r["default"]), None)
    summary = (f"{len(results)} candidates within {s.tolerance * 100:g}% of {s.params}, each distilled {s.steps} steps "
               f"({s.steps * s.batch_size * s.seq_len:,} tokens) from a top-{s.top_k} teacher cache; ranked by "
               f"{key.replace('_', ' ')}. ")
    if default is not None and default is not winner:
        summary += (f"The winner ({winner[key]:.4f}) beats the default width shape ({default[key]:.4f}, rank "
                    f"{results.index(default) + 1}) at this budget.")
    elif default is winner:
        summary += "The default width shape wins."
    else:
        summary += (f"The default width shape (prune --params {s.params}) is not within {s.tolerance * 100:g}% "
                    "of it, or prune finds none within 1%: not among them.")
    board = {"header": header, "rows": rows, "summary": summary, "ranked_by": key, "settings": asdict(s),
             "winner": {"shape": winner["shape"], "params": winner["params"]}, "candidates": results}
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    snippet = yaml.safe_dump({"prune": winner["shape"]}, sort_keys=False)
    (out / "winner.yaml").write_text(snippet)
    (out / "leaderboard.md").write_text("\n".join(lines) + f"\n\n{summary}\n\nWinner as a recipe section:\n\n"
                                        f"```yaml\n{snippet}```\n")
    plot_leaderboard(results, out / "leaderboard.png")
    (out / "leaderboard.json").write_text(json.dumps(board, indent=1) + "\n")  # last: it marks the search done
    return board


def plot_leaderboard(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rank, r in enumerate(results, 1):
        metrics = [json.loads(line) for line in Path(r["metrics"]).read_text().splitlines()]
        held = [m for m in metrics if "eval_loss" in m] or [m for m in metrics if "loss" in m]
        sh = r["shape"]
        label = f"#{rank} L{sh['layers']} H{sh['hidden']} F{sh['ffn']} h{sh['heads']}" + (" (default)" if r["default"] else "")
        ax.plot([m["tokens"] for m in held], [m.get("eval_loss", m.get("loss")) for m in held], marker="o", label=label)
    ax.set(xlabel="tokens", ylabel="held-out loss", title="architecture search: each candidate's short distillation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
