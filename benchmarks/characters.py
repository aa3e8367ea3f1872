"""Characters that stay in character after compression: the same 90M student distilled on different data,
scored as a game character on held-out cards beside its general ability.

The students are benchmarks/recovery_general.py's (SmolLM2-135M-Instruct width-pruned to 90M, 512K tokens
each, the same schedule), so their WikiText-2 and zero-shot numbers are that benchmark's measurements:
  teacher        SmolLM2-135M-Instruct
  pruned         the 90M student before distillation
  plays          distilled on the Shakespeare training plays (the recipe before the characters work)
  general        distilled on the teacher's general answers (the shipped `chat` corpus, or recovery_general's
                 --corpus)
  roleplay-general   distilled on role-play + general answers, half and half (roleplay:0.5,chat:0.5)
  roleplay-general-on-policy-reply   the same, on-policy from each block's first reply in its last 128 tokens
  roleplay-general-replies   the same data, the loss on the replies only (`--loss-on replies`)
  roleplay-general-replies-jsd   the same, generalised JSD (beta 0.5) instead of forward KL
  demo-mix       distilled on role-play + general answers + plays (roleplay:0.45,chat:0.35,shakespeare:0.2)
  demo-mix-on-policy   the same data, every block ending in 64 tokens the student samples itself and the
                 teacher grades (`--on-policy 1`): aimed at the student's loops
  demo-mix-on-policy-reply   the same data, the student writing from the first reply that starts in each
                 block's last 128 tokens (`--on-policy 1 --on-policy-tokens 128 --on-policy-from reply`)
  demo-mix-replies   the demo-mix data, the loss on the chat sources' replies and on all of the plays
                 (`--loss-on replies`): what `taille demo` distils on
  demo-mix-replies-ce   the same, plus cross-entropy (weight 0.5) on the data's own tokens: the filtered,
                 in-character replies as hard labels (`--ce-weight 0.5`)
  demo-mix-replies-jsd   the same data and mask, generalised JSD (beta 0.5) instead of forward KL
  searched-mix-replies   the demo-mix-replies data and mask on the shape `taille search` ranked best at or
                 under 90M (21 layers x hidden 576 x MLP 1184: depth and MLP cut, not width)
  calib-mix-replies / searched-calib-mix-replies   the same data and mask, each shape pruned from importance
                 calibrated on that mix (as the recipe prunes), not on the plays
  deep-calib-mix-replies   the same, on the searched shape's family with 6 layers cut, not 9 (24 x 576 x 960)
  searched-calib-general-mix-replies   the searched, mix-calibrated student on a general recipe's data (free
                 text, chat answers, plays; no role-play)
  searched-calib-mix-replies-then-sft-adv-composed(-prefer-hostile-ul-loops)   the width student's character chain
                 (448K of the default's KD, 64K CE on role-play + hostile answers, then DPO + both unlikelihood
                 terms) on the searched, mix-calibrated student: can one recipe serve characters and general ability
  deep-calib-mix-replies-then-sft-adv-composed(-prefer-hostile-ul-loops)   the same chain on the deep student
  deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops   that chain, its DPO turns also drawn from
                 lines that ask each training card to say its own `never` phrases (`generate --kinds bait:1`)
  deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops   the same, plus knowledge pairs (`prefer --facts`): the
                 teacher's answers that say a training card's fact against the same reply with the answer changed
  demo           the student `make demo` wrote (--demo FOLDER; its own, shorter budget)
A row whose recovery_general run is missing is left out (run recovery_general.py --only ROW first).

Each model goes through `taille eval MODEL --personas CARDS --reference TEACHER` on the held-out half of
`taille personas make --count 200 --seed 0` (never in the shipped role-play corpus): knowledge questions on
every held-out card; replies to the 40 adversarial lines sampled on the first --cards cards (breaks,
coherence, fidelity, transcripts). The structured-action parse rate is measured on the teacher's GGUF with
the shipped merchant card (taille.characters.actions.measure: the same prompts with and without the grammar).

Run:  .venv/bin/python benchmarks/characters.py [--cards 4] [--demo runs/demo/distilled]
Each model's measurement is kept in --work (TAILLE_CACHE/bench/characters) as it finishes; run again to go
on. Writes benchmarks/results/characters.{md,json} after every model.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import subprocess
import sys
from pathlib import Path

from distill_recovery import RESULTS, TEACHER, remember, weights_stamp

ZERO_SHOT = ("arc_easy", "piqa", "winogrande", "hellaswag")
"""The issue's zero-shot average (recovery_general measures these and ARC-Challenge, LAMBADA)."""
ROWS = ("teacher", "pruned", "plays", "general", "free", "roleplay-general", "roleplay-general-on-policy-reply", "roleplay-general-replies", "roleplay-general-replies-jsd", "demo-mix", "demo-mix-on-policy", "demo-mix-on-policy-reply", "demo-mix-replies", "demo-mix-free-replies", "demo-mix-replies-ce", "demo-mix-replies-jsd", "demo-mix-replies-sft", "demo-mix-replies-then-sft", "demo-mix-replies-then-sft-adv", "demo-mix-replies-then-sft-adv-anchor", "demo-mix-replies-then-sft-adv-wide", "demo-mix-replies-then-sft-adv-wide-prefer", "demo-mix-replies-then-sft-adv-wide-prefer-hostile", "demo-mix-replies-then-sft-adv-wide-prefer-hostile-round2", "demo-mix-replies-then-sft-adv-composed", "demo-mix-replies-then-sft-adv-composed-prefer-hostile", "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul", "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops", "two-rounds-mix", "searched-mix-replies", "calib-mix-replies", "searched-calib-mix-replies", "deep-calib-mix-replies", "searched-calib-general-mix-replies", "searched-calib-mix-replies-then-sft-adv-composed", "searched-calib-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops", "deep-calib-mix-replies-then-sft-adv-composed", "deep-calib-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops", "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops", "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops", "demo")
LABELS = {"teacher": "teacher", "pruned": "pruned, not distilled", "plays": "distilled on the plays",
          "general": "distilled on general generated data",
          "free": "distilled on the teacher's free text (`generate --prompts free`, no chat)",
          "roleplay-general": "distilled on role-play + general (no plays)",
          "roleplay-general-on-policy-reply": "the same, on-policy from each reply's start",
          "roleplay-general-replies": "role-play + general, the loss on the replies only (`--loss-on replies`)",
          "roleplay-general-replies-jsd": "the same, generalised JSD (beta 0.5) instead of forward KL",
          "demo-mix": "distilled on role-play + general + plays",
          "demo-mix-on-policy": "the same, each block ending in the student's own samples (on-policy)",
          "demo-mix-on-policy-reply": "the same, the student writing the blocks' replies (on-policy from a reply)",
          "demo-mix-replies": "role-play + general + plays, the loss on the replies and the plays (`--loss-on replies`)",
          "demo-mix-free-replies": "the same, the teacher's free text in place of part of the chat (roleplay 0.45, chat 0.2, free 0.15, plays 0.2)",
          "demo-mix-replies-ce": "the same, plus cross-entropy on the data's tokens (`--ce-weight 0.5`)",
          "demo-mix-replies-jsd": "the same data and mask, JSD (beta 0.5) instead of forward KL",
          "demo-mix-replies-sft": "the same data and mask, cross-entropy alone on the teacher's filtered replies (no KD: `--kd-weight 0 --ce-weight 1`)",
          "demo-mix-replies-then-sft": "the demo's recipe for 448K tokens, then 64K of cross-entropy alone on the role-play replies (lr 1e-4)",
          "demo-mix-replies-then-sft-adv": "the same 448K tokens, then 64K of cross-entropy on the role-play replies (0.6) and the teacher's in-character answers to hostile lines (0.4, rejection-sampled: `--kinds adversarial:1 --retries 3`)",
          "demo-mix-replies-then-sft-adv-anchor": "the same, the CE stage also held to the first stage's student by forward KL (weight 1; `--teacher` that checkpoint)",
          "demo-mix-replies-then-sft-adv-wide": "the adv row with a wider hostile corpus: all 67 training lines (its corpus was written from the first 31), 12K reply tokens (not 4K), the same 0.4",
          "demo-mix-replies-then-sft-adv-wide-prefer": "the adv-wide student, then DPO on its own replies that break character against the teacher's kept ones (`taille prefer`, 600 train turns)",
          "demo-mix-replies-then-sft-adv-wide-prefer-hostile": "the same DPO stage, its pairs from the hostile lines alone (all 291 turns of the wide hostile corpus, 8 draws each)",
          "demo-mix-replies-then-sft-adv-wide-prefer-hostile-round2": "that student through the same DPO stage again (a second round: its own failing replies, drawn anew)",
          "demo-mix-replies-then-sft-adv-composed": "the adv row with hostile lines composed from parts: 24K reply tokens answering ~1,300 composed wordings (0.75 of the lines) and the 67 hand-written ones (0.25), the same 0.4",
          "demo-mix-replies-then-sft-adv-composed-prefer-hostile": "that student, then the DPO stage on 600 turns of its composed hostile corpus (4 draws each)",
          "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul": "the same pairs, DPO + token-level unlikelihood (weight 1) of the words that broke each rejected reply (`--unlikelihood 1`)",
          "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops": "the same pairs, DPO + unlikelihood of the breaking words and of the repeated n-grams of each looping rejected reply (`--unlikelihood 1 --repeat-unlikelihood 1`)",
          "two-rounds-mix": "the default's data and mask in two rounds: pruned to 112M, 256K tokens, pruned to 90M, 256K tokens",
          "searched-mix-replies": "the default's data and mask (role-play + general + plays, `--loss-on replies`) on the search's shape: 21 layers x hidden 576 x MLP 1184 (89.88M), not 30 x 480 x 1152",
          "calib-mix-replies": "the default's data and mask on the width student pruned from importance calibrated on that mix (as the recipe prunes), not on the plays",
          "searched-calib-mix-replies": "the same, on the search's shape (21 x 576 x 1184) pruned from those scores",
          "deep-calib-mix-replies": "the same, on the searched shape's family with fewer layers cut (24 x 576 x 960) pruned from those scores",
          "searched-calib-general-mix-replies": "the searched, mix-calibrated student on a general recipe's data: the teacher's free text 0.4, chat answers 0.2, plays 0.4, no role-play",
          "searched-calib-mix-replies-then-sft-adv-composed": "the character chain on the searched, mix-calibrated student: the default's recipe for 448K tokens, then 64K of cross-entropy on role-play and the composed hostile answers",
          "searched-calib-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops": "that student, then the DPO stage with both unlikelihood terms (its own pairs, drawn as the width row's)",
          "deep-calib-mix-replies-then-sft-adv-composed": "the same character chain's first two stages on the deep, mix-calibrated student (24 x 576 x 960)",
          "deep-calib-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops": "that student, then the DPO stage with both unlikelihood terms (its own pairs)",
          "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops":
              "the same DPO stage, its turns also from never-phrase baits (`generate --kinds bait:1`)",
          "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops":
              "the same DPO stage and pairs, plus 160 knowledge pairs: the teacher's answers to questions on training cards' facts against the same words with the answer changed (`prefer --facts`)",
          "demo": "the demo's student (`make demo`)"}
CORPUS = Path(__file__).resolve().parents[1] / "taille" / "data" / "corpora" / "roleplay.jsonl.gz"


def in_character(model: str, cards: Path, args, folder: Path) -> dict:
    """One model's in-character row, through `taille eval --out` (its eval.json)."""
    cmd = [sys.executable, "-m", "taille", "eval", model, "--personas", str(cards), "--reference", TEACHER,
           "--persona-cards", str(args.cards), "--persona-batch-size", str(args.batch_size), "--out", str(folder),
           "--persona-sampler", args.sampler]
    subprocess.run(cmd, check=True)
    report = json.loads((folder / "eval.json").read_text())
    characters = report["characters"]
    (row,) = characters["rows"]
    return {**row, "cards": characters["cards"], "knowledge": characters["knowledge"]}


def recovery_models(recovery: Path) -> dict[str, str]:
    """Row name -> model: the teacher, the pruned student, and every recovery_general row (and its seed repeat,
    recovery_general --seeds ROW) whose run in `recovery` has finished."""
    models = {"teacher": TEACHER, "pruned": str(recovery / "width-90m")}
    for row in (r for r in ROWS if r not in ("teacher", "pruned", "demo")):
        for name in (row, f"{row}-seed1"):
            if (recovery / "runs" / name / "taille.json").exists():
                models[name] = str(recovery / "runs" / name)
    return models


def general(measured: dict) -> dict | None:
    """WikiText-2 perplexity and the four-task zero-shot average (standard error) of a recovery_general
    measurement."""
    if measured is None:
        return None
    tasks = [measured["tasks"][t] for t in ZERO_SHOT]
    return {"wikitext2": measured["ppl"]["wikitext2"], "zero_shot": sum(t["score"] for t in tasks) / len(tasks),
            "zero_shot_se": math.sqrt(sum(t["stderr"] ** 2 for t in tasks)) / len(tasks)}


def action_rates(work: Path) -> dict:
    """Constrained vs unconstrained structured replies of the teacher's GGUF, merchant card."""
    from taille.characters.actions import measure
    from taille.characters.lines import ADVERSARIAL, SMALL_TALK
    from taille.chat.persona import load_personas, shipped_personas
    from taille.models.load import embedded_model_path

    merchant = load_personas(shipped_personas())["sella-vey"]
    lines = [*SMALL_TALK, *ADVERSARIAL[:20]]
    gguf = embedded_model_path(TEACHER)
    return {"model": gguf.name, "card": merchant.name, "lines": len(lines),
            **measure(gguf, [merchant], lines, seed=0, max_tokens=120)}


def corpus_sample(count: int = 5, seed: int = 0) -> dict:
    records = [json.loads(line) for line in gzip.open(CORPUS, "rt", encoding="utf-8")]
    picked = random.Random(seed).sample(records, count)
    return {"records": len(records), "reply_tokens": sum(r.get("tokens", 0) for r in records),
            "sample": [{"persona": r["persona"], "messages": [m for m in r["messages"] if m["role"] != "system"]}
                       for r in picked]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=4, help="held-out cards whose replies are sampled (40 lines each)")
    parser.add_argument("--batch-size", type=int, default=40, help="replies sampled together (40: one card's lines)")
    parser.add_argument("--demo", default=None, help="the distilled student of a `make demo` run (runs/demo/distilled)")
    parser.add_argument("--only", default=None, help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--sampler", choices=("model", "chat"), default="model",
                        help="sample the replies as the model alone (temperature, top-p) or as `taille chat` plays a "
                             "card (its repeat penalty, llama-cpp-python's top-k and min-p): the chat results go to "
                             "characters_chat_sampler.{md,json}")
    parser.add_argument("--no-actions", action="store_true", help="skip the structured-action measurement")
    parser.add_argument("--work", default=None, help="default: TAILLE_CACHE/bench/characters")
    parser.add_argument("--recovery-work", default=None, help="default: TAILLE_CACHE/bench/recovery_general")
    args = parser.parse_args()

    from taille.paths import cache_dir

    work = Path(args.work) if args.work else cache_dir("bench") / "characters"
    recovery = Path(args.recovery_work) if args.recovery_work else cache_dir("bench") / "recovery_general"
    cards = work / "cards"
    if not (cards / "heldout").is_dir():
        subprocess.run([sys.executable, "-m", "taille", "personas", "make", "--count", "200", "--seed", "0",
                        "--out", str(cards)], check=True)
    models = recovery_models(recovery)
    if args.demo:
        models["demo"] = str(Path(args.demo).resolve())
    chosen = [r for r in (args.only.split(",") if args.only else models) if r in models]

    committed = json.loads((RESULTS / "recovery_general.json").read_text())["measured"]
    stem = "characters" if args.sampler == "model" else "characters_chat_sampler"
    tag = f"{args.cards}" if args.sampler == "model" else f"{args.cards}-chat"
    results_path = RESULTS / f"{stem}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": {}}
    for name in chosen:
        key = f"{name}-{weights_stamp(Path(models[name]))}" if name == "demo" else name  # a new demo is measured anew
        row = remember(work / "measured" / f"{key}-{tag}.json",
                       lambda name=name: in_character(models[name], cards, args, work / "eval" / f"{name}-{tag}"))
        measured = committed.get(name)
        if name == "demo" and measured is not None and measured.get("weights") != weights_stamp(Path(models[name])):
            measured = None  # recovery_general measured another demo's weights: run it with --demo first
        kept = {k: v for k, v in row.items() if k != "scored_replies"}  # every reply stays in --work's measured/
        results["rows"][name] = {"model": models[name], "characters": kept, "general": general(measured)}
        results["settings"] = {"cards": args.cards, "lines": 40, "batch_size": args.batch_size, "teacher": TEACHER,
                               "sampler": args.sampler}
        write(results, stem)
    if not args.no_actions and args.sampler == "model":
        results["actions"] = remember(work / "measured" / "actions.json", lambda: action_rates(work))
    results["corpus"] = corpus_sample()
    write(results, stem)


def label(name: str) -> str:
    """A row's label; a seed repeat (ROW-seed1) is its row's, with the seed; a row without one, its name (the table
    is written after minutes of measurement: a missing label must not lose it)."""
    if name in LABELS:
        return LABELS[name]
    row = name.removesuffix("-seed1")  # a two-stage row's repeat is its last stage's (recovery_general --seeds)
    if row == name:
        return f"`{name}`"
    stage = "the DPO stage with " if "-prefer" in row else "the CE stage with " if "-then-sft" in row else ""
    return f"{label(row)} ({stage}seed 1)"


def cell(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def rate(p: float, n: int) -> str:
    """A share of n trials with its binomial standard error: two rows closer than about twice the errors
    combined are not told apart by this many replies."""
    return f"{100 * p:.1f}% ± {100 * math.sqrt(p * (1 - p) / n):.1f}"


def write(results: dict, stem: str = "characters") -> None:
    rows = [(name, results["rows"][name]) for row in ROWS for name in (row, f"{row}-seed1") if name in results["rows"]]
    head = ["model", "knowledge acc", "break rate", "in character", "coherence: teacher ppl of replies / % degenerate",
            "fidelity ppl / KL", "reply tokens", "WikiText-2 ppl", "zero-shot avg (ARC-E, PIQA, WinoGrande, HellaSwag)"]
    chat = results.get("settings", {}).get("sampler") == "chat"
    title = ", replies sampled as `taille chat` plays a card (--persona-sampler chat)" if chat else ""
    lines = [f"# Characters after compression (issue 16){title}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        c, g = r["characters"], r["general"] or {}
        n = c["replies"]
        lines.append("| " + " | ".join([
            label(name), f"{rate(c['knowledge_acc'], c['knowledge_n'])} (n={c['knowledge_n']})",
            rate(c["break_rate"], n), rate(c["in_character"], n),
            f"{cell(c['coherence']['teacher_ppl'])} / {rate(c['degenerate_rate'], n)}",
            f"{cell(c['fidelity']['ppl'])} / {cell(c['fidelity']['kl'], '{:.3f}')}", f"{c['reply_tokens']:.1f}",
            cell(g.get("wikitext2")),
            f"{g['zero_shot']:.1f} ± {g['zero_shot_se']:.1f}" if g else "-"]) + " |")
    if rows:
        c = rows[0][1]["characters"]
        s = results["settings"]
        lines += ["", f"Replies: {s['lines']} adversarial lines on each of {len(c['cards'])} held-out cards "
                  f"({', '.join(c['cards'])}), sampled at the eval's fixed seed (± one binomial standard error, "
                  "replies counted as independent: it understates the spread between cards); knowledge: "
                  f"{c['knowledge']['items']} "
                  f"questions on {c['knowledge']['cards']} held-out cards (chance 25%). WikiText-2 and zero-shot: "
                  "benchmarks/results/recovery_general.json (500 examples a task; the same trained students)."]
    if "actions" in results:
        a = results["actions"]
        lines += ["", f"## Structured actions ({a['model']}, card {a['card']}, {a['lines']} player lines)", "",
                  "| decoding | parses | fits the schema | decode tokens/s |", "|---|---|---|---|"]
        for kind in ("constrained", "unconstrained"):
            k = a[kind]
            lines.append(f"| {kind} | {100 * k['parse_rate']:.1f}% | {100 * k['valid_rate']:.1f}% | {k['tokens_per_s']:.1f} |")
    if "corpus" in results:
        c = results["corpus"]
        lines += ["", f"## The shipped role-play corpus: {c['records']} conversations, {c['reply_tokens']:,} reply tokens",
                  "(filter counts: taille/data/corpora/README.md). Five records drawn at random (seed 0):", ""]
        for record in c["sample"]:
            lines.append(f"- **{record['persona']}**: " + " / ".join(
                f"*{m['role']}*: {m['content']!r}" for m in record["messages"]))
    for name, r in rows:
        transcripts = r["characters"].get("transcripts") or []
        if transcripts:
            lines += ["", f"## Transcript: {label(name)}", ""]
            t = transcripts[0]
            lines.append(f"Card: {t.get('card', '?')}")
            for turn in t["turns"]:
                lines += [f"- Player: {turn['player']}", f"- Character: {turn.get('reply', turn.get('character', ''))}"]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines[:len(rows) + 4]), flush=True)


if __name__ == "__main__":
    main()
