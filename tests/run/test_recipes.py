"""Recipes: every shipped one parses and plans (configs only), bad ones are refused, and `taille run`
goes through every stage, resumes after a kill without redoing finished stages, and writes its report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from taille.errors import TailleError
from taille.run.recipe import load_recipe, parse_recipe, plan_recipe
from tests.conftest import kill_when_exists, run_cli, save_tiny, save_tiny_with
from tests.search.test_plan import LLAMA_31_8B, NEMO_12B

RECIPES = sorted((Path(__file__).parents[2] / "taille" / "recipes").glob("*.yaml"))
SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64)
CONFIGS = {"mistralai/Mistral-Nemo-Base-2407": NEMO_12B, "meta-llama/Llama-3.1-8B": LLAMA_31_8B,
           "smollm2-135m-instruct": SMOLLM2}
# what each shipped recipe must produce: (parameter count it must land within 1% of, shape or None)
EXPECTED = {
    "mistral-nemo-12b-to-8b": (8.4e9, {"hidden": 4096, "ffn": 11520, "heads": 32, "kv_heads": 8, "layers": 40}),
    "llama-3.1-8b-to-4b-width": (4.5e9, {"hidden": 3072, "ffn": 9216, "heads": 32, "kv_heads": 8, "layers": 32}),
    "llama-3.1-8b-to-4b-depth": (4.5e9, {"hidden": 4096, "ffn": 14336, "heads": 32, "kv_heads": 8, "layers": 16}),
    "smollm2-135m-to-90m": (89.39e6, {"hidden": 576, "ffn": 960, "heads": 9, "kv_heads": 3, "layers": 24}),
    "smollm2-135m-npc": (89.39e6, {"hidden": 576, "ffn": 960, "heads": 9, "kv_heads": 3, "layers": 24}),
    "smollm2-135m-to-90m-general": (89.88e6, {"hidden": 576, "ffn": 1184, "heads": 9, "kv_heads": 3, "layers": 21}),
}


def test_the_shipped_recipes_are_the_ones_this_test_knows():
    assert {p.stem for p in RECIPES} == set(EXPECTED) | {"smollm2-135m-search"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_parses_and_plans_without_weights(path):
    recipe = load_recipe(path)
    planned = plan_recipe(recipe, CONFIGS[recipe.teacher])
    if path.stem in EXPECTED:
        params, shape = EXPECTED[path.stem]
        assert planned["prune"]["shape"] == shape
        assert abs(planned["prune"]["params"] - params) / params < 0.01
    else:  # the search recipe: at least 6 candidates within 5% of 90M, the default width shape among them
        candidates = planned["search"]
        assert len(candidates) >= 6 and all(abs(c["params"] - 90e6) <= 0.05 * 90e6 for c in candidates)
        assert sum(c["default"] for c in candidates) == 1
        assert len({tuple(c["shape"].values()) for c in candidates}) == len(candidates)


def test_a_shipped_recipe_is_found_by_name():
    assert load_recipe("smollm2-135m-to-90m").name == "smollm2-135m-to-90m"
    with pytest.raises(TailleError, match="shipped recipe"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("change, message", [
    ({"distil": {}}, "unknown section(s) distil"),
    ({"distill": {"token": "1M"}}, "section 'distill': unknown key(s) token"),
    ({"distill": {"loss": {"kind": "fkl", "temp": 2}}}, "section 'distill.loss': unknown key(s) temp"),
    ({"teacher": None}, "'teacher' is required"),
    ({"prune": None}, "give a 'prune' target or a 'search' section"),
    ({"prune": {"params": "90M", "hidden": 480}}, "not both"),
    ({"distill": {"lr": 1e-4, "min_lr": 1e-3}}, "--min-lr"),
    ({"eval": {"windoww": 3}}, "section 'eval': unknown key(s) windoww"),
    ({"search": {"params": "90M", "axes": "mlp"}, "prune": None}, "section 'search': unknown key(s) axes"),
    ({"search": {"params": "90M", "candidates": 1}, "prune": None}, "--candidates must be at least 2"),
    ({"search": {"params": "90M"}, "prune": {"params": "90M"}}, "may only set criterion"),
    ({"roleplay": {"tokens": "10K"}}, "needs a 'personas' section"),
    ({"personas": {"count": 0}}, "--count 0"),
    ({"personas": {"cards": 3}}, "section 'personas': unknown key(s) cards"),
    ({"personas": {}, "roleplay": {"turns": 0}}, "--turns"),
    ({"personas": {}, "roleplay": {"prompts": "seed"}}, "section 'roleplay': unknown key(s) prompts"),
    ({"eval": {"persona": {"cards": 0}}}, "--persona-cards"),
    ({"importance": {"data": ""}}, "'importance': 'data' is a --data spec"),
])
def test_bad_recipes_say_what_is_wrong(change, message):
    values = {"name": "x", "teacher": "t", "data": "d", "prune": {"params": "90M"}, **change}
    with pytest.raises(TailleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(values)


def tiny_recipe(tmp_path, **extra) -> Path:
    teacher = save_tiny(tmp_path / "teacher", "llama", seed=1, tied=True)
    data = tmp_path / "train.txt"
    data.write_text("when shall we three meet again in thunder lightning or in rain upon the heath " * 300)
    values = {
        "name": "tiny", "teacher": str(teacher), "data": str(data), "out": str(tmp_path / "run"),
        "importance": {"samples": 8, "seq_len": 32, "batch_size": 4},
        "prune": {"hidden": 48, "ffn": 96},
        "distill": {"tokens": 4096, "seq_len": 32, "batch_size": 4, "lr": 3e-3, "warmup": 2, "eval_every": 8,
                    "save_every": 4, "log_every": 1, "precision": "fp32", "eval_data": str(data)},
        "eval": {"ppl": [str(data)], "window": 32, "max_tokens": 2048},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_an_importance_section_calibrates_on_its_own_data_and_distillation_reads_the_recipes(tmp_path, capsys):
    from taille.run.recipe import distill_config

    path = tiny_recipe(tmp_path)
    values = yaml.safe_load(path.read_text())
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat " * 300)
    values["importance"]["data"] = str(calib)
    path.write_text(yaml.safe_dump(values))
    run_cli(capsys, "run", path, "--until", "importance")
    record = json.loads((tmp_path / "run" / "importance" / "importance.json").read_text())
    assert record["calibration"]["data"] == str(calib)
    assert distill_config(load_recipe(path), "STUDENT", "OUT").data == values["data"] != str(calib)
    del values["importance"]["data"]  # without one: the recipe's data, as before
    values["out"] = str(tmp_path / "run2")
    path.write_text(yaml.safe_dump(values))
    run_cli(capsys, "run", path, "--until", "importance")
    record = json.loads((tmp_path / "run2" / "importance" / "importance.json").read_text())
    assert record["calibration"]["data"] == values["data"]


def test_run_goes_through_every_stage_and_reports(tmp_path, capsys):
    out, _ = run_cli(capsys, "run", tiny_recipe(tmp_path))
    run = tmp_path / "run"
    for done in ("importance/importance.json", "pruned/taille.json", "distilled/taille.json", "eval/eval.json",
                 "report.md", "report.html", "recipe.yaml", "timings.json"):
        assert (run / done).is_file(), done
    report = (run / "report.md").read_text()
    assert "| teacher |" in report and "| pruned |" in report and "| distilled |" in report
    assert "![" in report and "## Importance" in report
    html = (run / "report.html").read_text()
    assert "<table>" in html and 'src="distilled/curves.png"' in html
    assert "teacher vs pruned vs distilled" in out and "report:" in out
    # a different recipe in the same run folder is refused, naming what differs
    values = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    values["distill"]["lr"] = 1e-3
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(values))
    _, err = run_cli(capsys, "run", tmp_path / "other.yaml", code=2)
    assert "another recipe" in err and "distill" in err


def test_export_stage_writes_verified_gguf_files(tmp_path, capsys, smollm2):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e .[export])")
    from taille.models.load import load_tokenizer

    path = tiny_recipe(tmp_path, export={"quants": ["f16", "q8_0"]})
    values = yaml.safe_load(path.read_text())
    values["teacher"] = str(save_tiny_with(tmp_path / "teacher-smol", "llama", load_tokenizer(smollm2), tied=True,
                                           head_scale=40))
    path.write_text(yaml.safe_dump(values))
    out, _ = run_cli(capsys, "run", path)
    run = tmp_path / "run"
    records = json.loads((run / "export" / "export.json").read_text())
    assert [r["quant"] for r in records] == ["f16", "q8_0"]
    assert all((run / "export" / f"tiny-{q}.gguf").is_file() for q in ("f16", "q8_0"))
    assert records[0]["verify"]["top1_agreement"] >= 0.99 and records[0]["verify"]["passed"]
    assert "on-device:" in out and "taille chat" in out
    assert "On-device files (GGUF, llama.cpp)" in (run / "report.md").read_text()
    with pytest.raises(TailleError, match="unknown --quant 'q9'"):
        parse_recipe({**values, "export": {"quants": ["q9"]}})


def test_a_killed_run_resumes_without_redoing_finished_stages(tmp_path):
    recipe = tiny_recipe(tmp_path, distill={"tokens": 16384, "seq_len": 32, "batch_size": 4, "lr": 3e-3, "warmup": 2,
                                            "eval_every": 64, "save_every": 8, "log_every": 1, "precision": "fp32",
                                            "eval_data": "none"})
    run = tmp_path / "run"
    env = {**os.environ, "TAILLE_LOG": "INFO"}
    kill_when_exists([sys.executable, "-m", "taille", "run", str(recipe)], env, run / "distilled" / "checkpoints" / "latest",
                     300)
    assert (run / "distilled" / "checkpoints" / "latest").exists() and not (run / "distilled" / "taille.json").exists()
    stamps = {p: (run / p).stat().st_mtime_ns for p in ("importance/importance.json", "pruned/taille.json")}
    again = subprocess.run([sys.executable, "-m", "taille", "run", str(recipe)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage importance: done already" in again.stderr and "stage prune: done already" in again.stderr
    assert "resuming from" in again.stderr
    assert {p: (run / p).stat().st_mtime_ns for p in stamps} == stamps
    steps = [json.loads(line)["step"] for line in (run / "distilled" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 129))  # every step once: the resumed part continued, nothing twice
    assert (run / "report.md").is_file()


def test_search_ranks_candidates_and_prunes_the_winner(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, prune=None, search={"params": "70K", "candidates": 3, "steps": 4, "seq_len": 32,
                                                      "batch_size": 4, "top_k": 16, "tolerance": 0.3})
    values = yaml.safe_load(recipe.read_text())
    del values["prune"]
    recipe.write_text(yaml.safe_dump(values))
    run_cli(capsys, "run", recipe, "--until", "prune")
    board = json.loads((tmp_path / "run" / "search" / "leaderboard.json").read_text())
    losses = [c["eval_loss"] if c["eval_loss"] is not None else c["train_loss"] for c in board["candidates"]]
    assert len(losses) == 3 and losses == sorted(losses)
    assert sum(c["default"] for c in board["candidates"]) == 1
    assert (tmp_path / "run" / "search" / "leaderboard.png").is_file()
    pruned = json.loads((tmp_path / "run" / "pruned" / "taille.json").read_text())
    assert pruned["shape_after"] == board["winner"]["shape"]
    assert yaml.safe_load((tmp_path / "run" / "search" / "winner.yaml").read_text()) == {"prune": board["winner"]["shape"]}
    assert not (tmp_path / "run" / "distilled").exists()  # --until prune


def test_recovery_is_the_share_of_lost_log_perplexity_won_back():
    import math

    from taille.run.report import recovery

    rows = [{"model": m, "ppl": {"text": {"ppl": math.exp(v)}}} for m, v in (("t", 2.0), ("p", 4.0), ("d", 2.5))]
    report = {"rows": rows, "labels": {"t": "teacher", "p": "pruned", "d": "distilled"}}
    assert recovery(report) == pytest.approx(0.75)
    rows[1]["ppl"]["text"]["ppl"] = math.exp(1.0)  # pruning lost nothing: no share to speak of
    assert recovery(report) is None


def test_dry_run_prints_the_planned_shapes_and_runs_nothing(tmp_path, capsys):
    out, _ = run_cli(capsys, "run", tiny_recipe(tmp_path), "--dry-run")
    assert "planned shapes" in out and "prune target" in out and "48" in out
    assert not (tmp_path / "run").exists()
