"""`taille generate`: a distillation corpus sampled from the teacher itself, for when its training data is
out of reach (Minitron's teacher-correction setting; ../shared/MINITRON.md).

Prompts in (the shipped general seed set, or the user's .txt / .jsonl), teacher answers out, as chat
JSONL that `--data` reads. Each prompt is answered in rounds (round r samples with seed + r) until the
token budget is met. Answers are filtered (too short, not in the language asked for) and de-duplicated
(exact, and near: Jaccard similarity of word 5-gram shingles against earlier answers); everything kept
is appended as it comes, so a stopped run started again skips the (prompt, round) pairs already done.
OUT.meta.json says which engine produced it, how fast, and what was filtered.

Engines: batched PyTorch generation (`transformers` generate), or llama.cpp running a GGUF teacher one
sequence at a time. `--engine auto` takes PyTorch: on SmolLM2-135M on the 2-core CPU it sampled 169
tokens/s at batch 64 against llama.cpp's 53 (benchmarks/generate_engines.py; batch 16: 81); llama.cpp is
for GGUF teachers transformers cannot load, or too little memory for unquantized weights.
Self-instruct (`--self-instruct N`): the teacher first writes N new prompts, each from a few seed prompts
shown as examples; they are filtered and de-duplicated like answers, kept in OUT.prompts.jsonl (so a
resumed run answers the same pool), and answered after the seed prompts.
Plain text (`--plain`, or `--prompts free`): the teacher continues each prompt as text, no chat turn, and
records are `text`. `--prompts free` is LLM-QAT's data-free generation (Liu et al. 2023): each record opens
with one word start drawn at random from the teacher's own vocabulary (kept in OUT.openings.jsonl) and the
rest is the teacher's, so the corpus follows what the teacher read in pre-training (prose, explanations,
lists, some code) rather than what it answers in a chat.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from taille.errors import TailleError
from taille.options import Count, coerce

log = logging.getLogger(__name__)

SEED = "seed"
"""--prompts value naming the shipped general seed set (taille/generate/seed_prompts.txt)."""
FREE = "free"
"""--prompts value for data-free generation: openings drawn from the teacher's vocabulary."""
FREE_OPENINGS = 8192
"""How many openings --prompts free draws (with --seed): rounds over them go on until --tokens are kept."""
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


@dataclass
class GenerateSettings:
    teacher: str
    """The model whose answers make the corpus."""
    out: str
    """JSONL to write: chat records, or text ones with --plain or --prompts free (appended to; OUT.meta.json
    beside it)."""
    prompts: str = SEED
    """'seed' (the shipped general set), 'free' (no prompts: each record opens with a word start drawn at
    random from the teacher's vocabulary and goes on as the teacher's plain text), or a .txt (a prompt a line) or
    .jsonl ({"prompt": ...} or {"messages": [...]}) file."""
    plain: bool = False
    """Continue each prompt as plain text (text records) instead of answering it in a chat turn; --prompts
    free always does."""
    tokens: Count = 300_000
    """Answer tokens to keep, after filtering (300K, 2M)."""
    max_new_tokens: int = 256
    """Longest answer."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling."""
    batch_size: int = 64
    """Prompts sampled together by the PyTorch engine (on a 2-core CPU, 64 doubled the tokens/s of 16)."""
    min_tokens: int = 16
    """Drop answers shorter than this."""
    near_duplicate: float = 0.7
    """Word 5-gram Jaccard above which an answer is a near-duplicate of an earlier one (1: exact only)."""
    language: str | None = "en"
    """Keep answers in this language: en (mostly Latin script with common English words), or none."""
    seed: int = 1234
    """Sampling seed."""
    precision: str = "auto"
    """auto (bf16-mixed where the hardware has fast bf16, else fp32), bf16-mixed or fp32."""
    engine: str = "auto"
    """auto (= torch: batched PyTorch, the faster here), torch, or llama.cpp (a GGUF teacher, one sequence
    at a time)."""
    self_instruct: int = 0
    """New prompts the teacher writes from the seed set first (kept in OUT.prompts.jsonl); with --personas,
    player lines it writes per card (OUT.player_lines.jsonl)."""
    personas: str | None = None
    """Folder of persona cards (`taille personas make`; its train/ half when it has one): write role-play
    conversations, the teacher answering in character, instead of answers to --prompts."""
    conversations: int = 8
    """With --personas: conversations per card in each round over the cards."""
    turns: int = 3
    """With --personas: most player turns in a conversation (each has 1 to N)."""
    kinds: str | None = None
    """With --personas: the shares of the first player line's kind, KIND:SHARE,... over knowledge, small_talk,
    goal, adversarial, hostile (lines composed from parts, ~1,300; share 0 unless named), bait (lines asking the
    character to say its own `never` phrases; share 0 unless named) (with --turns 1,
    adversarial:1 writes answers to hostile lines only: later turns are knowledge or small talk); none: knowledge
    0.35, small talk 0.2, goal 0.15, adversarial 0.3."""
    retries: int = 0
    """With --personas: a reply a filter drops is sampled again, up to N more times with new seeds, before its
    conversation ends there (rejection sampling: the lines the teacher most often breaks character on stay
    in the corpus, answered in character)."""

    def __post_init__(self):
        from taille.models.precision import check_precision

        coerce(self)
        if self.language == "none":
            self.language = None
        if self.engine not in ENGINES:
            raise TailleError(f"--engine {self.engine}: use one of {', '.join(ENGINES)}")
        if self.self_instruct < 0:
            raise TailleError("--self-instruct must be 0 or more")
        if self.tokens < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.min_tokens < 0:
            raise TailleError("--tokens, --max-new-tokens and --batch-size must be at least 1, --min-tokens 0 or more")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise TailleError("--top-p must be in (0, 1] and --temperature positive")
        if not 0 < self.near_duplicate <= 1:
            raise TailleError("--near-duplicate must be in (0, 1]")
        if self.conversations < 1 or not 1 <= self.turns <= 8:
            raise TailleError("--conversations must be at least 1 and --turns between 1 and 8")
        if self.kinds == "none":
            self.kinds = None
        if self.personas is None and (self.kinds is not None or self.retries):
            raise TailleError("--kinds and --retries shape role-play conversations: they need --personas")
        if self.retries < 0:
            raise TailleError("--retries must be 0 or more")
        if self.kinds is not None:
            from taille.characters.roleplay import parse_kinds

            parse_kinds(self.kinds)
        if self.personas is not None and (self.prompts != SEED or self.plain):
            raise TailleError("--personas writes its own player lines in chat turns; give --prompts (or --plain) "
                              "or --personas, not both")
        if self.prompts == FREE and self.self_instruct:
            raise TailleError("--self-instruct writes prompts from the seed set; --prompts free has none "
                              "(use one of them)")
        if self.language not in (None, "en"):
            raise TailleError(f"--language {self.language}: only en (or none) is checked so far")
        check_precision(self.precision)


def read_prompts(spec: str) -> list[str]:
    """The seed set, or a .txt (one prompt a line) / .jsonl ({"prompt": ...} or {"messages": [...]}, the last
    user message) file. Empty or malformed files are errors naming the line."""
    path = Path(__file__).parent / "seed_prompts.txt" if spec == SEED else Path(spec)
    if not path.is_file():
        raise TailleError(f"--prompts {spec}: no such file (give a .txt or .jsonl file, or 'seed')")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TailleError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"].strip())
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                users = [m.get("content") for m in record["messages"] if isinstance(m, dict) and m.get("role") == "user"]
                if not users or not isinstance(users[-1], str):
                    raise TailleError(f"{path}:{n}: 'messages' has no user message")
                prompts.append(users[-1].strip())
            else:
                raise TailleError(f"{path}:{n}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
        else:
            prompts.append(line.strip())
    prompts = [p for p in prompts if p]
    if not prompts:
        raise TailleError(f"--prompts {path}: no prompts in the file")
    return prompts


def shingles(text: str, n: int = 5) -> set[int]:
    words = _WORD.findall(text.lower())
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams if g}


class Deduplicator:
    """Exact (normalised text hash) and near (shingle Jaccard >= threshold) duplicates of earlier texts;
    candidates come from an index of shingles, so each check touches only texts that share one."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.exact: set[str] = set()
        self.docs: list[set[int]] = []
        self.index: dict[int, list[int]] = {}

    def check_and_add(self, text: str) -> str | None:
        """None if `text` is new (and now remembered), else 'exact' or 'near'."""
        key = hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()
        if key in self.exact:
            return "exact"
        mine = shingles(text)
        if self.threshold < 1 and mine:
            seen = {d for s in mine for d in self.index.get(s, ())}
            for d in seen:
                other = self.docs[d]
                if len(mine & other) / len(mine | other) >= self.threshold:
                    return "near"
        self.exact.add(key)
        doc = len(self.docs)
        self.docs.append(mine)
        for s in mine:
            self.index.setdefault(s, []).append(doc)
        return None


ENGINES = ("auto", "torch", "llama.cpp", "llama-server")


@dataclass
class Engine:
    """A teacher that answers a batch of rendered prompts."""

    name: str
    """What OUT.meta.json records."""
    chat: bool
    """The teacher has a chat template (records are chat; else plain continuations)."""
    render: Callable[[str], str | list[int]]
    """user message -> what `sample` takes (the chat-templated prompt)."""
    render_text: Callable[[str], str | list[int]]
    """plain text to continue -> what `sample` takes (no chat template)."""
    sample: Callable[[list, int, int], list[tuple[str, int]]]
    """(rendered prompts, max_new_tokens, seed) -> [(answer text as generated, leading space kept, tokens
    generated)]."""
    count: Callable[[str], int]
    """Tokens of a text."""
    render_messages: Callable[[list[dict]], str | list[int]] | None = None
    """a conversation (system, user, assistant ... ending with a user turn) -> what `sample` takes."""
    close: Callable[[], None] = lambda: None
    """Stop what the engine started (llama-server and its threads)."""
    vocabulary: Callable[[], list[str]] = lambda: []
    """Each ordinary (not special) token's text, for --prompts free."""


def torch_engine(s: GenerateSettings) -> Engine:
    import torch

    from taille.models.load import load_model, resolve_device
    from taille.models.precision import autocast, frozen_weights_dtype, resolve_precision

    device = resolve_device("auto")
    precision = resolve_precision(s.precision, device)
    model, tokenizer = load_model(s.teacher, dtype=frozen_weights_dtype(precision), device=device)
    chat = bool(getattr(tokenizer, "chat_template", None))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def render_messages(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None and \
        tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else ""

    def render_text(text: str) -> str:  # plain text starts as the tokenizer starts any text (its BOS, if it adds one)
        return bos + text

    def render(prompt: str) -> str:
        return render_messages([{"role": "user", "content": prompt}]) if chat else render_text(prompt)

    @torch.no_grad()
    def sample(texts: list[str], max_new_tokens: int, seed: int) -> list[tuple[str, int]]:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(seed)
        with autocast(precision, device):
            ids = model.generate(**enc, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        width = enc["input_ids"].shape[1]
        return [(continuation(tokenizer, int(row[width - 1]), row[width:].tolist()),
                 int((row[width:] != tokenizer.pad_token_id).sum())) for row in ids]  # left padding: the
        # prompt's last token is at width - 1

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return Engine(f"pytorch: transformers generate, batched ({device}, {precision})", chat, render,
                  render_text, sample, count, render_messages, vocabulary=lambda: hf_vocabulary(tokenizer))


def hf_vocabulary(tokenizer) -> list[str]:
    """A Hugging Face tokenizer's ordinary tokens' texts as they read inside a text (a word start keeps its
    space, which SentencePiece decoders drop from a lone token): what gguf_vocabulary reads from llama.cpp."""
    special = set(tokenizer.all_special_ids)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    return [continuation(tokenizer, anchor, [i]) for i in range(len(tokenizer)) if i not in special]


def continuation(tokenizer, last: int, new: list[int]) -> str:
    """The text `new` adds after a sequence ending with token `last`, as it reads there: decoded after `last`
    and cut, since SentencePiece decoders drop the word-start space of a sequence's first token (decoding
    `new` alone would glue it to the prompt)."""
    head = tokenizer.decode([last], skip_special_tokens=True)
    return tokenizer.decode([last, *new], skip_special_tokens=True)[len(head):]


def llama_engine(s: GenerateSettings, path: Path) -> Engine:
    """llama.cpp running the GGUF teacher, one prompt at a time (its own sampler: temperature, top-p)."""
    from taille.models.llamacpp import open_gguf, prompt_ids

    llm = open_gguf(path, n_ctx=2048)
    chat = bool(llm.metadata.get("tokenizer.chat_template"))

    def render_text(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                            special=False)

    def render(prompt: str) -> list[int]:
        return prompt_ids(llm, [{"role": "user", "content": prompt}]) if chat else render_text(prompt)

    def sample(prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[tuple[str, int]]:
        out = []
        for k, ids in enumerate(prompts):
            room = min(max_new_tokens, llm.n_ctx() - len(ids))
            reply = llm.create_completion(prompt=ids[: llm.n_ctx() - 1], max_tokens=max(1, room),
                                          temperature=s.temperature, top_p=s.top_p, top_k=0, min_p=0.0,
                                          repeat_penalty=1.0, seed=seed + k)
            out.append((reply["choices"][0]["text"], reply["usage"]["completion_tokens"]))
        return out

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode(), add_bos=False, special=False))

    return Engine(f"llama.cpp: {path.name}, one sequence at a time (cpu)", chat, render, render_text, sample, count,
                  lambda messages: prompt_ids(llm, messages), vocabulary=lambda: gguf_vocabulary(llm))


def server_engine(s: GenerateSettings, path: Path) -> Engine:
    """llama.cpp's own server running the GGUF teacher with --batch-size slots: continuous batching (a
    finished sequence frees its slot at once, no padding) and a prompt cache (a card's system prompt is
    read once per slot). The process lives as long as this one (taille.serve.engine.LlamaServer)."""
    import atexit
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    from taille.models.llamacpp import llama_cpp, prompt_ids
    from taille.serve.engine import LlamaServer, binary_path

    if not binary_path().is_file():
        raise TailleError(f"--engine llama-server needs llama.cpp's server, not built yet ({binary_path()}); "
                          "build it once: python -m taille.serve.engine build")
    vocab = llama_cpp().Llama(model_path=str(path), vocab_only=True, verbose=False)
    chat = bool(vocab.metadata.get("tokenizer.chat_template"))
    server = LlamaServer(path, parallel=s.batch_size, n_ctx=2048).start()
    atexit.register(server.stop)
    pool = ThreadPoolExecutor(max_workers=s.batch_size)

    def render_text(text: str) -> list[int]:
        return vocab.tokenize(text.encode(), add_bos=vocab.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                              special=False)

    def render_messages(messages: list[dict]) -> list[int]:
        return prompt_ids(vocab, messages)

    def one(ids: list[int], max_new_tokens: int, seed: int) -> tuple[str, int]:
        if len(ids) + max_new_tokens > server.n_ctx:
            return "", max_new_tokens  # no room for a whole reply: counted as unfinished, never cut short
        body = {"prompt": ids, "n_predict": max_new_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
                "seed": seed, "cache_prompt": True}
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        try:
            connection.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
        finally:
            connection.close()
        if response.status != 200:
            raise TailleError(f"llama-server answered {response.status}: {answer}; its log: {server.log_path}")
        return answer["content"], int(answer["tokens_predicted"])

    def sample(prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[tuple[str, int]]:
        return list(pool.map(lambda k: one(prompts[k], max_new_tokens, seed + k), range(len(prompts))))

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False))

    def close() -> None:
        pool.shutdown(cancel_futures=True)
        server.stop()

    return Engine(f"llama-server: {path.name}, {s.batch_size} slots, continuous batching (cpu)", chat,
                  lambda prompt: render_messages([{"role": "user", "content": prompt}]) if chat else render_text(prompt),
                  render_text, sample, count, render_messages, close, vocabulary=lambda: gguf_vocabulary(vocab))


def gguf_vocabulary(llm) -> list[str]:
    """A llama.cpp model's ordinary tokens' texts (control tokens detokenize to nothing without special)."""
    texts = (llm.detokenize([i]).decode("utf-8", errors="replace") for i in range(llm.n_vocab()))
    return [t for t in texts if t]


def pick_engine(s: GenerateSettings) -> Engine:
    from taille.models.load import resolve_model

    source = resolve_model(s.teacher)
    if s.engine in ("llama.cpp", "llama-server"):
        if source.kind != "gguf":
            raise TailleError(f"--engine {s.engine} needs a GGUF teacher; {s.teacher} is a {source.kind} model "
                              "(export it first: taille export MODEL --quant f16 --out teacher.gguf)")
        make = llama_engine if s.engine == "llama.cpp" else server_engine
        return make(s, Path(source.location))
    return torch_engine(s)


SELF_INSTRUCT = "Questions and requests that people send to an assistant, one per line:\n{examples}\n{next}."
"""The text the teacher continues to write a new prompt (self-instruct): a numbered list of seed prompts
ending at the next number. A plain continuation, not a chat turn: small teachers asked in a chat turn
answer the request instead of writing a new one."""
_NOT_A_REQUEST = re.compile(r"^(i |i'm |i am |sure|certainly|of course|here |as an )", re.IGNORECASE)


def self_instruct(engine: Engine, s: GenerateSettings, seeds: list[str], path: Path) -> list[str]:
    """Grow OUT.prompts.jsonl to `s.self_instruct` new prompts written by the teacher; return them all."""
    written = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()] \
        if path.is_file() else []
    dedup = Deduplicator(s.near_duplicate)
    for p in seeds + written:
        dedup.check_and_add(p)
    rng = random.Random(s.seed + len(written))
    attempts = 0
    with open(path, "a") as f:
        while len(written) < s.self_instruct:
            attempts += 1
            if attempts > 20 * s.self_instruct + 100:
                log.warning("self-instruct: %d of %d prompts after %d attempts; going on with those",
                            len(written), s.self_instruct, attempts)
                break
            batch = []
            for _ in range(s.batch_size):
                shown = rng.sample(seeds, min(4, len(seeds)))
                examples = "\n".join(f"{k}. {p}" for k, p in enumerate(shown, 1))
                batch.append(engine.render_text(SELF_INSTRUCT.format(examples=examples, next=len(shown) + 1)))
            for text, _ in engine.sample(batch, 64, s.seed + 7919 * attempts):
                prompt = text.strip().splitlines()[0].strip().strip('"') if text.strip() else ""
                words = len(prompt.split())
                if (not 4 <= words <= 60 or _NOT_A_REQUEST.match(prompt) or not looks_like(prompt, s.language)
                        or dedup.check_and_add(prompt)):
                    continue
                written.append(prompt)
                f.write(json.dumps({"prompt": prompt}) + "\n")
                f.flush()
                if len(written) >= s.self_instruct:
                    break
    return written


_ENGLISH = frozenset("the of and to a in is it that for on with as was be are this by not or you at have from".split())


def looks_like(text: str, language: str | None) -> bool:
    """A cheap script-and-stopword test: mostly ASCII letters and some of the commonest English words."""
    if language is None:
        return True
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    words = _WORD.findall(text.lower())
    ascii_share = sum(c.isascii() for c in letters) / len(letters)
    common = sum(w in _ENGLISH for w in words) / max(1, len(words))
    return ascii_share >= 0.9 and (len(words) < 8 or common >= 0.05)


def _done_ids(out: Path, dedup: Deduplicator, plain: bool) -> tuple[set[str], int]:
    """Ids already written (and their answers fed to the deduplicator) and their tokens, for resuming; a file of
    the other kind of records (chat vs plain text) is refused: its ids name other prompts."""
    done, tokens = set(), 0
    if out.is_file():
        for line in out.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if ("text" in record) != plain:
                    raise TailleError(f"{out} holds {'chat' if plain else 'plain-text'} records and this run writes "
                                      f"{'plain text' if plain else 'chat'}; give another --out")
                done.add(record["id"])
                tokens += record["tokens"]
                dedup.check_and_add(record["answer"])
    return done, tokens


def generate(s: GenerateSettings) -> dict:
    if s.personas is not None:
        from taille.characters.roleplay import generate_roleplay

        return generate_roleplay(s)

    prompts = None if s.prompts == FREE else read_prompts(s.prompts)
    engine = pick_engine(s)
    try:
        return _generate(s, prompts, engine)
    finally:
        engine.close()


def free_openings(words: list[str], s: GenerateSettings) -> list[str]:
    """FREE_OPENINGS words drawn (with --seed) from the teacher's vocabulary: tokens of 3 letters or more and
    nothing else (ASCII for --language en), and of those the ones that start a word (a leading space) when the
    vocabulary has at least 100; a word start is not always a whole word ("sympath")."""
    letters = r"[A-Za-z]{3,}" if s.language == "en" else r"[^\W\d_]{3,}"
    found = [w for w in words if re.fullmatch(f" ?{letters}", w)]
    spaced = [w for w in found if w.startswith(" ")]
    pool = sorted({w.strip() for w in (spaced if len(spaced) >= 100 else found)})
    if not pool:
        raise TailleError(f"--prompts free: {s.teacher}'s vocabulary has no word tokens to open text with; "
                          "give --prompts (a .txt of openings) with --plain")
    rng = random.Random(s.seed)
    return [rng.choice(pool) for _ in range(FREE_OPENINGS)]


def _generate(s: GenerateSettings, prompts: list[str] | None, engine: Engine) -> dict:
    from tqdm.auto import tqdm

    plain = s.plain or prompts is None or not engine.chat
    if not engine.chat:
        log.warning("%s has no chat template: generating plain continuations of the prompts (records are text)",
                    s.teacher)
    out = Path(s.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if prompts is None:  # drawn once and kept: a resumed run continues the same openings whatever changed since
        kept = Path(f"{out}.openings.jsonl")
        if kept.is_file():
            prompts = read_prompts(str(kept))
        else:
            prompts = free_openings(engine.vocabulary(), s)
            kept.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    given = len(prompts)
    if s.self_instruct:
        written = self_instruct(engine, s, prompts, Path(f"{out}.prompts.jsonl"))
        log.info("self-instruct: %d prompts written by the teacher (%s.prompts.jsonl)", len(written), out)
        prompts = prompts + written
    dedup = Deduplicator(s.near_duplicate)
    done, kept_tokens = _done_ids(out, dedup, plain)
    counts = {"kept": len(done), "exact_duplicate": 0, "near_duplicate": 0, "too_short": 0, "language": 0}
    generated, seconds = 0, 0.0
    bar = tqdm(total=s.tokens, initial=min(kept_tokens, s.tokens), desc="generate", unit="tok", unit_scale=True)
    rounds = 0
    with open(out, "a") as f:
        while kept_tokens < s.tokens:
            todo = [(i, p) for i, p in enumerate(prompts) if f"{i}-{rounds}" not in done]
            for b in range(0, len(todo), s.batch_size):
                if kept_tokens >= s.tokens:
                    break
                batch = todo[b:b + s.batch_size]
                start = time.perf_counter()
                answers = engine.sample([(engine.render_text if plain else engine.render)(p) for _, p in batch],
                                        s.max_new_tokens, s.seed + rounds * 1_000_003 + b)
                seconds += time.perf_counter() - start
                for (i, prompt), (raw, length) in zip(batch, answers):
                    generated += length
                    answer = raw.strip()
                    n = engine.count(answer)
                    verdict = ("too_short" if n < s.min_tokens else "language" if not looks_like(answer, s.language)
                               else None)
                    if verdict is None:
                        dup = dedup.check_and_add(answer)
                        verdict = f"{dup}_duplicate" if dup else None
                    if verdict is not None:
                        counts[verdict] += 1
                        continue
                    record = {"id": f"{i}-{rounds}", "prompt": prompt, "answer": answer, "tokens": n}
                    record.update({"text": prompt + raw.rstrip()} if plain
                                  else {"messages": [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": answer}]})
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    counts["kept"] += 1
                    kept_tokens += n
                    bar.update(n)
                bar.set_postfix(tok_s=f"{generated / max(seconds, 1e-9):.0f}")
            rounds += 1
            if rounds > 1000:
                raise TailleError("1000 rounds over the prompts did not reach --tokens; the filters drop almost "
                                  "everything (lower --min-tokens, raise --near-duplicate) or add prompts")
    bar.close()
    offered = sum(counts.values()) - len(done)
    meta = {"engine": engine.name, "teacher": s.teacher, "chat_template": engine.chat, "plain_text": plain,
            "settings": asdict(s), "prompts": len(prompts), "self_instruct_prompts": len(prompts) - given,
            "tokens_kept": kept_tokens, "records": counts["kept"], "generated_tokens_this_run": generated,
            "generation_tokens_per_s": round(generated / seconds, 1) if seconds else None,
            "filtered_this_run": {k: v for k, v in counts.items() if k != "kept"},
            "duplicate_rate_this_run": round((counts["exact_duplicate"] + counts["near_duplicate"]) / offered, 4)
            if offered else None}
    Path(f"{out}.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta
