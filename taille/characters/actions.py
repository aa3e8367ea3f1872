"""Structured actions: what a grammar buys and what it costs, measured on a GGUF file.

A card's `actions` schema (taille.chat.persona) makes the character answer with a JSON object such as
{"say": "Six silver, friend.", "emotion": "calm", "action": "trade", "target": "rope"}. `taille chat` and
`taille serve` constrain decoding to the schema with a llama.cpp grammar, so every reply parses. `measure`
asks the same prompts (the card, whose system prompt asks for that JSON, and a player line) twice, with and
without the grammar, and reports for each:

  parse_rate    share of replies that are one JSON value and nothing else (json.loads of the stripped text)
  valid_rate    share that also fit the schema (conforms: required keys, enums, types, maxLength)
  tokens_per_s  decode speed, from the first token to the last (the prompt's prefill left out: llama.cpp
                reuses it between the two runs), so the difference is the grammar's per-token cost
  n             replies
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from taille.chat.persona import Persona
from taille.errors import TailleError

log = logging.getLogger(__name__)

TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
         "null": type(None)}


def conforms(value, schema: dict) -> bool:
    """Whether `value` fits `schema` in the parts a card's actions use (type, enum, const, properties,
    required, additionalProperties: false, items, minLength/maxLength). Not a full JSON-schema validator:
    jsonschema is not a dependency."""
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(isinstance(value, TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                   for k in kinds if k in TYPES):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return False
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(key not in properties for key in value):
            return False
        if not all(conforms(value[key], sub) for key, sub in properties.items() if key in value):
            return False
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return all(conforms(item, schema["items"]) for item in value)
    return True


def parse(text: str, schema: dict) -> tuple[bool, bool]:
    """(whether `text` parses as JSON, whether it also fits `schema`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False, False
    return True, conforms(value, schema)


def measure(gguf_path: str | Path, personas: list[Persona], player_lines: list[str], seed: int = 0,
            max_tokens: int = 160, threads: int | None = None, n_ctx: int = 2048) -> dict:
    """Constrained vs unconstrained replies of every persona with `actions` to every player line (seed
    `seed + i` for the i-th line, the same for both runs, sampling as the card says). Returns
    {"constrained": {parse_rate, valid_rate, tokens_per_s, n}, "unconstrained": {...}}."""
    from taille.chat.engine import Reply, json_grammar, stream_reply
    from taille.models.llamacpp import open_gguf, prompt_ids

    acting = [p for p in personas if p.actions]
    if not acting or not player_lines:
        raise TailleError("measuring actions needs at least one persona with `actions` and one player line")
    llm = open_gguf(gguf_path, n_ctx=n_ctx, threads=threads)
    runs = {name: {"parsed": 0, "valid": 0, "tokens": 0, "seconds": 0.0, "n": 0}
            for name in ("constrained", "unconstrained")}
    for persona in acting:
        schema, grammar = persona.action_schema, json_grammar(persona.actions)
        for i, line in enumerate(player_lines):
            ids = prompt_ids(llm, [{"role": "system", "content": persona.system_prompt()},
                                   {"role": "user", "content": line}])
            for name, constraint in (("constrained", grammar), ("unconstrained", None)):
                reply, first, run = Reply(), None, runs[name]
                # the never guard stays off: this counts what the model itself writes
                for _ in stream_reply(llm, ids, reply, max_tokens, persona.temperature, persona.top_p,
                                      seed=seed + i, repeat_penalty=persona.repeat_penalty, grammar=constraint):
                    first = first or time.perf_counter()
                last = time.perf_counter()
                parsed, valid = parse(reply.text, schema)
                run["parsed"] += parsed
                run["valid"] += valid
                run["n"] += 1
                if first is not None and reply.tokens > 1:  # decode speed: the tokens after the first
                    run["tokens"] += reply.tokens - 1
                    run["seconds"] += last - first
                if name == "constrained" and not parsed:
                    log.warning("%s: a constrained reply did not parse (%s): %r", persona.id, reply.finish_reason,
                                reply.text[-200:])
    return {name: {"parse_rate": run["parsed"] / run["n"], "valid_rate": run["valid"] / run["n"],
                   "tokens_per_s": run["tokens"] / run["seconds"] if run["seconds"] else 0.0, "n": run["n"]}
            for name, run in runs.items()}
