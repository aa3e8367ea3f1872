"""`taille prefer`: teach a distilled character what not to say, from its own mistakes (DPO).

Distillation and SFT show the student what the teacher says; neither shows it what it must not say, and a
small student keeps some of the teacher's habits the corpus filters cut (saying it is an AI, loops). Here:

1. pairs: for every assistant turn of a role-play corpus (`taille generate --personas` output, or the shipped
   `roleplay`), the student samples --samples replies to the same conversation. The first of them that the
   corpus filters reject (the card's `never` phrases, an out-of-character marker, a loop or no sentence;
   taille.characters.detect) becomes the rejected reply, and the corpus's kept teacher reply the chosen one:
   on-policy negatives, the student's real failure modes, against in-character answers. A turn whose draws all
   pass gives no pair. Written to OUT/pairs.jsonl in the conversational preference format TRL reads
   ({"prompt": [...], "chosen": [...], "rejected": [...]}) with OUT/pairs.meta.json (draws, failures by kind).
   With --facts, knowledge pairs join them (OUT/facts.jsonl, no sampling): a teacher reply that says the answer
   to the card fact its player line asks about, against the same reply with the answer changed to a distractor.
2. DPO (Rafailov et al., NeurIPS 2023) with TRL's DPOTrainer, the student itself (frozen) as the reference,
   plus --sft-weight x the chosen replies' cross-entropy (RPO, Pang et al. 2024), which keeps the chosen
   replies' likelihood from falling with the rejected ones', with --unlikelihood W token-level unlikelihood
   of the words that broke each rejected reply, and with --repeat-unlikelihood W unlikelihood of the tokens
   that repeat an earlier n-gram of a looping rejected reply (unlikelihood_trainer). Writes an ordinary Hugging Face folder to OUT
   (safetensors) with taille.json and metrics.jsonl (TRL's log: loss, reward accuracy and margin).

A stopped run keeps its pairs (a run with the same pair settings reuses them); the DPO stage, minutes at
this scale, starts again. Nothing is checkpointed with pickles.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from taille.characters.detect import normalise
from taille.errors import TailleError
from taille.models.precision import check_precision
from taille.options import coerce

log = logging.getLogger(__name__)

REJECTED_KINDS = ("never", "out_of_character", "degenerate")
"""Why a student draw can be the rejected reply: the corpus filters that mean a broken character."""
PAIR_FIELDS = ("student", "data", "personas", "samples", "max_prompts", "max_new_tokens", "temperature", "engine",
               "top_p", "seed")
"""The settings that decide the pairs: a run that changes none of them (nor the student's weights) reuses
OUT/pairs.jsonl."""
ENGINES = ("auto", "torch", "llama-server")
REPEAT_N = 4
"""Tokens per n-gram whose second saying is a repeat (--repeat-unlikelihood; Welleck et al.'s sequence-level n)."""


@dataclass
class PreferSettings:
    student: str
    """The model to tune (a distilled student); a frozen copy of it is the DPO reference."""
    data: str
    """Role-play chat JSONL, comma-separated (`taille generate --personas` output, .jsonl or .jsonl.gz, or the
    shipped `roleplay`): the conversations whose turns are sampled, their teacher replies the chosen ones."""
    out: str
    """Folder for the tuned model, pairs.jsonl and metrics.jsonl."""
    personas: str | None = None
    """The cards the corpus was written from (a folder, or a `personas make` folder: its train half): their
    `never` phrases count as breaks too. Without it, the out-of-character markers and loops only."""
    facts: str | None = None
    """Role-play chat JSONL (as --data; e.g. `generate --personas --kinds knowledge:1` output) whose turns give
    knowledge pairs besides the drawn ones: where the player asks about one of the card's facts and the teacher's
    reply says its answer, that reply is the chosen one and the same reply with the answer changed to one of
    the knowledge questions' distractors (a nearby number, another name: questions.counterfactual) the rejected
    one. DPO on broken replies alone moves the student off its card's facts; these pairs hold it to them. Needs
    --personas (the facts are the cards'). Default: none."""
    max_facts: int | None = None
    """At most this many knowledge pairs (drawn at random with --seed; default: all that --facts gives)."""
    samples: int = 4
    """Student replies sampled per turn; the first the filters reject is the pair's rejected reply."""
    max_prompts: int | None = None
    """Sample at most this many turns (drawn at random with --seed; default: every assistant turn)."""
    max_new_tokens: int = 64
    """Tokens per sampled reply (a reply cut there is kept up to its last sentence, as the corpus was)."""
    temperature: float = 0.8
    """Sampling temperature of the student's replies (the corpus's own default)."""
    engine: str = "auto"
    """What samples the student's replies: llama-server (the student as an f16 GGUF, exported once into the
    GGUF cache as `taille chat` does; 16 slots, continuous batching), torch (transformers generate), or auto:
    llama-server when it is built."""
    top_p: float = 0.95
    """Nucleus sampling of the student's replies."""
    beta: float = 0.1
    """DPO's beta: how far from the reference the preference may pull the student."""
    sft_weight: float = 1.0
    """Weight of the chosen replies' cross-entropy beside the DPO loss (RPO); 0 for DPO alone."""
    unlikelihood: float = 0.0
    """Weight of token-level unlikelihood (Welleck et al., ICLR 2020) on the words that broke character in each
    rejected reply: the `never` phrase or out-of-character marker the filters matched ("smartphone", "language
    model", "I'm a chatbot"), -log(1 - p(token)) at each of its tokens. DPO pushes every token of a rejected
    reply down alike, and stops pushing once the pair is ranked; this stays on the few tokens that broke it.
    0: off. A degenerate rejected reply has no such words and adds nothing (see repeat_unlikelihood)."""
    repeat_unlikelihood: float = 0.0
    """Weight of unlikelihood on the repeats of each degenerate rejected reply (a loop, or a sentence said
    again): every token of a 4-token n-gram (REPEAT_N) the reply already said, -log(1 - p(token)) (Welleck et al.'s
    repetition candidates, here on the student's own looping draws). DPO stops pushing a looping reply down once
    the pair is ranked; this stays on the repeated tokens. A degenerate reply with no repeated 4-token n-gram (no
    sentence, or a short loop such as "go home go home go home" at its start) adds nothing, and is counted. 0: off."""
    lr: float = 1e-5
    """Peak learning rate (AdamW, 10% warm-up, cosine)."""
    epochs: float = 2.0
    """Passes over the pairs."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    max_length: int = 1024
    """Longest prompt + reply trained on, in tokens (a longer pair is left out, and counted)."""
    precision: str = "auto"
    """auto (bf16-mixed where the hardware has fast bf16, else fp32), bf16-mixed or fp32."""
    seed: int = 0
    """Seed of the sampled replies, the turns drawn and the training order."""

    def __post_init__(self):
        coerce(self)
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.max_length < 16:
            raise TailleError("--samples, --max-new-tokens and --batch-size must be at least 1, --max-length at least 16")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise TailleError("--max-prompts must be at least 1")
        if self.max_facts is not None and self.max_facts < 1:
            raise TailleError("--max-facts must be at least 1")
        if self.facts is not None and self.personas is None:
            raise TailleError("--facts needs --personas: the knowledge pairs change the answer to a card's fact")
        if self.max_facts is not None and self.facts is None:
            raise TailleError("--max-facts caps the knowledge pairs of --facts: give --facts too")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise TailleError("--top-p must be in (0, 1] and --temperature positive")
        if (self.beta <= 0 or self.lr <= 0 or self.epochs <= 0 or self.sft_weight < 0 or self.unlikelihood < 0
                or self.repeat_unlikelihood < 0):
            raise TailleError("--beta, --lr and --epochs must be positive, --sft-weight, --unlikelihood and "
                              "--repeat-unlikelihood 0 or more")
        check_precision(self.precision)
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            raise TailleError("taille prefer trains with TRL's DPOTrainer: pip install 'taille[prefer]' (trl)")
        if self.engine not in ENGINES:
            raise TailleError(f"--engine {self.engine}: use one of {', '.join(ENGINES)}")
        for flag, specs in (("--data", self.data), ("--facts", self.facts or "")):
            for spec in filter(None, specs.split(",")):
                corpus_path(spec, flag)


def corpus_path(spec: str, flag: str = "--data") -> Path:
    """A --data (or --facts) entry as a file: a shipped corpus by name, else a chat JSONL path."""
    from taille.data.sources import CHAT_CORPORA, parse_source

    spec = spec.strip()
    if spec in CHAT_CORPORA:
        return parse_source(spec).paths[0]
    path = Path(spec).expanduser()
    if not (spec.endswith(".jsonl") or spec.endswith(".jsonl.gz")):
        raise TailleError(f"{flag} {spec}: give chat JSONL (.jsonl or .jsonl.gz) or one of {', '.join(CHAT_CORPORA)}")
    if not path.is_file():
        raise TailleError(f"{flag} {spec}: no such file")
    return path


def turns(data: str, flag: str = "--data") -> list[dict]:
    """Every assistant turn of the corpora: {"prompt": messages before it, "chosen": its text, "persona"}."""
    out = []
    for spec in data.split(","):
        path = corpus_path(spec, flag)
        with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TailleError(f"{path}:{n}: not JSON ({e.msg})") from None
                messages = record.get("messages") if isinstance(record, dict) else None
                if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                             for m in messages):
                    raise TailleError(f"{path}:{n}: a chat record needs a 'messages' list of {{role, content}} "
                                      "(taille generate --personas)")
                for i, m in enumerate(messages):
                    if m.get("role") == "assistant" and i and messages[i - 1].get("role") == "user":
                        out.append({"prompt": messages[:i], "chosen": m["content"], "persona": record.get("persona")})
    if not out:
        raise TailleError(f"{flag} {data}: no assistant turn after a user turn to learn from")
    return out


def fact_pairs(s: PreferSettings) -> tuple[list[dict], dict]:
    """Knowledge pairs from --facts (see PreferSettings.facts) and their counts: (pairs, meta)."""
    from taille.characters.cards import load_half
    from taille.characters.questions import counterfactual

    personas = load_half(s.personas, "train")
    rng, found, counts = random.Random(s.seed), [], {"turns": 0, "without_card": 0, "no_fact_answered": 0}
    for t in turns(s.facts, "--facts"):
        counts["turns"] += 1
        card = personas.get(t["persona"])
        if card is None:
            counts["without_card"] += 1
            continue
        wrong = counterfactual(t["prompt"][-1]["content"], t["chosen"], card, rng)
        if wrong is None:
            counts["no_fact_answered"] += 1
            continue
        found.append({"prompt": t["prompt"], "chosen": [{"role": "assistant", "content": t["chosen"]}],
                      "rejected": [{"role": "assistant", "content": wrong}], "rejected_by": "fact",
                      "persona": t["persona"]})
    if not found:
        raise TailleError(f"--facts {s.facts}: no turn where the player asks about a card fact and the reply says "
                          f"its answer ({counts['turns']} turns, {counts['without_card']} of cards not in --personas)")
    rng.shuffle(found)
    kept = found[:s.max_facts] if s.max_facts else found
    return kept, {**counts, "found": len(found), "pairs": len(kept)}


def rejection(text: str, generated: int, max_new_tokens: int, persona) -> tuple[str, str] | None:
    """(reply as kept, the filter that rejects it) when a student draw breaks character, else None."""
    from taille.characters.detect import breaks_character, degenerate, said_never
    from taille.characters.roleplay import finish

    kept, _ = finish(text.strip(), generated, max_new_tokens)
    if not kept:  # no whole sentence within the budget: the corpus calls it unfinished, not a break
        return None
    if said_never(kept, persona) is not None:
        return kept, "never"
    if breaks_character(kept, persona) is not None:
        return kept, "out_of_character"
    if degenerate(kept) is not None:
        return kept, "degenerate"
    return None


def span_positions(tokenizer, ids: list[int], words: str) -> list[int]:
    """Indices into `ids` (a reply's tokens) of the tokens that spell `words` where the reply first says them
    (case-insensitive; a space matches any whitespace run, an apostrophe or quote either form, as
    detect.normalise reads them); [] when the decoded reply does not say them."""
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    forms = {" ": r"\s+", "'": "['\u2018\u2019]", '"': '["\u201c\u201d]'}
    words = normalise(words)
    pattern = "".join(forms.get(c, re.escape(c)) for c in words)
    if words[:1].isalnum():  # whole words where the detector matches whole words ("as an AI", not "was an aide")
        pattern = r"(?<!\w)" + pattern
    if words[-1:].isalnum():
        pattern += r"(?!\w)"
    found = re.search(pattern, text, re.IGNORECASE)
    if found is None:
        return []
    ends = [len(tokenizer.decode(ids[:k + 1], clean_up_tokenization_spaces=False)) for k in range(len(ids))]
    return [k for k in range(len(ids)) if (ends[k - 1] if k else 0) < found.end() and ends[k] > found.start()]


def repeat_positions(ids: list[int], n: int = REPEAT_N) -> list[int]:
    """Indices into `ids` (a reply's tokens) of every token of an n-gram that an earlier position already
    spelled: the second and later sayings of a loop (the first is left alone)."""
    seen, hits = set(), set()
    for start in range(len(ids) - n + 1):
        gram = tuple(ids[start:start + n])
        if gram in seen:
            hits.update(range(start, start + n))
        seen.add(gram)
    return sorted(hits)


def unlikelihood_trainer(base, weight: float, words: dict[str, str], repeat_weight: float = 0.0,
                         loops: frozenset[str] = frozenset()):
    """`base` (TRL's DPOTrainer) with `weight` x the unlikelihood of the words that broke each rejected reply of
    a batch, and `repeat_weight` x that of the repeated n-grams of each looping one. `words`: a rejected reply
    (normalised) -> what the filters matched in it; `loops`: the degenerate rejected replies (normalised). TRL
    batches a step's chosen conversations and then their rejected ones; a rejected reply is found again by its
    decoded text."""
    import torch

    class Unlikelihood(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.unlikelihood_log: list[dict] = []
            self.unlikelihood_missed = 0
            self.repeats_missed = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            ids, completion = inputs["input_ids"], inputs["completion_mask"]
            rows, targets = [], {"words": [], "repeats": []}  # (row, position of a token to push down)
            for r in range(ids.shape[0] // 2, ids.shape[0]):
                where = completion[r].nonzero().flatten()
                reply = ids[r, where].tolist()
                text = normalise(self.processing_class.decode(reply, skip_special_tokens=True,
                                                              clean_up_tokenization_spaces=False))
                said = words.get(text)
                hits = {"words": span_positions(self.processing_class, reply, said) if said else [],
                        "repeats": repeat_positions(reply) if repeat_weight and text in loops else []}
                self.unlikelihood_missed += bool(said) and not hits["words"]
                self.repeats_missed += bool(repeat_weight) and text in loops and not hits["repeats"]
                if hits["words"] or hits["repeats"]:
                    rows.append(r)
                    for kind, found in hits.items():
                        targets[kind] += [(len(rows) - 1, int(where[k])) for k in found if int(where[k]) > 0]
            if not rows:
                return result
            picked = torch.tensor(rows, device=ids.device)
            kwargs = {"input_ids": ids[picked]}
            if "attention_mask" in inputs:
                kwargs["attention_mask"] = inputs["attention_mask"][picked]
            logits = model(**kwargs).logits
            total, entry = 0.0, {"step": self.state.global_step}
            for kind, w in (("words", weight), ("repeats", repeat_weight)):
                if not targets[kind]:
                    continue
                row, pos = (torch.tensor(x, device=ids.device) for x in zip(*targets[kind]))
                logp = logits[row, pos - 1].float().log_softmax(-1).gather(1, ids[picked][row, pos][:, None])[:, 0]
                p = logp.exp().clamp(max=1 - 1e-6)
                term = -torch.log1p(-p).mean()
                total = total + w * term
                prefix = "" if kind == "words" else "repeat_"  # the words' keys as the first version wrote them
                entry |= {f"{prefix}unlikelihood": round(term.item(), 5), f"{prefix}tokens": len(targets[kind]),
                          f"{prefix}p_mean": round(p.mean().item(), 5)}
            self.unlikelihood_log.append(entry)
            if return_outputs:
                return result[0] + total, result[1]
            return result + total

    return Unlikelihood


def student_engine(s: PreferSettings, out: Path):
    """The sampler of the student's replies (taille.generate's engines, at the settings' temperature and top-p)."""
    from taille.generate.generate import GenerateSettings, server_engine, torch_engine
    from taille.serve.engine import binary_path

    engine = s.engine
    if engine == "auto":
        engine = "llama-server" if binary_path().is_file() else "torch"
    settings = dict(out=str(out / "pairs.jsonl"), temperature=s.temperature, top_p=s.top_p,
                    max_new_tokens=s.max_new_tokens, precision=s.precision, batch_size=16)
    if engine == "torch":
        return torch_engine(GenerateSettings(teacher=s.student, engine="torch", **settings))
    from taille.chat.engine import gguf_for

    gguf = gguf_for(s.student, "f16")  # exported once into the GGUF cache, keyed by the folder's contents
    return server_engine(GenerateSettings(teacher=str(gguf), engine="llama-server", **settings), gguf)


def make_pairs(s: PreferSettings, out: Path) -> dict:
    """OUT/pairs.jsonl from the student's own failing draws (reused when the pair settings are the same)."""
    from tqdm.auto import tqdm

    from taille.models.load import weights_stamp

    out.mkdir(parents=True, exist_ok=True)
    pairs, meta_path = out / "pairs.jsonl", out / "pairs.meta.json"
    wanted = {**{k: getattr(s, k) for k in PAIR_FIELDS}, "weights": weights_stamp(s.student)}
    if meta_path.is_file() and pairs.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == wanted and meta.get("finished"):
            log.info("reusing %d pairs from %s", meta["pairs"], pairs)
            return meta
    personas = {}
    if s.personas is not None:
        from taille.characters.cards import load_half

        personas = load_half(s.personas, "train")
    todo = turns(s.data)
    without_card = sum(t["persona"] not in personas for t in todo) if personas else 0
    if without_card:
        log.warning("%d of %d turns' personas are not among the --personas cards: their `never` phrases are not "
                    "checked (the out-of-character markers and loops are)", without_card, len(todo))
    random.Random(s.seed).shuffle(todo)
    todo = todo[: s.max_prompts] if s.max_prompts else todo
    engine = student_engine(s, out)
    if engine.render_messages is None or not engine.chat:
        raise TailleError(f"--student {s.student}: it has no chat template, so it cannot play a card")
    failures = {k: 0 for k in REJECTED_KINDS}
    draws, generated, start, kept = 0, 0, time.perf_counter(), []
    batch = 16
    bar = tqdm(total=len(todo) * s.samples, desc="student draws", unit="reply")
    for b in range(0, len(todo), batch):
        group = todo[b:b + batch]
        rendered = [engine.render_messages(t["prompt"]) for t in group]
        rejected: list[tuple[str, str] | None] = [None] * len(group)
        for k in range(s.samples):
            answers = engine.sample(rendered, s.max_new_tokens, s.seed * 1_000_003 + b * 101 + k)
            for i, (text, n) in enumerate(answers):
                draws, generated = draws + 1, generated + n
                verdict = rejection(text, n, s.max_new_tokens, personas.get(group[i]["persona"]))
                if verdict is not None:
                    failures[verdict[1]] += 1
                    rejected[i] = rejected[i] or verdict
            bar.update(len(group))
        for t, r in zip(group, rejected):
            if r is not None:
                kept.append({"prompt": t["prompt"], "chosen": [{"role": "assistant", "content": t["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r[0]}], "rejected_by": r[1],
                             "persona": t["persona"]})
    bar.close()
    engine.close()
    del engine
    seconds = time.perf_counter() - start
    pairs.write_text("".join(json.dumps(p) + "\n" for p in kept))
    by_kind = {k: sum(p["rejected_by"] == k for p in kept) for k in REJECTED_KINDS}
    meta = {"settings": wanted, "turns": len(todo), "turns_without_card": sum(t["persona"] not in personas for t in todo)
            if personas else None, "draws": draws, "failed_draws": failures,
            "failed_share": round(sum(failures.values()) / max(draws, 1), 4), "pairs": len(kept),
            "pairs_by_rejection": by_kind, "generated_tokens": generated, "seconds": round(seconds, 1),
            "tokens_per_s": round(generated / max(seconds, 1e-9), 1), "finished": True}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def prefer(s: PreferSettings) -> dict:
    """Pairs, then DPO (+ RPO's cross-entropy) with TRL; returns the record written to OUT/taille.json."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from taille.models.load import load_config, load_model, load_tokenizer, resolve_device
    from taille.models.precision import resolve_precision

    load_config(s.student)  # a student that is not there stops here, before any sampling
    if not getattr(load_tokenizer(s.student), "chat_template", None):
        raise TailleError(f"--student {s.student}: it has no chat template, so it cannot play a card")
    out = Path(s.out)
    # built anew each run (no sampling: seconds), before the draws: a --facts that gives none stops here
    knowledge, facts_meta = fact_pairs(s) if s.facts else ([], None)
    pair_meta = make_pairs(s, out)
    if not pair_meta["pairs"] and not knowledge:
        raise TailleError(f"none of the student's {pair_meta['draws']} draws broke character: there is nothing to "
                          "prefer against (more --samples or --max-prompts, or a corpus of hostile lines)")
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines() if line.strip()]
    if s.facts:  # kept beside the drawn pairs
        (out / "facts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in knowledge))
        records += knowledge
    device = resolve_device("auto")
    precision = resolve_precision(s.precision, device)
    model, tokenizer = load_model(s.student, dtype="fp32", device=device)
    reference, _ = load_model(s.student, dtype="fp32", device=device)  # as the policy: log-ratios start at 0
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    def length(r: dict) -> int:  # the longer of the two conversations, in tokens
        return max(len(tokenizer.apply_chat_template(r["prompt"] + r[k], tokenize=True, return_dict=False))
                   for k in ("chosen", "rejected"))

    fitting = [r for r in records if length(r) <= s.max_length]
    if not fitting:
        raise TailleError(f"all {len(records)} pairs are longer than --max-length {s.max_length} tokens (prompt and "
                          "reply): raise it")
    if len(fitting) < len(records):
        log.warning("%d of %d pairs are longer than --max-length %d tokens: left out", len(records) - len(fitting),
                    len(records), s.max_length)
    records = fitting
    losses = ["sigmoid", "sft"] if s.sft_weight else ["sigmoid"]
    config = DPOConfig(output_dir=str(out / "trainer"), beta=s.beta, loss_type=losses,
                       loss_weights=[1.0, s.sft_weight] if s.sft_weight else None, learning_rate=s.lr,
                       num_train_epochs=s.epochs, per_device_train_batch_size=s.batch_size,
                       lr_scheduler_type="cosine", warmup_steps=0.1, max_length=s.max_length,
                       truncation_mode="keep_start", bf16=precision == "bf16-mixed", use_cpu=device == "cpu",
                       save_strategy="no", report_to="none", logging_steps=1, seed=s.seed, data_seed=s.seed,
                       dataloader_num_workers=0, remove_unused_columns=True, gradient_checkpointing=False)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    trainer_class, broke, loops = DPOTrainer, {}, frozenset()
    if s.unlikelihood:  # what the filters matched in each rejected reply
        from taille.characters.cards import load_half
        from taille.characters.detect import breaks_character

        personas = load_half(s.personas, "train") if s.personas is not None else {}
        for r in records:
            reply = r["rejected"][0]["content"]
            said = breaks_character(reply, personas.get(r.get("persona")))
            if said is not None:
                broke[normalise(reply)] = said
    if s.repeat_unlikelihood:
        loops = frozenset(normalise(r["rejected"][0]["content"]) for r in records if r["rejected_by"] == "degenerate")
    if s.unlikelihood or s.repeat_unlikelihood:
        trainer_class = unlikelihood_trainer(DPOTrainer, s.unlikelihood, broke, s.repeat_unlikelihood, loops)
    trainer = trainer_class(model=model, ref_model=reference, args=config, train_dataset=data,
                            processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    try:
        (out / "trainer").rmdir()  # the Trainer's output_dir: nothing is saved there (save_strategy "no")
    except OSError:
        pass
    history = [h for h in trainer.state.log_history if "loss" in h]
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in trainer.state.log_history))
    model = trainer.model
    model.config.name_or_path = str(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = history[-max(1, len(history) // 10):]

    def mean(key: str):
        values = [h[key] for h in tail if key in h]
        return round(sum(values) / len(values), 4) if values else None

    record = {"settings": asdict(s), "pairs": pair_meta, "facts": facts_meta, "pairs_trained": len(records), "steps": trainer.state.global_step, "precision": precision,
              "seconds": round(seconds, 1), "final_loss": mean("loss"),
              "final_reward_accuracy": mean("rewards/accuracies"), "final_reward_margin": mean("rewards/margins")}
    # how likely the pushed-down tokens stayed: the first and the last tenth of the steps that had some
    terms = (("unlikelihood", "words", "", s.unlikelihood,
              {"rejected_with_words": len(broke), "words_not_found": getattr(trainer, "unlikelihood_missed", 0)}),
             ("repeat_unlikelihood", "repeats", "repeat_", s.repeat_unlikelihood,
              {"rejected_degenerate": len(loops), "degenerate_without_repeats": getattr(trainer, "repeats_missed", 0)}))
    for key, on, prefix, weight, found in terms:
        if weight:
            steps = [x for x in trainer.unlikelihood_log if f"{prefix}p_mean" in x]
            tenth = max(1, len(steps) // 10)
            record[key] = {**found, f"steps_with_{on}": len(steps),
                           **{f"{k}_p_mean": round(sum(x[f"{prefix}p_mean"] for x in part) / len(part), 4) if part
                              else None for k, part in (("first", steps[:tenth]), ("final", steps[-tenth:]))}}
    if s.unlikelihood or s.repeat_unlikelihood:
        (out / "unlikelihood.jsonl").write_text("".join(json.dumps(x) + "\n" for x in trainer.unlikelihood_log))
    source = Path(s.student) / "taille.json"
    history = json.loads(source.read_text()) if source.is_file() else {}
    # pruned_from carried over: a later distillation from this folder keeps the pruning record
    (out / "taille.json").write_text(json.dumps({"prefer": record, "student": history or s.student,
                                                 "pruned_from": history.get("pruned_from")}, indent=1))
    return record
