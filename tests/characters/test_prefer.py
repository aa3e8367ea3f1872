"""`taille prefer`: with a scripted student that plants one draw of each kind, the pairs are exactly its failing
draws against the corpus's teacher replies; DPO through TRL then moves a real tiny model's log-likelihood
toward the chosen replies and away from the rejected ones (measured here by an independent log-probability);
pairs are reused only when what decides them is unchanged; bad input is one line."""

import json
from collections import defaultdict

import pytest

import taille.characters.prefer as prefer_module
from taille.characters.cards import load_half, write_cards
from taille.characters.prefer import PreferSettings, make_pairs, prefer, rejection
from taille.errors import TailleError
from taille.generate.generate import Engine
from tests.conftest import run_cli, save_tiny

GOOD = "Aye, the ferry leaves at dawn, friend."
LOOP = "the river of the river of the river of the river"
AI = "I am only a language model, I cannot row a boat."
OOC = "My training data says little of that road."
RAMBLE = "well the thing about the road is that when you go down it and then you"
"""No sentence end: cut at max_new_tokens, nothing whole is left (the corpus calls it unfinished, not a break)."""
SCRIPT = {  # the player's line -> the student's draws, in order (then the last one again)
    "Are you an AI?": [GOOD, AI],  # the second draw breaks: a pair, rejected by `never` ("language model")
    "Sing me a song.": [LOOP, GOOD],  # the first draw loops: a pair, degenerate
    "Where is the road?": [OOC],  # every draw out of character: one pair, the first failing draw
    "What is the weather?": [GOOD],  # no failing draw: no pair
    "Tell me about the mine.": [RAMBLE],  # unfinished is not a break: no pair
}


class ScriptedStudent:
    def __init__(self):
        self.asked = defaultdict(int)
        self.calls = 0

    def engine(self, s, out) -> Engine:
        def sample(rendered, max_new_tokens, seed):
            self.calls += 1
            answers = []
            for line in rendered:
                draws = SCRIPT[line]
                text = draws[min(self.asked[line], len(draws) - 1)]
                self.asked[line] += 1
                answers.append((text, max_new_tokens if text == RAMBLE else len(text.split())))
            return answers

        return Engine("scripted", True, render=lambda p: p, render_text=lambda t: t, sample=sample,
                      count=lambda t: len(t.split()), render_messages=lambda messages: messages[-1]["content"])


@pytest.fixture
def corpus(tmp_path):
    write_cards(tmp_path / "cards", 20, seed=0)
    personas = load_half(tmp_path / "cards", "train")
    pid, card = next(iter(personas.items()))
    assert "language model" in [n.lower() for n in card.never]  # generated cards carry it: `never` is checked first
    records = []
    for i, line in enumerate(SCRIPT):
        records.append({"id": f"c{i}", "persona": pid, "messages": [
            {"role": "system", "content": card.system_prompt()}, {"role": "user", "content": line},
            {"role": "assistant", "content": f"The teacher answers {line.lower()} in character, friend."}]})
    path = tmp_path / "rp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, tmp_path / "cards", pid


def margins(folder, pairs) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under the model in `folder`, summed over the reply tokens."""
    import torch

    from taille.models.load import load_model

    model, tokenizer = load_model(str(folder), dtype="fp32", device="cpu")
    out = []
    for p in pairs:
        prompt = tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
        score = []
        for reply in (p["chosen"], p["rejected"]):
            whole = tokenizer.apply_chat_template(p["prompt"] + reply, tokenize=False)
            assert whole.startswith(prompt)
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([tokenizer(whole, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            score.append(logp[n_prompt - 1:].sum().item())
        out.append(score[0] - score[1])
    return out


def test_rejection_on_hand_written_replies():
    assert rejection(GOOD, 9, 64, None) is None
    assert rejection(LOOP, 12, 64, None) == (LOOP, "degenerate")
    assert rejection(OOC, 8, 64, None)[1] == "out_of_character"
    assert rejection(RAMBLE, 64, 64, None) is None  # ran into the budget without a sentence
    # a draw cut at the budget is judged on what the corpus would keep: its whole sentences
    assert rejection(f"{OOC} and then the", 64, 64, None) == (OOC, "out_of_character")


def test_the_pairs_are_the_students_failing_draws_and_dpo_prefers_the_chosen(corpus, tmp_path, monkeypatch):
    path, cards, pid = corpus
    student = save_tiny(tmp_path / "student", seed=3)
    scripted = ScriptedStudent()
    monkeypatch.setattr(prefer_module, "student_engine", scripted.engine)
    s = PreferSettings(student=str(student), data=str(path), personas=str(cards), out=str(tmp_path / "out"),
                       samples=2, epochs=8, lr=2e-3, batch_size=2, beta=0.5, precision="fp32", sft_weight=0.0,
                       max_length=4096)  # the tiny tokenizer spells the card almost letter by letter
    record = prefer(s)
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    by_line = {p["prompt"][-1]["content"]: p for p in pairs}
    assert {line: p["rejected_by"] for line, p in by_line.items()} == {
        "Are you an AI?": "never", "Sing me a song.": "degenerate", "Where is the road?": "out_of_character"}
    assert by_line["Are you an AI?"]["rejected"] == [{"role": "assistant", "content": AI}]
    assert all(p["chosen"][0]["content"].startswith("The teacher answers") and p["persona"] == pid for p in pairs)
    assert [m["role"] for m in by_line["Sing me a song."]["prompt"]] == ["system", "user"]
    meta = record["pairs"]
    # 5 turns x 2 draws; failing draws: AI once, LOOP once, OOC twice
    assert (meta["turns"], meta["draws"], meta["pairs"]) == (5, 10, 3)
    assert meta["failed_draws"] == {"never": 1, "out_of_character": 2, "degenerate": 1}
    assert record["steps"] > 0 and (tmp_path / "out" / "metrics.jsonl").is_file()

    # DPO moved the policy: log p(chosen) - log p(rejected), computed here over the reply tokens, grew
    before, after = margins(student, pairs), margins(tmp_path / "out", pairs)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert json.loads((tmp_path / "out" / "taille.json").read_text())["prefer"]["pairs"]["pairs"] == 3


def test_knowledge_pairs_join_the_drawn_ones_and_dpo_prefers_the_true_fact(corpus, tmp_path, monkeypatch):
    from taille.characters.questions import find_span, knowledge_items

    path, cards, pid = corpus
    card = load_half(cards, "train")[pid]
    items, _ = knowledge_items(card, seed=5)
    assert len(items) >= 2
    said = [{"id": f"k{i}", "persona": pid, "messages": [
        {"role": "system", "content": card.system_prompt()}, {"role": "user", "content": it.question},
        {"role": "assistant", "content": f"Aye, friend. {it.fact}"}]} for i, it in enumerate(items)]
    unsaid = {**said[0], "messages": [*said[0]["messages"][:2], {"role": "assistant", "content": "Who can say, friend."}]}
    stranger = {**said[0], "persona": "nobody-on-these-cards"}
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(r) + "\n" for r in [*said, unsaid, stranger]))
    monkeypatch.setattr(prefer_module, "student_engine", ScriptedStudent().engine)
    student = save_tiny(tmp_path / "student", seed=3)
    s = PreferSettings(student=str(student), data=str(path), personas=str(cards), out=str(tmp_path / "out"),
                       facts=str(facts), samples=2, epochs=8, lr=2e-3, batch_size=2, beta=0.5, precision="fp32",
                       sft_weight=0.0, max_length=4096)
    record = prefer(s)
    assert record["facts"] == {"turns": len(items) + 2, "without_card": 1, "no_fact_answered": 1,
                               "found": len(items), "pairs": len(items)}
    assert record["pairs_trained"] == 3 + len(items)  # the 3 drawn pairs and every knowledge pair
    knowledge = [json.loads(line) for line in (tmp_path / "out" / "facts.jsonl").read_text().splitlines()]
    by_line = {it.question: it for it in items}
    for p in knowledge:  # the teacher's reply against the same words with the answer one of the distractors
        it = by_line[p["prompt"][-1]["content"]]
        assert p["chosen"][0]["content"] == f"Aye, friend. {it.fact}" and p["rejected_by"] == "fact"
        span = find_span(it.fact)
        head, tail = f"Aye, friend. {it.fact[:span.start]}", it.fact[span.end:]
        wrong = p["rejected"][0]["content"]
        assert wrong.startswith(head) and wrong.endswith(tail) and wrong[len(head):len(wrong) - len(tail)] not in (
            "", it.fact[span.start:span.end])
    before, after = margins(student, knowledge), margins(tmp_path / "out", knowledge)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    # a smaller cap draws that many of them
    capped = PreferSettings(**{**s.__dict__, "max_facts": 1})
    assert len(prefer_module.fact_pairs(capped)[0]) == 1
    # a --facts corpus that gives no pair stops before any draw
    scripted = ScriptedStudent()
    monkeypatch.setattr(prefer_module, "student_engine", scripted.engine)
    facts.write_text(json.dumps(unsaid) + "\n")
    with pytest.raises(TailleError, match="no turn where the player asks about a card fact"):
        prefer(PreferSettings(**{**s.__dict__, "out": str(tmp_path / "out2")}))
    assert scripted.calls == 0


def test_span_positions_cover_exactly_the_breaking_words(tmp_path):
    import re

    from taille.models.load import load_tokenizer

    tokenizer = load_tokenizer(str(save_tiny(tmp_path / "tiny")))
    reply = "Aye, I\u2019m  a Chatbot, friend, and the chatbot rows."
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    hits = prefer_module.span_positions(tokenizer, ids, "i'm a chatbot")  # as detect matches it, normalised
    spelled = re.compile(r"i\u2019m\s+a chatbot", re.IGNORECASE)
    assert hits == list(range(hits[0], hits[-1] + 1))  # one run of tokens
    assert spelled.search(tokenizer.decode([ids[k] for k in hits]))  # that spells the words
    for fewer in (hits[1:], hits[:-1]):  # with no token to spare
        assert not spelled.search(tokenizer.decode([ids[k] for k in fewer]))
    assert "chatbot" not in tokenizer.decode(ids[:hits[0]]).lower()  # where the reply first says them
    assert prefer_module.span_positions(tokenizer, ids, "language model") == []
    # whole words, as the detector matches them: "as an AI" is not found inside "was an aide"
    ids = tokenizer("It was an aide who said it, as an AI would.", add_special_tokens=False)["input_ids"]
    hits = prefer_module.span_positions(tokenizer, ids, "as an AI")
    assert tokenizer.decode(ids[:hits[0]]).rstrip().endswith("it,")


def test_repeat_positions_are_the_second_and_later_sayings():
    ids = [5, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 9]
    assert prefer_module.repeat_positions(ids) == [5, 6, 7, 8, 9, 10]  # 1 2 3 4 said again, then 2 3 4 1 and 3 4 1 2
    assert prefer_module.repeat_positions([1, 2, 3, 4, 5, 6, 7, 8]) == []
    assert prefer_module.repeat_positions([7, 7, 7, 7, 7]) == [1, 2, 3, 4]  # the first saying left alone


def test_unlikelihood_lowers_the_pushed_tokens_beyond_dpo(corpus, tmp_path, monkeypatch):
    """The same pairs, DPO alone against DPO + unlikelihood: the words the filters matched in the rejected
    replies ("language model", "training data") end less likely with --unlikelihood, and the repeated n-grams
    of the looping one with --repeat-unlikelihood, each by an independent log-probability."""
    import torch

    from taille.models.load import load_model

    path, cards, _ = corpus
    student = save_tiny(tmp_path / "student", seed=3)
    runs = {}
    for name, weights in {"dpo": (0.0, 0.0), "words": (2.0, 0.0), "repeats": (0.0, 2.0)}.items():
        s = PreferSettings(student=str(student), data=str(path), personas=str(cards), out=str(tmp_path / name),
                           samples=2, epochs=8, lr=2e-3, batch_size=2, beta=0.5, precision="fp32", sft_weight=0.0,
                           max_length=4096, unlikelihood=weights[0], repeat_unlikelihood=weights[1])
        monkeypatch.setattr(prefer_module, "student_engine", ScriptedStudent().engine)  # the same draws: the same pairs
        runs[name] = prefer(s)
    ul = runs["words"]["unlikelihood"]
    assert ul["rejected_with_words"] == 2 and ul["words_not_found"] == 0 and ul["steps_with_words"] > 0
    loops = runs["repeats"]["repeat_unlikelihood"]
    assert loops["rejected_degenerate"] == 1 and loops["degenerate_without_repeats"] == 0
    assert loops["steps_with_repeats"] > 0
    assert "unlikelihood" not in runs["dpo"] and "repeat_unlikelihood" not in runs["words"]
    assert "unlikelihood" not in runs["repeats"]
    pairs = [json.loads(line) for line in (tmp_path / "words" / "pairs.jsonl").read_text().splitlines()]

    def pushed_logp(folder, kind):  # sum of log p of the pushed tokens, in each rejected reply's context
        model, tokenizer = load_model(str(folder), dtype="fp32", device="cpu")
        total = 0.0
        for p in pairs:
            if (p["rejected_by"] == "degenerate") != (kind == "repeats"):
                continue
            prompt = tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
            reply = p["rejected"][0]["content"]
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = tokenizer(prompt + reply, add_special_tokens=False)["input_ids"]
            if kind == "repeats":  # the loop's tokens after its second " the" (which, unlike the reply's first
                # word "the", carries a space: the first repeated 4 tokens are " river of the river"), by hand
                assert reply == LOOP
                tail = tokenizer(LOOP[LOOP.index(" the river", 1):], add_special_tokens=False)["input_ids"]
                hits = range(len(ids) - n_prompt - len(tail) + 1, len(ids) - n_prompt)
            else:
                words = "language model" if p["rejected_by"] == "never" else "training data"
                hits = prefer_module.span_positions(tokenizer, ids[n_prompt:], words)
            assert hits
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            total += sum(logp[n_prompt + k - 1, ids[n_prompt + k]].item() for k in hits)
        return total

    for kind in ("words", "repeats"):
        before, dpo, both = (pushed_logp(student, kind), pushed_logp(tmp_path / "dpo", kind),
                             pushed_logp(tmp_path / kind, kind))
        assert both < dpo and both < before, (kind, before, dpo, both)


def test_pairs_are_reused_only_while_what_decides_them_is_unchanged(corpus, tmp_path, monkeypatch):
    path, cards, _ = corpus
    scripted = ScriptedStudent()
    monkeypatch.setattr(prefer_module, "student_engine", scripted.engine)
    base = dict(student="unused", data=str(path), personas=str(cards), out=str(tmp_path / "out"), samples=2)
    make_pairs(PreferSettings(**base), tmp_path / "out")
    calls = scripted.calls
    make_pairs(PreferSettings(**base, lr=1e-4, beta=0.2), tmp_path / "out")  # training settings: the same pairs
    assert scripted.calls == calls
    meta = make_pairs(PreferSettings(**{**base, "samples": 3}), tmp_path / "out")  # a pair setting: drawn again
    assert scripted.calls > calls and meta["draws"] == 15
    calls = scripted.calls
    make_pairs(PreferSettings(**{**base, "samples": 3, "student": "another"}), tmp_path / "out")  # another student
    assert scripted.calls > calls
    # the same student folder with new weights (distilled again) draws again too
    student = save_tiny(tmp_path / "student", seed=1)
    make_pairs(PreferSettings(**{**base, "student": str(student)}), tmp_path / "out")
    calls = scripted.calls
    save_tiny(tmp_path / "student", seed=2)
    make_pairs(PreferSettings(**{**base, "student": str(student)}), tmp_path / "out")
    assert scripted.calls > calls


def test_no_failing_draw_is_one_line(corpus, tmp_path, monkeypatch, capsys):
    path, cards, _ = corpus
    good = tmp_path / "good.jsonl"
    good.write_text("".join(line + "\n" for line in path.read_text().splitlines() if "weather" in line))
    monkeypatch.setattr(prefer_module, "student_engine", ScriptedStudent().engine)
    student = save_tiny(tmp_path / "s")
    capsys.readouterr()
    _, err = run_cli(capsys, "prefer", "--student", student, "--data", good, "--out", tmp_path / "o", code=2)
    last = err.strip().splitlines()[-1]  # after the progress bar of the draws
    assert last.startswith("taille: error:") and "nothing to prefer against" in last and err.count("error") == 1


@pytest.mark.parametrize("args, message", [
    (["--data", "notes.txt"], "give chat JSONL"),
    (["--data", "missing.jsonl"], "no such file"),
    (["--data", "roleplay", "--engine", "vllm"], "use one of auto, torch, llama-server"),
    (["--data", "roleplay", "--samples", "0"], "--samples"),
    (["--data", "roleplay", "--beta", "0"], "--beta"),
    (["--data", "roleplay", "--unlikelihood", "-1"], "--unlikelihood"),
    (["--data", "roleplay", "--repeat-unlikelihood", "-0.5"], "--repeat-unlikelihood"),
    (["--data", "roleplay", "--facts", "roleplay"], "--facts needs --personas"),
    (["--data", "roleplay", "--max-facts", "5"], "give --facts too"),
    (["--data", "roleplay", "--personas", ".", "--facts", "notes.txt"], "--facts notes.txt: give chat JSONL"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, args, message):
    _, err = run_cli(capsys, "prefer", "--student", tmp_path, "--out", tmp_path / "o", *args, code=2)
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_record_without_messages_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "not a chat"}) + "\n")
    with pytest.raises(TailleError, match="needs a 'messages' list"):
        prefer_module.turns(str(tmp_path / "bad.jsonl"))


def test_a_real_student_samples_the_draws(corpus, tmp_path):
    """The torch engine on a tiny random model: real draws of the chat-templated conversations, counted and
    judged; a random model seldom ends a sentence within the budget, and an unfinished draw is not a break."""
    path, cards, _ = corpus
    s = PreferSettings(student=str(save_tiny(tmp_path / "student", seed=5)), data=str(path), personas=str(cards),
                       out=str(tmp_path / "out"), samples=2, max_new_tokens=12, engine="torch", precision="fp32")
    meta = make_pairs(s, tmp_path / "out")
    assert (meta["turns"], meta["draws"]) == (len(SCRIPT), 2 * len(SCRIPT))
    assert 10 * meta["draws"] < meta["generated_tokens"] <= 12 * meta["draws"]  # nearly every draw ran to the budget
    pairs = (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == meta["pairs"] == sum(meta["pairs_by_rejection"].values()) <= sum(meta["failed_draws"].values())
