"""One source of truth: the CLI and a recipe build each stage's settings from the same dataclass, so a
verb run with no options and a recipe section left empty give the same settings (teacher correction's
learning rate once differed: 2e-5 from the CLI, 1e-5 from a recipe)."""

from __future__ import annotations

import dataclasses

import pytest

from taille.run.recipe import (
    correct_config, distill_config, eval_settings, importance_config, parse_recipe, prune_config,
)
from tests.conftest import run_cli

PATHS = {"out", "student", "teacher", "model", "data", "scores", "resume"}
"""What the recipe's run decides itself (folders, which model), not settings."""


def captured(monkeypatch, module: str, name: str):
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **k: seen.append((a, k)) or _stop())
    return seen


class _Stop(Exception):
    pass


def _stop():
    raise _Stop


def settings_of(seen):
    (args, kwargs), = seen
    value, = [v for v in (*args, *kwargs.values()) if dataclasses.is_dataclass(v)]
    return {k: v for k, v in dataclasses.asdict(value).items() if k not in PATHS}


RECIPE = parse_recipe({"name": "r", "teacher": "T", "data": "D", "prune": {"params": "50K"}, "correct": {},
                       "distill": {}, "eval": {"ppl": ["D"]}})


@pytest.mark.parametrize("verb,module,name,cli_args,from_recipe", [
    ("correct", "taille.distill.train", "distill", ["--teacher", "T", "--data", "D", "--out", "O"],
     lambda: correct_config(RECIPE, "O").distill_config()),
    ("distill", "taille.distill.train", "distill", ["--student", "S", "--teacher", "T", "--data", "D", "--out", "O"],
     lambda: dataclasses.replace(distill_config(RECIPE, "S", "O"), resume=False)),
    ("importance", "taille.prune.prune", "run_importance", ["-m", "T", "--data", "D"],
     lambda: importance_config(RECIPE, "T", "O")),
    ("prune", "taille.prune.prune", "run_prune", ["-m", "T", "--out", "O", "--params", "50K", "--scores", "S"],
     lambda: prune_config(RECIPE, "T", "O", "S")),
    ("eval", "taille.eval.run", "evaluate", ["T", "--ppl", "D"], lambda: eval_settings(RECIPE)),
])
def test_the_cli_and_a_recipe_build_the_same_settings(monkeypatch, capsys, verb, module, name, cli_args, from_recipe):
    seen = captured(monkeypatch, module, name)
    with pytest.raises(_Stop):
        from taille.cli import main

        main([verb, *cli_args])
    from_cli = settings_of(seen)
    recipe = {k: v for k, v in dataclasses.asdict(from_recipe()).items() if k not in PATHS}
    assert from_cli == recipe


def test_the_recipe_correction_stage_runs_the_distillation_settings(monkeypatch, tmp_path):
    from taille.distill.config import DistillConfig
    from taille.run.pipeline import stage_correct

    seen = captured(monkeypatch, "taille.distill.train", "distill")
    with pytest.raises(_Stop):
        stage_correct(RECIPE, tmp_path, "T")
    (args, _), = seen
    assert isinstance(args[0], DistillConfig) and args[0].loss.ce_weight == 1 and args[0].loss.kd == 0
    assert args[0].lr == 2e-5 and args[0].min_lr == pytest.approx(2e-6) and args[0].warmup == 20


def test_a_config_file_gives_lists_and_single_texts_as_a_recipe_would(monkeypatch, tmp_path):
    seen = captured(monkeypatch, "taille.eval.run", "evaluate")
    (tmp_path / "eval.yaml").write_text("tasks: [arc_easy, piqa]\nppl: shakespeare\n")
    with pytest.raises(_Stop):
        from taille.cli import main

        main(["eval", "T", "--config", str(tmp_path / "eval.yaml")])
    (args, _), = seen
    assert args[1].tasks == ["arc_easy", "piqa"] and args[1].ppl == ["shakespeare"]
