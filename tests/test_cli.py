import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli, save_tiny


@pytest.mark.parametrize("verb,words", [
    ("info", ["MODEL", "--json", "Hub id", "prunable axes"]),
    ("eval", ["MODEL...", "--ppl", "--window", "--stride", "--precision", "--max-tokens", "--batch-size", "--tasks",
              "--task-data", "--limit", "--num-fewshot", "--speed", "--reference"]),
    ("importance", ["--model", "--data", "--samples", "--seq-len", "--depth-metric", "--block-sizes"]),
    ("prune", ["--params", "--ratio", "--axes", "--hidden", "--ffn", "--heads", "--kv-heads", "--layers",
               "--drop-layers", "--criterion", "--depth-criterion", "--scores"]),
])
def test_verb_help_documents_its_options(capsys, verb, words):
    out, _ = run_cli(capsys, verb, "-h")
    for word in words:
        assert word in out, word


def test_top_level_help_lists_verbs(capsys):
    out, _ = run_cli(capsys, "--help")
    assert "info" in out and "eval" in out


def test_config_file_with_flag_override(tmp_path, capsys):
    model = save_tiny(tmp_path / "m")
    (tmp_path / "held.txt").write_text("upon the heath there to meet with macbeth " * 30)
    (tmp_path / "eval.yaml").write_text(
        f"ppl: [{tmp_path / 'held.txt'}]\nwindow: 32\nbatch-size: 2\nprecision: fp32\njson: true\n")
    out, _ = run_cli(capsys, "eval", model, "--config", tmp_path / "eval.yaml", "--window", 48)
    (row,) = json.loads(out)["rows"]
    (result,) = row["ppl"].values()
    assert result["window"] == 48  # the flag wins over the file
    assert result["precision"] == "fp32"  # the file wins over the default


def test_config_file_errors(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("windw: 32\n")
    _, err = run_cli(capsys, "eval", "m", "--config", tmp_path / "bad.yaml", code=2)
    assert "unknown option 'windw' for `taille eval`" in err and "window" in err
    _, err = run_cli(capsys, "eval", "m", "--config", tmp_path / "none.yaml", code=2)
    assert "no such file" in err


def test_import_stays_light():
    code = "import sys, taille, taille.cli; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m(tmp_path):
    result = subprocess.run([sys.executable, "-m", "taille", "info", "-h"], capture_output=True, text=True)
    assert result.returncode == 0 and "prunable axes" in result.stdout


def test_ctrl_c_anywhere_exits_130_with_one_line(monkeypatch, capsys):
    import taille.search.plan as plan_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_module, "plan", interrupted)
    _, err = run_cli(capsys, "plan", "smollm2-135m-instruct", "--params", "90M", code=130)
    assert "taille: interrupted" in err.splitlines() and "Aborted" not in err


def test_sigint_during_a_distillation_exits_130(tmp_path):
    import os
    import signal
    import time

    teacher = save_tiny(tmp_path / "t", seed=1)
    (tmp_path / "d.txt").write_text("when shall we three meet again in thunder lightning or in rain " * 300)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "taille", "distill", "--student", str(teacher), "--teacher",
                             str(teacher), "--data", str(tmp_path / "d.txt"), "--out", str(out), "--tokens", "100M",
                             "--seq-len", "32", "--batch-size", "2", "--log-every", "1", "--precision", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TAILLE_LOG": "WARNING"},
                            # Ctrl-C at a terminal, also when pytest itself runs as a background job (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "taille: interrupted" in err.splitlines() and "Traceback" not in err and "Aborted" not in err
