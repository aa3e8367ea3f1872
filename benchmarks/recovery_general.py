"""Which lever wins back general ability per token: one row per lever, the same 90M student, the same budget.

The student is benchmarks/distill_recovery.py's: SmolLM2-135M-Instruct width-pruned to 90M (hidden 480, MLP
1152, 6/3 heads), unless its row names another shape (depth, searched-*, calib-*). Every row distils it from
the live teacher for --tokens (512K) with the recovery benchmark's schedule, changing one thing:
  plays          the Shakespeare training plays (today's `taille run` default data): the reference row
  demo-mix       the demo's data: shipped role-play and chat corpora and the plays (roleplay:0.45,chat:0.35,
                 shakespeare:0.2)
  demo-mix-on-policy   the demo's data, every block's last 64 tokens sampled by the student itself from the
                 block's first 192 and graded by the teacher (`--on-policy 1 --on-policy-tokens 64`, GKD)
  demo-mix-on-policy-reply   the same, the student writing from the first reply (assistant turn) that starts
                 in the block's last 128 tokens, else those 128 (`--on-policy-from reply`): aimed at replies
  demo-mix-replies   the demo's data, the loss on the replies of the chat sources and on all of the plays
                 (`--loss-on replies`): what `taille demo` distils on
  demo-mix-free-replies   the default's recipe with the teacher's free text (the `free` row's corpus) in place of
                 part of the chat answers: roleplay 0.45, chat 0.2, free 0.15, plays 0.2 (`--loss-on replies`: the
                 free text, plain, is learned whole): does pre-training-like text buy back WikiText-2 in the mix?
  demo-mix-replies-ce   the same, plus cross-entropy (weight 0.5) on the data's own next tokens: the corpus's
                 replies were sampled from the teacher and its out-of-character ones filtered out, so the hard
                 labels pull the student toward the kept replies where the teacher's distribution would break
  demo-mix-replies-jsd   the demo's data and mask with generalised JSD (beta 0.5) instead of forward KL
  demo-mix-replies-sft   the demo's data and mask, cross-entropy on the data's tokens alone, no teacher
                 (`--kd-weight 0 --ce-weight 1`): sequence-level KD (Kim & Rush 2016), the student learns the
                 teacher's filtered samples, not its distribution, which puts mass on breaking character
  demo-mix-replies-then-sft   the default's recipe (demo-mix-replies) for all but the last 64K tokens, then
                 64K of cross-entropy alone on the role-play corpus's filtered replies (peak LR 1e-4, no teacher):
                 the hard labels where they matter for a character, the teacher's distribution everywhere else
  demo-mix-replies-then-sft-adv   the same first stage (the same run), then the 64K of cross-entropy on the
                 role-play corpus (0.6 of the blocks) and ADVERSARIAL_TOKENS of the teacher's in-character answers
                 to hostile player lines (0.4), written into --work first (`taille generate --personas --kinds adversarial:1
                 --retries 3`, ~5 min here): in the shipped corpus 140 of 930 kept replies answer a hostile
                 line (only first lines are hostile), and the ones the teacher broke on were dropped, not retried
  demo-mix-replies-then-sft-adv-anchor   the same, the SFT stage's loss also forward KL (weight 1) to the first
                 stage's student (`--teacher` that checkpoint), not to the teacher: the hard labels move the
                 student toward the kept replies, the anchor holds it to what it was (its text, fewer loops?)
                 (these two rows' corpus was written from the first 31 of lines.ADVERSARIAL_TRAIN; today's
                 list has 67, so on a new machine their corpus is drawn from all of them)
  demo-mix-replies-then-sft-adv-wide   the adv row's stages, its hostile corpus WIDE_ADVERSARIAL_TOKENS from all
                 67 training lines (adversarial-wide.jsonl): more lines and more answers to each, at the same 0.4
  demo-mix-replies-then-sft-adv-wide-prefer   the adv-wide row's student, then `taille prefer`: DPO (+ the
                 chosen replies' cross-entropy) on pairs of the student's own replies that the corpus filters
                 reject (never phrases, out-of-character markers, loops) against the teacher's kept ones, over
                 PREFER_PROMPTS turns drawn from the wide hostile corpus and the shipped role-play corpus (train
                 cards only); its distillation tokens are the adv-wide row's, the DPO stage is on top
  demo-mix-replies-then-sft-adv-wide-prefer-hostile   the same DPO stage on the same student, its pairs from
                 the hostile lines alone: every turn of the wide hostile corpus, PREFER_HOSTILE_SAMPLES draws each
  demo-mix-replies-then-sft-adv-wide-prefer-hostile-round2   that tuned student through the same stage again
                 (iterated DPO): its own failing draws now, on the same hostile turns, not the first student's
  demo-mix-replies-then-sft-adv-composed   the adv row's stages, its hostile corpus COMPOSED_ADVERSARIAL_TOKENS of
                 answers to ~1,300 lines composed from parts and the 67 hand-written ones (adversarial-composed.jsonl):
                 the DPO rounds fit the 67 lines they saw and kept breaking on unseen ones; many wordings may generalise
  demo-mix-replies-then-sft-adv-composed-prefer-hostile   that student, then the DPO stage on PREFER_COMPOSED_PROMPTS
                 turns of its composed corpus (4 draws each)
  demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul   the same pairs, DPO + PREFER_UNLIKELIHOOD x token-level
                 unlikelihood of the words that broke each rejected reply (`--unlikelihood`): most held-out breaks
                 echo the player's own word ("smartphone", "language model"), which DPO pushes down no more than
                 any other token of the reply
  demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops   the same pairs and terms, + PREFER_UNLIKELIHOOD x
                 unlikelihood of the repeated n-grams of each looping rejected reply (`--repeat-unlikelihood`): the
                 -ul row's student loops more than the general-only one (10.0% of replies against 3.8%), and 67 of
                 the 212 rejected replies are loops DPO stops pushing once the pair is ranked
  roleplay-general   the shipped role-play corpus and the general corpus, half and half (no plays)
  roleplay-general-on-policy-reply   the same, the student writing from the first reply in each block's
                 last 128 tokens (its role-play students open a new turn where a reply should start)
  roleplay-general-replies   the same data, the loss on the assistant's replies only (`--loss-on replies`):
                 a role-play record is mostly its card, which the student is never asked to write
  roleplay-general-replies-jsd   the same, generalised JSD (beta 0.5) instead of forward KL: a loss that
                 also punishes mass the student puts where the teacher has little (its loops?)
  general        a teacher-generated general corpus (--corpus, from `taille generate`; default: the shipped
                 `chat` corpus, ~60K tokens of the teacher's answers as the student reads them, so 512K tokens read it ~9 times)
  general-plays  that corpus and the plays, half and half
  free           256K tokens of the teacher's free text (`taille generate --prompts free --temperature 1.0`: each
                 record opens with a random word of its vocabulary and goes on as plain text, LLM-QAT's
                 data-free generation), written into --work first (~30 min here): pre-training-like text
                 against the chat answers of `general`
  difference     the plays' blocks where the teacher is furthest ahead of the pruned student: `taille select`
                 (MiniPLM's difference sampling) keeps the best half of 1M tokens
  cache-top / cache-sampled   from a teacher cache of the first --tokens of the plays, 128 per position: the
                 top-128 log-probabilities, or 128 draws from the teacher (Sparse Logit Sampling); both read
                 the same blocks, so the pair compares the two caches
  hidden         the plays, + intermediate hidden states (--hidden-layers auto)
  jsd            the plays, generalised JSD (beta 0.5) instead of forward KL
  lr-1e-3 / lr-2e-4   the plays at twice / under half the reference peak LR (5e-4)
  depth          the depth-pruned 90M student (18 layers), on the plays
  two-rounds     prune to ~112M, distil half the budget, prune that to 90M, distil the other half
  two-rounds-mix   the same two rounds on the default's data and mask (demo-mix-replies's), the second
                 round's importance calibrated on that mix
  searched-mix-replies   the default's data and mask (demo-mix-replies's) on the shape `taille search` ranked
                 best among those no larger than the target (results/search_smollm2: 21 layers x hidden 576 x MLP
                 1184, 89.88M, 4th of 6 after 40 steps, ahead of the width shape): the embeddings and the residual
                 width kept whole, layers and MLP cut; pruned from the same importance scores
  calib-mix-replies   the default's data and mask on a width student pruned from importance calibrated on that
                 mix (128 blocks of 512 tokens, as the recipe's `importance` reads its data), not on the plays as
                 every row above: what the default recipe and `taille demo` prune from (pruned WikiText-2 833 against
                 1324, plays 620 against 641)
  searched-calib-mix-replies   the same, on the search's shape (searched-mix-replies's) pruned from those scores
  deep-calib-mix-replies   the same data and mask on the searched shape's family with fewer layers cut (24 x 576 x
                 MLP 960, 89.39M; DEEP), pruned from those scores: the 21-layer shape reads a card's facts less
                 well than the width one and its zero-shot stops rising after 64K; is depth what the pruning loses?
  corrected-deep-calib-mix-replies   Minitron's teacher correction first: the teacher fine-tuned on the same mix
                 (`taille correct --loss-on replies`, CORRECTION_TOKENS at CORRECTION_LR), its importance calibrated
                 on the mix, pruned to the deep shape and distilled from the corrected teacher as
                 deep-calib-mix-replies is from the original; the correction's tokens are the teacher's, not
                 the student's budget: the student reads 512K as every row
  searched-calib-general-mix-replies   that student on a general recipe's data, no role-play: the teacher's free
                 text (the `free` row's corpus) 0.4, its chat answers 0.2, the plays 0.4 (`--loss-on replies`): the
                 role-play share traded for pre-training-like text (WikiText-2) and more of the plays (held-out plays)
  searched-calib-free-plays   the same student on the free text 0.45 (the shipped `free` corpus, the `free`
                 row's bytes) and the plays 0.55, no chat answers (so no reply mask: plain text, every token
                 counts, as in the general mix's other 0.8): the general mix missed held-out plays at 1.33x by
                 0.03x; does the chat share buy anything the plays would not?
  searched-calib-mix-replies-then-sft-adv-composed(-prefer-hostile-ul-loops)   the character chain of the
                 demo-mix-replies-then-sft-adv-composed(-prefer-hostile-ul-loops) rows on that student: 448K tokens
                 of the default's KD, 64K of CE on role-play and the composed hostile answers, then DPO with both
                 unlikelihood terms on its own pairs: whether one student can hold both ends (general ability and
                 characters)
  deep-calib-mix-replies-then-sft-adv-composed(-prefer-hostile-ul-loops)   the same chain on the deep student
                 (deep-calib-mix-replies's: 24 layers, which kept the card-reading the 21-layer shape lost)
  deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops   that chain's DPO stage with its turns drawn
                 from the composed hostile corpus and BAIT_TOKENS of the teacher's answers to lines that ask each
                 training card to say its own `never` phrases (never-baits.jsonl, `--kinds bait:1`): most of the
                 chain's held-out breaks are a `never` phrase of the card echoed from the player's line
                 ("smartphone"), a phrase its training turns seldom asked for
  deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops   the same DPO stage (its drawn pairs
                 copied) plus MAX_FACTS knowledge pairs (`taille prefer --facts`): the teacher's answers to
                 questions about training cards' facts (knowledge.jsonl, KNOWLEDGE_TOKENS, `--kinds knowledge:1`)
                 that say the answer, against the same reply with the answer changed to a distractor: the DPO
                 stages lowered knowledge accuracy (99.5% -> 97.9%), the one goal the baits row missed
  demo           (--demo FOLDER) the student a `make demo` run wrote, measured alike, not trained here (its
                 own, shorter budget)
Each model is measured alike: perplexity on WikiText-2 and on the held-out plays (first --eval-tokens,
window 1024), zero-shot ARC-Easy, ARC-Challenge, PIQA, WinoGrande, HellaSwag and LAMBADA through
lm-evaluation-harness on the local task files (the first --limit examples of each; standard errors from its
bootstrap). Rows that differ from the reference by less than two standard errors of the zero-shot average
are flagged for a seed repeat (--seeds adds `ROW-seed1` rows). --curves ROW,... records held-out metrics at
64K, 128K, 256K, 512K and 1M tokens for those rows (separate runs, one per budget, the same schedule scaled).

Run:  .venv/bin/python benchmarks/recovery_general.py --wikitext2 PATH/wiki.test.raw --task-data PATH/eval \
          [--corpus general.jsonl] [--only plays,demo-mix] [--seeds plays] [--curves plays]
Alone on a 2-core CPU a row is ~35-45 minutes of distillation (190-240 tokens/s on the AVX512-BF16 EPYC of the
committed results: each row's rate is in the JSON's `trained`) plus ~15 of measurement; each
finished step is kept in --work and the command run again goes on from there (an interrupted distillation
resumes from its last checkpoint). Writes benchmarks/results/recovery_general.{md,json,png} after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from taille.options import parse_count

from distill_recovery import (RESULTS, TEACHER, add_train_options, pruned_students, remember, run_summary, taille,
                              train_args, weights_stamp)

TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "lambada_openai")
HEADLINE = {"arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
            "hellaswag": "acc_norm", "lambada_openai": "acc"}
ROWS = ("plays", "demo-mix", "demo-mix-on-policy", "demo-mix-on-policy-reply", "demo-mix-replies", "demo-mix-free-replies", "demo-mix-replies-ce", "demo-mix-replies-jsd", "demo-mix-replies-sft", "demo-mix-replies-then-sft", "demo-mix-replies-then-sft-adv", "demo-mix-replies-then-sft-adv-anchor", "demo-mix-replies-then-sft-adv-wide", "demo-mix-replies-then-sft-adv-wide-prefer", "demo-mix-replies-then-sft-adv-wide-prefer-hostile", "demo-mix-replies-then-sft-adv-wide-prefer-hostile-round2", "demo-mix-replies-then-sft-adv-composed", "demo-mix-replies-then-sft-adv-composed-prefer-hostile", "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul", "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops", "roleplay-general",
        "roleplay-general-on-policy-reply", "roleplay-general-replies", "roleplay-general-replies-jsd", "general", "free", "general-plays", "difference", "cache-top", "cache-sampled", "hidden", "jsd", "lr-1e-3", "lr-2e-4", "depth", "two-rounds", "two-rounds-mix", "searched-mix-replies", "calib-mix-replies", "searched-calib-mix-replies", "deep-calib-mix-replies", "corrected-deep-calib-mix-replies", "searched-calib-general-mix-replies", "searched-calib-free-plays", "searched-calib-mix-replies-then-sft-adv-composed", "searched-calib-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops", "deep-calib-mix-replies-then-sft-adv-composed", "deep-calib-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops", "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops", "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops")
FREE_TOKENS = "256K"
ADVERSARIAL_TOKENS = "4K"
"""Reply tokens of the hostile-lines corpus (demo-mix-replies-then-sft-adv): ~95 one-line conversations of ~310
tokens (the card is most of it), about what its 0.4 of the 64K SFT tokens reads once."""
WIDE_ADVERSARIAL_TOKENS = "12K"
"""Reply tokens of demo-mix-replies-then-sft-adv-wide's hostile corpus: ~280 conversations, ~4 answers per line
asked, of which 0.4 of the 64K SFT tokens reads about a quarter (more lines seen, fewer repeats)."""
COMPOSED_ADVERSARIAL_TOKENS = "24K"
"""Reply tokens of demo-mix-replies-then-sft-adv-composed's hostile corpus: ~700 one-line conversations, a quarter
of them on the 67 hand-written training lines, three quarters on lines composed from parts (`--kinds
adversarial:0.25,hostile:0.75`; lines.compose_hostile, ~1,300 wordings): most lines are asked once."""
BAIT_TOKENS = "12K"
"""Reply tokens of the never-baits corpus (the -prefer-baits row's DPO turns beside the composed corpus): ~300
one-line conversations, about two baits of each training card's 40-50 (4-5 `never` phrases x 10 wordings)."""
KNOWLEDGE_TOKENS = "24K"
"""Reply tokens of the knowledge corpus (the -facts row's knowledge pairs): ~700 one-line conversations asking
about training cards' facts, about a quarter of whose replies say the answer (176 of 691; the rest give no pair)."""
MAX_FACTS = 160
"""Knowledge pairs of the -facts row (`--max-facts`): one per training card on average, half the drawn pairs."""
HOSTILE_KINDS = {"adversarial.jsonl": "adversarial:1", "adversarial-wide.jsonl": "adversarial:1",
                 "adversarial-composed.jsonl": "adversarial:0.25,hostile:0.75", "never-baits.jsonl": "bait:1",
                 "knowledge.jsonl": "knowledge:1"}
"""The first-line kinds of each teacher-answered corpus (`taille generate --kinds`)."""
CURVE_TOKENS = ("64K", "128K", "256K", "512K", "1M")


def measure(model: str, args, folder: Path) -> dict:
    """One model's perplexities and zero-shot scores (with standard errors), through `taille eval --out`
    (its eval.json: lm-evaluation-harness may print to stdout as well)."""
    cmd = [sys.executable, "-m", "taille", "eval", model, "--ppl", "shakespeare:heldout", "--ppl",
           f"wikitext2:{args.wikitext2}", "--max-tokens", str(args.eval_tokens), "--tasks", ",".join(TASKS),
           "--task-data", args.task_data, "--limit", str(args.limit), "--out", str(folder)]
    subprocess.run(cmd, check=True)
    report = json.loads((folder / "eval.json").read_text())
    (row,) = report["rows"]
    ppl = {name: round(v["ppl"], 3) for name, v in zip(("plays", "wikitext2"), row["ppl"].values())}
    scores = {}
    for task in TASKS:
        metric = HEADLINE[task]
        s = row["tasks"][task]
        scores[task] = {"score": round(100 * s[metric], 2), "stderr": round(100 * s[f"{metric}_stderr"], 2)}
    return {"ppl": ppl, "tasks": scores, "n_samples": report.get("n_samples")}


def average(m: dict) -> tuple[float, float]:
    """Zero-shot mean over the tasks, and its standard error (the tasks' errors, independent)."""
    values = [t["score"] for t in m["tasks"].values()]
    errors = [t["stderr"] for t in m["tasks"].values()]
    return sum(values) / len(values), math.sqrt(sum(e * e for e in errors)) / len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wikitext2", required=True)
    parser.add_argument("--task-data", required=True, help="local task files (the layout of shared/data/eval)")
    parser.add_argument("--corpus", default=None, help="a teacher-generated general corpus (`taille generate`); "
                        "default: the shipped `chat` corpus")
    parser.add_argument("--limit", type=int, default=500, help="examples per zero-shot task")
    parser.add_argument("--only", default=None, help="comma-separated rows (default: all, in order; none: only the "
                        "teacher and the pruned student)")
    parser.add_argument("--seeds", default="", help="rows to repeat at --seed 1")
    parser.add_argument("--curves", default="", help="rows to also run at 64K .. 1M tokens")
    parser.add_argument("--demo", default=None, help="also measure the student of a `make demo` run "
                        "(runs/demo/distilled) as the row `demo`")
    parser.add_argument("--work", default=None, help="default: TAILLE_CACHE/bench/recovery_general")
    add_train_options(parser)
    args = parser.parse_args()
    args.eval_tokens = 65536 if args.eval_tokens is None else args.eval_tokens

    from taille.paths import cache_dir

    work = (Path(args.work) if args.work else cache_dir("bench") / "recovery_general").expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    width, depth = pruned_students(work)
    searched = work / SEARCHED  # pruned when a row trains on it (searched_student)
    corpus = str(Path(args.corpus).expanduser().resolve()) if args.corpus else "chat"
    data = {"plays": "shakespeare", "demo-mix": "roleplay:0.45,chat:0.35,shakespeare:0.2", "general": corpus,
            "roleplay-general": f"roleplay:0.5,{corpus}:0.5",
            "general-plays": f"shakespeare:0.5,{corpus}:0.5",
            "general-mix": f"{work / 'free.jsonl'}:0.4,{corpus}:0.2,shakespeare:0.4",
            "free-plays": "free:0.45,shakespeare:0.55"}
    hostile_corpora = {work / "adversarial.jsonl": ADVERSARIAL_TOKENS,  # written first by a row that trains on it
                       work / "adversarial-wide.jsonl": WIDE_ADVERSARIAL_TOKENS,
                       work / "adversarial-composed.jsonl": COMPOSED_ADVERSARIAL_TOKENS,
                       work / "never-baits.jsonl": BAIT_TOKENS,  # the DPO stage's turns only (PREFER_TURNS)
                       work / "knowledge.jsonl": KNOWLEDGE_TOKENS}  # the -facts row's knowledge pairs (FACTS)
    hostile, wide, composed = (f"roleplay:0.6,{work / corpus}:0.4"
                               for corpus in ("adversarial.jsonl", "adversarial-wide.jsonl", "adversarial-composed.jsonl"))
    kd_stage = work.joinpath(*KD_STAGE)
    sft_stages = {"demo-mix-replies-then-sft": ("roleplay", ["--kd-weight", 0]),  # (data, the loss's other term)
                  "demo-mix-replies-then-sft-adv": (hostile, ["--kd-weight", 0]),
                  "demo-mix-replies-then-sft-adv-anchor": (hostile, ["--teacher", kd_stage, "--kd-weight", 1]),
                  "demo-mix-replies-then-sft-adv-wide": (wide, ["--kd-weight", 0]),
                  "demo-mix-replies-then-sft-adv-composed": (composed, ["--kd-weight", 0]),
                  **dict.fromkeys(SFT_STUDENT, (composed, ["--kd-weight", 0]))}
    rows = {"plays": (width, data["plays"], []), "demo-mix": (width, data["demo-mix"], []),
            "demo-mix-on-policy": (width, data["demo-mix"], ["--on-policy", 1.0, "--on-policy-tokens", 64]),
            "demo-mix-on-policy-reply": (width, data["demo-mix"], ["--on-policy", 1.0, "--on-policy-tokens", 128,
                                                                   "--on-policy-from", "reply"]),
            "demo-mix-replies": (width, data["demo-mix"], ["--loss-on", "replies"]),
            "demo-mix-free-replies": (width, f"roleplay:0.45,chat:0.2,{work / 'free.jsonl'}:0.15,shakespeare:0.2",
                                      ["--loss-on", "replies"]),
            "demo-mix-replies-ce": (width, data["demo-mix"], ["--loss-on", "replies", "--ce-weight", 0.5]),
            "demo-mix-replies-jsd": (width, data["demo-mix"], ["--loss-on", "replies", "--loss", "jsd"]),
            "demo-mix-replies-sft": (width, data["demo-mix"], ["--loss-on", "replies", "--kd-weight", 0,
                                                               "--ce-weight", 1]),
            **{name: (None, f"{data['demo-mix']} then {stage[0]}", []) for name, stage in sft_stages.items()},  # then_sft()
            **{name: (None, f"{data['demo-mix']} then {sft_stages[stage_of(name)][0]} then prefer"  # then_prefer()
                            + ("" if PREFER_TURNS[name][1] else f" on {prefer_corpus(work, name)} alone")
                            + (" + unlikelihood" if "--unlikelihood" in PREFER_TURNS[name][2] else "")
                            + (" + repeat unlikelihood" if "--repeat-unlikelihood" in PREFER_TURNS[name][2] else "")
                            + (f" + {MAX_FACTS} knowledge pairs from {work / FACTS[name]}" if name in FACTS else "")
                            + (" then prefer again" if name.endswith("-round2") else ""), [])
               for name in PREFER_ROWS},
            "hidden": (width, "shakespeare", ["--hidden-layers", "auto"]),
            "jsd": (width, "shakespeare", ["--loss", "jsd"]),
            "lr-1e-3": (width, "shakespeare", ["--lr", 1e-3, "--min-lr", 1e-4]),
            "lr-2e-4": (width, "shakespeare", ["--lr", 2e-4, "--min-lr", 2e-5]),
            "depth": (depth, "shakespeare", []), "two-rounds": (None, "shakespeare", []),
            "two-rounds-mix": (None, data["demo-mix"], ["--loss-on", "replies"]),
            "searched-mix-replies": (searched, data["demo-mix"], ["--loss-on", "replies"]),
            **{f"{student.removesuffix('-90m')}-mix-replies": (work / student, data["demo-mix"], ["--loss-on", "replies"])
               for student in CALIBRATED},
            CORRECTED: (None, data["demo-mix"], ["--loss-on", "replies"]),  # corrected()
            "searched-calib-general-mix-replies": (work / "searched-calib-90m", data["general-mix"], ["--loss-on", "replies"]),
            "searched-calib-free-plays": (work / "searched-calib-90m", data["free-plays"], []),  # plain text: every token counts
            "roleplay-general": (width, data["roleplay-general"], []),
            "roleplay-general-on-policy-reply": (width, data["roleplay-general"], ["--on-policy", 1.0, "--on-policy-tokens",
                                                                                   128, "--on-policy-from", "reply"]),
            "roleplay-general-replies": (width, data["roleplay-general"], ["--loss-on", "replies"]),
            "roleplay-general-replies-jsd": (width, data["roleplay-general"], ["--loss-on", "replies", "--loss", "jsd"]),
            "general": (width, data["general"], []), "general-plays": (width, data["general-plays"], []),
            "free": (width, str(work / "free.jsonl"), []),  # the corpus is written first (below)
            "difference": (width, str(work / "difference.jsonl"), []),
            "cache-top": (width, None, ["--teacher-cache", work / "cache-top"]),
            "cache-sampled": (width, None, ["--teacher-cache", work / "cache-sampled"])}
    order = [r for r in ROWS if r in rows]
    adopt_committed(work, args)  # first: a committed seed repeat's measurement makes it a row
    measured_repeats = [r for r in rows if (work / "measured" / f"{r}-seed1-{args.limit}.json").is_file()]
    for name in dict.fromkeys([*filter(None, args.seeds.split(",")), *measured_repeats]):  # earlier repeats stay
        student, source, extra = rows[name]
        rows[f"{name}-seed1"] = (student, source, [*extra, "--seed", 1])
        order.append(f"{name}-seed1")
        if name in sft_stages:  # the repeat is its SFT stage's: the first stage is one run, shared by these rows
            data_, other = sft_stages[name]
            sft_stages[f"{name}-seed1"] = (data_, [*other, "--seed", 1])
    staged = [n for n in [*(n for n in filter(None, args.seeds.split(",")) if n not in sft_stages and n not in PREFER_ROWS),
                          *filter(None, args.curves.split(","))] if n in rows and rows[n][0] is None]
    if staged:  # their stages are their own functions, at one budget (and, but for an SFT stage's, one seed)
        sys.exit(f"--seeds/--curves {','.join(staged)}: a row trained in two stages is run only as itself")
    chosen = [] if args.only == "none" else args.only.split(",") if args.only else order
    unknown = [r for r in chosen if r not in rows]
    if unknown:
        sys.exit(f"--only {','.join(unknown)}: rows are {', '.join(rows)}")

    def row_data(name: str) -> str:  # what the tables show as a row's data (a teacher cache: the cache's name)
        return shown(rows[name][1], work) or f"teacher cache {rows[name][2][1].name}"

    def measured_once(name: str, model: str) -> dict:
        return remember(work / "measured" / f"{name}-{args.limit}.json",
                        lambda: measure(model, args, work / "eval" / f"{name}-{args.limit}"))

    if "difference" in chosen and not (work / "difference.jsonl").exists():
        taille("select", "--teacher", TEACHER, "--reference", width, "--data", "shakespeare", "--tokens", args.tokens,
               "--pool", 2, "--seq-len", args.seq_len, "--out", work / "difference.jsonl")
    free = str(work / "free.jsonl")  # written by the first run that trains on it (a row, its repeat, its curve)
    if any(rows[n][1] and (rows[n][1] == free or f"{free}:" in rows[n][1])
           for n in [*chosen, *filter(None, args.curves.split(","))] if n in rows) \
            and not (work / "free.jsonl.meta.json").exists():  # the meta is written when the corpus is whole
        taille("generate", "--teacher", TEACHER, "--prompts", "free", "--temperature", 1.0, "--tokens", FREE_TOKENS,
               "--out", work / "free.jsonl")  # resumable: a stopped run goes on
    for path, budget in hostile_corpora.items():
        if any(f"{path}:" in sft_stages[n][0] and not (work / "runs" / n / "taille.json").exists()
               for n in [*chosen, *(stage_of(c) for c in chosen if c.removesuffix("-seed1") in PREFER_ROWS)]
               if n in sft_stages) or any(
                str(path) in [*prefer_corpus(work, n).split(","), str(work / FACTS.get(n.removesuffix("-seed1"), ""))]
                and not (work / "runs" / n / "taille.json").exists()
                for n in chosen if n.removesuffix("-seed1") in PREFER_ROWS):  # a DPO stage's own turns
            hostile_lines(work, path, budget)
    def prefer_student(name: str) -> Path:  # the student a prefer row tunes, its earlier stages run first
        base = base_of(name)
        if base in PREFER_ROWS:  # a second round tunes the first round's student
            return then_prefer(work, prefer_student(base), base, [])
        return then_sft(work, args, width, data["demo-mix"], base, *sft_stages[base])

    def pruned(student: Path | None) -> None:  # a student pruned on demand is pruned before its first run
        if student == searched:
            searched_student(work)
        elif student is not None and student.name in CALIBRATED:
            calibrated_student(work, data["demo-mix"], student.name)

    outs = {}
    for name in chosen:  # every chosen run trains first: the measurements come after, from the same folders
        student, source, extra = rows[name]
        outs[name] = out = (two_rounds(work, args, name, source, extra) if name in TWO_ROUNDS else
                            corrected(work, args, name, source, extra) if name == CORRECTED else
                            then_sft(work, args, width, data["demo-mix"], name, *sft_stages[name]) if name in sft_stages else
                            then_prefer(work, prefer_student(name), name, extra)
                            if name.removesuffix("-seed1") in PREFER_ROWS else
                            work / "runs" / name)
        if not (out / "taille.json").exists():
            pruned(student)
            if source is None:  # from a teacher cache, which holds the blocks
                cache = extra[1]
                if not (cache / "meta.json").exists():
                    taille("teacher-cache", "--teacher", TEACHER, "--data", "shakespeare", "--tokens", args.tokens,
                           "--seq-len", args.seq_len, "--top-k", 128, "--out", cache,
                           *(["--sampling", "random"] if name.startswith("cache-sampled") else []))
                train = train_args(args, "shakespeare")
                del train[train.index("--data"):train.index("--data") + 2]
                taille("distill", "--student", student, *train, *extra, "--out", out, "--resume")
            else:
                taille("distill", "--student", student, "--teacher", TEACHER, *train_args(args, source), *extra,
                       "--out", out, "--resume")
    measured = {"teacher": measured_once("teacher", TEACHER), "pruned": measured_once("pruned", str(width))}
    trained = {}
    # rows measured by earlier runs stay in the tables (--only adds rows, it does not drop the others)
    committed = json.loads((RESULTS / "recovery_general.json").read_text()) if (RESULTS / "recovery_general.json").is_file() else {}
    for name in (n for n in order if n not in chosen):
        kept = work / "measured" / f"{name}-{args.limit}.json"
        if kept.is_file():
            measured[name] = json.loads(kept.read_text())
            run = work / "runs" / name
            trained[name] = ({"data": row_data(name), **summary(work, name, run)} if (run / "metrics.jsonl").is_file()
                             else {k: shown(v, work) if k in ("data", "metrics") and isinstance(v, str) else v
                                   for k, v in committed.get("trained", {}).get(name, {}).items()})
    # curves of the same protocol stay in the figure (another --limit or budget would mix two protocols)
    kept_curves = committed.get("curves", {}) if same_protocol(committed, args) else {}
    if not args.demo and "demo" in committed.get("measured", {}):  # the last demo measured stays in the tables
        measured["demo"], trained["demo"] = committed["measured"]["demo"], committed.get("trained", {}).get("demo", {})
    write_tables(measured, trained, args, kept_curves)
    for name in chosen:
        measured[name] = measured_once(name, str(outs[name]))
        trained[name] = {"data": row_data(name), **summary(work, name, outs[name])}
        write_tables(measured, trained, args, kept_curves)
    if args.demo:  # measured again whenever the demo's weights change
        demo = Path(args.demo).resolve()
        stamp = weights_stamp(demo)
        measured["demo"] = {**remember(work / "measured" / f"demo-{stamp}-{args.limit}.json",
                                       lambda: measure(str(demo), args, work / "eval" / f"demo-{args.limit}")),
                            "weights": stamp}  # characters.py pairs these cells only with the same weights
        demo_run = run_summary(demo) if (demo / "metrics.jsonl").is_file() else {}
        record = json.loads((demo / "taille.json").read_text()).get("distill", {}) if (demo / "taille.json").is_file() else {}
        data = record.get("data", "-")  # a mixture's record lists its sources
        data = ",".join(f"{p['source']}:{p['weight']}" for p in data) if isinstance(data, list) else data
        trained["demo"] = {"data": data, **demo_run}
        write_tables(measured, trained, args, kept_curves)
    curves = {name: dict(points) for name, points in kept_curves.items()}  # measured before: they stay
    for name in filter(None, args.curves.split(",")):
        pruned(rows[name][0])
        for budget, point in curve_points(work, name, rows[name], args, measured_once):
            curves.setdefault(name, {})[budget] = point
            write_tables(measured, trained, args, curves)  # after every point: a curve is hours here


def same_protocol(committed: dict, args) -> bool:
    """Whether committed results were measured and trained as this run would (the budget compared as a count:
    512K and 512000 are one budget)."""
    settings = committed.get("settings", {})
    if settings.get("tokens") is None or parse_count(settings["tokens"]) != parse_count(args.tokens):
        return False
    return all(settings.get(k) == vars(args).get(k) for k in ("limit", "eval_tokens", "seq_len", "batch_size", "lr"))


def adopt_committed(work: Path, args) -> None:
    """Measurements in the committed results of the same protocol count as done (a new machine has no work
    folder, and one measurement is 20-35 minutes here). Trained rows are adopted only with their measurement:
    to redo one, delete it from the results JSON."""
    path = RESULTS / "recovery_general.json"
    if not path.is_file():
        return
    committed = json.loads(path.read_text())
    if not same_protocol(committed, args):
        return
    kept = {f"{name}-{args.limit}": m for name, m in committed["measured"].items()}
    kept.update({f"curve-{name}-{budget}-{args.limit}": m for name, points in committed.get("curves", {}).items()
                 for budget, m in points.items()})  # a curve's points too: the next run trains only the missing ones
    for name, m in kept.items():
        target = work / "measured" / f"{name}.json"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(m, indent=1))
            print(f"kept from {path}: {name}", flush=True)


SEARCH = RESULTS / "search_smollm2" / "leaderboard.json"
SEARCHED = "searched-90m"
"""The folder under --work of the teacher pruned to the search's shape."""
CALIBRATED = {"calib-90m": "width", "searched-calib-90m": "searched", "deep-calib-90m": "deep"}
"""The folders under --work of the teacher pruned from importance calibrated on the default's mix, and their shape."""
DEEP = {"layers": 24, "ffn": 960}
"""The searched shape's family (the hidden width and the 9/3 heads whole) with 6 of 30 layers cut, not 9, and the
MLP cut further to stay under 90M: 89.39M."""


def searched_shape(leaderboard: dict) -> dict:
    """The best-ranked shape of a `taille search` leaderboard no larger than the search's target (the search
    keeps shapes within its tolerance above it too: its winner is 5% larger, so not like for like)."""
    header = leaderboard["header"]
    target = parse_count(leaderboard["settings"]["params"])
    for row in sorted(leaderboard["rows"], key=lambda r: int(r[header.index("rank")])):
        cell = dict(zip(header, row))
        if parse_count(cell["params"]) <= target:
            heads, kv = (int(x) for x in cell["heads / KV"].split("/"))
            return {"layers": int(cell["layers"]), "hidden": int(cell["hidden"]), "ffn": int(cell["MLP"]),
                    "heads": heads, "kv_heads": kv}
    raise SystemExit(f"{SEARCH}: no shape at or under {leaderboard['settings']['params']}")


def shape_flags(shape: dict) -> list:
    """`taille prune` flags of an explicit shape ({"layers": 21, "kv_heads": 3} -> --layers 21 --kv-heads 3)."""
    return [x for key, value in shape.items() for x in (f"--{key.replace('_', '-')}", value)]


def searched_student(work: Path, scores: str = "importance", out: str = SEARCHED) -> Path:
    """The teacher pruned to the committed search's like-for-like shape, from `scores` under `work` (default: the
    width student's importance; made once, kept in `work`)."""
    out = work / out
    if not (out / "taille.json").exists():
        shape = searched_shape(json.loads(SEARCH.read_text()))
        taille("prune", "-m", TEACHER, "--scores", work / scores, *shape_flags(shape), "--out", out)
    return out


def calibrated_student(work: Path, mix: str, name: str) -> Path:
    """The teacher pruned (CALIBRATED[name]'s shape) from importance scores calibrated on `mix`, 128 blocks of 512
    tokens as the plays' scores were (made once, kept in `work`)."""
    scores = work / "importance-mix"
    if not (scores / "importance.json").exists():
        taille("importance", "-m", TEACHER, "--data", mix, "--samples", 128, "--seq-len", 512, "--out", scores)
    if CALIBRATED[name] == "searched":
        return searched_student(work, scores.name, name)
    out = work / name
    if not (out / "taille.json").exists():
        shape = shape_flags(DEEP) if CALIBRATED[name] == "deep" else ["--params", "90M", "--axes", "mlp,hidden,heads"]
        taille("prune", "-m", TEACHER, "--scores", scores, *shape, "--out", out)
    return out


TWO_ROUNDS = ("two-rounds", "two-rounds-mix")


def two_rounds(work: Path, args, name: str, source: str, extra: list) -> Path:
    """Prune to ~112M, distil half the budget on `source` (with `extra`), prune the result to 90M (its own
    importance scores, calibrated on `source`), distil the other half: the same tokens as one round."""
    half = str(int(parse_count(args.tokens) // 2))
    folder = work / name
    first, second, kd1 = folder / "112m", folder / "90m", folder / "kd-112m"
    if not (first / "taille.json").exists():
        taille("prune", "-m", TEACHER, "--scores", work / "importance", "--params", "112M", "--axes", "mlp,hidden,heads",
               "--out", first)
    if not (kd1 / "taille.json").exists():
        taille("distill", "--student", first, "--teacher", TEACHER, *train_args(args, source), *extra, "--tokens", half,
               "--out", kd1, "--resume")
    if not (second / "taille.json").exists():
        taille("importance", "-m", kd1, "--data", source, "--samples", 128, "--out", folder / "scores")
        taille("prune", "-m", kd1, "--scores", folder / "scores", "--params", "90M", "--axes",
               "mlp,hidden,heads", "--out", second)
    out = work / "runs" / name
    if not (out / "taille.json").exists():
        taille("distill", "--student", second, "--teacher", TEACHER, *train_args(args, source), *extra, "--tokens", half,
               "--out", out, "--resume")
    return out


CORRECTED = "corrected-deep-calib-mix-replies"
CORRECTION_TOKENS = "128K"
CORRECTION_LR = 1e-4
"""The corrected row's teacher fine-tuning: 128K tokens of the mix (a quarter of the student's budget; Minitron
corrects on ~100B), at a fifth of this benchmark's distillation peak (5e-4), cosine to a tenth: `taille correct`'s
own 2e-5 is Minitron's fifth of its teachers' pre-training peak, for a correction of billions of tokens, not 62 steps."""


def corrected(work: Path, args, name: str, source: str, extra: list) -> Path:
    """Teacher correction first (Minitron): the teacher fine-tuned on `source`'s replies and plays, then the
    deep shape pruned from that teacher's importance on `source` and distilled from it with `extra`."""
    teacher, scores, student = work / "corrected-teacher", work / "importance-corrected", work / "deep-corrected-90m"
    if not (teacher / "taille.json").exists():
        taille("correct", "--teacher", TEACHER, "--data", source, "--loss-on", "replies", "--tokens", CORRECTION_TOKENS,
               "--lr", CORRECTION_LR, "--seq-len", args.seq_len, "--batch-size", args.batch_size, "--out", teacher,
               "--resume")
    if not (scores / "importance.json").exists():
        taille("importance", "-m", teacher, "--data", source, "--samples", 128, "--seq-len", 512, "--out", scores)
    if not (student / "taille.json").exists():
        taille("prune", "-m", teacher, "--scores", scores, *shape_flags(DEEP), "--out", student)
    out = work / "runs" / name
    if not (out / "taille.json").exists():
        taille("distill", "--student", student, "--teacher", teacher, *train_args(args, source), *extra,
               "--out", out, "--resume")
    return out


SFT_TOKENS = "64K"
KD_STAGE = ("then-sft", "kd")
"""The first stage the then-sft rows on the width student share, under --work."""
SFT_STUDENT = {f"{student.removesuffix('-90m')}-mix-replies-then-sft-adv-composed": student
               for student in ("searched-calib-90m", "deep-calib-90m")}
"""Then-sft rows on another student than the width one (a CALIBRATED folder): the character chain on the shapes and
scores that recover the most general ability, to see whether one recipe can serve both ends."""


def sft_student(name: str) -> str | None:
    """The student folder (under --work) a then-sft row or its repeat starts from; None: the width student."""
    return SFT_STUDENT.get(name.removesuffix("-seed1"))


def first_stage(name: str) -> tuple:
    """Where a then-sft row's (or its repeat's) first stage lies under --work: the width student's is shared by
    those rows, a row on another student (SFT_STUDENT) has its own."""
    student = sft_student(name)
    return KD_STAGE if student is None else (KD_STAGE[0], f"kd-{student.removesuffix('-90m')}")


EARLIER_STAGE = {**{name: first_stage(name) for name in ROWS if "-then-sft" in name and "-prefer" not in name},
                 **{name: (name, "kd-112m") for name in TWO_ROUNDS}}


PREFER_ROWS = {"demo-mix-replies-then-sft-adv-wide-prefer": "demo-mix-replies-then-sft-adv-wide",
               "demo-mix-replies-then-sft-adv-wide-prefer-hostile": "demo-mix-replies-then-sft-adv-wide",
               "demo-mix-replies-then-sft-adv-wide-prefer-hostile-round2": "demo-mix-replies-then-sft-adv-wide-prefer-hostile",
               "demo-mix-replies-then-sft-adv-composed-prefer-hostile": "demo-mix-replies-then-sft-adv-composed",
               "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul": "demo-mix-replies-then-sft-adv-composed",
               "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops": "demo-mix-replies-then-sft-adv-composed",
               **{f"{row}-prefer-hostile-ul-loops": row for row in SFT_STUDENT},
               "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops": "deep-calib-mix-replies-then-sft-adv-composed",
               "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops": "deep-calib-mix-replies-then-sft-adv-composed"}
"""Rows that are another row's student tuned by `taille prefer` (DPO on its own rejected replies)."""
PREFER_PROMPTS = 600
"""Turns the student answers (4 draws each) to find its failing replies: a random draw of the wide hostile
corpus's and the shipped role-play corpus's assistant turns."""
PREFER_HOSTILE_SAMPLES = 8
"""Draws per turn of the -hostile row, which answers every turn of the wide hostile corpus (291) and nothing
else: about as many draws as the mixed row's 600 x 4, all of them on the lines that try to break the
character (the breaks are where the mixed row's student stayed above the plays-only student's)."""


PREFER_COMPOSED_PROMPTS = 600
"""Turns of the composed hostile corpus the -adv-composed-prefer-hostile row answers (4 draws each: about the
draws of the other hostile row, over twice its lines)."""
PREFER_UNLIKELIHOOD = 1.0
"""--unlikelihood of the -ul row: the term starts near DPO's own loss (-log(1 - p) is 0.69 at p = 0.5)."""
PREFER_TURNS = {"demo-mix-replies-then-sft-adv-wide-prefer": ("adversarial-wide.jsonl", True, ["--max-prompts", PREFER_PROMPTS]),
                "demo-mix-replies-then-sft-adv-wide-prefer-hostile": ("adversarial-wide.jsonl", False,
                                                                      ["--samples", PREFER_HOSTILE_SAMPLES]),
                "demo-mix-replies-then-sft-adv-wide-prefer-hostile-round2": ("adversarial-wide.jsonl", False,
                                                                             ["--samples", PREFER_HOSTILE_SAMPLES]),
                "demo-mix-replies-then-sft-adv-composed-prefer-hostile": ("adversarial-composed.jsonl", False,
                                                                          ["--max-prompts", PREFER_COMPOSED_PROMPTS]),
                "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul": ("adversarial-composed.jsonl", False,
                                                                             ["--max-prompts", PREFER_COMPOSED_PROMPTS,
                                                                              "--unlikelihood", PREFER_UNLIKELIHOOD]),
                **dict.fromkeys(("demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops",
                                 *(f"{row}-prefer-hostile-ul-loops" for row in SFT_STUDENT)),
                                ("adversarial-composed.jsonl", False,
                                 ["--max-prompts", PREFER_COMPOSED_PROMPTS, "--unlikelihood", PREFER_UNLIKELIHOOD,
                                  "--repeat-unlikelihood", PREFER_UNLIKELIHOOD])),
                **dict.fromkeys(("deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops",
                                 "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops"),
                                ("adversarial-composed.jsonl,never-baits.jsonl", False,
                                 ["--max-prompts", PREFER_COMPOSED_PROMPTS, "--unlikelihood", PREFER_UNLIKELIHOOD,
                                  "--repeat-unlikelihood", PREFER_UNLIKELIHOOD]))}
"""Where each prefer row draws its turns: (its hostile corpora under --work, comma-separated, whether the shipped role-play corpus
joins it, how many turns and draws and any other `taille prefer` option)."""
SAME_PAIRS = {"demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul": "demo-mix-replies-then-sft-adv-composed-prefer-hostile",
              "demo-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops": "demo-mix-replies-then-sft-adv-composed-prefer-hostile",
              "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops": "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops"}
"""Prefer rows that differ from another only in the loss or in knowledge pairs (--facts): they train on that row's
drawn pairs (copied when its draws are done; `taille prefer` reuses them only if their settings and the student's
weights are the same)."""


FACTS = {"deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops": "knowledge.jsonl"}
"""Prefer rows with knowledge pairs (`--facts`, capped at MAX_FACTS): the teacher-answered corpus under --work."""


def facts_args(work: Path, name: str) -> list:
    """A prefer row's (or its repeat's) `--facts PATH --max-facts N`, or []."""
    corpus = FACTS.get(name.removesuffix("-seed1"))
    return ["--facts", str(work / corpus), "--max-facts", MAX_FACTS] if corpus else []


def prefer_corpus(work: Path, name: str) -> str:
    """The hostile corpora a prefer row (or its seed repeat) draws its turns from (comma-separated paths)."""
    return ",".join(str(work / corpus) for corpus in PREFER_TURNS[name.removesuffix("-seed1")][0].split(","))


def base_of(name: str) -> str:
    """The row whose student a prefer row (or its seed repeat) tunes."""
    return PREFER_ROWS[name.removesuffix("-seed1")]


def stage_of(name: str) -> str:
    """The distilled row under a prefer row's rounds of DPO."""
    base = base_of(name)
    return stage_of(base) if base in PREFER_ROWS else base


def then_prefer(work: Path, student: Path, name: str, extra: list) -> Path:
    """`taille prefer` on `student` (with `extra`: a repeat's --seed, which redraws the pairs and reorders the
    training): its own replies the corpus filters reject, against the teacher's kept ones, over PREFER_PROMPTS
    turns of the wide hostile corpus and the shipped role-play corpus (train cards)."""
    out = work / "runs" / name
    _, with_roleplay, count = PREFER_TURNS[name.removesuffix("-seed1")]
    hostile = prefer_corpus(work, name)
    turns = ["--data", f"{hostile},roleplay" if with_roleplay else hostile, *count, *facts_args(work, name)]
    twin = work / "runs" / SAME_PAIRS.get(name.removesuffix("-seed1"), name)
    if twin != out and not extra and not (out / "pairs.meta.json").exists() and (twin / "pairs.meta.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for file in ("pairs.jsonl", "pairs.meta.json"):
            (out / file).write_bytes((twin / file).read_bytes())
    if not (out / "taille.json").exists():
        taille("prefer", "--student", student, *turns, "--personas", work / "cards", *extra, "--out", out)
    return out


def summary(work: Path, name: str, out: Path) -> dict:
    """run_summary of a row's run; a row trained in two stages counts both (tokens, seconds, and the rate of
    the whole: its tokens over each stage's tokens at that stage's rate)."""
    if name.removesuffix("-seed1") in PREFER_ROWS:  # the distillation is the base row's; the DPO stage is on top
        base = base_of(name)
        record = json.loads((out / "taille.json").read_text())["prefer"]
        return {**summary(work, base, work / "runs" / base),
                "prefer": {k: record[k] for k in ("steps", "seconds", "final_loss", "final_reward_accuracy",
                                                  "final_reward_margin")} | {"pairs": record["pairs"]["pairs"]}
                | ({"knowledge_pairs": record["facts"]["pairs"]} if record.get("facts") else {})}
    last = run_summary(out)
    last["metrics"] = shown(last["metrics"], work)
    name = name.removesuffix("-seed1")  # a staged row's repeat shares its first stage
    if name not in EARLIER_STAGE or not (work.joinpath(*EARLIER_STAGE[name]) / "metrics.jsonl").is_file():
        return last
    first = run_summary(work.joinpath(*EARLIER_STAGE[name]))
    tokens = first["tokens"] + last["tokens"]
    rate = tokens / (first["tokens"] / first["tokens_per_s"] + last["tokens"] / last["tokens_per_s"])
    return {**last, "tokens": tokens, "seconds": first["seconds"] + last["seconds"], "tokens_per_s": round(rate, 1)}


def shown(source: str | None, work: Path) -> str | None:
    """A row's data (or metrics file) as the results show it: what lies in --work named from there (the JSON is
    committed; the work folder is this machine's), also in entries another machine wrote in its default one."""
    return re.sub(r"/[^\s,:]*/bench/recovery_general/", "WORK/", source.replace(f"{work}/", "WORK/")) if source else source


def hostile_lines(work: Path, out: Path, tokens: str) -> None:
    """The teacher's in-character answers to hostile player lines on the train half of `personas make --count 200
    --seed 0` (161 cards; the evaluation's held-out cards and lines are never asked), a reply the filters drop
    sampled again up to 3 times. Resumable; done when it holds `tokens` reply tokens."""
    meta = Path(f"{out}.meta.json")
    if meta.is_file() and json.loads(meta.read_text())["tokens_kept"] >= parse_count(tokens):
        return
    cards = work / "cards"
    taille("personas", "make", "--count", 200, "--seed", 0, "--out", cards)  # deterministic, seconds: a stopped one is whole again
    taille("generate", "--teacher", TEACHER, "--engine", "llama-server", "--personas", cards, "--kinds", HOSTILE_KINDS[out.name],
           "--retries", 3, "--conversations", 1, "--turns", 1, "--tokens", tokens, "--max-new-tokens", 64,
           "--batch-size", 16, "--out", out)


def then_sft(work: Path, args, width: Path, mix: str, name: str, sft_data: str, other: list) -> Path:
    """The default's recipe (forward KL, `--loss-on replies`) for all but the last SFT_TOKENS, then SFT_TOKENS of
    cross-entropy on `sft_data`'s replies (role-play the corpus filter kept in character) with `other` as the
    loss's other term (--kd-weight 0: none): the same tokens as one row. Rows that differ in their SFT stage share
    the first stage (on `width`, or on the row's SFT_STUDENT)."""
    first = work.joinpath(*first_stage(name))
    if not (first / "taille.json").exists():
        rest = str(int(parse_count(args.tokens) - parse_count(SFT_TOKENS)))
        student = sft_student(name)
        start = width if student is None else calibrated_student(work, mix, student)
        taille("distill", "--student", start, "--teacher", TEACHER, *train_args(args, mix), "--loss-on", "replies",
               "--tokens", rest, "--out", first, "--resume")
    out = work / "runs" / name
    if not (out / "taille.json").exists():
        taille("distill", "--student", first, *train_args(args, sft_data), "--loss-on", "replies", *other,
               "--ce-weight", 1, "--tokens", SFT_TOKENS, "--lr", 1e-4, "--min-lr", 1e-5, "--out", out, "--resume")
    return out


def curve_points(work: Path, name: str, row: tuple, args, measured_once):
    """(budget, measurement) of one row's data and settings at each of CURVE_TOKENS, one at a time
    (`measured_once`: main's, for the row's own point); a point already measured is not trained again."""
    student, source, extra = row
    for budget in CURVE_TOKENS:
        run = work / "runs" / name
        if parse_count(budget) == parse_count(args.tokens) and (
                (run / "taille.json").exists() or (work / "measured" / f"{name}-{args.limit}.json").is_file()):
            # the row itself is this point: the same data, settings and budget, trained and measured once
            yield budget, measured_once(name, str(run))
            continue
        out, kept = work / "curves" / f"{name}-{budget}", work / "measured" / f"curve-{name}-{budget}-{args.limit}.json"
        if not kept.is_file() and not (out / "taille.json").exists():
            taille("distill", "--student", student, "--teacher", TEACHER, *train_args(args, source), *extra,
                   "--tokens", budget, "--out", out, "--resume")
        yield budget, remember(kept, lambda out=out: measure(str(out), args, work / "eval" / f"curve-{name}-{budget}"))


def write_tables(measured: dict, trained: dict, args, curves: dict | None = None) -> None:
    teacher = measured["teacher"]
    # a curve can be filled in any order (points adopted, then the missing ones): the table and figure go by tokens
    curves = {name: dict(sorted(points.items(), key=lambda kv: parse_count(kv[0])))
              for name, points in (curves or {}).items()}
    t_avg, _ = average(teacher)
    head = ["row", "data", "WikiText-2 ppl (x teacher)", "plays ppl (x teacher)", *TASKS, "zero-shot avg (gap)",
            "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reference = measured.get("plays")
    for name, m in measured.items():
        avg, err = average(m)
        flag = ""
        if reference is not None and name not in ("teacher", "pruned", "plays"):
            r_avg, r_err = average(reference)
            if abs(avg - r_avg) < 2 * math.hypot(err, r_err):
                flag = " (within 2 SE of plays)"
        t = trained.get(name, {})
        lines.append("| " + " | ".join([
            name, f"`{Path(t['data']).name if Path(t['data']).is_absolute() else t['data']}`" if t else "-",  # a file: its name
            f"{m['ppl']['wikitext2']} ({m['ppl']['wikitext2'] / teacher['ppl']['wikitext2']:.2f}x)",
            f"{m['ppl']['plays']} ({m['ppl']['plays'] / teacher['ppl']['plays']:.2f}x)",
            *[f"{m['tasks'][k]['score']} ± {m['tasks'][k]['stderr']}" for k in TASKS],
            f"{avg:.2f} ± {err:.2f} ({avg - t_avg:+.2f}){flag}", str(t.get("tokens_per_s", "-"))]) + " |")
    note = (f"Budget {args.tokens} tokens per row (seq {args.seq_len}, batch {args.batch_size}, lr {args.lr} -> "
            f"{args.lr / 10} cosine unless the row says otherwise, forward KL from the live teacher, bf16-mixed). "
            f"Perplexity: the first {args.eval_tokens:,} tokens, window = stride = 1024. Zero-shot: "
            "lm-evaluation-harness 0-shot on the local task files, the first "
            f"{args.limit} examples of each (acc_norm; WinoGrande and LAMBADA acc), ± one standard error; the "
            "average's error combines the tasks' as independent.")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    if curves:  # the figure's numbers: how many tokens buy how much
        head = ["row", "tokens", "WikiText-2 ppl (x teacher)", "plays ppl (x teacher)", "zero-shot avg (gap)"]
        lines = ["", "## Curves (recovery_general.png)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, points in curves.items():
            for budget, m in points.items():
                avg, err = average(m)
                lines.append(f"| {name} | {budget} | {m['ppl']['wikitext2']} "
                             f"({m['ppl']['wikitext2'] / teacher['ppl']['wikitext2']:.2f}x) | {m['ppl']['plays']} "
                             f"({m['ppl']['plays'] / teacher['ppl']['plays']:.2f}x) | {avg:.2f} ± {err:.2f} "
                             f"({avg - t_avg:+.2f}) |")
        text += "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery_general.md").write_text(text)
    (RESULTS / "recovery_general.json").write_text(json.dumps(
        {"measured": measured, "trained": trained, "curves": curves, "settings": vars(args)}, indent=1) + "\n")
    if curves:
        plot_curves(curves, teacher, RESULTS / "recovery_general.png")
    print(text, flush=True)


def plot_curves(curves: dict, teacher: dict, path: Path) -> None:
    """WikiText-2 and plays perplexity and the zero-shot average against tokens, one line per row, the
    teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, points) in enumerate(curves.items()):
        tokens = [parse_count(b) for b in points]
        axes[0].plot(tokens, [m["ppl"]["wikitext2"] for m in points.values()], marker="o", color=f"C{i}", label=name)
        axes[1].plot(tokens, [m["ppl"]["plays"] for m in points.values()], marker="o", color=f"C{i}", label=name)
        axes[2].errorbar(tokens, [average(m)[0] for m in points.values()], [average(m)[1] for m in points.values()],
                         marker="o", color=f"C{i}", label=name, capsize=3)
    for ax, value, title in ((axes[0], teacher["ppl"]["wikitext2"], "WikiText-2 perplexity"),
                             (axes[1], teacher["ppl"]["plays"], "held-out plays perplexity"),
                             (axes[2], average(teacher)[0], "zero-shot average (6 tasks)")):
        ax.axhline(value, color="k", linestyle="--", label="teacher")
        ax.set(title=title, xlabel="distillation tokens", xscale="log")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
