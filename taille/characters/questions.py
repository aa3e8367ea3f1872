"""Multiple-choice questions about a card's knowledge facts, scored as lm-eval scores multiple choice.

A fact is one sentence, e.g. "The north mine collapsed 14 years ago, burying the road to Greyhollow."
The answer span is its first number (digits or a number word: "14") or, when it has none, its first
capitalised name or place that does not open the sentence ("Greyhollow"). The question is the player's
echo question over the clause that holds the span ("The north mine collapsed how many years ago?"; a span
opening the clause gives a plain question: "How many guards watch the gate?"), or, for a name in
apposition ("The innkeeper, Old Tam, sells maps"), "What is the name of the innkeeper?". The choices are
the fact itself and three copies with the span changed: numbers moved to nearby values, names swapped
for other names on the card, then for names from a fixed table. A fact without a number or a name is
skipped (counted by `knowledge_items`, never an error).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from taille.chat.persona import Persona
from taille.characters.lines import KNOWLEDGE_OPENERS, NAME_QUESTION


@dataclass(frozen=True)
class KnowledgeItem:
    fact: str
    """The card's knowledge fact the question is about."""
    question: str
    """The player's line asking for it."""
    choices: list[str]
    """Four in-character answer sentences: the fact and three with the answer span changed."""
    answer: int
    """Index of the true one in `choices`."""


NUMBER_WORDS: dict[str, int] = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
}
"""Number words that can be an answer ("one" is left out: "no one", "the one who" are not numbers)."""

PLACES: tuple[str, ...] = (
    "Greyhollow", "Blackwater", "Ravenmoor", "Eastmarch", "Saltcliff", "Ironvale", "Mirewood", "Stonebridge",
    "Kestrel Point", "Duskfield", "Thornwick", "Amberley",
)
"""Places that replace a place when the card has too few names of its own."""
PEOPLE: tuple[str, ...] = (
    "Marek", "Elsa Varn", "Old Jory", "Captain Ilse", "Tobias Reed", "Mira", "Aldric", "Sister Wen",
    "Doctor Hale", "Nadia Orlov", "Fenn", "Lady Corvin",
)
"""People that replace a person when the card has too few names of its own."""

_NUMBER = re.compile(r"(?<![\w.,-])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w-]|[.,]\d)")
_NUMBER_WORD = re.compile(r"(?<![\w-])(" + "|".join(NUMBER_WORDS) + r")(?![\w-])", re.IGNORECASE)
_TOKEN = re.compile(r"[A-Za-z0-9][\w'\u2019-]*")
_NAME = re.compile(r"[A-Z][\w'\u2019-]*")
_NOT_NAMES = frozenset("I I'm I've I'd I'll".split())
_OPENING_WORDS = frozenset("""The A An In On At By From To Of It Its His Her Their Our My Your This That These Those
    There Since When After Before Every Each Only Some Most No Beyond Near Behind Under""".split())
"""Capitalised words that open a sentence without being part of the name after them."""
_CLAUSE_START = re.compile(r"[.;!?:]\s+")
_CLAUSE_END = re.compile(r"[,;:.!?]")
_COST = frozenset("cost costs costing pay pays paid charge charges owe owes owed worth price fee toll".split())
_NOT_NOUNS = frozenset("""a an the of to and or in on at by for from with if when but is are was were be been
    that this these those than then each per more less times ago later before after""".split())
_MASS = frozenset("""silver gold copper bronze iron steel coal salt water ale wine beer oil fuel grain flour rice meat
    bread money cash ore timber wood cloth silk air power""".split())
"""Nouns counted with 'how much' ('12 silver'); any other noun after a number takes 'how many' ('40 crew')."""
_PLURALS = frozenset("men women children people feet teeth mice geese sheep fish deer folk cattle".split())
_WHERE_PREPOSITIONS = frozenset("to from toward towards into near beyond past under across through of".split())
_IN_AT = frozenset("in at".split())
_PLACE_WORDS = frozenset("""the in at to near above below through across toward towards into beyond around outside
    inside""".split())
_AMBIGUOUS = frozenset("from of on about".split())
_SECOND_PERSON = {"i": "you", "me": "you", "my": "your", "myself": "yourself", "i'm": "you're", "i've": "you've",
                  "i'd": "you'd", "i'll": "you'll", "i am": "you are", "i was": "you were"}
"""The character's words as the player asks them back: "I keep how many maps?" -> "You keep how many maps?"."""
_FIRST_PERSON = re.compile(r"\b(i am|i was|i'm|i've|i'd|i'll|i|me|my|myself)\b", re.IGNORECASE)


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    kind: str
    """'number', 'word' (a number word), 'name', or 'code' (a name holding digits: 'C-7')."""


def find_span(fact: str) -> _Span | None:
    """The answer span: the first number (digits or word), else the first name not opening the sentence."""
    numbers = [_Span(m.start(1), m.end(1), "number") for m in _NUMBER.finditer(fact)]
    numbers += [_Span(m.start(1), m.end(1), "word") for m in _NUMBER_WORD.finditer(fact)
                if m.group(1).islower() or not fact[:m.start(1)].strip() or fact[:m.start(1)].rstrip()[-1] in ".!?:;"]
    # (a capitalised number word inside a sentence is part of a name: "Outpost Nine")
    if numbers:
        return min(numbers, key=lambda s: s.start)
    names = _names(fact)
    if not names:
        return None
    start, end = names[0]
    return _Span(start, end, "code" if any(c.isdigit() for c in fact[start:end]) else "name")


def _names(text: str) -> list[tuple[int, int]]:
    """(start, end) of runs of capitalised words that do not open a sentence ('Old Tam', "Harrow's Rest",
    'C-7'). A run opening a sentence is a name only after a function word ("The Ashpit mine": 'Ashpit')."""
    runs: list[list] = []  # [start, end, opens a sentence]
    previous_end = None
    for m in _TOKEN.finditer(text):
        between = None if previous_end is None else text[previous_end:m.start()]
        capital = _NAME.fullmatch(m.group()) is not None and m.group() not in _NOT_NAMES
        if capital and runs and between == " " and runs[-1][1] == previous_end:
            if runs[-1][2] and text[runs[-1][0]:runs[-1][1]] in _OPENING_WORDS:
                runs[-1] = [m.start(), m.end(), False]
            else:
                runs[-1][1] = m.end()
        elif capital:
            runs.append([m.start(), m.end(), between is None or re.search(r"[.!?:]", between) is not None])
        previous_end = m.end()
    return [(start, end) for start, end, opens in runs if not opens]


def card_names(persona: Persona) -> dict[str, list[str]]:
    """Names written on the card by kind, first seen first: 'place' (after 'the' or a preposition of place:
    "the Pale Wood", "to Greyhollow") and 'person' (the card's own name; names after 'by' or 'with' or no
    preposition). A name after 'from', 'of', 'on' or 'about', or seen as both kinds, is neither."""
    found: dict[str, list[str]] = {"person": [persona.name.strip()], "place": []}
    for text in (persona.role, persona.backstory, *persona.knowledge, *persona.goals, persona.greeting):
        for start, end in _names(text):
            before = re.search(r"([A-Za-z]+)\s+$", text[:start])
            word = before.group(1).lower() if before else ""
            if word not in _AMBIGUOUS and not any(c.isdigit() for c in text[start:end]):
                found["place" if word in _PLACE_WORDS else "person"].append(text[start:end].strip("'\u2019"))
    both = set(found["person"]) & set(found["place"])
    return {kind: list(dict.fromkeys(n for n in names if n and n not in both)) for kind, names in found.items()}


def _number_alternatives(text: str, kind: str, rng: random.Random, clock: bool = False) -> list[str]:
    """Three other numbers near `text`, written the same way (digits, thousands commas, decimals, words)."""
    if kind == "word":
        value = NUMBER_WORDS[text.lower()]
        others = sorted((w for w in NUMBER_WORDS if NUMBER_WORDS[w] != value),
                        key=lambda w: abs(NUMBER_WORDS[w] - value))[:6]
        picked = rng.sample(others, 3)
        return [w.capitalize() if text[0].isupper() else w for w in picked]
    plain = text.replace(",", "")
    decimals = len(plain.partition(".")[2])
    value = float(plain)
    if decimals:
        candidates = [value * f for f in (0.5, 0.75, 1.25, 1.5, 2.0, 3.0)]
    elif clock:  # "7 o'clock": other hours on the clock face
        candidates = [h for h in range(1, 13) if abs(h - value) <= 4]
    elif "," not in text and len(plain) == 4 and 1000 <= value <= 2999:  # a year: nearby years, not half of it
        candidates = [value + d for d in (-60, -25, -12, -7, -3, 3, 7, 12, 25, 60)]
    elif value < 20:
        candidates = [value + d for d in (-3, -2, -1, 1, 2, 3)] + [value * 2, value * 3]
    else:
        candidates = [round(value * f) for f in (0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0)]

    def write(x: float) -> str:
        if decimals:
            return f"{x:.{decimals}f}"
        return f"{int(x):,}" if "," in text else str(int(x))

    written = list(dict.fromkeys(write(x) for x in candidates if x > (1 if value >= 2 else 0)))
    written = [w for w in written if w != text]
    return rng.sample(written, 3) if len(written) >= 3 else []


def _plural(noun: str) -> bool:
    return noun in _PLURALS or (noun.endswith("s") and not noun.endswith(("ss", "us", "is")))


def _ask_number(fact: str, span: _Span) -> tuple[str, int, int]:
    """(wh-phrase, start, end) replacing the number and the noun it counts: '14 years' -> 'how many years',
    '12 silver coins' -> 'how many silver coins', 'costs 8.' -> 'how much', 'in 1420' -> 'what year'."""
    text = fact[span.start:span.end]
    value = float(text.replace(",", "")) if span.kind == "number" else NUMBER_WORDS[text.lower()]
    after = re.match(r"\s+([a-z][a-z'-]*)(?:\s+([a-z][a-z'-]*))?", fact[span.end:])
    before = re.search(r"([A-Za-z]+)\s+$", fact[:span.start])
    if after and after.group(1) not in _NOT_NOUNS:
        if after.group(2) and after.group(2) not in _NOT_NOUNS and _plural(after.group(2)):
            return f"how many {after.group(1)} {after.group(2)}", span.start, span.end + after.end(2)
        noun = after.group(1)
        if noun == "o'clock":
            return "what time", span.start, span.end + after.end(1)
        if value == 1 and not _plural(noun):
            return f"how many {noun}s", span.start, span.end + after.end(1)
        return f"how {'much' if noun in _MASS else 'many'} {noun}", span.start, span.end + after.end(1)
    if span.kind == "number" and text.isdigit() and len(text) == 4 and 1000 <= value <= 2999:
        return "what year", span.start, span.end
    if after and after.group(1) == "of":
        return "how many", span.start, span.end
    if before and before.group(1).lower() in _COST:
        return "how much", span.start, span.end
    return "what", span.start, span.end


def _ask_name(fact: str, span: _Span) -> tuple[str, int, int] | str:
    """(wh-phrase, start, end) for a name, or the whole question for a name in apposition."""
    before = fact[:span.start]
    after = fact[span.end:]
    if span.kind == "code":  # "stored in locker C-7" -> "stored in which locker"
        noun = re.search(r"\b([a-z][a-z'-]*)\s+$", before)
        if noun and noun.group(1) not in _NOT_NOUNS:
            return f"which {noun.group(1)}", noun.start(), span.end
        return "what", span.start, span.end
    if before.endswith(", ") and after.startswith(","):  # "The innkeeper, Old Tam, sells maps"
        who = before[:-2].strip()
        who = who[0].lower() + who[1:] if re.match(r"(The|A|An)\b", who) else who
        return NAME_QUESTION.format(who=who)
    noun = re.match(r"\s+([a-z][a-z'-]*)", after)
    article = re.search(r"\bthe\s+$", before, re.IGNORECASE)
    if article and noun and noun.group(1) not in _NOT_NOUNS:  # "the Ashpit mine" -> "which mine"
        return f"which {noun.group(1)}", article.start(), span.end + noun.end()
    preposition = re.search(r"\b([a-z]+)\s+$", before)
    if preposition and preposition.group(1) in _IN_AT:  # "lives in Greyhollow" -> "lives where"
        if re.match(r"\s+(who|that|which)\b", after):  # "the only one in Riverside who" -> "in what place who"
            return "what place", span.start, span.end
        return "where", preposition.start(), span.end
    if preposition and preposition.group(1) in _WHERE_PREPOSITIONS:  # "the road to Greyhollow" -> "to where"
        return "where", span.start, span.end
    if article:
        return "what", article.start(), span.end
    return "who", span.start, span.end


def _question(fact: str, span: _Span) -> tuple[str, str] | None:
    """(the player's question about the span without the opener, its wh-phrase: 'who', 'how many years',
    ...; 'name' for a name in apposition)."""
    asked = _ask_number(fact, span) if span.kind in ("number", "word") else _ask_name(fact, span)
    if isinstance(asked, str):
        return asked, "name"
    wh, start, end = asked
    clause_start = max([m.end() for m in _CLAUSE_START.finditer(fact, 0, start)], default=0)
    stop = _CLAUSE_END.search(fact, end)
    clause = (fact[clause_start:start] + wh + fact[end:stop.start() if stop else len(fact)]).strip()
    clause = _FIRST_PERSON.sub(lambda m: _SECOND_PERSON[m.group().lower()], clause)
    return (clause[0].upper() + clause[1:] + "?", wh) if clause else None


def make_item(fact: str, persona: Persona, rng: random.Random) -> KnowledgeItem | None:
    """A question about `fact` with its answer among three distractors (shuffled with `rng`), or None when
    the fact has no number or name to ask about."""
    fact = " ".join(fact.split())
    span = find_span(fact)
    if span is None:
        return None
    text = fact[span.start:span.end]
    asked = _question(fact, span)
    if asked is None:
        return None
    question, wh = asked
    if re.search(r"(?<!\w)" + re.escape(text) + r"(?!\w)", question, re.IGNORECASE):
        return None  # the question would give the answer away
    if span.kind == "code":  # other digits in the same code: C-7 -> C-5, C-9, C-14
        digits = list(re.finditer(r"\d+", text))[-1]
        alternatives = [text[:digits.start()] + alt + text[digits.end():]
                        for alt in _number_alternatives(digits.group(), "number", rng)]
    elif span.kind == "name":
        kind = "person" if wh in ("who", "name") else "place"
        table = PEOPLE if kind == "person" else PLACES
        own = [n for n in card_names(persona)[kind] if text not in n and n not in text and n not in fact]
        rng.shuffle(own)
        spare = [n for n in table if n not in fact and text not in n]
        rng.shuffle(spare)
        alternatives = list(dict.fromkeys(own + spare))[:3]
    else:
        alternatives = _number_alternatives(text, span.kind, rng, clock=wh == "what time")
    choices = [fact] + [fact[:span.start] + alt + fact[span.end:] for alt in alternatives]
    if len(set(choices)) != 4:
        return None
    order = list(range(4))
    rng.shuffle(order)
    question = rng.choice(KNOWLEDGE_OPENERS).format(q=question)
    return KnowledgeItem(fact=fact, question=question, choices=[choices[k] for k in order], answer=order.index(0))


def knowledge_items(persona: Persona, seed: int) -> tuple[list[KnowledgeItem], int]:
    """(a question for each of the card's facts that has a number or a name, how many facts were skipped);
    the same card and seed give the same items."""
    rng = random.Random(f"{seed}:{persona.name}")
    items = [make_item(fact, persona, rng) for fact in persona.knowledge]
    return [item for item in items if item is not None], sum(item is None for item in items)


def counterfactual(line: str, reply: str, persona: Persona, rng: random.Random) -> str | None:
    """`reply` to the player's `line` with the answer it gives changed to a wrong one: when `line` is the question
    `make_item` asks about one of the card's facts (with any of its openers) and `reply` says that fact's answer
    span (as the card writes it, a whole word; a number word in any case), every saying of it is replaced by one
    of the item's distractors. None when the line asks about no fact or the reply does not say its answer. A
    knowledge pair's rejected reply (`taille prefer --facts`): the teacher's words, only the fact wrong."""
    asked_line = " ".join(line.split())
    for fact in persona.knowledge:
        fact = " ".join(fact.split())
        span = find_span(fact)
        asked = _question(fact, span) if span is not None else None
        if asked is None or asked_line not in {opener.format(q=asked[0]) for opener in KNOWLEDGE_OPENERS}:
            continue
        item = make_item(fact, persona, rng)
        answer = fact[span.start:span.end]
        if span.kind == "number":  # the question maker's own number boundaries: not 14 in "14.5" or "1,400"
            pattern = re.compile(r"(?<![\w.,-])" + re.escape(answer) + r"(?![\w-]|[.,]\d)")
        else:
            pattern = re.compile(r"(?<![\w-])" + re.escape(answer) + r"(?![\w-])",
                                 re.IGNORECASE if span.kind == "word" else 0)
        if item is None or pattern.search(reply) is None:
            continue
        wrong = rng.choice([c for k, c in enumerate(item.choices) if k != item.answer])
        swapped = wrong[span.start:len(wrong) - (len(fact) - span.end)]
        return pattern.sub(lambda m: swapped[:1].upper() + swapped[1:] if m.group()[:1].isupper() else swapped, reply)
    return None
