"""llama.cpp's converter and quantizer log a line per tensor; `export_gguf` keeps that log to itself unless
asked (`verbose=True`), and quotes its end when a tool fails. Checked at the file-descriptor level (capfd):
the quantizer runs inside this process, in C."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli, save_tiny_with

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")

QUANTIZE_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+\S+\.weight", re.M)
"""llama.cpp's quantizer, per tensor: `[   3/  20]   blk.0.attn_k.weight - [   32,    16, ...], type = ...`"""
CONVERT_LINE = re.compile(r"hf-to-gguf:blk\.0\.attn_k\.weight")
"""llama.cpp's converter, per tensor: `INFO:hf-to-gguf:blk.0.attn_k.weight, torch.float32 --> F16, ...`"""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2):
    """A tiny random-init llama (hidden 64, 2 layers) with SmolLM2's tokenizer, which the converter knows."""
    from taille.models.load import load_tokenizer

    return save_tiny_with(tmp_path_factory.mktemp("tiny") / "llama", "llama", load_tokenizer(smollm2), head_scale=40)


@pytest.mark.slow  # runs llama.cpp's converter and quantizer
def test_export_keeps_llama_cpp_logs_unless_verbose(tmp_path, tiny_llama, capfd):
    from taille.export.gguf import export_gguf

    capfd.readouterr()
    record = export_gguf(str(tiny_llama), tmp_path / "quiet.gguf", "q8_0")
    out, err = capfd.readouterr()
    assert record["tensor_types"].get("q8_0")
    assert not QUANTIZE_LINE.search(out + err), (out + err)[-2000:]
    assert not CONVERT_LINE.search(out + err), (out + err)[-2000:]
    assert len((out + err).splitlines()) < 10, out + err  # a few progress/info lines at most, not one per tensor

    export_gguf(str(tiny_llama), tmp_path / "loud.gguf", "q8_0", verbose=True)
    out, err = capfd.readouterr()
    assert len(QUANTIZE_LINE.findall(out + err)) >= 10, (out + err)[-2000:]
    assert CONVERT_LINE.search(out + err), (out + err)[-2000:]


@pytest.mark.slow  # runs llama.cpp's quantizer
def test_a_failing_quantizer_is_quiet_and_quotes_its_log(tmp_path, capfd):
    from taille.errors import TailleError
    from taille.export.gguf import quantize
    from taille.models.quant import get_quant

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a header that promises tensors it does not have
    capfd.readouterr()
    with pytest.raises(TailleError) as info:
        quantize(bad, tmp_path / "out.gguf", get_quant("q8_0"))
    out, err = capfd.readouterr()
    message = str(info.value)
    assert "quantizer failed" in message
    assert "\n" in message and "quantize" in message.split("\n", 1)[1], message  # the log's last lines
    assert out == "" and err == "", (out, err)


@pytest.mark.slow  # runs llama.cpp's converter and quantizer
def test_cli_quiet_export_still_prints_its_summary(tmp_path, tiny_llama, capfd):
    stdout, _ = run_cli(capfd, "export", tiny_llama, "--quant", "q8_0", "--out", tmp_path / "c.gguf")
    assert stdout.startswith("wrote ") and not QUANTIZE_LINE.search(stdout)
