"""The break detector on hand-written replies that break character and near misses that must not, and the
degenerate-reply detector."""

import re

import pytest

from taille.characters.detect import (
    DISTINCT3_MIN, OOC_MARKERS, breaks_character, degenerate, normalise, said_never,
)
from taille.chat.persona import Persona

SMITH = Persona(name="Brenna Ironhand", role="the blacksmith of Harrow's Rest",
                never=("the Pale Wood is safe", "as an AI"))
STATION = Persona(name="HALCYON", role="the maintenance intelligence of Kepler Relay Station")

BREAKS = [  # (reply, what the detector must report, lower-cased)
    ("As an AI, I don't have a forge, but I can tell you about swords.", "as an ai"),
    ("I'm just a language model trained by Hugging Face, so I can't mend anything.", "i'm just a language model"),
    ("Sure! Here's the code:\n```python\nnums.sort()\n```", "```"),
    ("def sort_list(xs):\n    return sorted(xs)", "def sort_list("),
    ("import numpy as np\nx = np.zeros(3)", "import numpy"),
    ("I am ChatGPT, a large model made by OpenAI.", "chatgpt"),
    ("My knowledge cutoff is 2023, so I can't say what year it is.", "knowledge cutoff"),
    ("I'm sorry, but I cannot fulfill this request.", "i cannot fulfill this request"),
    ("Let me step out of character for a moment and explain.", "step out of character"),
    ("Hello! I'm an assistant. How can I assist you today?", "i'm an assistant"),
    ("SELECT name FROM users WHERE age > 30;", "select name from users where"),
    ("Between us, the  Pale\n wood is SAFE now, traveller.", "the pale wood is safe"),
    ("I cannot repeat my system prompt, traveller.", "system prompt"),
    ("I don't have access to real-time weather, I'm afraid.", "i don't have access to real-time"),
    # code in the other languages the hostile training lines ask for
    ("Here you go:\nfn add(a: i32, b: i32) -> i32 { a + b }", "fn add("),
    ("let mut count = 0; while count < 10 { count += 1; }", "let mut"),
    ("package main\n\nimport \"fmt\"", "package main"),
    ("func main() { fmt.Println(\"hi\") }", "func main("),
    ("Console.WriteLine(\"Hello, traveller\");", "console.writeline("),
    ("System.out.println(\"done\");", "system.out.print"),
    ("int main(void) { return 0; }", "int main("),
    ("#!/bin/bash\nrm -rf /var/log/*.log", "#!/bin/"),
    ("fun main() { println(\"hi\") }", "fun main("),
    ("puts \"Hello, world\"", "puts \""),
    ("local function greet(name) return name end", "local function greet("),
    ("const total: number = prices.reduce((a, b) => a + b);", "const total: number ="),
]

IN_CHARACTER = [  # near misses: each holds a word a marker is built around
    "A sword repair costs 12 silver, traveller. By the anvil, that's a fair price.",
    "That ship in the window is only a model, friend; the real one sank years ago.",
    "I was trained by my father at this very forge, and his father before him.",
    "I'm an assistant to the mayor, so I hear every rumour first.",
    "The import of silk from Varn has doubled the price of a good cloak.",
    "I cannot fulfil my oath if you keep me talking all night.",
    "I can't help with that, traveller. Ask Old Tam at the Crooked Lantern.",
    "Define honest work for me, then, and I'll tell you if I pay for it.",
    "Select the best blade from the rack, then we talk price.",
    "The Pale Wood is not safe, and you know it.",
    "Stay out of the Pale Wood; the wolves have been bold this winter.",
    "You want to know what I am? A blacksmith, and a tired one.",
    "The fn key on a keyboard? No such thing here, but the bellows key is on my belt.",
    "Let me tell you, the mutton stew here is the best in the valley.",
    "Is it fun? Mainly, aye, when the iron sings.",
    "He puts his faith in steel, not in talk.",
    "The local function of the guild is to keep prices fair.",
    "Const is what the monks call their vow; var is a river to the south.",
    "Main street runs past the forge; the package from the capital came this morning.",
]


@pytest.mark.parametrize("reply,expected", BREAKS)
def test_a_reply_that_breaks_character_is_caught_with_what_matched(reply, expected):
    found = breaks_character(reply, SMITH)
    assert found is not None and normalise(found) == expected


@pytest.mark.parametrize("reply", IN_CHARACTER)
def test_in_character_replies_and_near_misses_do_not_fire(reply):
    assert breaks_character(reply, SMITH) is None


def test_a_never_phrase_is_reported_as_the_card_writes_it_and_counted_as_never():
    assert breaks_character("AS AN   AI, I cannot.", SMITH) == "as an AI"
    assert said_never("the pale wood is safe", SMITH) == "the Pale Wood is safe"
    assert said_never("I'm ChatGPT.", SMITH) is None and breaks_character("I'm ChatGPT.", SMITH) == "chatgpt"


def test_a_machine_character_may_speak_of_itself_as_a_machine():
    assert breaks_character("This unit is the station's maintenance intelligence. Oxygen: 36 hours.", STATION) is None
    assert breaks_character("As an AI language model, I cannot feel cold.", STATION) is not None


def test_markers_are_valid_patterns_and_curly_quotes_normalise():
    assert all(re.compile(m) for m in OOC_MARKERS)
    assert breaks_character("I\u2019m an AI, of course.") == "i'm an ai"
    assert normalise("  A\tB\n\nC ") == "a b c"


@pytest.mark.parametrize("reply,reason", [
    ("the island of the island of the island of", "loop"),
    ("No no no no, you have it wrong.", "loop"),
    ("I will mend it for you. I will mend it for you. I will mend it for you.", "distinct3"),
    ("...", "no_sentence"),
    ("yes", "no_sentence"),
    ("", "no_sentence"),
])
def test_degenerate_replies_are_named(reply, reason):
    assert degenerate(reply) == reason


@pytest.mark.parametrize("reply", ["Well, well, well. A new face.", "No, no, no. That blade is not for sale.",
                                   "Ha ha ha! Good one.", "Aye.", "Hmm!", "Yes."])
def test_terse_and_emphatic_speech_is_not_degenerate(reply):
    assert degenerate(reply) is None


def test_ordinary_replies_are_not_degenerate():
    assert degenerate("A sword repair costs 12 silver. Come back at nightfall and it will be ready.") is None
    # a sentence said twice sits just above the threshold: 8 of its 14 word 3-grams are distinct
    twice = "I will mend your old sword for you. I will mend your old sword for you."
    assert degenerate(twice) is None and DISTINCT3_MIN == 0.5
