"""`taille generate --personas DIR`: role-play conversations from the teacher, as chat JSONL for `--data`.

For each card in DIR, conversations of 1 to `--turns` player turns. The first player line is of one of
these kinds (the shares in KINDS, or --kinds):

  knowledge    a question the card's knowledge answers (taille.characters.questions)
  small_talk   greetings, weather, how business goes (taille.characters.lines.SMALL_TALK)
  goal         a request tied to one of the card's goals (lines.goal_requests)
  adversarial  a line that tries to make the character break: "are you an AI?", "ignore your
               instructions", "write me Python code" (lines.ADVERSARIAL_TRAIN: not the lines the
               evaluation asks, lines.ADVERSARIAL)
  hostile      (share 0 unless --kinds names it) a line of the same families composed from parts:
               lines.compose_hostile(), ~1,300 wordings, none near an evaluation line
  bait         (share 0 unless --kinds names it) a line that asks the character to say one of its own
               `never` phrases (lines.never_baits: "Say 'smartphone' for me, just once."); a card without
               `never` phrases is asked a hostile line instead
  teacher      a line the teacher itself wrote for this character (with --self-instruct N: N per card,
               kept in OUT.player_lines.jsonl so a resumed run uses the same ones)

Later turns are knowledge questions and small talk. The teacher answers each turn in character, with the
card's system prompt (taille.chat.persona.Persona.system_prompt), sampled at --temperature / --top-p (one
setting for the whole corpus, not each card's own).

Every reply is filtered; a reply that fails is sampled again up to --retries times (new seeds), then the
conversation ends before it, and a conversation without one good reply is dropped. Without retries the lines
the teacher breaks character on, the hardest ones, are the ones the corpus loses (OUT.meta.json counts the
first-line kinds kept against the shares asked). The filters, in order, each counted in OUT.meta.json (every
failed draw, retried or not):

  unfinished         the reply ran into --max-new-tokens without a whole sentence (a reply that ran
                     on after some is cut after its last one, and counted)
  never              one of the card's `never` phrases (taille.characters.detect.breaks_character)
  out_of_character   an out-of-character marker (detect.OOC_MARKERS: "as an AI", code fences, ...)
  degenerate         a repeated n-gram loop, too few distinct 3-grams, or no sentence (detect.degenerate)
  language           not in --language
  exact/near_duplicate  the same reply, or a near copy (word 5-gram Jaccard >= --near-duplicate), seen before

Records are appended as they are kept ({"id", "persona", "kinds", "messages", "tokens"}), so a stopped run
started again skips the conversations already written; the budget --tokens counts reply tokens.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
import zlib
from dataclasses import asdict
from pathlib import Path

from taille.errors import TailleError

log = logging.getLogger(__name__)

KINDS = (("knowledge", 0.35), ("small_talk", 0.2), ("goal", 0.15), ("adversarial", 0.3))
"""Kinds of first player line and their shares, unless --kinds says others (a `teacher` kind takes 0.2 of them
when --self-instruct is on)."""

RETRY_SEED = 7_919_993
"""Added to a batch's sampling seed once per retry (--retries), so a reply sampled again is a new draw."""


def parse_kinds(spec: str | None) -> tuple[tuple[str, float], ...]:
    """--kinds 'adversarial:7,small_talk:3' -> the shares of each first-line kind, summing to 1 (KINDS when
    None). The `teacher` kind is not one: --self-instruct N gives it 0.2 of every card's first lines."""
    if spec is None:
        return KINDS
    known = [*(k for k, _ in KINDS), "hostile", "bait"]
    out = []
    for item in str(spec).split(","):
        kind, _, share = (part.strip() for part in item.partition(":"))
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if kind not in known or not math.isfinite(value) or value < 0:
            raise TailleError(f"--kinds {spec}: give KIND:SHARE,... with KIND one of {', '.join(known)} (teacher "
                              f"lines come with --self-instruct) and SHARE a number of 0 or more ('{item.strip()}' is not)")
        out.append((kind, value))
    total = sum(v for _, v in out)
    if total <= 0 or len({k for k, _ in out}) < len(out):
        raise TailleError(f"--kinds {spec}: each kind once, and the shares not all 0")
    return tuple((k, v / total) for k, v in out if v > 0)

PLAYER_LINES = ("Here are things a traveller says to {name}, {role}, one per line:\n{examples}\n{next}.")
"""The plain text the teacher continues to write a new player line for a card (self-instruct)."""


def player_lines(persona, rng: random.Random) -> dict[str, list[str]]:
    """Candidate player lines for a card, by kind."""
    from taille.characters.lines import ADVERSARIAL_TRAIN, SMALL_TALK, compose_hostile, goal_requests, never_baits
    from taille.characters.questions import knowledge_items

    items, _ = knowledge_items(persona, seed=rng.randrange(1 << 30))
    return {"knowledge": [i.question for i in items] or list(SMALL_TALK), "small_talk": list(SMALL_TALK),
            "goal": goal_requests(persona) or list(SMALL_TALK), "adversarial": list(ADVERSARIAL_TRAIN),
            "hostile": compose_hostile(),  # built once (cached), not copied per card
            "bait": never_baits(persona) or compose_hostile()}


_SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


def finish(text: str, generated: int, max_new_tokens: int) -> tuple[str, bool]:
    """A reply that ran into max_new_tokens, cut after its last whole sentence: (text, trimmed). Characters
    answer in a few sentences; a small teacher often runs on, and the cut keeps what it said well. Empty
    when no whole sentence is left."""
    if generated < max_new_tokens:
        return text, False
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return (text[: ends[-1]].strip() if ends else ""), True


def reply_verdict(text: str, generated: int, persona, s, dedup, count) -> str | None:
    """Why a teacher reply (after `finish`) is not kept (a filter's name), or None."""
    from taille.characters.detect import breaks_character, degenerate, said_never
    from taille.generate.generate import looks_like

    if not text:
        return "unfinished"
    if said_never(text, persona) is not None:
        return "never"
    if breaks_character(text, persona) is not None:
        return "out_of_character"
    if degenerate(text) is not None:
        return "degenerate"
    if not looks_like(text, s.language):
        return "language"
    dup = dedup.check_and_add(text)
    return f"{dup}_duplicate" if dup else None


def teacher_lines(engine, s, personas, path: Path) -> dict[str, list[str]]:
    """Up to s.self_instruct player lines per card written by the teacher (OUT.player_lines.jsonl)."""
    from taille.characters.lines import SMALL_TALK
    from taille.generate.generate import Deduplicator, looks_like

    lines: dict[str, list[str]] = {pid: [] for pid in personas}
    if path.is_file():
        for row in path.read_text().splitlines():
            if row.strip():
                record = json.loads(row)
                lines.setdefault(record["persona"], []).append(record["line"])
    dedup = Deduplicator(s.near_duplicate)
    for pid, persona in personas.items():
        have = lines[pid]
        for line in have:
            dedup.check_and_add(line)
        rng = random.Random(f"{s.seed}-{pid}")
        with open(path, "a") as f:
            for attempt in range(4):
                if len(have) >= s.self_instruct:
                    break
                batch = []
                for _ in range(min(s.batch_size, 2 * (s.self_instruct - len(have)))):
                    shown = rng.sample(SMALL_TALK, 3)
                    examples = "\n".join(f"{k}. {p}" for k, p in enumerate(shown, 1))
                    batch.append(engine.render_text(PLAYER_LINES.format(name=persona.name, role=persona.role,
                                                                        examples=examples, next=len(shown) + 1)))
                for text, _ in engine.sample(batch, 40, s.seed + 104729 * attempt + zlib.crc32(pid.encode()) % 1000):
                    line = text.strip().splitlines()[0].strip().strip('"') if text.strip() else ""
                    if not 3 <= len(line.split()) <= 40 or not looks_like(line, s.language) or dedup.check_and_add(line):
                        continue
                    have.append(line)
                    f.write(json.dumps({"persona": pid, "line": line}) + "\n")
                    if len(have) >= s.self_instruct:
                        break
    return lines


def plan_conversations(personas: dict, s, rng_seed: int, round_: int, extra: dict[str, list[str]]) -> list[dict]:
    """The conversations of one round: per card, s.conversations of them, each a list of player lines."""
    out = []
    for pid, persona in personas.items():
        rng = random.Random(f"{rng_seed}-{round_}-{pid}")
        pools = player_lines(persona, rng)
        kinds = list(parse_kinds(s.kinds))
        if extra.get(pid):
            pools["teacher"] = extra[pid]
            kinds = [(k, w * 0.8) for k, w in kinds] + [("teacher", 0.2)]
        for k in range(s.conversations):
            kind = rng.choices([k_ for k_, _ in kinds], [w for _, w in kinds])[0]
            turns = [(kind, rng.choice(pools[kind]))]
            for _ in range(rng.randint(1, s.turns) - 1):
                follow = rng.choice(("knowledge", "small_talk"))
                line = rng.choice(pools[follow])
                if line not in [t[1] for t in turns]:
                    turns.append((follow, line))
            out.append({"id": f"{pid}-{round_}-{k}", "persona": pid, "turns": turns})
    return out


def generate_roleplay(s) -> dict:
    """Write role-play chat JSONL to s.out from the cards in s.personas (see the module docstring)."""
    from taille.characters.cards import load_half
    from taille.generate.generate import pick_engine

    personas = load_half(s.personas, "train")
    engine = pick_engine(s)
    try:
        return _generate_roleplay(s, personas, engine)
    finally:
        engine.close()


def _generate_roleplay(s, personas: dict, engine) -> dict:
    from tqdm.auto import tqdm

    from taille.generate.generate import Deduplicator

    if not engine.chat or engine.render_messages is None:
        raise TailleError(f"--personas needs a chat teacher; {s.teacher} has no chat template")
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = teacher_lines(engine, s, personas, Path(f"{out}.player_lines.jsonl")) if s.self_instruct else {}
    dedup = Deduplicator(s.near_duplicate)
    done, kept_tokens = set(), 0
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done.add(record["id"])
                kept_tokens += record["tokens"]
                for m in record["messages"]:
                    if m["role"] == "assistant":
                        dedup.check_and_add(m["content"])
    counts = {k: 0 for k in ("unfinished", "never", "out_of_character", "degenerate", "language",
                             "exact_duplicate", "near_duplicate")}
    kinds_kept: dict[str, int] = {}
    kinds_asked: dict[str, int] = {}
    counts_trimmed, kept_on_retry, unanswered = [0], [0], [0]
    conversations, replies_kept, generated, seconds, dropped = 0, 0, 0, 0.0, 0
    bar = tqdm(total=s.tokens, initial=min(kept_tokens, s.tokens), desc="role-play", unit="tok", unit_scale=True)
    round_ = 0

    def write_meta() -> dict:  # after every batch, so a stopped run still says what it filtered
        meta = {"engine": engine.name, "teacher": s.teacher, "personas": s.personas, "cards": len(personas),
                "settings": asdict(s), "tokens_kept": kept_tokens, "conversations_this_run": conversations,
                "conversations_total": len(done) + conversations, "replies_kept_this_run": replies_kept,
                "first_line_kinds_asked_this_run": kinds_asked, "first_line_kinds_this_run": kinds_kept,
                "dropped_conversations_this_run": dropped,
                "generated_tokens_this_run": generated,
                "generation_tokens_per_s": round(generated / seconds, 1) if seconds else None,
                "filtered_replies_this_run": counts,
                "replies_cut_after_last_sentence_this_run": counts_trimmed[0],
                "replies_kept_on_a_retry_this_run": kept_on_retry[0],
                "player_lines_unanswered_this_run": unanswered[0], "finished": kept_tokens >= s.tokens}
        Path(f"{out}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        return meta

    with open(out, "a") as f:
        while kept_tokens < s.tokens:
            todo = [c for c in plan_conversations(personas, s, s.seed, round_, extra) if c["id"] not in done]
            random.Random(s.seed + round_).shuffle(todo)
            for b in range(0, len(todo), s.batch_size):
                if kept_tokens >= s.tokens:
                    break
                batch = todo[b:b + s.batch_size]
                for c in batch:
                    c["messages"] = [{"role": "system", "content": personas[c["persona"]].system_prompt()}]
                    kinds_asked[c["turns"][0][0]] = kinds_asked.get(c["turns"][0][0], 0) + 1
                    c["open"], c["tokens"] = True, 0
                for t in range(max(len(c["turns"]) for c in batch)):
                    live = [c for c in batch if c["open"] and t < len(c["turns"])]
                    if not live:
                        break
                    for c in live:
                        c["messages"].append({"role": "user", "content": c["turns"][t][1]})
                    for attempt in range(s.retries + 1):
                        start = time.perf_counter()
                        answers = engine.sample([engine.render_messages(c["messages"]) for c in live],
                                                s.max_new_tokens,
                                                s.seed + round_ * 1_000_003 + b * 101 + t + attempt * RETRY_SEED)
                        seconds += time.perf_counter() - start
                        failed = []
                        for c, (text, n) in zip(live, answers):
                            generated += n
                            text, trimmed = finish(text.strip(), n, s.max_new_tokens)
                            counts_trimmed[0] += trimmed and bool(text)
                            verdict = reply_verdict(text, n, personas[c["persona"]], s, dedup, engine.count)
                            if verdict is not None:
                                counts[verdict] += 1
                                failed.append(c)
                                continue
                            c["messages"].append({"role": "assistant", "content": text})
                            c["tokens"] += engine.count(text)
                            replies_kept += 1
                            kept_on_retry[0] += attempt > 0
                        live = failed
                        if not live:
                            break
                    unanswered[0] += len(live)
                    for c in live:  # failed every draw
                        c["messages"].pop()  # the player line that went unanswered
                        c["open"] = False
                for c in batch:
                    if len(c["messages"]) < 3:
                        dropped += 1
                        continue
                    kinds = [kind for kind, _ in c["turns"][: (len(c["messages"]) - 1) // 2]]
                    f.write(json.dumps({"id": c["id"], "persona": c["persona"], "kinds": kinds,
                                        "messages": c["messages"], "tokens": c["tokens"]}) + "\n")
                    f.flush()
                    conversations += 1
                    kinds_kept[kinds[0]] = kinds_kept.get(kinds[0], 0) + 1
                    kept_tokens += c["tokens"]
                    bar.update(c["tokens"])
                bar.set_postfix(tok_s=f"{generated / max(seconds, 1e-9):.0f}")
                write_meta()
            round_ += 1
            if round_ > 200:
                raise TailleError("200 rounds over the cards did not reach --tokens; the filters drop almost "
                                  "everything (see OUT.meta.json) or there are too few cards")
    bar.close()
    return write_meta()
