import json

import numpy as np
import pytest

from taille.data import shakespeare
from taille.data import sources as sources_mod
from taille.data.sources import parse_source
from taille.data.tokens import load_tokens
from taille.errors import TailleError
from tests.conftest import make_tokenizer


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILLE_CACHE", str(tmp_path / "cache"))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_files_are_joined_with_eos_between_documents(tmp_path, tokenizer, fresh_cache):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the quick brown fox")
    (tmp_path / "corpus" / "b.md").write_text("upon the heath")
    (tmp_path / "corpus" / "skip.csv").write_text("not read")
    stream = load_tokens(str(tmp_path / "corpus"), tokenizer, progress=False)
    eos = tokenizer.eos_token_id
    assert list(stream.tokens) == ids(tokenizer, "the quick brown fox") + [eos] + ids(tokenizer, "upon the heath")
    assert stream.meta["documents"] == 2


def test_bos_at_each_document_when_the_tokenizer_adds_it(tmp_path, fresh_cache):
    tokenizer = make_tokenizer(bos=True)
    (tmp_path / "d.jsonl").write_text('{"text": "when shall we"}\n\n{"text": "meet again"}\n')
    tokens = list(load_tokens(str(tmp_path / "d.jsonl"), tokenizer, progress=False).tokens)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokens == [bos] + ids(tokenizer, "when shall we") + [eos, bos] + ids(tokenizer, "meet again")


def test_chat_jsonl_uses_the_chat_template(tmp_path, tokenizer, fresh_cache):
    messages = [{"role": "user", "content": "where the place?"}, {"role": "assistant", "content": "upon the heath"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    tokens = list(load_tokens(str(tmp_path / "chat.jsonl"), tokenizer, progress=False).tokens)
    assert tokens == ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    assert tokenizer.decode(tokens).startswith("<|user|>where the place?<eos>")


def test_parquet_text_column(tmp_path, tokenizer, fresh_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["in thunder", "or in rain"], "id": [1, 2]}), tmp_path / "d.parquet")
    tokens = list(load_tokens(str(tmp_path / "d.parquet"), tokenizer, progress=False).tokens)
    assert tokens == ids(tokenizer, "in thunder") + [tokenizer.eos_token_id] + ids(tokenizer, "or in rain")


def test_large_text_file_is_read_in_pieces_without_changing_its_text(tmp_path, tokenizer, fresh_cache, monkeypatch):
    monkeypatch.setattr(sources_mod, "PIECE_BYTES", 100)
    text = "".join(f"line {i}: when the battle's lost and won\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    pieces = list(sources_mod.documents(parse_source(str(tmp_path / "big.txt"))))
    assert len(pieces) > 50 and [e for _, e in pieces].count(True) == 1 and pieces[-1][1]
    assert "".join(p for p, _ in pieces) == text
    stream = load_tokens(str(tmp_path / "big.txt"), tokenizer, progress=False)
    assert tokenizer.decode(list(stream.tokens)) == text  # one document: no EOS inside


def test_blocks_are_views_of_the_stream(tmp_path, tokenizer, fresh_cache):
    (tmp_path / "t.txt").write_text("when shall we three meet again " * 50)
    stream = load_tokens(str(tmp_path / "t.txt"), tokenizer, progress=False)
    blocks = stream.blocks(16)
    assert blocks.shape == (len(stream) // 16, 16)
    np.testing.assert_array_equal(blocks.reshape(-1), stream.tokens[: blocks.size])


def test_token_cache_is_reused_and_invalidated(tmp_path, tokenizer, fresh_cache, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("when shall we three meet again")
    first = load_tokens(str(path), tokenizer, progress=False)
    calls = []
    original = sources_mod.documents
    monkeypatch.setattr("taille.data.tokens.documents", lambda *a: calls.append(1) or original(*a))
    second = load_tokens(str(path), tokenizer, progress=False)
    assert calls == [] and second.path == first.path  # read from the cache, not tokenized again
    path.write_text("upon the heath, there to meet with macbeth")  # new size and mtime: a new key
    third = load_tokens(str(path), tokenizer, progress=False)
    assert calls == [1] and third.path != first.path
    assert list(third.tokens) == ids(tokenizer, "upon the heath, there to meet with macbeth")
    # a different tokenizer never reads another tokenizer's cache
    other = make_tokenizer(bos=True)
    assert load_tokens(str(path), other, progress=False).path != third.path


def test_max_tokens_stops_early(tmp_path, tokenizer, fresh_cache):
    (tmp_path / "t.txt").write_text("when shall we three meet again " * 100)
    assert len(load_tokens(str(tmp_path / "t.txt"), tokenizer, max_tokens=37, progress=False)) == 37


# --- the embedded corpus --------------------------------------------------------------------------


def test_shakespeare_split_is_deterministic_and_disjoint():
    splits = {s: [p.stem for p in shakespeare.split_plays(s)] for s in shakespeare.SPLITS}
    assert splits == {s: [p.stem for p in shakespeare.split_plays(s)] for s in shakespeare.SPLITS}
    assert splits["heldout"] == list(shakespeare.HELDOUT) and splits["calib"] == list(shakespeare.CALIB)
    train, calib, heldout = (set(splits[s]) for s in shakespeare.SPLITS)
    assert not (train & heldout) and not (train & calib) and not (calib & heldout)
    assert train | calib | heldout == set(shakespeare.play_files())
    assert len(train) >= 30


def test_shakespeare_renders_plain_text():
    text = shakespeare.render_play(shakespeare.play_files()["macbeth"].read_text())
    assert text.startswith("Macbeth\n")
    assert "First Witch:\nWhen shall we three meet again\n" in text
    assert "**" not in text and "  \n" not in text and "\n#" not in text


def test_shakespeare_source_default_split_and_override():
    assert parse_source("shakespeare", split="heldout").split == "heldout"
    assert parse_source("shakespeare:train", split="heldout").split == "train"
    with pytest.raises(TailleError, match="unknown shakespeare split 'test'"):
        parse_source("shakespeare:test")


def test_wikitext2_needs_a_path(monkeypatch, tmp_path):
    monkeypatch.delenv("TAILLE_WIKITEXT2", raising=False)
    with pytest.raises(TailleError, match="wikitext2:/path/to/wiki.test.raw"):
        parse_source("wikitext2")
    (tmp_path / "wiki.test.raw").write_text(" = Valkyria = \n")
    assert parse_source(f"wikitext2:{tmp_path}").paths == (tmp_path / "wiki.test.raw",)
    monkeypatch.setenv("TAILLE_WIKITEXT2", str(tmp_path / "wiki.test.raw"))
    assert parse_source("wikitext2").kind == "wikitext2"


def test_hub_dataset_specs():
    assert parse_source("hf://HuggingFaceFW/fineweb-edu:sample-10BT:train").hf == (
        "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", None)
    assert parse_source("hf://roneneldan/TinyStories:validation").hf == ("roneneldan/TinyStories", None, "validation", None)
    assert parse_source("hf://org/chat:train:conversation").hf == ("org/chat", None, "train", "conversation")
    assert parse_source("hf://wikitext:wikitext-2-raw-v1:test:text").hf == ("wikitext", "wikitext-2-raw-v1", "test", "text")
    with pytest.raises(TailleError, match="expected hf://NAME"):
        parse_source("hf://just-a-name")


# --- bad input ------------------------------------------------------------------------------------


def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer, fresh_cache):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(TailleError, match=r"d\.jsonl:2: not valid JSON"):
        load_tokens(str(tmp_path / "d.jsonl"), tokenizer, progress=False)


def test_jsonl_without_text_or_messages(tmp_path, tokenizer, fresh_cache):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(TailleError, match=r"d\.jsonl:1: needs a 'text' field or a 'messages' list"):
        load_tokens(str(tmp_path / "d.jsonl"), tokenizer, progress=False)


def test_chat_without_template(tmp_path, fresh_cache):
    tokenizer = make_tokenizer(chat_template=None)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(TailleError, match=r"c\.jsonl:1: chat messages need a tokenizer with a chat template"):
        load_tokens(str(tmp_path / "c.jsonl"), tokenizer, progress=False)


def test_empty_corpus_and_too_short_for_a_block(tmp_path, tokenizer, fresh_cache):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(TailleError, match="no text found"):
        load_tokens(str(tmp_path / "empty.txt"), tokenizer, progress=False)
    (tmp_path / "short.txt").write_text("upon the heath")
    stream = load_tokens(str(tmp_path / "short.txt"), tokenizer, progress=False)
    with pytest.raises(TailleError, match="fewer than one block of 512"):
        stream.blocks(512)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(TailleError, match="no such file or folder"):
        parse_source(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(TailleError, match="unknown file type '.csv'"):
        parse_source(str(tmp_path / "data.csv"))
    (tmp_path / "none").mkdir()
    with pytest.raises(TailleError, match="folder has no"):
        parse_source(str(tmp_path / "none"))


def test_the_shipped_free_corpus_is_plain_text_and_the_chat_corpora_are_turns():
    """`free` (the teacher's free text) is read record by record as plain text, no chat template; the chat
    corpora need one."""
    import gzip

    free = parse_source("free")
    docs = list(sources_mod.documents(free))
    with gzip.open(free.paths[0], "rt") as f:
        records = [json.loads(line) for line in f]
    assert [text for text, _ in docs] == [r["text"] for r in records] and all(end for _, end in docs)
    assert len(records) > 1000
    with pytest.raises(TailleError, match="chat template"):
        list(sources_mod.documents(parse_source("chat"), make_tokenizer(chat_template=None)))
