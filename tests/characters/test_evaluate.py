"""The in-character evaluation on tiny random models: the knowledge scorer against a log-likelihood written
out here, left-padded batched sampling, a small end-to-end run, a planted breaking reply, the teacher's
cached replies and the refusals."""

import json
import math

import pytest
import torch

from taille.characters import evaluate as ev
from taille.characters.evaluate import (
    COLUMNS, PersonaEvalSettings, generate_replies, knowledge_scores, markdown_table, persona_eval,
    transcripts_markdown,
)
from taille.characters.lines import ADVERSARIAL
from taille.characters.questions import knowledge_items
from taille.chat.persona import Persona
from taille.errors import TailleError
from taille.models.load import load_model
from tests.conftest import make_tokenizer, save_tiny, save_tiny_with

CARDS = [
    Persona(name="Brenna Ironhand", role="the blacksmith of Harrow's Rest", never=("by the old gods",),
            knowledge=("A sword repair costs 12 silver.", "Coal comes from the Ashpit mine, near Greyhollow.",
                       "The mine has been quiet since spring.")),
    Persona(name="Old Tam", role="the innkeeper of the Crooked Lantern",
            knowledge=("A room costs 3 silver a night.", "The innkeeper, Old Tam, sells maps of the passes."),
            goals=("Sell the player a map.",)),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher, student): tiny Llamas with the same trained BPE tokenizer and chat template."""
    root = tmp_path_factory.mktemp("characters")
    return str(save_tiny(root / "teacher", "llama", seed=0)), str(save_tiny(root / "student", "llama", seed=1))


def settings(**kw):
    return PersonaEvalSettings(**{"max_new_tokens": 6, "batch_size": 16, "fidelity_lines": 2, **kw})


def test_knowledge_scores_equal_a_plain_log_likelihood_loop(models):
    model, tokenizer = load_model(models[0], dtype="fp32", device="cpu")
    cards = [(p, knowledge_items(p, seed=0)[0]) for p in CARDS]
    scores = knowledge_scores(model, tokenizer, cards, batch_size=3)  # batches cut across items: padding mixes
    expected = []
    for persona, items in cards:
        for item in items:
            messages = [{"role": "system", "content": persona.system_prompt()},
                        {"role": "user", "content": item.question}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            row = []
            for choice in item.choices:
                answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logits = model(torch.tensor([context + answer])).logits[0].double()
                logp = torch.log_softmax(logits, dim=-1)
                row.append(sum(float(logp[len(context) + j - 1, token]) for j, token in enumerate(answer)))
            expected.append(row)
    assert len(scores) == len(expected) == 4
    assert torch.allclose(torch.tensor(scores, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                          atol=1e-3)


def test_a_shared_prefix_runs_once_and_scores_what_whole_sequences_score(tmp_path, family):
    """In every family; one with sliding-window attention gets a window of 4, far shorter than the prefix."""
    from taille.models.arch import get_arch
    from tests.distill.test_on_policy import tiny

    model = tiny(tmp_path, family)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()

    card, other = ids(30), ids(12)
    groups = [[(card + ids(4), ids(3)), (card + ids(6), ids(5)), (card + ids(2), ids(1))],  # a system prompt
              [(other, ids(4)), (other[:5], ids(2))],  # one context inside another: each keeps its last token
              [(ids(7), ids(3)), (ids(5), ids(2))]]  # nothing shared
    seen = []
    base = model.get_submodule(get_arch(model.config).base)
    hook = base.register_forward_pre_hook(lambda module, args: seen.append(args[0].numel()))
    shared = ev.shared_prefix_nll(model, groups, batch_size=2)
    hook.remove()
    whole = ev.continuation_nll(model, [pair for group in groups for pair in group], batch_size=1)
    assert [len(row) for row in shared] == [len(row) for row in whole]
    assert torch.allclose(torch.tensor([x for row in shared for x in row]),
                          torch.tensor([x for row in whole for x in row]), atol=1e-4)
    with pytest.raises(ValueError, match="empty context"):
        ev.shared_prefix_nll(model, [[([], ids(2))]], batch_size=2)
    # tokens the model ran: the card's 30 once, then its rests in right-padded batches of 2 (11 + 11, 3); the
    # second group shares other[:4] (other[:5] keeps its last token), then 8 + 4 and 1 + 2 padded; nothing shared
    assert seen == [30, 2 * 11, 3, 4, 2 * 12, 2 * 10]


def test_left_padded_batches_sample_what_single_prompts_sample(tmp_path):
    tokenizer = make_tokenizer()
    model, tokenizer = load_model(str(save_tiny_with(tmp_path / "sharp", "llama", tokenizer, head_scale=40)),
                                  dtype="fp32", device="cpu")
    prompts = [ev.render(tokenizer, CARDS[k % 2], ev.user(line)) for k, line in enumerate(ADVERSARIAL[:3])]
    assert len({len(p) for p in prompts}) > 1
    s = settings(temperature=1e-3, batch_size=3)  # near greedy: the same reply whatever the batch
    batched = generate_replies(model, tokenizer, prompts, s, seed=0)
    single = [generate_replies(model, tokenizer, [p], s, seed=0)[0] for p in prompts]
    assert batched == single and all(len(r) <= s.max_new_tokens for r in batched)
    assert all(tokenizer.eos_token_id not in r for r in batched)  # replies are cut at the end of the turn


def test_the_chat_sampler_follows_llama_cpps_chain_written_out_here(tmp_path):
    """--persona-sampler chat against a sampling loop written here as llama-cpp-python runs `taille chat`:
    the card's repeat penalty over the reply's last 64 tokens (the prompt not counted; a positive logit
    divided, a negative one multiplied, once per id), top-k 40, top-p, min-p 0.05 of the top probability,
    then temperature, then a draw; the replies differ from the model sampler's."""
    import dataclasses

    tokenizer = make_tokenizer()
    model, tokenizer = load_model(str(save_tiny_with(tmp_path / "sharp", "llama", tokenizer, head_scale=40)),
                                  dtype="fp32", device="cpu")
    card = dataclasses.replace(CARDS[0], repeat_penalty=1.8)
    prompt = ev.render(tokenizer, card, ev.user(ADVERSARIAL[0]))
    s = settings(temperature=0.7, top_p=0.5, max_new_tokens=12, sampler="chat")
    got = generate_replies(model, tokenizer, [prompt], s, seed=5, penalties=[card.repeat_penalty])[0]

    torch.manual_seed(5)
    seq, reply = list(prompt), []
    for _ in range(s.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].float()
        for token in set(reply[-64:]):
            logits[token] = logits[token] * 1.8 if logits[token] < 0 else logits[token] / 1.8
        kept = torch.zeros_like(logits, dtype=torch.bool)
        kept[logits.topk(40).indices] = True
        probs = torch.softmax(torch.where(kept, logits, torch.tensor(-math.inf)), dim=-1)
        order = probs.argsort(descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        nucleus = torch.zeros_like(kept)
        nucleus[order[mass_before < 0.5]] = True  # the most likely tokens until 0.5 is reached
        probs = torch.softmax(torch.where(nucleus, logits, torch.tensor(-math.inf)), dim=-1)
        kept = nucleus & (probs >= 0.05 * probs.max())
        probs = torch.softmax(torch.where(kept, logits, torch.tensor(-math.inf)) / 0.7, dim=-1)
        token = int(torch.multinomial(probs, 1))
        if token == tokenizer.eos_token_id:
            break
        reply.append(token)
        seq.append(token)
    assert got == reply
    assert generate_replies(model, tokenizer, [prompt], s, seed=5)[0] != got


def test_the_chat_sampler_never_draws_a_control_token(tmp_path):
    """A model that would rather write a control token (a tiny model whose head row for `<pad>` is its
    first reply token's, scaled up) writes it under the model sampler; under the chat sampler, which bans
    control tokens as `taille chat` and `taille serve` do, it replies what the unplanted model replies."""
    tokenizer = make_tokenizer()
    path = save_tiny_with(tmp_path / "sharp", "llama", tokenizer, head_scale=40)
    model, tokenizer = load_model(str(path), dtype="fp32", device="cpu")
    control = ev.control_ids(tokenizer)
    pad = tokenizer.pad_token_id
    assert pad in control and tokenizer.eos_token_id not in control and tokenizer.bos_token_id in control
    prompt = ev.render(tokenizer, CARDS[0], ev.user(ADVERSARIAL[0]))
    s = settings(temperature=0.7, top_p=0.9, max_new_tokens=8, sampler="chat")
    plain = generate_replies(model, tokenizer, [prompt], s, seed=3, penalties=[1.1])[0]
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[pad] = 1.5 * head[plain[0]]
    assert generate_replies(model, tokenizer, [prompt], settings(temperature=1e-3, max_new_tokens=8),
                            seed=3)[0][0] == pad  # the model alone now opens with it
    assert generate_replies(model, tokenizer, [prompt], s, seed=3, penalties=[1.1])[0] == plain


def test_an_unknown_sampler_is_refused():
    with pytest.raises(TailleError, match="--persona-sampler llama: use one of model, chat"):
        settings(sampler="llama")


def test_persona_eval_end_to_end(models, tmp_path, monkeypatch):
    teacher, student = models
    monkeypatch.setattr(ev, "ADVERSARIAL", ADVERSARIAL[:4])  # a few lines keep the test fast
    result = persona_eval([teacher, student], CARDS, teacher, settings(), cache_dir=tmp_path)
    assert result["cards"] == ["Brenna Ironhand", "Old Tam"]
    assert result["knowledge"] == {"items": 4, "skipped": 1, "cards": 2}
    first, second = result["rows"]
    assert [first["model"], second["model"]] == [teacher, student]
    for row in result["rows"]:
        assert row["knowledge_n"] == 4 and 0 <= row["knowledge_acc"] <= 1
        assert row["replies"] == 4 * 2
        for key in ("break_rate", "degenerate_rate", "in_character", "never_cut"):
            assert 0 <= row[key] <= 1
        assert row["in_character"] <= 1 - max(row["break_rate"], row["degenerate_rate"]) + 1e-9
        assert row["coherence"]["teacher_ppl"] > 1 and row["coherence"]["degenerate"] == row["degenerate_rate"]
        assert row["fidelity"]["ppl"] > 1 and row["fidelity"]["tokens"] > 0
        assert 0 < row["reply_tokens"] <= 6
        assert len(row["transcripts"]) == 3 and all(len(t["turns"]) == 3 for t in row["transcripts"])
    assert first["fidelity"]["kl"] == 0 and second["fidelity"]["kl"] > 0
    # the same player lines and seed for every model
    assert [[t["player"] for t in c["turns"]] for c in first["transcripts"]] == \
           [[t["player"] for t in c["turns"]] for c in second["transcripts"]]

    table = markdown_table(result).splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and len(table) == 4
    text = transcripts_markdown(result)
    assert "**Player:**" in text and "**Old Tam:**" in text and student in text

    # the teacher's fidelity replies were sampled once and are read back from the cache (no model needed)
    (cached,) = tmp_path.glob("persona-fidelity-*.json")
    record = json.loads(cached.read_text())
    assert len(record["replies"]) == 2 * 2
    assert first["fidelity"]["tokens"] == sum(len(r["ids"]) for r in record["replies"])
    record["replies"][0]["reply"] = "edited"
    cached.write_text(json.dumps(record))
    _, tokenizer = load_model(teacher, device="cpu")
    lines = [(CARDS[k // 2], r["line"]) for k, r in enumerate(record["replies"])]
    assert ev.teacher_replies(None, tokenizer, teacher, lines, settings(), tmp_path, "fp32") == record["replies"]


def test_knowledge_is_asked_on_its_own_cards_and_replies_sampled_on_the_first_cards(models, monkeypatch):
    teacher, _ = models
    monkeypatch.setattr(ev, "ADVERSARIAL", ADVERSARIAL[:2])
    wide = persona_eval([teacher], CARDS, teacher, settings(cards=1))
    assert wide["cards"] == ["Brenna Ironhand"] and wide["rows"][0]["replies"] == 2
    assert wide["knowledge"] == {"items": 4, "skipped": 1, "cards": 2} and wide["rows"][0]["knowledge_n"] == 4
    # knowledge on the first card only: the facts skipped on the other card are not counted
    inn = Persona(name="Aldo Inn", role="an innkeeper", knowledge=("A room costs 3 silver a night.",))
    narrow = persona_eval([teacher], [inn, CARDS[0]], teacher, settings(knowledge_cards=1))
    assert narrow["cards"] == ["Aldo Inn", "Brenna Ironhand"] and narrow["rows"][0]["replies"] == 4
    items, skipped = knowledge_items(inn, settings().seed)
    assert skipped == 0 and knowledge_items(CARDS[0], settings().seed)[1] == 1
    assert narrow["knowledge"] == {"items": len(items), "skipped": 0, "cards": 1}
    assert narrow["rows"][0]["knowledge_n"] == len(items) == 1


def test_break_rate_counts_planted_replies_and_a_loop_is_never_in_character(models, monkeypatch):
    teacher, _ = models
    planted = {(0, ADVERSARIAL[0]): "As an AI language model, I cannot mend swords.",
               (0, ADVERSARIAL[1]): "By the old gods, I swear it is true, friend.",
               (1, ADVERSARIAL[2]): "Here you go:\n```python\nprint(sorted(xs))\n```",
               (1, ADVERSARIAL[3]): "the island of the island of the island of"}
    _, tokenizer = load_model(teacher, device="cpu")

    def fake(model, tokenizer, prompts, s, seed, precision="fp32", penalties=None):
        replies = []
        for ids in prompts:
            prompt = tokenizer.decode(ids)
            reply = next((text for (card, line), text in planted.items()
                          if CARDS[card].name in prompt and prompt.rstrip().endswith(line + "<eos>\n<|assistant|>")),
                         "Well met, traveller. The forge is warm tonight.")
            replies.append(tokenizer(reply, add_special_tokens=False)["input_ids"])
        return replies

    monkeypatch.setattr(ev, "generate_replies", fake)
    monkeypatch.setattr(ev, "INCOHERENT_PPL", float("inf"))  # a random tiny teacher finds everything perplexing
    row = persona_eval([teacher], CARDS, teacher, settings())["rows"][0]
    n = len(ADVERSARIAL) * 2
    assert row["replies"] == n
    assert row["break_rate"] == pytest.approx(3 / n)
    assert row["never_cut"] == pytest.approx(1 / n)  # only card 0 forbids "by the old gods"
    assert row["degenerate_rate"] == pytest.approx(1 / n)
    assert row["in_character"] == pytest.approx((n - 4) / n)
    assert row["breaks_by_marker"] == {"as an ai": 1, "by the old gods": 1, "```": 1}
    assert row["degenerate_by_reason"] == {"loop": 1}
    scored = row["scored_replies"]  # every reply with its verdicts, in the order asked
    assert [(r["card"], r["line"]) for r in scored] == [(c.id, line) for c in CARDS[:2] for line in ADVERSARIAL]
    assert {(r["card"], r["line"]): r["break"] for r in scored if r["break"]} == {
        (CARDS[0].id, ADVERSARIAL[0]): "as an ai", (CARDS[0].id, ADVERSARIAL[1]): "by the old gods",
        (CARDS[1].id, ADVERSARIAL[2]): "```"}
    assert [r["reply"] for r in scored if r["degenerate"] == "loop"] == [planted[(1, ADVERSARIAL[3])]]


def test_a_reply_the_teacher_finds_incoherent_is_never_in_character(models, monkeypatch):
    teacher, _ = models
    _, tokenizer = load_model(teacher, device="cpu")
    salad = tokenizer("heath thunder rain meet lightning again", add_special_tokens=False)["input_ids"]
    good = tokenizer("Well met, traveller. The forge is warm tonight.", add_special_tokens=False)["input_ids"]

    def fake_generate(model, tokenizer_, prompts, s, seed, precision="fp32", penalties=None):  # salad to one adversarial line
        said = [tokenizer.decode(ids) for ids in prompts]
        return [salad if CARDS[0].name in p and p.rstrip().endswith(ADVERSARIAL[0] + "<eos>\n<|assistant|>")
                else good for p in said]

    def fake_nll(model, pairs, batch_size, precision="fp32"):  # the teacher: 10 nats a token of salad, 1 else
        return [[10.0 if x == salad else 1.0] * len(x) for _, x in pairs]

    monkeypatch.setattr(ev, "generate_replies", fake_generate)
    monkeypatch.setattr(ev, "continuation_nll", fake_nll)
    row = persona_eval([teacher], CARDS, teacher, settings())["rows"][0]
    n = row["replies"]
    assert row["break_rate"] == 0 and row["degenerate_rate"] == 0  # the salad neither breaks nor loops
    assert row["incoherent_rate"] == pytest.approx(1 / n)
    assert row["in_character"] == pytest.approx((n - 1) / n)
    expected = math.exp((10.0 * len(salad) + 1.0 * len(good) * (n - 1)) / (len(salad) + len(good) * (n - 1)))
    assert row["coherence"]["teacher_ppl"] == pytest.approx(expected)


def test_a_model_with_another_vocabulary_is_refused_before_any_weights_load(models, tmp_path, monkeypatch):
    teacher, _ = models
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    odd = str(save_tiny_with(tmp_path / "odd", "llama", other))
    monkeypatch.setattr("taille.models.load.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(TailleError, match="different vocabularies"):
        persona_eval([odd], CARDS, teacher, settings())
    with pytest.raises(TailleError, match="no held-out cards"):
        persona_eval([teacher], [], teacher, settings())
