"""Replies from a GGUF model in llama.cpp: chat template, context window, sampling, streaming, guard.

Used by `taille chat` (one conversation in a terminal) and `taille serve` (one request at a time from a
queue). Plain functions over a `llama_cpp.Llama`:

  prompt_ids(llm, messages)          the conversation rendered with the file's own chat template (models/)
  fit_messages(llm, messages, room)  drop the oldest turns until the prompt leaves `room` tokens
  stream_reply(llm, ids, ...)        text pieces as llama.cpp samples them, cut before forbidden phrases,
                                     never a control token (a new turn's `<|im_start|>`): banned
  json_grammar(schema_json)          a llama.cpp grammar that only lets a reply of that JSON schema through
  guard_json(text, never)            a JSON reply with the forbidden phrases cut from its `say` only

llama.cpp keeps the KV cache of the previous prompt and re-evaluates only what changed, so a
conversation that grows by one turn costs one turn of prefill.
"""

from __future__ import annotations

import functools
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from taille.chat.persona import SAY
from taille.errors import TailleError
from taille.models.llamacpp import prompt_ids

log = logging.getLogger(__name__)


class ContextFull(TailleError):
    """The newest message alone (with the system prompt) does not fit the context window."""


@dataclass
class Reply:
    """What stream_reply leaves behind once it is exhausted."""

    text: str = ""
    tokens: int = 0
    """Length of the reply in tokens (its text tokenized again)."""
    finish_reason: str = "stop"
    """stop (end of turn or a stop string), length (max_tokens), content_filter (a forbidden phrase)."""
    cached_tokens: int = 0
    """Prompt tokens the engine found in its cache (llama-server reports them)."""


def gguf_for(model: str, quant: str = "f16") -> Path:
    """A GGUF file for `model`: the file itself when it is one (or an embedded GGUF), else an export kept
    in the cache (keyed by the model folder's contents), made once."""
    import hashlib

    from taille.export.gguf import export_gguf
    from taille.models.load import model_folder, resolve_model
    from taille.paths import cache_dir

    source = resolve_model(model)
    if source.kind == "gguf":
        return Path(source.location)
    folder = model_folder(model)
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(folder.iterdir()) if p.is_file())
    key = hashlib.sha256(f"{folder.resolve()}|{stamp}|{quant}".encode()).hexdigest()[:16]
    path = cache_dir("gguf") / f"{folder.name}-{key}-{quant}.gguf"
    if not path.is_file():
        log.info("exporting %s to GGUF (%s) once: %s", model, quant, path)
        export_gguf(model, path, quant)
    return path


def fit_messages(llm, messages: list[dict], room: int) -> tuple[list[dict], list[int], int]:
    """Drop the oldest turns after the system messages until the prompt leaves `room` tokens of the
    context for the reply. Returns (messages kept, their prompt ids, how many were dropped)."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    budget = llm.n_ctx() - room
    dropped = 0
    while True:
        kept = system + turns[dropped:]
        ids = prompt_ids(llm, kept)
        if len(ids) <= budget:
            return kept, ids, dropped
        if dropped >= len(turns) - 1:
            raise ContextFull(
                f"the prompt needs {len(ids)} tokens with only the newest message kept; the context window is "
                f"{llm.n_ctx()} tokens and {room} are reserved for the reply"
            )
        dropped += 1
        if turns[dropped]["role"] == "assistant":  # keep a conversation starting with the user
            dropped += 1 if dropped < len(turns) - 1 else 0


_CONTROL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_ids(llm) -> frozenset[int]:
    """The vocabulary's control tokens that do not end generation (`<|im_start|>`, `<|endoftext|>` where
    it is not end-of-generation...): the chat template's structure, never a character's words."""
    if llm not in _CONTROL:
        _CONTROL[llm] = vocab_controls(llm._model.vocab)
    return _CONTROL[llm]


def vocab_controls(vocab) -> frozenset[int]:
    """control_ids of a llama.cpp vocabulary (a `llama_vocab` pointer)."""
    import llama_cpp

    return frozenset(t for t in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_control(vocab, t)
                     and not llama_cpp.llama_vocab_is_eog(vocab, t))


def banned(llm):
    """A llama-cpp-python logits processor that bans control_ids. llama.cpp stops at end-of-generation tokens
    only, so a student that opens the next turn instead of closing its own (`<|im_start|>user ...`, seen in
    role-play students) would show the player the roles' text (the control token detokenizes to nothing and
    "user" follows). Banned, the model ends its turn or goes on in it; `taille serve` sends llama-server the
    same ban (taille.serve.server), and the persona eval's chat sampler bans the same tokens. One vectorised
    assignment a token (llama-cpp-python's `logit_bias` copies the logits and loops in Python over every id:
    Llama 3 and Gemma vocabularies hold hundreds to thousands of reserved control tokens). It runs first in
    llama-cpp-python's chain, as `logit_bias` would."""
    import numpy as np

    ids = np.fromiter(sorted(control_ids(llm)), dtype=np.intc)

    def ban(input_ids, scores):
        scores[ids] = -np.inf
        return scores

    ban.ids = ids
    return ban


def stream_reply(llm, ids: list[int], reply: Reply, max_tokens: int, temperature: float = 0.7,
                 top_p: float = 0.9, stop: list[str] | None = None, never: tuple[str, ...] = (),
                 seed: int | None = None, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, grammar=None) -> Iterator[str]:
    """Text pieces of the reply to prompt `ids`, as they are sampled. Text that could be the start of a
    phrase in `never` is held back until it cannot; a reply reaching such a phrase ends before it
    (finish_reason content_filter). With a `grammar` (json_grammar) the reply is JSON and the phrases are
    cut from its `say` alone once it is whole (guard_json), so it still parses: it then comes as one piece
    when there are phrases to look for. The model never writes a control token (banned).
    `reply` is filled in as the stream goes."""
    from llama_cpp import LogitsProcessorList

    chunks = llm.create_completion(
        prompt=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop or [],
        stream=True, seed=seed, repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, grammar=grammar,
        logits_processor=LogitsProcessorList([banned(llm)]),
    )
    guard = JsonGuard(never) if grammar is not None else PhraseGuard(never)
    try:
        for chunk in chunks:
            choice = chunk["choices"][0]
            safe, blocked = guard.feed(choice["text"])
            if safe:
                reply.text += safe
                yield safe
            if blocked:
                reply.finish_reason = "content_filter"
                return
            if choice.get("finish_reason"):
                reply.finish_reason = choice["finish_reason"]
        rest, cut = guard.finish()
        if cut:
            reply.finish_reason = "content_filter"
        if rest:
            reply.text += rest
            yield rest
    finally:
        chunks.close()  # stops llama.cpp sampling when the caller stops early (Ctrl-C, client gone)
        reply.tokens = len(llm.tokenize(reply.text.encode(), add_bos=False, special=False))


JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
"""A character inside a JSON string, as llama-server's C++ converter writes the rule. The Python converter
of llama-cpp-python 0.3.36 allows any character but a quote or a backslash: a raw newline got into `say`
in 4 of 62 constrained SmolLM2 replies (player lines asking for recipes, equations...), and json.loads,
like any strict JSON parser, refused them."""


@functools.lru_cache(maxsize=64)
def json_grammar(schema_json: str | None):
    """A llama.cpp grammar for replies of the JSON schema `schema_json` (JSON text; None: any JSON object).
    Built once per schema by llama-cpp-python's converter, the Python twin of the one llama-server runs."""
    from taille.models.llamacpp import llama_cpp

    grammar = llama_cpp().llama_grammar
    if schema_json is None:
        return grammar.LlamaGrammar.from_string(grammar.JSON_GBNF, verbose=False)
    rules = grammar.json_schema_to_gbnf(schema_json).splitlines()
    rules = [JSON_CHAR if rule.startswith("char ::= ") else rule for rule in rules]
    return grammar.LlamaGrammar.from_string("\n".join(rules), verbose=False)


def guard_json(text: str, never: tuple[str, ...]) -> tuple[str, bool]:
    """`text`, a JSON reply, with `say` cut before the first phrase of `never` in it (case-insensitive, as
    PhraseGuard cuts a stream); keys, enums and other fields keep the shape the grammar gave them, so the
    reply still parses. Returns (text, whether something was cut). Text that does not parse as an object
    with a string `say` is returned as it is."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text, False
    if not isinstance(value, dict) or not isinstance(value.get(SAY), str):
        return text, False
    guard = PhraseGuard(never)
    said, blocked = guard.feed(value[SAY])
    if not blocked:
        return text, False
    value[SAY] = said
    return json.dumps(value, ensure_ascii=False), True


class JsonGuard:
    """PhraseGuard's interface for JSON replies: without phrases the stream passes; with some, the whole
    reply is held and guard_json cuts `say` at the end (a phrase cut from the middle of a stream would
    leave JSON that does not parse)."""

    def __init__(self, phrases: tuple[str, ...]):
        self.phrases = tuple(p for p in phrases if p.strip())
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.phrases:
            return text, False
        self.pending += text
        return "", False

    def finish(self) -> tuple[str, bool]:
        """(the rest of the reply, whether a phrase was cut from it)."""
        rest, self.pending = self.pending, ""
        return guard_json(rest, self.phrases) if rest else ("", False)


class PhraseGuard:
    """Streams text while making sure none of `phrases` (case-insensitive) is ever emitted."""

    def __init__(self, phrases: tuple[str, ...]):
        self.phrases = [p.lower() for p in phrases if p.strip()]
        self.hold = max((len(p) for p in self.phrases), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a phrase was reached)."""
        self.pending += text
        low = self.pending.lower()
        hits = [low.find(p) for p in self.phrases if p in low]
        if hits:
            safe, self.pending = self.pending[: min(hits)], ""
            return safe.rstrip(), True
        if not self.phrases:
            safe, self.pending = self.pending, ""
            return safe, False
        cut = max(0, len(self.pending) - self.hold)
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest

    def finish(self) -> tuple[str, bool]:
        """(the rest of the reply, False: what is held back at the end is never a whole phrase)."""
        return self.flush(), False
