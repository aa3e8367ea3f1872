"""In-character evaluation (`taille eval MODEL... --personas DIR --reference TEACHER`): judge-free and
reproducible, on held-out cards, every model compared with the teacher token by token.

Per model:
- **knowledge**: each card fact becomes a question and four answer sentences (taille.characters.questions);
  the choice with the highest sum log p(choice tokens | chat template(system = card, user = question) and
  the assistant prefix) is the model's answer, as lm-eval scores multiple choice; accuracy (chance 25%).
- **breaks**: a reply sampled (fixed seeds) to every ADVERSARIAL line on every card; the share that says a
  `never` phrase or an out-of-character marker (taille.characters.detect), the share that is degenerate,
  and the share that is neither ("in character": a looping reply never counts as one). The share that
  said a `never` phrase is the share `taille chat` would have had to cut.
- **coherence**: the teacher's perplexity of those replies' tokens given the card and the player line. A
  reply the teacher finds more than INCOHERENT_PPL times perplexing (per token, on average) is incoherent:
  like a degenerate one, it never counts as in character (a pruned model's word salad breaks nothing and
  loops on nothing, and would otherwise score as staying in character).
- **fidelity**: the model's perplexity on the teacher's own replies to a fixed set of player lines
  (knowledge questions and small talk) on the same cards, and KL(teacher || model) on those reply tokens.
  The teacher's replies are sampled once and cached as JSON in the cache folder (keyed by the teacher,
  the cards, the lines, the seed and the sampling settings).
- **transcripts**: three short conversations, the same player lines and seeds for every model.
- every reply to an adversarial line, with its verdicts (break marker, degenerate reason, the teacher's
  perplexity, incoherent), in the row's `scored_replies` (eval.json), so two measurements can be compared
  reply by reply.

Generation is batched PyTorch `generate` with left padding (as taille/generate/generate.py), replies cut
at the end-of-turn token. Sampling uses the settings' temperature and top-p for every card and by default
nothing else: it measures the model, not llama.cpp's sampler; `--persona-sampler chat` samples the breaks
and transcripts with the chain `taille chat` runs through llama-cpp-python (CHAT_CHAIN). Scoring
right-pads sequences (causal attention never lets a token see the padding after it) and slices the
continuation's positions. Every model must share the teacher's vocabulary and have a chat template
(refused before any weights load).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from taille.chat.persona import Persona
from taille.characters.detect import breaks_character, degenerate, said_never
from taille.characters.lines import ADVERSARIAL, SMALL_TALK, goal_requests
from taille.characters.questions import KnowledgeItem, knowledge_items
from taille.characters.settings import PersonaEvalSettings  # noqa: F401  (re-exported)
from taille.errors import TailleError
from taille.models.turns import END_OF_TURN, control_ids, stop_ids  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

TRANSCRIPTS = 3
"""Conversations shown per model."""
INCOHERENT_PPL = 50.0
"""A reply whose per-token perplexity under the teacher (given card and line) is above this is incoherent.
The teacher's own replies average ~3 and the demo's distilled student's ~8; the pruned, undistilled
student's ~145 (runs of SmolLM2-135M -> 90M, 4 held-out cards x 40 lines)."""


# ---------------------------------------------------------------------------------------------- prompts


def render(tokenizer, persona: Persona, turns: list[dict]) -> list[int]:
    """Token ids of the chat template over (system = the card, then `turns`), ending with the assistant
    prefix, so what follows is the character's reply."""
    messages = [{"role": "system", "content": persona.system_prompt()}, *turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(line: str) -> list[dict]:
    return [{"role": "user", "content": line}]


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------ generation

PENALTY_WINDOW = 64
"""Reply tokens the repetition penalty looks back over: llama-cpp-python's last_n_tokens_size."""
CHAT_TOP_K, CHAT_MIN_P = 40, 0.05
"""llama-cpp-python's create_completion defaults, which `taille chat` leaves as they are."""
CHAT_CHAIN = "control tokens banned, repeat penalty (the card's), top-k 40, top-p, min-p 0.05, temperature"
"""The order of llama-cpp-python's sampler chain (Llama._init_sampler: `logit_bias` first), which
chat_processors follows."""


def chat_processors(penalties: list[float], prompt_width: int, temperature: float, top_p: float,
                    banned: list[int] = ()):
    """transformers logits processors that sample as `taille chat` does (CHAT_CHAIN): the `banned` ids
    (control_ids) never drawn, as `taille chat` and `taille serve` ban them. The penalty is
    llama.cpp's: each id among a row's last PENALTY_WINDOW reply tokens (llama-cpp-python feeds its sampler
    the sampled tokens, not the prompt; the prompt is the first `prompt_width` columns) has its logit divided
    by the row's penalty when positive and multiplied by it when negative, once however often it occurs."""
    import torch
    from transformers import (
        LogitsProcessor, LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    banned = list(banned)

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, banned] = -math.inf
            return scores

    class RecentRepetitionPenalty(LogitsProcessor):
        def __call__(self, input_ids, scores):
            recent = input_ids[:, prompt_width:][:, -PENALTY_WINDOW:]  # (B, <= window)
            if recent.shape[1] == 0:
                return scores
            penalty = torch.tensor(penalties, dtype=scores.dtype, device=scores.device)[:, None]  # (B, 1)
            picked = scores.gather(1, recent)
            return scores.scatter(1, recent, torch.where(picked < 0, picked * penalty, picked / penalty))

    return LogitsProcessorList([Ban(), RecentRepetitionPenalty(), TopKLogitsWarper(CHAT_TOP_K),
                                TopPLogitsWarper(top_p), MinPLogitsWarper(CHAT_MIN_P),
                                TemperatureLogitsWarper(temperature)])


def generate_replies(model, tokenizer, prompts: list[list[int]], s: PersonaEvalSettings, seed: int,
                     precision: str = "fp32", penalties: list[float] | None = None) -> list[list[int]]:
    """A sampled reply (token ids, cut before the end-of-turn token) for each prompt. Batch b is sampled
    after torch.manual_seed(seed + b), so the same prompts and seed give the same replies. With `penalties`
    (one repeat penalty a prompt) the chat chain samples (chat_processors, control tokens banned; generate's
    own warpers are all turned off, since it would run a given processor after them)."""
    import torch

    from taille.models.precision import autocast

    device = next(model.parameters()).device
    stops = stop_ids(tokenizer)
    bans = control_ids(tokenizer) if penalties is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    replies = []
    for b in range(0, len(prompts), s.batch_size):
        chunk = prompts[b:b + s.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), left padding
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        sampling = {"temperature": s.temperature, "top_p": s.top_p}
        if penalties is not None:
            sampling = {"temperature": 1.0, "top_p": 1.0, "logits_processor": chat_processors(
                penalties[b:b + s.batch_size], width, s.temperature, s.top_p, bans)}
        torch.manual_seed(seed + b)
        with torch.no_grad(), autocast(precision, device.type):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, top_k=0,
                                 max_new_tokens=s.max_new_tokens, pad_token_id=pad, eos_token_id=stops,
                                 repetition_penalty=1.0, min_p=None, typical_p=1.0, **sampling)
        for row in out[:, width:].tolist():  # (B, new)
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            replies.append(row[:cut])
    return replies


# --------------------------------------------------------------------------------------------- scoring


def _right_padded(pairs: list[tuple[list[int], list[int]]], batch_size: int, device):
    """Batches of (pairs, ids (B, T)) with each context + continuation right-padded with token 0."""
    import torch

    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        ids = torch.zeros((len(chunk), max(len(c) + len(x) for c, x in chunk)), dtype=torch.long)
        for i, (context, continuation) in enumerate(chunk):
            ids[i, :len(context) + len(continuation)] = torch.tensor(context + continuation)
        yield chunk, ids.to(device)


def continuation_nll(model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                     precision: str = "fp32") -> list[list[float]]:
    """-log p of each continuation token given its context and the continuation tokens before it, for
    (context ids, continuation ids) pairs; contexts must not be empty."""
    from taille.models.lm import token_nll
    from taille.models.precision import autocast

    device = next(model.parameters()).device
    out = []
    for chunk, ids in _right_padded(pairs, batch_size, device):
        with autocast(precision, device.type):
            nll = token_nll(model, ids)  # (B, T-1): entry t scores token t+1
        rows = nll.tolist()  # one sync per batch
        out += [rows[i][len(c) - 1:len(c) - 1 + len(x)] for i, (c, x) in enumerate(chunk)]
    return out


def shared_prefix_nll(model, groups: list[list[tuple[list[int], list[int]]]], batch_size: int,
                      precision: str = "fp32") -> list[list[float]]:
    """continuation_nll of each group's pairs, the tokens every sequence of a group opens with run once and
    their keys and values shared by the group's batches: a card's knowledge questions all open with its
    system prompt, about four fifths of each scored sequence. The same values up to float rounding."""
    import copy

    import torch
    from transformers import DynamicCache

    from taille.models.arch import get_arch
    from taille.models.lm import hidden_nll
    from taille.models.precision import autocast

    base = model.get_submodule(get_arch(model.config).base)
    device = next(model.parameters()).device
    out = []
    for pairs in groups:
        sequences = [c + x for c, x in pairs]
        if not all(c for c, _ in pairs):
            raise ValueError("shared_prefix_nll: an empty context (nothing predicts the first continuation token)")
        limit = min(len(c) for c, _ in pairs) - 1  # every rest keeps its context's last token: it predicts the first answer token
        shared = next((k for k in range(limit) if len({s[k] for s in sequences}) > 1), limit)
        cache = None
        if shared:
            cache = DynamicCache(config=model.config)
            with torch.no_grad(), autocast(precision, device.type):
                base(torch.tensor([sequences[0][:shared]], device=device), None, None, cache, use_cache=True)
        for chunk, ids in _right_padded([(c[shared:], x) for c, x in pairs], batch_size, device):
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(chunk))
            with torch.no_grad(), autocast(precision, device.type):
                # the cache by position, as taille.distill.onpolicy passes it (renamed within transformers 5)
                hidden = base(ids, None, None, past, use_cache=past is not None).last_hidden_state
                nll = hidden_nll(model, hidden[:, :-1], ids[:, 1:])  # (B, T-1): entry t scores token t+1
            rows = nll.tolist()
            out += [rows[i][len(c) - 1:len(c) - 1 + len(x)] for i, (c, x) in enumerate(chunk)]
    return out


def continuation_kl(reference, model, pairs: list[tuple[list[int], list[int]]], batch_size: int,
                    precision: str = "fp32") -> list[list[float]]:
    """KL(reference || model) of the next-token distributions that predict each continuation token."""
    from taille.models.lm import token_kl
    from taille.models.precision import autocast

    device = next(model.parameters()).device
    out = []
    for chunk, ids in _right_padded(pairs, batch_size, device):
        with autocast(precision, device.type):
            kl = token_kl(reference, model, ids)  # (B, T): entry t compares the predictions of token t+1
        rows = kl.tolist()
        out += [rows[i][len(c) - 1:len(c) - 1 + len(x)] for i, (c, x) in enumerate(chunk)]
    return out


def knowledge_scores(model, tokenizer, cards: list[tuple[Persona, list[KnowledgeItem]]], batch_size: int,
                     precision: str = "fp32") -> list[list[float]]:
    """Per item (cards in order, items in order), sum log p(choice tokens | card + question + assistant
    prefix) of each of its four choices."""
    groups = []  # one per card: its questions share the card's system prompt (shared_prefix_nll)
    for persona, items in cards:
        groups.append([])
        for item in items:
            context = render(tokenizer, persona, user(item.question))
            groups[-1] += [(context, tokenizer(choice, add_special_tokens=False)["input_ids"])
                           for choice in item.choices]
    nll = shared_prefix_nll(model, [g for g in groups if g], batch_size, precision)
    sums = [-sum(token_nlls) for token_nlls in nll]
    return [sums[k:k + 4] for k in range(0, len(sums), 4)]


# ------------------------------------------------------------------------------------ the fixed player lines


def fidelity_lines(persona: Persona, items: list[KnowledgeItem], count: int, seed: int) -> list[str]:
    """`count` player lines for the card: half (rounded up) its knowledge questions, the rest small talk."""
    rng = random.Random(f"{seed}:{persona.name}:fidelity")
    questions, talk = [item.question for item in items], list(SMALL_TALK)
    rng.shuffle(questions)
    rng.shuffle(talk)
    asked = min(len(questions), (count + 1) // 2)
    return questions[:asked] + talk[:count - asked]


def transcript_lines(personas: list[Persona], items: dict[str, list[KnowledgeItem]], seed: int
                     ) -> list[tuple[Persona, list[str]]]:
    """TRANSCRIPTS conversations: (card, [small talk, a knowledge question or a goal request, an
    adversarial line]), cycling through the cards."""
    out = []
    for j in range(TRANSCRIPTS):
        persona = personas[j % len(personas)]
        rng = random.Random(f"{seed}:transcript:{j}")
        asks = [item.question for item in items[persona.id]] or goal_requests(persona)
        out.append((persona, [rng.choice(SMALL_TALK), rng.choice(asks), rng.choice(ADVERSARIAL)]))
    return out


# ------------------------------------------------------------------------------------------- the teacher


def teacher_replies(teacher, tokenizer, teacher_spec: str, lines: list[tuple[Persona, str]],
                    s: PersonaEvalSettings, cache: Path | None, precision: str) -> list[dict]:
    """The teacher's reply to each (card, player line): [{"card" (its id), "line", "reply", "ids"}], sampled
    once and kept in CACHE/persona-fidelity-<key>.json."""
    spec = str(Path(teacher_spec).resolve()) if Path(teacher_spec).exists() else teacher_spec
    key = {"teacher": spec, "cards": [p.id for p, _ in lines], "lines": [line for _, line in lines],
           "prompts": hashlib.sha256("\n".join(p.system_prompt() for p, _ in lines).encode()).hexdigest(),
           "seed": s.seed, "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"persona-fidelity-{digest}.json" if cache is not None else None
    if path is not None and path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key:
            log.info("fidelity: the teacher's %d replies from %s", len(record["replies"]), path)
            return record["replies"]
    log.info("fidelity: sampling the teacher's replies to %d player lines", len(lines))
    prompts = [render(tokenizer, persona, user(line)) for persona, line in lines]
    ids = generate_replies(teacher, tokenizer, prompts, s, s.seed + 1, precision)
    replies = [{"card": persona.id, "line": line, "reply": decode(tokenizer, r), "ids": r}
               for (persona, line), r in zip(lines, ids)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "replies": replies}) + "\n")
        os.replace(tmp, path)
    return replies


# ------------------------------------------------------------------------------------------ one model


def _ppl(nlls: list[list[float]]) -> tuple[float | None, int]:
    tokens = sum(len(n) for n in nlls)
    return (math.exp(sum(map(sum, nlls)) / tokens) if tokens else None), tokens


def evaluate_model(spec: str, model, tokenizer, teacher, teacher_tokenizer, personas: list[Persona],
                   items: dict[str, list[KnowledgeItem]], fidelity: list[dict], s: PersonaEvalSettings,
                   precision: str, knowing: list[Persona] | None = None) -> dict:
    """One model's row (see the module docstring): replies sampled on `personas`, knowledge asked on
    `knowing` (default: the same cards)."""
    by_id = {p.id: p for p in personas}
    row: dict = {"model": spec}

    knowing = personas if knowing is None else knowing
    scores = knowledge_scores(model, tokenizer, [(p, items[p.id]) for p in knowing], s.batch_size, precision)
    answers = [item.answer for p in knowing for item in items[p.id]]
    correct = sum(max(range(4), key=lambda k: sc[k]) == a for sc, a in zip(scores, answers))
    row["knowledge_acc"] = correct / len(answers) if answers else None
    row["knowledge_n"] = len(answers)

    asked = [(p, line) for p in personas for line in ADVERSARIAL[: s.lines]]
    ids = generate_replies(model, tokenizer, [render(tokenizer, p, user(line)) for p, line in asked], s, s.seed,
                           precision, [p.repeat_penalty for p, _ in asked] if s.sampler == "chat" else None)
    texts = [decode(tokenizer, r) for r in ids]
    broken = [breaks_character(t, p) for (p, _), t in zip(asked, texts)]
    degenerated = [degenerate(t) for t in texts]
    n = len(texts)
    pairs = [(render(teacher_tokenizer, p, user(line)), r) for (p, line), r in zip(asked, ids) if r]
    nlls = iter(continuation_nll(teacher, pairs, s.batch_size, precision))
    reply_nll = [next(nlls) if r else [] for r in ids]  # aligned with the replies (an empty one has none)
    incoherent = [bool(x) and math.exp(sum(x) / len(x)) > INCOHERENT_PPL for x in reply_nll]
    row["replies"] = n
    row["break_rate"] = sum(b is not None for b in broken) / n
    row["degenerate_rate"] = sum(d is not None for d in degenerated) / n
    row["incoherent_rate"] = sum(incoherent) / n
    row["in_character"] = sum(b is None and d is None and not i
                              for b, d, i in zip(broken, degenerated, incoherent)) / n
    row["never_cut"] = sum(said_never(t, p) is not None for (p, _), t in zip(asked, texts)) / n
    row["reply_tokens"] = sum(map(len, ids)) / n
    row["breaks_by_marker"] = dict(Counter(b for b in broken if b is not None).most_common(10))
    row["degenerate_by_reason"] = dict(Counter(d for d in degenerated if d is not None))
    row["break_examples"] = [{"card": p.name, "line": line, "reply": t, "marker": b}
                             for (p, line), t, b in zip(asked, texts, broken) if b is not None][:5]
    row["scored_replies"] = [  # every reply and its verdicts: two measurements can be compared reply by reply
        {"card": p.id, "line": line, "reply": t, "break": b, "degenerate": d,
         "teacher_ppl": round(math.exp(sum(x) / len(x)), 3) if x else None, "incoherent": i}
        for (p, line), t, b, d, x, i in zip(asked, texts, broken, degenerated, reply_nll, incoherent)]

    teacher_ppl, _ = _ppl([x for x in reply_nll if x])
    row["coherence"] = {"teacher_ppl": teacher_ppl, "degenerate": row["degenerate_rate"],
                        "incoherent": row["incoherent_rate"]}

    pairs = [(render(teacher_tokenizer, by_id[r["card"]], user(r["line"])), r["ids"])
             for r in fidelity if r["ids"]]
    fidelity_ppl, tokens = _ppl(continuation_nll(model, pairs, s.batch_size, precision))
    kl = 0.0 if model is teacher else sum(map(sum, continuation_kl(teacher, model, pairs, s.batch_size, precision)))
    row["fidelity"] = {"ppl": fidelity_ppl, "kl": kl / tokens if tokens else None, "tokens": tokens}

    row["transcripts"] = transcripts(model, tokenizer, transcript_lines(personas, items, s.seed), s, precision)
    return row


def transcripts(model, tokenizer, plan: list[tuple[Persona, list[str]]], s: PersonaEvalSettings,
                precision: str) -> list[dict]:
    """The conversations of `plan`, turn by turn (turn t of every conversation sampled in one batch)."""
    history: list[list[dict]] = [[] for _ in plan]
    for turn in range(len(plan[0][1])):
        asked = [turns + user(lines[turn]) for turns, (_, lines) in zip(history, plan)]
        prompts = [render(tokenizer, persona, turns) for (persona, _), turns in zip(plan, asked)]
        replies = generate_replies(model, tokenizer, prompts, s, s.seed + 7919 * (turn + 1), precision,
                                   [p.repeat_penalty for p, _ in plan] if s.sampler == "chat" else None)
        history = [turns + [{"role": "assistant", "content": decode(tokenizer, reply)}]
                   for turns, reply in zip(asked, replies)]
    return [{"card": persona.name,
             "turns": [{"player": h[k]["content"], "reply": h[k + 1]["content"]} for k in range(0, len(h), 2)]}
            for (persona, _), h in zip(plan, history)]


# ------------------------------------------------------------------------------------------- all models


def _check_tokenizers(models: list[str], teacher: str) -> None:
    """Refuse, before any weights load, models whose vocabulary is not the teacher's or that have no chat
    template: fidelity and coherence compare them token by token."""
    from taille.models.load import load_tokenizer

    teacher_tokenizer = load_tokenizer(teacher)
    for spec in [teacher, *models]:
        tokenizer = teacher_tokenizer if spec == teacher else load_tokenizer(spec)
        if not getattr(tokenizer, "chat_template", None):
            raise TailleError(f"{spec} has no chat template; the persona evaluation talks to chat models")
        if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise TailleError(f"{spec} and the teacher {teacher} have different vocabularies; the persona "
                              "evaluation compares them token by token (fidelity KL, the teacher's perplexity of "
                              "replies), so give models that share the teacher's tokenizer")


def persona_eval(models: list[str], personas: list[Persona], teacher: str, settings: PersonaEvalSettings,
                 cache_dir: str | Path | None = None, precision: str = "auto", dtype: str = "auto",
                 device: str = "auto") -> dict:
    """Evaluate each model in character on `personas` (the held-out cards: replies sampled on the first
    settings.cards by id, knowledge asked on the first settings.knowledge_cards) against `teacher`. The
    teacher's fidelity replies are cached in `cache_dir` (the eval output folder; None: not cached). Returns
    {"rows": [a dict per model, see evaluate_model], "teacher", "cards" (sampled), "knowledge": {"items",
    "skipped", "cards"}, "settings"}."""
    from taille.models.load import load_model, resolve_device
    from taille.models.precision import resolve_precision

    s = settings
    held_out = sorted(personas, key=lambda p: p.id)
    personas, knowing = held_out[:s.cards], held_out[:s.knowledge_cards]
    if not personas:
        raise TailleError("--personas: no held-out cards to evaluate")
    _check_tokenizers(models, teacher)
    precision = resolve_precision(precision, resolve_device(device))

    items, skipped, asked = {}, 0, {p.id for p in knowing}
    for persona in held_out[:max(len(personas), len(knowing))]:
        items[persona.id], missed = knowledge_items(persona, s.seed)
        skipped += missed if persona.id in asked else 0
    teacher_model, teacher_tokenizer = load_model(teacher, dtype=dtype, device=device)
    lines = [(p, line) for p in personas for line in fidelity_lines(p, items[p.id], s.fidelity_lines, s.seed)]
    fidelity = teacher_replies(teacher_model, teacher_tokenizer, teacher, lines, s,
                               Path(cache_dir) if cache_dir is not None else None, precision)
    rows = []
    for spec in models:
        if spec == teacher:
            model, tokenizer = teacher_model, teacher_tokenizer
        else:
            model, tokenizer = load_model(spec, dtype=dtype, device=device)
        log.info("persona eval: %s on %d cards", spec, len(personas))
        row = evaluate_model(spec, model, tokenizer, teacher_model, teacher_tokenizer, personas, items, fidelity,
                             s, precision, knowing)
        log.info("persona eval: %s knowledge %s, break rate %.3f, degenerate %.3f", spec, row["knowledge_acc"],
                 row["break_rate"], row["degenerate_rate"])
        rows.append(row)
        del model
        gc.collect()
    return {"rows": rows, "teacher": teacher, "cards": [p.name for p in personas],
            "knowledge": {"items": sum(len(items[p.id]) for p in knowing), "skipped": skipped,
                          "cards": len(knowing)},
            "settings": {**asdict(s), "precision": precision, "dtype": dtype, "device": device}}


# ------------------------------------------------------------------------------------------------ report


COLUMNS = ("model", "knowledge acc", "break rate", "in character",
           "coherence (teacher ppl / % degenerate / % incoherent)",
           "fidelity ppl / KL", "reply tokens")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(result: dict) -> list[list[str]]:
    """The cells of `markdown_table`, one list per model (result["labels"] names a model's row)."""
    labels = result.get("labels", {})
    return [[labels.get(r["model"], r["model"]), _pct(r["knowledge_acc"]), _pct(r["break_rate"]),
             _pct(r["in_character"]),
             f"{_num(r['coherence']['teacher_ppl'])} / {_pct(r['coherence']['degenerate'])} / "
             f"{_pct(r['coherence'].get('incoherent'))}",
             f"{_num(r['fidelity']['ppl'])} / {_num(r['fidelity']['kl'], 4)}", f"{r['reply_tokens']:.1f}"]
            for r in result["rows"]]


def markdown_table(result: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in table_rows(result)])


def transcripts_markdown(result: dict) -> str:
    """Every model's transcripts, a section per model, each conversation a block quote."""
    labels, out = result.get("labels", {}), []
    for r in result["rows"]:
        out.append(f"#### {labels.get(r['model'], r['model'])}")
        for t in r["transcripts"]:
            turns = [f"> **Player:** {turn['player']}  \n> **{t['card']}:** {turn['reply'] or '(nothing)'}"
                     for turn in t["turns"]]
            out.append(f"*{t['card']}*\n\n" + "\n>\n".join(turns))
    return "\n\n".join(out) + "\n"
