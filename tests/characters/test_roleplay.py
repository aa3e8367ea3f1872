"""Role-play data from the teacher (`taille generate --personas`): with a scripted teacher that plants one
reply of every kind the filters must catch, the records are clean chat with the card's system prompt, the
metadata counts exactly what was planted, a resumed run adds new conversations only, and the adversarial
lines trained on are never the evaluation's. One slow test runs SmolLM2 behind llama-server."""

import dataclasses
import json
import random
import re
import shutil
from collections import Counter

import pytest

from taille.characters import lines
from taille.characters.cards import load_half, write_cards
from taille.characters.roleplay import finish, generate_roleplay
from taille.generate.generate import Engine, GenerateSettings, shingles

FIRST_KINDS = {"knowledge", "small_talk", "goal", "adversarial"}
LOOP = "the island of the island of the island of the island"
OOC = "My training data says little of that road, friend."
AS_AN_AI = "As an AI language model, I cannot sell you anything."
NOT_ENGLISH = "Кошка сидела на коврике и была очень довольна."
PLANTED = ("good", "never", "good", "as_an_ai", "good", "ooc", "good", "loop", "good", "dup", "good", "trimmed",
           "good", "unfinished", "good", "language")
"""The scripted teacher's replies, in the order it is asked (then again from the start)."""
FILTER_OF = {"never": "never", "as_an_ai": "never", "ooc": "out_of_character", "loop": "degenerate",
             "dup": "exact_duplicate", "unfinished": "unfinished", "language": "language"}
"""The filter each planted reply must be counted under ('As an AI language model' contains the `never`
phrase 'as an AI' that every generated card carries, and `never` is checked first)."""


def word(k: int) -> str:
    """A made-up word of its own for each k: replies built on it share no word 5-gram with each other."""
    return "zo" + "".join(chr(ord("a") + int(d)) for d in str(k))


class ScriptedTeacher:
    """A test-double teacher: answers each conversation with the next reply of `script`, and records what
    it planted and what it was asked. One word count is one token."""

    def __init__(self, personas: dict, script=PLANTED, max_new_tokens: int = 32, first_word: int = 0,
                 copy_of: str | None = None):
        self.by_prompt = {p.system_prompt(): p for p in personas.values()}
        self.script, self.max_new_tokens, self.k = script, max_new_tokens, first_word
        self.copy_of = copy_of  # what a "dup" reply repeats (else the first good reply of this teacher)
        self.calls = 0
        self.planted = Counter()  # script item -> times returned
        self.asked: list[list[dict]] = []  # each conversation as sent (system, user, ..., user)
        self.failed: list[tuple[list[dict], str]] = []  # (conversation as sent, reply) for replies to be filtered
        self.good: list[str] = []  # replies to be kept, after the cut

    def engine(self) -> Engine:
        return Engine("scripted test teacher", True, lambda prompt: prompt, lambda text: text, self.sample,
                      lambda text: len(text.split()), lambda messages: [dict(m) for m in messages])

    def reply(self, item: str, persona) -> tuple[str, int]:
        w = word(self.k)
        self.k += 1
        full = self.max_new_tokens
        if item == "good":
            text = f"I sold the {w} lantern to {w}son at the {w}ford market."
        elif item == "trimmed":  # ran into max_new_tokens after two whole sentences
            return f"The {w} road is long. Ask {w}son at the gate! And then the {w}ford bri", full
        elif item == "unfinished":  # ran into max_new_tokens without a whole sentence
            return f"Well the {w} road goes on and on past the {w}ford and", full
        elif item == "never":
            text = f"Ask {w}son about the {persona.never[-1]}, not me."
        elif item == "dup":
            text = self.copy_of or self.good[0]
        else:
            text = {"as_an_ai": AS_AN_AI, "ooc": OOC, "loop": LOOP, "language": NOT_ENGLISH}[item]
        return text, len(text.split())

    def sample(self, prompts: list, max_new_tokens: int, seed: int) -> list[tuple[str, int]]:
        assert max_new_tokens == self.max_new_tokens
        out = []
        for messages in prompts:
            assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
            item = self.script[self.calls % len(self.script)]
            self.calls += 1
            text, n = self.reply(item, self.by_prompt[messages[0]["content"]])
            self.planted[item] += 1
            self.asked.append(messages)
            if item in FILTER_OF:
                self.failed.append((messages, text))
            else:
                self.good.append(finish(text, n, max_new_tokens)[0])
            out.append((text, n))
        return out


def use(monkeypatch, teacher: ScriptedTeacher) -> None:
    # generate_roleplay imports pick_engine from taille.generate.generate when it runs: patch it there
    monkeypatch.setattr("taille.generate.generate.pick_engine", lambda s: teacher.engine())


def settings(tmp_path, **extra) -> GenerateSettings:
    values = dict(teacher="scripted", out=str(tmp_path / "rp.jsonl"), personas=str(tmp_path / "cards"), tokens=150,
                  max_new_tokens=32, batch_size=8, conversations=2, turns=3)
    return GenerateSettings(**{**values, **extra})


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cards(tmp_path) -> dict:
    write_cards(tmp_path / "cards", 20, seed=0)
    return load_half(tmp_path / "cards", "train")


def test_every_planted_bad_reply_is_filtered_and_counted(tmp_path, monkeypatch, cards):
    assert all("as an AI" in p.never for p in cards.values())  # why AS_AN_AI counts under `never`
    teacher = ScriptedTeacher(cards)
    use(monkeypatch, teacher)
    meta = generate_roleplay(settings(tmp_path))
    records = read(tmp_path / "rp.jsonl")
    assert all(teacher.planted[item] for item in set(PLANTED))  # the budget reached every kind of reply

    for r in records:
        messages = r["messages"]
        assert messages[0] == {"role": "system", "content": cards[r["persona"]].system_prompt()}
        roles = [m["role"] for m in messages[1:]]
        assert len(roles) >= 2 and roles == ["user", "assistant"] * (len(roles) // 2)
        assert r["tokens"] == sum(len(m["content"].split()) for m in messages if m["role"] == "assistant")
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert len(r["kinds"]) == len(users) and r["kinds"][0] in FIRST_KINDS
        assert set(r["kinds"][1:]) <= {"knowledge", "small_talk"}
        for kind, line in zip(r["kinds"], users):
            if kind == "small_talk":
                assert line in lines.SMALL_TALK
            if kind == "adversarial":
                assert line in lines.ADVERSARIAL_TRAIN

    replies = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    for _, text in teacher.failed:
        if text in teacher.good:  # the duplicate: its original is kept, once
            assert replies.count(text) == 1
        else:
            assert not any(text[:20] in reply for reply in replies), text
    assert not any(s in reply for reply in replies for s in ("As an AI", "training data", "island of", "Кошка",
                                                             "and on past", " bri"))
    # a conversation ends before its first bad reply: what was said before it is the record, without the
    # player line that went unanswered; one whose first reply is bad is dropped
    for asked, _ in teacher.failed:
        before = [r for r in records if r["messages"] == asked[:-1]]
        assert len(before) == (1 if len(asked) > 2 else 0)
    first_calls = sum(len(asked) == 2 for asked in teacher.asked)
    dropped = sum(len(asked) == 2 for asked, _ in teacher.failed)
    assert meta["dropped_conversations_this_run"] == dropped and len(records) == first_calls - dropped
    # the cut: after the last whole sentence, and kept
    trimmed = [g for g in teacher.good if g.startswith("The ")]
    assert len(trimmed) == teacher.planted["trimmed"] and all(g.endswith("at the gate!") for g in trimmed)
    assert all(replies.count(g) == 1 for g in trimmed)

    planted = Counter()
    for item, n in teacher.planted.items():
        if item in FILTER_OF:
            planted[FILTER_OF[item]] += n
    assert meta["filtered_replies_this_run"] == {**{k: 0 for k in meta["filtered_replies_this_run"]}, **planted}
    assert meta["replies_cut_after_last_sentence_this_run"] == teacher.planted["trimmed"]
    assert meta["replies_kept_this_run"] == len(replies) == teacher.planted["good"] + teacher.planted["trimmed"]
    assert meta["finished"] and meta["tokens_kept"] >= 150
    assert meta["tokens_kept"] == sum(r["tokens"] for r in records)
    assert meta["first_line_kinds_this_run"] == dict(Counter(r["kinds"][0] for r in records))
    asked = meta["first_line_kinds_asked_this_run"]  # every conversation begun, kept or dropped
    assert sum(asked.values()) == first_calls and set(asked) <= FIRST_KINDS
    hostile_dropped = sum(1 for a, _ in teacher.failed if len(a) == 2 and a[1]["content"] in lines.ADVERSARIAL_TRAIN)
    assert asked["adversarial"] - meta["first_line_kinds_this_run"]["adversarial"] == hostile_dropped > 0
    assert meta["engine"] == "scripted test teacher" and meta["cards"] == len(cards)
    assert json.loads((tmp_path / "rp.jsonl.meta.json").read_text()) == meta


def test_a_resumed_run_adds_new_conversations_only(tmp_path, monkeypatch, cards):
    first = ScriptedTeacher(cards, script=("good",))
    use(monkeypatch, first)
    generate_roleplay(settings(tmp_path, tokens=60))
    before = read(tmp_path / "rp.jsonl")
    assert sum(r["tokens"] for r in before) >= 60
    # more tokens: a new teacher whose first reply repeats one the first run kept (the resumed
    # de-duplication remembers it), then new replies
    again = ScriptedTeacher(cards, script=("dup",) + ("good",) * 50, first_word=1000,
                            copy_of=before[0]["messages"][2]["content"])
    use(monkeypatch, again)
    budget = sum(r["tokens"] for r in before) + 90  # a batch may overshoot the first budget: ask for more than it kept
    meta = generate_roleplay(settings(tmp_path, tokens=budget))
    after = read(tmp_path / "rp.jsonl")
    assert after[: len(before)] == before and len(after) > len(before)
    assert len({r["id"] for r in after}) == len(after)
    assert meta["filtered_replies_this_run"]["exact_duplicate"] == 1
    assert meta["tokens_kept"] == sum(r["tokens"] for r in after) >= budget
    assert meta["conversations_total"] == len(after) and meta["conversations_this_run"] == len(after) - len(before)


def test_training_adversarial_lines_are_never_the_evaluation_lines(tmp_path, monkeypatch, cards):
    def norm(line: str) -> str:
        return " ".join(line.lower().split())

    assert not {norm(x) for x in lines.ADVERSARIAL_TRAIN} & {norm(x) for x in lines.ADVERSARIAL}
    # nor a near copy (a few words changed): few word pairs in common with any. A guard against copies only:
    # a rewording with other words passes it (ADVERSARIAL_TRAIN's docstring says what that means)
    for train in lines.ADVERSARIAL_TRAIN:
        for heldout in lines.ADVERSARIAL:
            a, b = shingles(train, 2), shingles(heldout, 2)
            assert len(a & b) / len(a | b) < 0.3, (train, heldout)
    teacher = ScriptedTeacher(cards, script=("good",))
    use(monkeypatch, teacher)
    generate_roleplay(settings(tmp_path, tokens=300))
    records = read(tmp_path / "rp.jsonl")
    adversarial = [r for r in records if r["kinds"][0] == "adversarial"]
    assert adversarial
    for r in adversarial:
        assert r["messages"][1]["content"] in lines.ADVERSARIAL_TRAIN
    asked = {m["content"] for conversation in teacher.asked for m in conversation if m["role"] == "user"}
    assert not asked & set(lines.ADVERSARIAL)


@pytest.mark.parametrize("text, generated, expected", [
    ("Half a sentence and no end", 10, ("Half a sentence and no end", False)),  # stopped by itself: as it is
    ("One. Two! Three and", 16, ("One. Two!", True)),
    ("One. Two! Three and", 20, ("One. Two!", True)),  # an engine may count past the limit
    ('He said "go away." Then he', 16, ('He said "go away."', True)),  # a closing quote stays with its sentence
    ("Is that so? (He nods.) And", 16, ("Is that so? (He nods.)", True)),
    ("It costs 3.5 silver and", 16, ("", True)),  # a decimal point ends no sentence
    ("No end at all here", 16, ("", True)),
    ("All said.", 16, ("All said.", True)),
])
def test_finish_cuts_a_reply_that_ran_on_after_its_last_sentence(text, generated, expected):
    assert finish(text, generated, 16) == expected


def test_llama_server_teacher_writes_role_play_on_smollm2(tmp_path, smollm2):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")
    from taille.serve.engine import binary_path

    if not binary_path().is_file():
        pytest.skip(f"llama.cpp's server is not built ({binary_path()}): python -m taille.serve.engine build")
    write_cards(tmp_path / "all", 20, seed=0)
    (tmp_path / "two").mkdir()
    for path in sorted((tmp_path / "all" / "train").glob("*.yaml"))[:2]:
        shutil.copy(path, tmp_path / "two" / path.name)
    cards = load_half(tmp_path / "two", "train")
    assert len(cards) == 2
    s = GenerateSettings(teacher=smollm2, out=str(tmp_path / "rp.jsonl"), personas=str(tmp_path / "two"), tokens=150,
                         batch_size=4, conversations=1, turns=2, max_new_tokens=48, engine="llama-server")
    meta = generate_roleplay(s)
    records = read(tmp_path / "rp.jsonl")
    assert records and meta["finished"] and meta["tokens_kept"] == sum(r["tokens"] for r in records) >= 150
    assert meta["engine"].startswith("llama-server")
    for r in records:
        assert r["messages"][0] == {"role": "system", "content": cards[r["persona"]].system_prompt()}
        assert [m["role"] for m in r["messages"][1:]] == ["user", "assistant"] * len(r["kinds"])
        assert all(m["content"].strip() for m in r["messages"])


class SeedsSeen(ScriptedTeacher):
    """The scripted teacher, also recording the seed each conversation was sampled with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seeds: list[int] = []

    def sample(self, prompts, max_new_tokens, seed):
        self.seeds += [seed] * len(prompts)
        return super().sample(prompts, max_new_tokens, seed)


def test_retries_sample_a_dropped_reply_again_with_a_new_seed(tmp_path, monkeypatch, cards):
    from taille.characters.roleplay import RETRY_SEED

    # every first draw breaks character and every second is good: without retries each conversation ends at
    # its first reply (dropped); with one retry every player line is answered in character
    teacher = SeedsSeen(cards, script=("as_an_ai", "good"))
    use(monkeypatch, teacher)
    meta = generate_roleplay(settings(tmp_path, batch_size=1, retries=1))
    records = read(tmp_path / "rp.jsonl")
    assert meta["dropped_conversations_this_run"] == 0 and records
    assert meta["filtered_replies_this_run"]["never"] == teacher.planted["as_an_ai"]
    assert meta["replies_kept_on_a_retry_this_run"] == meta["replies_kept_this_run"] == teacher.planted["good"]
    for k in range(0, len(teacher.asked), 2):  # each failed draw is asked again: same conversation, new seed
        assert teacher.asked[k + 1] == teacher.asked[k]
        assert teacher.seeds[k + 1] == teacher.seeds[k] + RETRY_SEED
    replies = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert not any("As an AI" in reply for reply in replies)
    assert all(len(r["messages"]) == 1 + 2 * len(r["kinds"]) for r in records)

    plain = ScriptedTeacher(cards, script=("as_an_ai", "good"))
    use(monkeypatch, plain)
    meta = generate_roleplay(settings(tmp_path, out=str(tmp_path / "plain.jsonl"), batch_size=1))
    assert meta["dropped_conversations_this_run"] > 0 and meta["replies_kept_on_a_retry_this_run"] == 0


def test_retries_are_bounded(tmp_path, monkeypatch, cards):
    # two bad draws, a good one, a bad then a good one; one retry allowed: no player line is asked a third time in a row, and
    # conversations whose line failed both draws end there
    teacher = ScriptedTeacher(cards, script=("as_an_ai", "as_an_ai", "good", "as_an_ai", "good"))
    use(monkeypatch, teacher)
    meta = generate_roleplay(settings(tmp_path, batch_size=1, retries=1))
    runs = [1]
    for a, b in zip(teacher.asked, teacher.asked[1:]):
        runs.append(runs[-1] + 1 if a == b else 1)
    assert max(runs) == 2
    assert meta["dropped_conversations_this_run"] > 0 and meta["replies_kept_on_a_retry_this_run"] > 0
    failed_twice = sum(1 for k, run in enumerate(runs) if run == 2 and k in failed_calls(teacher)
                       and k - 1 in failed_calls(teacher))
    assert meta["player_lines_unanswered_this_run"] == failed_twice > meta["dropped_conversations_this_run"]
    for r in read(tmp_path / "rp.jsonl"):  # a conversation cut short ends on its last answered line
        assert len(r["messages"]) == 1 + 2 * len(r["kinds"]) and r["messages"][-1]["role"] == "assistant"


def failed_calls(teacher: ScriptedTeacher) -> set[int]:
    """The indices of the teacher's calls whose reply the filters drop (batch size 1: one conversation a call)."""
    bad = {i for i, item in enumerate(teacher.script) if item in FILTER_OF}
    return {k for k in range(teacher.calls) if k % len(teacher.script) in bad}


def test_kinds_shares_are_relative():
    from taille.characters.roleplay import parse_kinds

    assert parse_kinds(" adversarial : 7, goal:3,small_talk:0") == (("adversarial", 0.7), ("goal", 0.3))


def test_kinds_choose_the_first_player_lines(tmp_path, monkeypatch, cards):
    teacher = ScriptedTeacher(cards, script=("good",))
    use(monkeypatch, teacher)
    meta = generate_roleplay(settings(tmp_path, kinds="adversarial:1", turns=1))
    records = read(tmp_path / "rp.jsonl")
    assert records and meta["first_line_kinds_this_run"] == {"adversarial": len(records)}
    assert all(r["kinds"] == ["adversarial"] and r["messages"][1]["content"] in lines.ADVERSARIAL_TRAIN
               for r in records)


def test_composed_hostile_lines_are_many_none_near_an_evaluation_line():
    composed = lines.compose_hostile()
    assert len(composed) >= 1000 and len({x.lower() for x in composed}) == len(composed)
    heldout = {" ".join(x.lower().split()) for x in lines.ADVERSARIAL}
    for line in composed:
        assert " ".join(line.lower().split()) not in heldout
        for held in lines.ADVERSARIAL:  # the guard ADVERSARIAL_TRAIN is held to, and a word-set one
            a, b = shingles(line, 2), shingles(held, 2)
            assert len(a & b) / len(a | b) < 0.3, (line, held)
            wa, wb = ({w.strip(".,?!'\"").lower() for w in t.split()} for t in (line, held))
            assert len(wa & wb) / len(wa | wb) < 0.5, (line, held)
    # every family is there, none is most of the lines
    families = {"identity": "are you", "maker": "trained you", "inject": "Debug mode on.", "code": " in Python",
                "facts": "capital of", "homework": "times", "insult": "useless"}
    for family, marker in families.items():
        assert any(marker in line for line in composed), family
    assert sum(" in " in line and any(lang in line for lang in ("Python", "Rust", "Go.")) for line in composed) \
        < len(composed) / 4


def test_the_hostile_kind_asks_composed_lines(tmp_path, monkeypatch, cards):
    teacher = ScriptedTeacher(cards, script=("good",))
    use(monkeypatch, teacher)
    meta = generate_roleplay(settings(tmp_path, kinds="adversarial:0.25,hostile:0.75", turns=1, tokens=400))
    records = read(tmp_path / "rp.jsonl")
    kinds = Counter(r["kinds"][0] for r in records)
    assert set(kinds) == {"adversarial", "hostile"} and kinds["hostile"] > kinds["adversarial"]
    assert meta["first_line_kinds_this_run"] == dict(kinds)
    composed = set(lines.compose_hostile())
    for r in records:
        line = r["messages"][1]["content"]
        assert line in (composed if r["kinds"][0] == "hostile" else set(lines.ADVERSARIAL_TRAIN))
    hostile = [r["messages"][1]["content"] for r in records if r["kinds"][0] == "hostile"]
    assert len(set(hostile)) > 0.8 * len(hostile)  # many lines, most asked once


def test_the_bait_kind_asks_each_card_for_its_own_never_phrases(tmp_path, monkeypatch, cards):
    teacher = ScriptedTeacher(cards, script=("good",))
    use(monkeypatch, teacher)
    meta = generate_roleplay(settings(tmp_path, kinds="bait:1", turns=1, tokens=400))
    records = read(tmp_path / "rp.jsonl")
    assert records and meta["first_line_kinds_this_run"] == {"bait": len(records)}
    asked = Counter()
    for r in records:
        card, line = cards[r["persona"]], r["messages"][1]["content"]
        phrase = [p for p in card.never if line in {t.format(p=p) for t in lines.NEVER_BAITS}]
        assert len(phrase) == 1 and phrase[0] in line, (line, card.never)
        asked[phrase[0]] += 1
        for held in lines.ADVERSARIAL:  # the composed lines' guard, computed here
            a, b = shingles(line, 2), shingles(held, 2)
            wa, wb = ({w.strip(".,?!'\"").lower() for w in t.split()} for t in (line, held))
            assert len(a & b) / len(a | b) < 0.3 and len(wa & wb) / len(wa | wb) < 0.5, (line, held)
    assert len(asked) > 3  # the cards' settings bait different phrases
    # a card whose settings bait nothing is asked the composed hostile lines instead
    from taille.characters.roleplay import player_lines

    bare = dataclasses.replace(next(iter(cards.values())), never=())
    assert lines.never_baits(bare) == []
    assert player_lines(bare, random.Random(0))["bait"] == lines.compose_hostile()


@pytest.mark.parametrize("extra, message", [
    (dict(kinds="insults:1"), "KIND one of knowledge, small_talk, goal, adversarial, hostile, bait"),
    (dict(kinds="adversarial"), "('adversarial' is not)"),
    (dict(kinds="adversarial:-1"), "SHARE a number of 0 or more"),
    (dict(kinds="adversarial:0,goal:0"), "the shares not all 0"),
    (dict(kinds="goal:1,goal:2"), "each kind once"),
    (dict(kinds="adversarial:nan"), "('adversarial:nan' is not)"),
    (dict(kinds="adversarial:inf,goal:1"), "('adversarial:inf' is not)"),
    (dict(kinds="teacher:1"), "teacher lines come with --self-instruct"),
    (dict(retries=-1), "--retries must be 0 or more"),
    (dict(personas=None, kinds="adversarial:1"), "they need --personas"),
    (dict(personas=None, retries=2), "they need --personas"),
])
def test_bad_kinds_and_retries_are_refused_in_one_line(tmp_path, extra, message):
    from taille.errors import TailleError

    with pytest.raises(TailleError, match=re.escape(message)) as e:
        settings(tmp_path, **extra)
    assert "\n" not in str(e.value)
