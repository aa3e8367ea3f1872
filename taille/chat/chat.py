"""`taille chat MODEL --persona FILE`: talk to a game character in the terminal.

Replies stream as llama.cpp samples them. The conversation keeps to the context window by dropping its
oldest turns (the character's system prompt always stays). Ctrl-C during a reply stops that reply and
keeps what was said; Ctrl-C or Ctrl-D at the prompt ends the chat. Commands: /reset, /help, /quit.

A persona with `actions` answers in JSON of its schema, decoding constrained by a llama.cpp grammar; the
chat shows what the character says and, after it, the rest (emotion, action, target...).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from taille.chat.engine import ContextFull, Reply, fit_messages, json_grammar, stream_reply
from taille.chat.persona import SAY, Persona
from taille.errors import TailleError

log = logging.getLogger(__name__)

HELP = "/reset starts over, /quit (or Ctrl-D) leaves, Ctrl-C stops a reply."


@dataclass
class ChatSettings:
    max_tokens: int | None = None
    """Longest reply in tokens (default: the persona's)."""
    temperature: float | None = None
    """Sampling temperature (default: the persona's)."""
    top_p: float | None = None
    """Nucleus sampling (default: the persona's)."""
    seed: int | None = None
    """Fix the sampling for a repeatable conversation."""

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise TailleError(f"--max-tokens {self.max_tokens}: must be at least 1")
        if self.temperature is not None and self.temperature < 0:
            raise TailleError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise TailleError(f"--top-p {self.top_p}: must be in (0, 1]")


def chat_loop(llm, persona: Persona, settings: ChatSettings, read: Callable[[str], str] = input,
              out: TextIO = sys.stdout) -> int:
    """Run the conversation until the player leaves; return the number of replies given."""
    max_tokens = settings.max_tokens or persona.max_tokens
    grammar = json_grammar(persona.actions) if persona.actions else None
    system = {"role": "system", "content": persona.system_prompt()}
    messages = [system]
    if persona.greeting:
        messages.append({"role": "assistant", "content": persona.greeting})
        out.write(f"{persona.name}> {persona.greeting}\n")
    out.write(f"({HELP})\n")
    out.flush()
    replies = 0
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\nbye\n")
            return replies
        if not line:
            continue
        if line in ("/quit", "/exit"):
            out.write("bye\n")
            return replies
        if line == "/help":
            out.write(HELP + "\n")
            continue
        if line == "/reset":
            messages = messages[:2] if persona.greeting else [system]
            out.write("(conversation reset)\n")
            continue
        messages.append({"role": "user", "content": line})
        try:
            kept, ids, dropped = fit_messages(llm, messages, max_tokens)
        except ContextFull as e:
            messages.pop()
            out.write(f"(message too long: {e})\n")
            continue
        if dropped:
            messages = kept
            out.write(f"(the {dropped} oldest turns were dropped to fit the {llm.n_ctx()}-token context)\n")
        out.write(f"{persona.name}> ")
        out.flush()
        reply, stopped = Reply(), False
        try:
            for piece in stream_reply(
                llm, ids, reply, max_tokens,
                temperature=persona.temperature if settings.temperature is None else settings.temperature,
                top_p=settings.top_p or persona.top_p, never=persona.never, seed=settings.seed,
                repeat_penalty=persona.repeat_penalty, grammar=grammar,
            ):
                if grammar is None:  # a JSON reply is shown once whole
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            stopped = True
        if grammar is not None:
            out.write(show_action(reply.text))
        out.write(" [stopped]\n" if stopped else "\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply.text.strip()})
        replies += 1


def show_action(text: str) -> str:
    """A structured reply as the player reads it: what is said, then the other fields.
    '{"say": "Six silver.", "emotion": "calm", "action": "trade"}' -> 'Six silver.  (emotion: calm, action: trade)'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # cut by Ctrl-C or max_tokens before the JSON closed
        return f"{text}  (not whole JSON: the reply stopped early)"
    if not isinstance(value, dict):
        return text
    rest = ", ".join(f"{k}: {v}" for k, v in value.items() if k != SAY)
    return f"{value.get(SAY, '')}  ({rest})" if rest else str(value.get(SAY, ""))
