"""The engine's start-up failures are one clear line naming its log (no model needed)."""

from __future__ import annotations

import pytest

from taille.errors import TailleError


def fake_engine(tmp_path, monkeypatch, script: str):
    """A LlamaServer whose binary is a shell script."""
    from taille.serve.engine import LlamaServer

    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setenv("TAILLE_LLAMA_SERVER", str(fake))
    return LlamaServer(tmp_path / "model.gguf", parallel=1, n_ctx=256, log_path=tmp_path / "engine.log")


def test_an_engine_that_exits_while_starting_names_its_log(tmp_path, monkeypatch):
    engine = fake_engine(tmp_path, monkeypatch, "echo 'error: failed to load model' >&2\nexit 1\n")
    with pytest.raises(TailleError, match="exited with status 1 while starting; its log: .*engine.log"):
        engine.start(timeout=30)
    assert "failed to load model" in (tmp_path / "engine.log").read_text()  # the log holds the engine's words


def test_an_engine_that_never_answers_is_stopped_and_named(tmp_path, monkeypatch):
    engine = fake_engine(tmp_path, monkeypatch, "exec sleep 60\n")
    with pytest.raises(TailleError, match="did not answer /health within 1 s"):
        engine.start(timeout=1)
    assert not engine.alive()  # stopped, not left behind


def test_a_missing_or_stale_engine_says_how_to_build_it(tmp_path, monkeypatch):
    import taille.serve.engine as engine

    monkeypatch.delenv("TAILLE_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(engine, "binary_path", lambda: tmp_path / "taille-llama-server")
    with pytest.raises(TailleError, match="python -m taille.serve.engine build"):
        engine.find_binary()
    pytest.importorskip("llama_cpp", reason="a stale build is told from the installed llama-cpp-python's version")
    (tmp_path / "taille-llama-server").write_text("")
    (tmp_path / "taille-llama-server.json").write_text('{"llama_cpp_python": "0.0.1"}')
    with pytest.raises(TailleError, match="built for llama-cpp-python 0.0.1"):
        engine.find_binary()
