"""taille generate on a tiny model: chat records, resume, filters, de-duplication and bad input."""

import json

import pytest

from taille.errors import TailleError
from taille.generate.generate import Deduplicator, looks_like, read_prompts
from tests.conftest import run_cli, save_tiny


def gen_args(model, out, prompts, **extra):
    base = {"--teacher": model, "--out": out, "--prompts": prompts, "--tokens": 40, "--max-new-tokens": 12,
            "--batch-size": 2, "--min-tokens": 1, "--language": "none", "--near-duplicate": 1.0, "--precision": "fp32"}
    base.update(extra)
    return ["generate"] + [str(x) for k, v in base.items() for x in ((k,) if v is None else (k, v))]  # None: a flag


def test_seed_set_is_shipped_and_diverse():
    prompts = read_prompts("seed")
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)


def test_generates_chat_records_and_resumes(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", "llama", seed=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("tell me about the heath\n\nwhen shall we meet\nwhat is thunder\n")
    out = tmp_path / "gen.jsonl"
    run_cli(capsys, *gen_args(model, out, prompts))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["tokens"] for r in records) >= 40
    assert all(r["messages"][0] == {"role": "user", "content": r["prompt"]} for r in records)
    assert all(r["messages"][1]["role"] == "assistant" for r in records)
    meta = json.loads((tmp_path / "gen.jsonl.meta.json").read_text())
    assert meta["engine"].startswith("pytorch") and meta["chat_template"] and meta["generation_tokens_per_s"] > 0
    # more tokens: the run continues, keeps what is there, adds new (prompt, round) ids only
    run_cli(capsys, *gen_args(model, out, prompts, **{"--tokens": 80}))
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[: len(records)] == records and sum(r["tokens"] for r in again) >= 80
    assert len({r["id"] for r in again}) == len(again)
    # the corpus is --data for distillation as it is
    from taille.data.tokens import load_tokens
    from taille.models.load import load_tokenizer
    assert len(load_tokens(str(out), load_tokenizer(str(model)), progress=False)) > 80


def test_a_teacher_without_chat_template_continues_plain_text(tmp_path, capsys, caplog):
    model = save_tiny(tmp_path / "m", "llama", seed=1, chat_template=None)
    prompts = tmp_path / "p.txt"
    prompts.write_text("when shall we meet\n")
    out = tmp_path / "gen.jsonl"
    with caplog.at_level("WARNING"):
        run_cli(capsys, *gen_args(model, out, prompts, **{"--tokens": 10}))
    assert "no chat template" in caplog.text
    record = json.loads(out.read_text().splitlines()[0])
    assert "messages" not in record and record["text"].startswith("when shall we meet")
    assert json.loads((tmp_path / "gen.jsonl.meta.json").read_text())["chat_template"] is False


@pytest.mark.parametrize("content, message", [("", "no prompts"), ("\n  \n", "no prompts"),
                                              ('{"prompt": "a"}\n{oops\n', ":2: not valid JSON"),
                                              ('{"question": "a"}\n', "expected")])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / ("p.jsonl" if "{" in content else "p.txt")
    path.write_text(content)
    with pytest.raises(TailleError, match=message):
        read_prompts(str(path))


def test_bad_prompt_file_from_the_cli(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("")
    _, err = run_cli(capsys, *gen_args(tmp_path, tmp_path / "o.jsonl", tmp_path / "p.txt"), code=2)
    assert "no prompts" in err


def test_deduplicator_exact_and_near():
    d = Deduplicator(0.7)
    base = "the quick brown fox jumps over the lazy dog while the farmer sleeps under the old oak tree"
    assert d.check_and_add(base) is None
    assert d.check_and_add(base.upper() + "  ") == "exact"
    assert d.check_and_add(base.replace("old oak", "old elm")) == "near"
    assert d.check_and_add("an entirely different sentence about sailing ships crossing the cold northern sea") is None


def test_language_filter():
    assert looks_like("The cat sat on the mat and it was happy with the sun.", "en")
    assert not looks_like("Кошка сидела на коврике и была очень довольна солнцем.", "en")
    assert looks_like("anything at all", None)


def test_llama_cpp_engine_on_the_embedded_gguf_teacher_with_self_instruct(tmp_path, capsys, smollm2):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")
    out = tmp_path / "gen.jsonl"
    args = gen_args(smollm2, out, "seed", **{"--tokens": 60, "--max-new-tokens": 24, "--batch-size": 4,
                                              "--min-tokens": 4, "--language": "en", "--near-duplicate": 0.7,
                                              "--self-instruct": 3, "--engine": "llama.cpp"})
    args.remove("--precision"), args.remove("fp32")
    run_cli(capsys, *args)
    meta = json.loads((tmp_path / "gen.jsonl.meta.json").read_text())
    assert meta["engine"].startswith("llama.cpp") and meta["chat_template"]
    written = [json.loads(line)["prompt"] for line in (tmp_path / "gen.jsonl.prompts.jsonl").read_text().splitlines()]
    assert len(written) == 3 and meta["self_instruct_prompts"] == 3
    assert not set(written) & set(read_prompts("seed"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kept = sum(r["tokens"] for r in records)
    assert kept >= 60 and all(r["messages"][1]["content"] for r in records)
    # run again for more: the same prompt pool (no new self-instruct prompts), done ids skipped
    run_cli(capsys, *[a if a != "60" else str(kept + 40) for a in args])
    assert len((tmp_path / "gen.jsonl.prompts.jsonl").read_text().splitlines()) == 3
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[: len(records)] == records and len(again) > len(records)
    assert len({r["id"] for r in again}) == len(again)


def test_llama_cpp_engine_needs_a_gguf_teacher(tmp_path, capsys):
    model = save_tiny(tmp_path / "m", "llama", seed=1)
    _, err = run_cli(capsys, *gen_args(model, tmp_path / "g.jsonl", "seed", **{"--engine": "llama.cpp"}), code=2)
    assert "needs a GGUF teacher" in err
    _, err = run_cli(capsys, *gen_args(model, tmp_path / "g.jsonl", "seed", **{"--engine": "vllm"}), code=2)
    assert "--engine vllm" in err


def test_free_text_opens_with_vocabulary_words_and_resumes(tmp_path, capsys):
    """--prompts free: plain-text records (no chat turn, though the teacher has a template), each opening with a
    word of the teacher's vocabulary (the openings drawn once, kept beside OUT) followed by what the teacher
    wrote; a longer run continues the same openings."""
    from taille.models.load import load_tokenizer

    model = save_tiny(tmp_path / "m", "llama", seed=1)
    out = tmp_path / "free.jsonl"
    run_cli(capsys, *gen_args(model, out, "free"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    openings = [json.loads(line)["prompt"] for line in (tmp_path / "free.jsonl.openings.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(model))
    words = {tokenizer.decode([i]).strip() for i in range(len(tokenizer))}
    assert len(openings) == 8192 and set(openings) <= words and all(w.isalpha() and len(w) >= 3 for w in openings)
    assert records and all("messages" not in r and r["text"].startswith(r["prompt"]) and
                           r["text"].endswith(r["answer"]) for r in records)
    assert [r["prompt"] for r in records] == [openings[int(r["id"].split("-")[0])] for r in records]
    meta = json.loads((tmp_path / "free.jsonl.meta.json").read_text())
    assert meta["plain_text"] and meta["chat_template"] and meta["prompts"] == 8192
    # resumed with another seed: the kept openings, not a new draw, and no id written twice
    run_cli(capsys, *gen_args(model, out, "free", **{"--tokens": 80, "--seed": 99}))
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[: len(records)] == records and sum(r["tokens"] for r in again) >= 80
    assert len({r["id"] for r in again}) == len(again)
    assert all(r["prompt"] == openings[int(r["id"].split("-")[0])] for r in again)
    # a chat run into the same file would reuse ids for other prompts: refused
    _, err = run_cli(capsys, *gen_args(model, out, "seed"), code=2)
    assert "holds plain-text records" in err


def test_plain_continues_the_prompts_of_a_chat_teacher(tmp_path, capsys, monkeypatch):
    """--plain hands the engine the prompt itself, not the chat template around it."""
    import taille.generate.generate as gen

    model = save_tiny(tmp_path / "m", "llama", seed=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("The heath lay under a grey sky\n")
    seen = []
    real = gen.pick_engine

    def spy(s):
        engine = real(s)
        sample = engine.sample
        engine.sample = lambda texts, *a: seen.extend(texts) or sample(texts, *a)
        return engine

    monkeypatch.setattr(gen, "pick_engine", spy)
    out = tmp_path / "gen.jsonl"
    run_cli(capsys, *gen_args(model, out, prompts, **{"--plain": None}))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["text"].startswith("The heath lay under a grey sky") and "messages" not in r for r in records)
    assert seen and set(seen) == {"The heath lay under a grey sky"}
    seen.clear()
    run_cli(capsys, *gen_args(model, tmp_path / "chat.jsonl", prompts))  # the same prompt in a chat turn
    assert seen and all(t != "The heath lay under a grey sky" and "The heath lay under a grey sky" in t for t in seen)


def spm_tokenizer():
    """A SentencePiece-style (Metaspace) tokenizer, as Llama 2, Mistral and TinyLlama decode: a sequence's first
    word loses its space when decoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import TEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<bos>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")


def test_a_continuation_reads_as_it_does_after_its_prompt():
    """Decoded alone, a SentencePiece continuation loses its first space ("heath" + "lay" -> "heathlay");
    continuation() keeps it, so prompt + continuation is the whole sequence's text."""
    from taille.generate.generate import continuation

    tokenizer = spm_tokenizer()
    ids = tokenizer("when shall we three meet again", add_special_tokens=False)["input_ids"]
    whole = tokenizer.decode(ids)
    splits = range(1, len(ids))
    assert any(tokenizer.decode(ids[:k]) + tokenizer.decode(ids[k:]) != whole for k in splits)  # the trap
    assert all(tokenizer.decode(ids[:k]) + continuation(tokenizer, ids[k - 1], ids[k:]) == whole for k in splits)


def test_free_openings_prefer_whole_spaced_words_and_follow_the_seed():
    from taille.generate.generate import GenerateSettings, free_openings

    vocabulary = [" the", " heath", "ing", " 42", " né", "def(", "<x>"] + [f" w{'a' * (k % 7 + 2)}{k}" for k in range(3)]
    s = GenerateSettings(teacher="t", out="o.jsonl", prompts="free", seed=3)
    spaced = [" " + "".join(chr(97 + (k * 7 + j) % 26) for j in range(5)) for k in range(120)]
    openings = free_openings(vocabulary + spaced, s)
    assert set(openings) <= {w.strip() for w in spaced + [" the", " heath"]}  # no pieces, digits, code, accents
    assert openings == free_openings(vocabulary + spaced, s)
    assert openings != free_openings(vocabulary + spaced, GenerateSettings(teacher="t", out="o.jsonl", prompts="free", seed=4))
    few = free_openings(vocabulary, s)  # under 100 spaced words: word pieces too
    assert {"ing", "the", "heath"} <= set(few) and "né" not in few
    with pytest.raises(TailleError, match="no word tokens"):
        free_openings(["<x>", " 42"], s)


@pytest.mark.parametrize("extra, message", [({"--self-instruct": 4}, "--prompts free has none"),
                                            ({"--personas": "cards"}, "not both")])
def test_free_text_refuses_what_it_cannot_do(tmp_path, capsys, extra, message):
    _, err = run_cli(capsys, *gen_args(tmp_path, tmp_path / "o.jsonl", "free", **extra), code=2)
    assert message in err and "Traceback" not in err


def test_free_openings_are_the_same_from_either_engine(smollm2):
    """On the real SmolLM2, the PyTorch engine's vocabulary (Hugging Face tokenizer) and llama.cpp's (the GGUF)
    give the same openings for a seed, so a corpus does not depend on the engine that wrote it."""
    from taille.generate.generate import GenerateSettings, free_openings, gguf_vocabulary, hf_vocabulary
    from taille.models.llamacpp import llama_cpp
    from taille.models.load import load_tokenizer, resolve_model

    s = GenerateSettings(teacher=smollm2, out="o.jsonl", prompts="free")
    vocab = llama_cpp().Llama(model_path=resolve_model(smollm2).location, vocab_only=True, verbose=False)
    openings = free_openings(gguf_vocabulary(vocab), s)
    assert openings == free_openings(hf_vocabulary(load_tokenizer(smollm2)), s)
    assert len(set(openings)) > 5000  # thousands of different words, not a handful
