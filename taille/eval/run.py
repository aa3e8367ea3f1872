"""`taille eval`: one table with a row per model — parameters, perplexities, zero-shot tasks and their
average, speed and memory, KL to a reference — as Markdown, JSON and a bar chart."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from taille.errors import TailleError
from taille.eval.config import EvalSettings  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def mean_kl(reference, model, tokens: np.ndarray, window: int, batch_size: int, precision: str) -> float:
    """Mean KL(reference || model) per token over non-overlapping windows of `tokens`."""
    from taille.data.tokens import batches
    from taille.models.lm import token_kl
    from taille.models.precision import autocast

    blocks = tokens[: len(tokens) // window * window].reshape(-1, window)
    if len(blocks) == 0:
        raise TailleError(f"--reference-data has {len(tokens)} tokens, fewer than one window of {window}")
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for ids in batches(blocks, batch_size, device):
        with autocast(precision, device.type):
            total += token_kl(reference, model, ids).sum(dtype=torch.float64)
    return float(total) / blocks.size


def evaluate(models: list[str], s: EvalSettings, out: Path | None = None) -> dict:
    """The report of `models` under `s`; `out` (the report's folder) keeps what the character evaluation
    generates once (the teacher's fidelity replies)."""
    from taille.data.tokens import load_tokens
    from taille.eval.harness import check_tasks, headline, run_tasks
    from taille.eval.ppl import perplexity
    from taille.eval.speed import measure_in_subprocess
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import resolve_precision

    s = dataclasses.replace(s, precision=resolve_precision(s.precision, resolve_device(s.device)))
    if s.tasks:
        check_tasks(s.tasks, s.task_data)  # before any model loads
    personas = None
    if s.personas:  # the cards and the models' tokenizers are checked before any model loads, too
        from taille.characters.cards import load_half
        from taille.characters.evaluate import _check_tokenizers

        personas = list(load_half(s.personas, "heldout").values())
        _check_tokenizers(models, s.reference)
    reference = None
    if s.reference:
        reference, ref_tokenizer = load_model(s.reference, dtype=s.dtype, device=s.device)
    rows, task_records = [], {}
    for spec in models:
        model, tokenizer = load_model(spec, dtype=s.dtype, device=s.device)
        row = {"model": spec, "params": sum(p.numel() for p in model.parameters()), "ppl": {}, "tasks": {}}
        for data in s.ppl:
            stream = load_tokens(data, tokenizer, split="heldout", max_tokens=s.max_tokens)
            result = perplexity(model, stream.tokens, window=s.window, stride=s.stride, batch_size=s.batch_size,
                                source=stream.meta["source"], precision=s.precision)
            row["ppl"][result.source] = result.to_dict()
        if s.tasks:
            record = run_tasks(model, tokenizer, s.tasks, s.task_data, s.limit, s.num_fewshot, s.batch_size,
                               s.precision, s.seed)
            row["tasks"] = record["scores"]
            task_records = {k: v for k, v in record.items() if k != "scores"}
            accuracies = [headline(m)[1] for m in record["scores"].values() if headline(m)[0] != "perplexity"]
            row["average"] = float(np.mean(accuracies)) if accuracies else None
        if s.speed:
            row["speed"] = measure_in_subprocess(spec, s.dtype, s.device, s.precision)
        if reference is not None:
            if tokenizer.get_vocab() != ref_tokenizer.get_vocab() and len(tokenizer) <= len(ref_tokenizer):
                log.warning("%s and the reference %s have different vocabularies: KL compares token ids", spec, s.reference)
            stream = load_tokens(s.reference_data, tokenizer, split="heldout", max_tokens=s.reference_tokens)
            row["kl_to_reference"] = mean_kl(reference, model, stream.tokens, min(s.window, len(stream.tokens)),
                                             s.batch_size, s.precision)
        rows.append(row)
        del model
        gc.collect()
    report = {"rows": rows, "settings": asdict(s), **task_records}
    if s.personas:
        from taille.characters.evaluate import persona_eval

        if reference is not None:
            del reference
            gc.collect()
        characters = persona_eval(models, personas, s.reference, s.persona, cache_dir=out, precision=s.precision,
                                  dtype=s.dtype, device=s.device)
        report["characters"] = characters
    return report


def markdown(report: dict) -> str:
    header, rows = table(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text = "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) if rows and len(header) > 2 else ""
    if report.get("characters"):
        text += ("\n\n" if text else "") + characters_markdown(report)
    return text


def characters_markdown(report: dict, transcripts: bool = True) -> str:
    """The in-character table (held-out cards), and the transcripts, as Markdown."""
    from taille.characters.evaluate import markdown_table, transcripts_markdown

    c = {**report["characters"], "labels": report.get("labels", {})}
    k = c.get("knowledge", {})
    text = (f"### In character: {len(c['cards'])} held-out cards, judged by the teacher {c['teacher']}\n\n"
            + markdown_table(c) + f"\n\nKnowledge: {k.get('items', '?')} questions on {k.get('cards', len(c['cards']))} "
            f"held-out cards ({k.get('skipped', 0)} facts skipped: "
            "no number or name to ask for); break rate counts replies with a `never` phrase or an out-of-character "
            "marker; in character = neither a break nor degenerate.")
    if transcripts:
        text += "\n\n### Transcripts (same player lines, same seed)\n\n" + transcripts_markdown(c)
    return text


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows of cells) of the report's table; a model's label (report["labels"]) names its row."""
    from taille.eval.harness import headline

    rows = report["rows"]
    texts = list(dict.fromkeys(t for r in rows for t in r["ppl"]))
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    header = ["model", "params"] + [f"ppl {t}" for t in texts]
    header += [f"{t} ({headline(rows[0]['tasks'][t])[0]})" for t in tasks] + (["average"] if tasks else [])
    has_speed, has_kl = any("speed" in r for r in rows), any("kl_to_reference" in r for r in rows)
    if has_speed:
        header += ["prefill tok/s b1 / b8", "decode tok/s b1 / b8", "peak MiB b8", "weights MiB"]
    if has_kl:
        header += ["KL to reference"]
    labels, out = report.get("labels", {}), []
    for r in rows:
        cells = [labels.get(r["model"], r["model"]), f"{r['params'] / 1e6:.2f}M"] + [
            f"{r['ppl'][t]['ppl']:.2f}" if t in r["ppl"] else "-" for t in texts]
        cells += [_fmt(headline(r["tasks"][t])) if t in r["tasks"] else "-" for t in tasks]
        if tasks:
            cells.append(f"{100 * r['average']:.1f}" if r.get("average") is not None else "-")
        if has_speed:
            sp = r.get("speed", {})
            cells += [f"{sp['b1']['prefill_tok_s']:.0f} / {sp['b8']['prefill_tok_s']:.0f}",
                      f"{sp['b1']['decode_tok_s']:.1f} / {sp['b8']['decode_tok_s']:.1f}",
                      f"{sp['b8']['peak_mib']}", f"{sp['weights_mib']}"] if sp else ["-"] * 4
        if has_kl:
            cells.append(f"{r['kl_to_reference']:.4f}" if "kl_to_reference" in r else "-")
        out.append(cells)
    return header, out


def _fmt(metric: tuple[str, float]) -> str:
    name, value = metric
    return f"{value:.2f}" if name == "perplexity" else f"{100 * value:.1f}"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from taille.eval.harness import headline

    rows = report["rows"]
    tasks = [t for t in dict.fromkeys(t for r in rows for t in r["tasks"]) if headline(rows[0]["tasks"][t])[0] != "perplexity"]
    texts = list(dict.fromkeys(t for r in rows for t in r["ppl"]))
    panels = [p for p in (("tasks", tasks), ("ppl", texts)) if p[1]]
    characters = report.get("characters")
    if characters:
        panels.append(("characters", ["knowledge acc", "in character", "break rate", "degenerate"]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, (kind, names) in zip(axes[0], panels):
        for i, r in enumerate(characters["rows"] if kind == "characters" else rows):
            if kind == "characters":
                values = [100 * (r.get(key) or 0) for key in ("knowledge_acc", "in_character", "break_rate",
                                                              "degenerate_rate")]
            else:
                values = [100 * headline(r["tasks"][n])[1] if kind == "tasks" else r["ppl"][n]["ppl"] for n in names]
            label = report.get("labels", {}).get(r["model"]) or Path(r["model"]).name or r["model"]
            ax.bar(np.arange(len(names)) + i * width, values, width, label=label)
        ax.set_xticks(np.arange(len(names)) + width * (len(rows) - 1) / 2, names, rotation=20, ha="right")
        ax.set_ylabel("perplexity (log)" if kind == "ppl" else "% of questions / replies" if kind == "characters"
                      else "accuracy (%)")
        if kind == "ppl":
            ax.set_yscale("log")
        ax.set_title({"tasks": "zero-shot tasks", "ppl": "held-out perplexity",
                      "characters": "in character (held-out cards)"}[kind])
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "eval.md").write_text(markdown(report) + "\n")
    if any(r["tasks"] or r["ppl"] for r in report["rows"]) or report.get("characters"):
        plot(report, out / "eval.png")
