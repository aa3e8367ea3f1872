"""Personas, the reply engine (context window, forbidden phrases) and `taille chat` driven through a
terminal by pexpect, on the embedded SmolLM2 GGUF in llama.cpp."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from taille.chat.engine import PhraseGuard
from taille.chat.persona import load_persona, load_personas, shipped_personas
from taille.errors import TailleError


def test_shipped_personas_load_with_ids():
    personas = load_personas(shipped_personas())
    assert set(personas) == {"brenna-ironhand", "old-tam", "halcyon", "sella-vey"}
    brenna = personas["brenna-ironhand"]
    prompt = brenna.system_prompt()
    assert "You are Brenna Ironhand" in prompt and "Ashpit mine" in prompt and '"as an AI"' in prompt
    assert brenna.action_schema is None and "JSON" not in prompt
    merchant = personas["sella-vey"]  # the one that answers in structured actions
    assert merchant.action_schema["required"] == ["say", "emotion", "action"]
    assert '"action": one of "none", "trade"' in merchant.system_prompt() and hash(merchant)


@pytest.mark.parametrize("text, message", [
    ("name: X\n", "missing role"),
    ("name: X\nrole: smith\nmood: grim\n", "unknown keys mood"),
    ("- a list\n", "a mapping"),
    ("name: X\nrole: smith\nknowledge: {a: 1}\n", "'knowledge' must be a list"),
    ("name: X\nrole: smith\ntemperature: 5\n", "temperature must be in [0, 2]"),
    ("name: [X\n", "not valid YAML"),
    ("name: X\nrole: smith\nrepeat_penalty: 0.5\n", "repeat_penalty in [1, 2]"),
])
def test_bad_persona_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(TailleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_persona(path)


def test_two_files_with_one_id_are_refused(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text("name: Old Tam\nrole: innkeeper\n")
    with pytest.raises(TailleError, match="already taken"):
        load_personas(tmp_path)


def test_guard_cuts_before_a_forbidden_phrase_split_across_pieces():
    guard = PhraseGuard(("as an AI",))
    out, blocked = "", False
    for piece in ["Well, trav", "eller, speaking as", " an a", "i, I think"]:
        safe, blocked = guard.feed(piece)
        out += safe
        if blocked:
            break
    assert blocked and out.rstrip() == "Well, traveller, speaking"
    guard = PhraseGuard(("as an AI",))
    text = "".join(guard.feed(p)[0] for p in ["no phrase ", "here, as a", "n aside"]) + guard.flush()
    assert text == "no phrase here, as an aside"


llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")


@pytest.fixture(scope="module")
def llm(smollm2):
    from taille.chat.engine import gguf_for
    from taille.models.llamacpp import open_gguf

    return open_gguf(gguf_for(smollm2), n_ctx=256)


def test_old_turns_are_dropped_to_fit_the_context(llm):
    from taille.chat.engine import ContextFull, fit_messages

    system = {"role": "system", "content": "You are a smith."}
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"Question {i}: what do you think of the weather today?"},
                  {"role": "assistant", "content": f"Answer {i}: cold, grey and windy, like every day here."}]
    messages = [system, *turns, {"role": "user", "content": "And tomorrow?"}]
    kept, ids, dropped = fit_messages(llm, messages, room=64)
    assert dropped > 0 and len(ids) <= 256 - 64
    assert kept[0] == system and kept[-1]["content"] == "And tomorrow?" and kept[1]["role"] == "user"
    with pytest.raises(ContextFull, match="context window is 256"):
        fit_messages(llm, [system, {"role": "user", "content": "word " * 400}], room=64)


def test_a_reply_never_opens_a_new_turn(llm):
    """After a closed assistant turn SmolLM2 goes on with `<|im_start|>user ...`: llama.cpp alone would hand
    the player "user\nI'm a traveler..." (the control token detokenizes to nothing); with the control tokens
    banned the model ends its reply instead, at once."""
    from taille.chat.engine import Reply, control_ids, stream_reply
    from taille.models.llamacpp import prompt_ids

    closed = ("<|im_start|>system\nYou are Brenna, a smith.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
              "<|im_start|>assistant\nHello, traveller. What brings you to my forge?<|im_end|>\n")
    ids = llm.tokenize(closed.encode(), add_bos=False, special=True)
    first = next(iter(llm.generate(ids, temp=0)))
    assert first in control_ids(llm) and llm.detokenize([first], special=True) == b"<|im_start|>"
    assert llm.create_completion(prompt=ids, max_tokens=8, temperature=0)["choices"][0]["text"].startswith("user")
    reply = Reply()
    assert "".join(stream_reply(llm, ids, reply, 8, temperature=0)) == "" and reply.finish_reason == "stop"
    for seed in range(16):  # sampled, too: no reply of 16 seeds shows a role
        text = "".join(stream_reply(llm, ids, Reply(), 8, temperature=1.0, top_p=1.0, seed=seed))
        assert not text.lstrip().startswith(("user", "assistant", "system")), (seed, text)
    # an ordinary reply runs to its own end of turn
    asked = prompt_ids(llm, [{"role": "system", "content": "You are Brenna, a smith."}, {"role": "user", "content": "Hello!"}])
    reply = Reply()
    assert len("".join(stream_reply(llm, asked, reply, 24, temperature=0)).split()) >= 2 and reply.tokens >= 2


def test_the_persona_eval_bans_what_chat_bans(llm, smollm2):
    """The eval's chat sampler (PyTorch, the Hugging Face tokenizer) and `taille chat` (llama.cpp, the GGUF)
    ban the same tokens on the real SmolLM2: the GGUF's non-end-of-generation control tokens."""
    from taille.characters.evaluate import control_ids as eval_bans
    from taille.chat.engine import banned
    from taille.models.load import load_tokenizer

    chat_bans = set(banned(llm).ids.tolist())
    assert llm.tokenize(b"<|im_start|>", add_bos=False, special=True)[0] in chat_bans
    assert set(eval_bans(load_tokenizer(smollm2))) == chat_bans


@pytest.mark.slow
def test_three_turn_terminal_chat(smollm2, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TAILLE_CACHE": os.environ["TAILLE_CACHE"], "HF_HUB_OFFLINE": "1"}
    child = pexpect.spawn(
        sys.executable, ["-m", "taille", "chat", smollm2, "--persona", str(shipped_personas() / "blacksmith.yaml"),
                         "--max-tokens", "24", "--seed", "3"],
        env=env, encoding="utf-8", timeout=120)
    child.expect_exact("Brenna Ironhand> Traveller. Need something mended")
    for question in ("Can you mend my sword?", "Where is the coal?", "What sings in the mine?"):
        child.expect_exact("you> ")
        child.sendline(question)
        child.expect(r"Brenna Ironhand> (.*)\r\n")
        assert child.match.group(1).strip(), f"no reply to {question!r}"
    child.expect_exact("you> ")
    time.sleep(0.5)  # let input() block first
    child.kill(signal.SIGINT)  # Ctrl-C at the prompt leaves cleanly
    child.expect_exact("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
