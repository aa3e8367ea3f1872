"""report.md and report.html of a run: shapes, parameter counts, teacher vs pruned vs distilled, the
distillation curves, importance figures and the search leaderboard. One list of blocks rendered twice,
so the two files always say the same thing; figures are linked by relative path (the run folder moves
as one)."""

from __future__ import annotations

import html
import json
from pathlib import Path


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def blocks(recipe, run: Path, teacher: str) -> list[tuple]:
    """("h1"|"h2"|"p", text) | ("table", header, rows) | ("img", relative path, caption)."""
    out: list[tuple] = [("h1", f"taille run: {recipe.name}"),
                        ("p", f"Teacher {teacher}, data {recipe.data}"
                              + (f", calibration {recipe.importance['data']}" if recipe.importance.get("data") else "")
                              + f", recipe {recipe.source or '-'}.")]
    pruned = _json(run / "pruned" / "taille.json")
    if pruned:
        before, after = pruned["shape_before"], pruned["shape_after"]
        header = ["", "params"] + list(before)
        out += [("h2", "Shape"),
                ("table", header, [["teacher", f"{pruned['params_before'] / 1e6:.2f}M"] + [str(v) for v in before.values()],
                                   ["student", f"{pruned['params_after'] / 1e6:.2f}M"] + [str(v) for v in after.values()]]),
                ("p", f"Width ranked by {pruned['criterion']}"
                      + (f", layers chosen by {pruned['depth_criterion']}" if pruned.get("depth_criterion") else "")
                      + f"; {pruned['params_after'] / pruned['params_before']:.1%} of the teacher's parameters.")]
    evaluation = _json(run / "eval" / "eval.json")
    if evaluation:
        from taille.eval.run import table

        header, rows = table(evaluation)
        out += [("h2", "Teacher vs pruned vs distilled"), ("table", header, rows)]
        if (run / "eval" / "eval.png").is_file():
            out.append(("img", "eval/eval.png", "evaluation"))
        if evaluation.get("characters"):
            from taille.characters.evaluate import COLUMNS, table_rows

            c = evaluation["characters"]
            out += [("h2", "As a game character"),
                    ("table", list(COLUMNS), table_rows({**c, "labels": evaluation.get("labels", {})})),
                    ("p", f"On {len(c['cards'])} held-out cards (never in the role-play data), judged by the teacher; "
                          "transcripts in eval/eval.md.")]
        recovered = recovery(evaluation)
        if recovered is not None:
            out.append(("p", f"Distillation won back {recovered:.0%} of the log-perplexity pruning lost "
                             f"(on {next(iter(evaluation['rows'][0]['ppl']))})."))
    for folder, title in (("distilled", "Distillation"), ("sft", "Second training stage (sft)")):
        trained = _json(run / folder / "taille.json")
        if not trained:
            continue
        d = trained["distill"]
        data = f" on {d['config']['data']}" if folder == "sft" else ""
        out += [("h2", title),
                ("p", f"{d['tokens']:,} tokens{data} in {d['steps']} steps ({d['precision']}, {d['processes']} "
                      f"process(es), global batch {d['global_batch']}); final loss {d['final_loss']:.4f}; "
                      f"{d['seconds'] / 60:.1f} min of training.")]
        if (run / folder / "curves.png").is_file():
            out.append(("img", f"{folder}/curves.png", "training loss, held-out perplexity and KL to the teacher"))
    preferred = _json(run / "preferred" / "taille.json")
    if preferred:
        r, pairs = preferred["prefer"], preferred["prefer"]["pairs"]
        out += [("h2", "Preference tuning (DPO on the student's own broken replies)"),
                ("p", f"{pairs['pairs']:,} pairs from {pairs['turns']:,} role-play turns ({pairs['failed_share']:.1%} of "
                      f"{pairs['draws']:,} student draws broke character: "
                      f"{', '.join(f'{k} {v}' for k, v in pairs['failed_draws'].items())}); {r['steps']} DPO steps in "
                      f"{r['seconds'] / 60:.1f} min, reward accuracy {r['final_reward_accuracy']} over the last steps.")]
    exported = _json(run / "export" / "export.json")
    if exported:
        rows = []
        for r in exported:
            v = r.get("verify") or {}
            rows.append([Path(r["out"]).name, r["quant"], f"{r['bytes'] / 2**20:.1f}",
                         f"{v['top1_agreement']:.2%}" if v else "-", f"{v['mean_kl']:.5f}" if v else "-"])
        out += [("h2", "On-device files (GGUF, llama.cpp)"),
                ("table", ["file", "quant", "MiB", "top-1 agreement with PyTorch", "mean KL"], rows),
                ("p", f"Talk to it: taille chat {exported[-1]['out']}")]
    board = _json(run / "search" / "leaderboard.json")
    if board:
        out += [("h2", "Architecture search"), ("table", board["header"], board["rows"]),
                ("p", board["summary"])]
        if (run / "search" / "leaderboard.png").is_file():
            out.append(("img", "search/leaderboard.png", "each candidate's held-out loss during its short distillation"))
    figures = [f for f in ("heads", "neurons", "layers") if (run / "importance" / f"{f}.png").is_file()]
    if figures:
        out.append(("h2", "Importance"))
        out += [("img", f"importance/{f}.png", f"importance: {f}") for f in figures]
    timings = _json(run / "timings.json")
    if timings:
        out += [("h2", "Time per stage (seconds, this machine)"),
                ("table", list(timings), [[f"{v:.0f}" for v in timings.values()]])]
    return out


def recovery(evaluation: dict) -> float | None:
    """Fraction of the teacher-to-pruned log-perplexity gap that distillation closed (first text)."""
    import math

    labels = evaluation.get("labels", {})
    by_label = {labels.get(r["model"]): r for r in evaluation["rows"]}
    if not {"teacher", "pruned", "distilled"} <= set(by_label) or not by_label["teacher"]["ppl"]:
        return None
    text = next(iter(by_label["teacher"]["ppl"]))
    t, p, d = (math.log(by_label[k]["ppl"][text]["ppl"]) for k in ("teacher", "pruned", "distilled"))
    return (p - d) / (p - t) if p > t else None


def to_markdown(items: list[tuple]) -> str:
    lines = []
    for kind, *rest in items:
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + rest[0], ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        elif kind == "img":
            lines += [f"![{rest[1]}]({rest[0]})", ""]
    return "\n".join(lines)


def to_html(items: list[tuple], title: str) -> str:
    e = html.escape
    body = []
    for kind, *rest in items:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{e(rest[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{e(rest[0])}</p>")
        elif kind == "table":
            header, rows = rest
            body.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
        elif kind == "img":
            body.append(f'<figure><img src="{e(rest[0])}" alt="{e(rest[1])}"><figcaption>{e(rest[1])}</figcaption></figure>')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f4f4f4}img{max-width:100%}figure{margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_run_report(recipe, run: Path, teacher: str) -> Path:
    items = blocks(recipe, run, teacher)
    (run / "report.html").write_text(to_html(items, f"taille run: {recipe.name}"))
    (run / "report.md").write_text(to_markdown(items))
    return run / "report.md"
