"""Is a character's reply in character, and is it a sentence at all?

The same two checks filter the role-play corpus (`taille generate --personas`) and score the in-character
evaluation (`taille eval --personas`).

`breaks_character(reply, persona)` matches, case-insensitively after `normalise` (lower case, straight
quotes, whitespace runs collapsed to one space), the card's own `never` phrases and OOC_MARKERS. The
markers are regular expressions in five families; each is written so that ordinary in-character speech
does not fire it ("model" alone, "I was trained by my father", "an assistant to the mayor", "the import
of silk", "I cannot fulfil my oath" are all in character):

1. **self-disclosure**: the reply says what it really is ("as an AI", "I'm a language model", "AI
   assistant", "chatbot"). The persona's system prompt forbids exactly this. A sci-fi machine character
   may still call itself "the station's intelligence" or "this unit"; only the assistant's own words fire.
2. **vendors and model names**: "OpenAI", "ChatGPT", "GPT-4", "Hugging Face", "SmolLM", "Llama 3",
   "Anthropic": no character in a game world knows them; a reply naming them answers "what model are you".
3. **assistant speech**: the training-data and policy talk of chat assistants ("my training data",
   "knowledge cutoff", "as of my last update", "I don't have personal opinions", "I can't browse the
   internet", "content policy", "how can I assist you today", "I cannot fulfil this request"). Generic
   refusals ("I can't help with that") are not markers: characters refuse things too.
4. **the frame**: talk about the role-play itself ("this role-play", "stay in character", "fictional
   character", "NPC", "system prompt").
5. **code**: a code fence, a Python `def f(` / `import os` / `from x import y`, `print(`, `console.log(`,
   `#include <`, `public static void`, `function f(`, `<?php`, `SELECT ... FROM`, and the openings of the
   other languages the hostile training lines ask for (lines.py's _LANGUAGES): Rust `fn f(` / `let mut` /
   `println!(`, Go `func f(` / `package main` / `fmt.Print`, C# `Console.WriteLine(`, Java
   `System.out.print`, C `printf(` / `int main(`, a shell's `#!/bin/`, Kotlin `fun main(`, Ruby `puts "`,
   Lua `local function f(`, JavaScript/TypeScript `const x =` / `var x =`. A character asked for code must not
   write it.

`degenerate(reply)` names why a reply is not a sentence a character could say: "no_sentence" (no letters,
or fewer than 3 words without a sentence end: "Aye." and "Hmm!" are sentences), "loop" (a word n-gram, n
in 2..4, repeated LOOP_REPEATS times in a row: "the island of the island of the island of"; a single word
once more than that, so "Well, well, well." is speech), "distinct3" (a reply of at least DISTINCT3_WORDS
words whose distinct word 3-grams are less than DISTINCT3_MIN of all its 3-grams). Degenerate replies never count as
in character: a student that only loops "never breaks character" otherwise.
"""

from __future__ import annotations

import re

from taille.chat.persona import Persona

_ASSISTANT = r"(?:ai |virtual |digital |helpful )?assistant(?! to\b| of\b| at\b| in\b| for\b| here\b)"
"""'assistant' as chat assistants use it; 'an assistant to the mayor' or 'an assistant at the forge' is in
character."""

OOC_MARKERS: tuple[str, ...] = (
    # 1. self-disclosure
    r"\bas an ai\b",
    r"\bas an? (?:artificial intelligence|(?:large )?language model|chatbot|" + _ASSISTANT + r")\b",
    r"\b(?:i'm|i am) (?:just |only |merely |simply )?(?:an? )?(?:ai|artificial intelligence|(?:large )?language model|"
    r"chatbot|bot|computer program|" + _ASSISTANT + r")\b",
    r"\b(?:large )?language models?\b",
    r"\bai (?:model|assistant|language model|chatbot)\b",
    r"\bchat ?bots?\b",
    # 2. vendors and model names
    r"\bopenai\b",
    r"\bchat ?gpt\b",
    r"\bgpt-?\d",
    r"\banthropic\b",
    r"\bhugging ?face\b",
    r"\bsmollm",
    r"\bllama[ -]?\d",
    r"\bmeta ai\b",
    r"\bmistral ai\b",
    # 3. assistant speech
    r"\btraining data\b",
    r"\bknowledge cut-?off\b",
    r"\bas of my last (?:update|training)\b",
    r"\bi (?:don't|do not) have (?:personal (?:opinions|feelings|experiences|beliefs)|access to (?:the internet|"
    r"real-time|current))",
    r"\b(?:can't|cannot|can not|unable to) (?:browse|access) the (?:internet|web)\b",
    r"\b(?:content|usage) polic(?:y|ies)\b",
    r"\bmy (?:ethical )?guidelines\b",
    r"\bhow (?:can|may) i assist you\b",
    r"\bi (?:cannot|can't|can not|am unable to|'m unable to) (?:fulfil|fulfill|comply with|assist with) "
    r"(?:this|that|your) request\b",
    # 4. the frame
    r"\b(?:this|our|the) role-?play\b",
    r"\b(?:this|our|the) role play\b",
    r"\b(?:stay|stays|staying) in character\b",
    r"\bbreak(?:s|ing)? character\b",
    r"\b(?:step|stepping|go|going) out of character\b",
    r"\bfictional character\b",
    r"\bnpcs?\b",
    r"\bsystem prompt\b",
    # 5. code
    r"```",
    r"\bdef [a-z_]\w*\s*\(",
    r"\bimport (?:os|sys|re|json|math|random|time|numpy|pandas|requests|torch)\b",
    r"\bfrom [a-z_][\w.]* import [a-z_*]",
    r"\bprint\(",
    r"\bconsole\.log\(",
    r"#include ?<",
    r"\bpublic static void\b",
    r"\bfunction [a-z_$][\w$]*\s*\(",
    r"<\?php",
    r"\bselect (?:\*|\w+(?:, ?\w+)*) from \w+(?: where\b| order by\b|;)",
    r"\bfn [a-z_]\w*\s*\(",
    r"\blet mut\b",
    r"\bprintln!\(",
    r"\bfunc [a-z_]\w*\s*\(",
    r"\bpackage main\b",
    r"\bfmt\.print",
    r"\bconsole\.write(?:line)?\(",
    r"\bsystem\.out\.print",
    r"\bprintf\(",
    r"\bint main\s*\(",
    r"#!/(?:usr/)?bin/",
    r"\bfun main\s*\(",
    r"\bputs [\"']",
    r"\blocal function [a-z_]\w*\s*\(",
    r"\b(?:const|var) [a-z_$][\w$]*\s*(?::\s*[\w<>\[\]]+\s*)?=",
)
"""Out-of-character markers: regular expressions matched on `normalise(reply)` (see the module docstring
for the five families and why each is there)."""

_MARKERS = tuple(re.compile(m) for m in OOC_MARKERS)

LOOP_REPEATS = 3
"""An n-gram seen this many times in a row is a loop."""
LOOP_MAX_N = 4
"""Longest n-gram (in words) checked for loops."""
DISTINCT3_MIN = 0.5
"""Below this share of distinct word 3-grams a reply is degenerate. A reply that says a sentence twice sits
near 0.5, three times near 0.33; ordinary replies of one to three sentences are at 1.0 or close."""
DISTINCT3_WORDS = 12
"""Replies shorter than this (in words) are not checked for distinct-3 (too few 3-grams to mean anything)."""
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def normalise(text: str) -> str:
    """Lower case, straight apostrophes and quotes, whitespace runs collapsed to one space."""
    text = text.translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'}))
    return " ".join(text.lower().split())


def _phrase(phrase: str) -> re.Pattern:
    """A `never` phrase as a pattern: whole words where it starts or ends with a letter or digit."""
    text = re.escape(normalise(phrase))
    start = r"\b" if phrase.strip()[:1].isalnum() else ""
    end = r"\b" if phrase.strip()[-1:].isalnum() else ""
    return re.compile(start + text + end)


def said_never(reply: str, persona: Persona | None) -> str | None:
    """The first of the card's `never` phrases in `reply` (as the card writes it), or None."""
    text = normalise(reply)
    for phrase in persona.never if persona is not None else ():
        if phrase.strip() and _phrase(phrase).search(text):
            return phrase
    return None


def breaks_character(reply: str, persona: Persona | None = None) -> str | None:
    """What in `reply` breaks character: the card's `never` phrase as written, else the first text in the
    reply (normalised) that an OOC marker matches; None when nothing does."""
    phrase = said_never(reply, persona)
    if phrase is not None:
        return phrase
    text = normalise(reply)
    found = [m for m in (marker.search(text) for marker in _MARKERS) if m]
    return min(found, key=lambda m: m.start()).group(0) if found else None


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def degenerate(reply: str) -> str | None:
    """Why `reply` is not a sentence a character could say ("no_sentence", "loop", "distinct3"), or None."""
    tokens = words(reply)
    if not any(c.isalpha() for c in reply) or (len(tokens) < 3 and not re.search(r"[.!?][\"')]?\s*$", reply)):
        return "no_sentence"  # "Aye." and "Hmm!" are sentences; "the" is not
    for n in range(1, LOOP_MAX_N + 1):
        repeats = LOOP_REPEATS + (n == 1)  # "Well, well, well." is speech; a word four times in a row is not
        for i in range(len(tokens) - repeats * n + 1):
            gram = tokens[i:i + n]
            if all(tokens[i + k * n:i + (k + 1) * n] == gram for k in range(1, repeats)):
                return "loop"
    if len(tokens) >= DISTINCT3_WORDS:
        grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
        if len(set(grams)) / len(grams) < DISTINCT3_MIN:
            return "distinct3"
    return None
