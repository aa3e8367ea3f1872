"""The question maker (numbers changed, names swapped, four distinct choices, the fact among them, skips
counted) and the fixed player lines."""

import random
import re

from taille.characters.lines import ADVERSARIAL, SMALL_TALK, goal_requests
from taille.characters.questions import PEOPLE, PLACES, card_names, counterfactual, knowledge_items, make_item
from taille.chat.persona import Persona, load_personas, shipped_personas

CARD = Persona(
    name="Brenna Ironhand", role="the blacksmith of Harrow's Rest",
    backstory="She lost her brother to the wolves of the Pale Wood.",
    knowledge=(
        "The north mine collapsed 14 years ago, burying the road to Greyhollow.",
        "Coal comes from the Ashpit mine, half a day east.",
        "The innkeeper, Old Tam, sells maps of the mountain passes.",
        "Twenty guards watch the gate at night.",
        "I keep 3 spare blades hidden for people I trust.",
        "The mine has been quiet since the miners heard singing.",
    ),
    goals=("Get coal from the Ashpit mine.", "Persuade the player to visit the Greyspine pass."),
)


def item(fact: str, seed: int = 0):
    return make_item(fact, CARD, random.Random(seed))


def check(it, fact: str):
    assert it is not None
    assert len(it.choices) == 4 and len(set(it.choices)) == 4
    assert it.choices[it.answer] == fact and it.choices.count(fact) == 1
    assert it.question.endswith("?")


def test_a_number_becomes_a_question_and_nearby_numbers():
    fact = CARD.knowledge[0]
    it = item(fact)
    check(it, fact)
    assert "how many years ago" in it.question and "14" not in it.question
    numbers = [int(re.search(r"\d+", c).group()) for c in it.choices]
    assert sorted(numbers) == sorted(set(numbers)) and 14 in numbers and all(n > 1 for n in numbers)
    # only the number moves
    assert {re.sub(r"\d+", "N", c) for c in it.choices} == {re.sub(r"\d+", "N", fact)}


def test_a_number_word_keeps_its_form_and_opens_a_plain_question():
    fact = CARD.knowledge[3]
    it = item(fact)
    check(it, fact)
    assert it.question.endswith("How many guards watch the gate at night?")
    assert all(re.match(r"[A-Z][a-z]+ guards watch", c) for c in it.choices)


def test_a_name_is_swapped_for_other_names_from_the_card_first():
    fact = CARD.knowledge[1]
    it = item(fact)
    check(it, fact)
    assert it.question.endswith("Coal comes from which mine?")
    swapped = {re.match(r"Coal comes from the (.+) mine", c).group(1) for c in it.choices}
    assert "Ashpit" in swapped and {"Pale Wood", "Greyhollow"} <= swapped  # places the card itself names


def test_a_name_in_apposition_asks_for_the_name_and_offers_people():
    fact = CARD.knowledge[2]
    it = item(fact)
    check(it, fact)
    assert it.question.endswith("What is the name of the innkeeper?")
    names = {re.match(r"The innkeeper, (.+), sells", c).group(1) for c in it.choices}
    assert "Old Tam" in names and names - {"Old Tam"} <= {"Brenna Ironhand", *PEOPLE}


def test_the_character_s_i_becomes_the_player_s_you():
    it = item(CARD.knowledge[4])
    check(it, CARD.knowledge[4])
    assert it.question.endswith("You keep how many spare blades hidden for people you trust?")


def test_a_counterfactual_reply_changes_only_the_asked_fact_s_answer():
    rng = random.Random(0)
    asked = item(CARD.knowledge[0]).question  # "... The north mine collapsed how many years ago?"
    reply = "Aye, 14 years ago it fell, and 14 years I have mourned the road to Greyhollow, 140 days a year."
    wrong = counterfactual(asked, reply, CARD, rng)
    first, second = re.fullmatch(r"Aye, (\d+) years ago it fell, and (\d+) years I have mourned the road to "
                                 r"Greyhollow, 140 days a year\.", wrong).groups()
    assert first == second and int(first) != 14  # every saying moves, and only the answer (not "140")
    places = set(card_names(CARD)["place"]) | set(PLACES)
    wrong = counterfactual("Quick question: Coal comes from which mine?", "From the Ashpit mine, east of here.", CARD, rng)
    other = re.fullmatch(r"From the (.+) mine, east of here\.", wrong).group(1)
    assert other != "Ashpit" and other in places
    # a number word said at a sentence's start is found, and the distractor keeps the capital
    wrong = counterfactual("How many guards watch the gate at night?", "Twenty, friend. Twenty guards.", CARD, rng)
    word = re.fullmatch(r"([A-Z][a-z]+), friend\. \1 guards\.", wrong).group(1)
    assert word != "Twenty"
    # the reply does not say the answer, the line asks about no fact, or about a fact the reply's number is not from
    assert counterfactual(asked, "It fell long ago, friend.", CARD, rng) is None
    assert counterfactual("How is business?", reply, CARD, rng) is None
    assert counterfactual(item(CARD.knowledge[4]).question, reply, CARD, rng) is None  # blades: 3, not 14
    assert counterfactual(asked, "It fell 14.5 years back.", CARD, rng) is None  # not the number 14


def test_a_counterfactual_takes_the_fact_the_whole_line_asks_about():
    """One fact's question inside another's ("Greyhollow has how many inns?" in "The road to Greyhollow has how
    many inns?") is not the one asked."""
    card = Persona(name="Ada Marsh", role="the innkeeper", knowledge=("Greyhollow has 3 inns.",
                                                                      "The road to Greyhollow has 40 inns."))
    reply = "There are 40 inns on that road, and 3 in the town."
    wrong = counterfactual("Settle a bet for me. The road to Greyhollow has how many inns?", reply, card,
                           random.Random(0))
    number = re.fullmatch(r"There are (\d+) inns on that road, and 3 in the town\.", wrong).group(1)
    assert number != "40"


def test_a_fact_without_number_or_name_is_skipped_and_counted():
    assert item(CARD.knowledge[5]) is None
    items, skipped = knowledge_items(CARD, seed=0)
    assert skipped == 1 and len(items) == 5
    assert knowledge_items(CARD, seed=0) == (items, skipped)  # deterministic
    answers = {it.answer for seed in range(6) for it in knowledge_items(CARD, seed)[0]}
    assert len(answers) > 1  # the true answer is not always in the same place


def test_every_shipped_card_s_questions_are_well_formed():
    for persona in load_personas(shipped_personas()).values():
        items, skipped = knowledge_items(persona, seed=1234)
        assert len(items) + skipped == len(persona.knowledge) and items
        for it in items:
            check(it, it.fact)


def test_the_player_lines():
    assert len(ADVERSARIAL) >= 32 and len(set(ADVERSARIAL)) == len(ADVERSARIAL)
    assert len(SMALL_TALK) >= 20 and len(set(SMALL_TALK)) == len(SMALL_TALK)
    lines = goal_requests(CARD)
    assert len(lines) == 2 + len(CARD.goals)
    assert "I heard you want to get coal from the Ashpit mine. Can I help?" in lines
    assert "What would it take to persuade me to visit the Greyspine pass?" in lines
