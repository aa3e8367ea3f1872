"""A recipe with characters: `taille run` composes the cards, has the teacher write role-play from the train half
into the run, distils on a mixture where `roleplay` names that file, and does neither again on a second run;
the evaluation scores characters on the run's cards against the teacher."""

import json
from pathlib import Path

import yaml

from taille.characters.cards import load_half
from taille.run.recipe import data_spec, eval_settings, load_recipe
from tests.characters.test_roleplay import ScriptedTeacher
from tests.conftest import run_cli
from tests.run.test_recipes import tiny_recipe


def character_recipe(tmp_path) -> Path:
    """tests/run/test_recipes.py's tiny recipe, with cards and role-play in a half-and-half mixture."""
    path = tiny_recipe(tmp_path, name="tiny-npc", personas={"count": 8, "seed": 0},
                       roleplay={"tokens": 200, "conversations": 1, "turns": 2, "max_new_tokens": 16, "batch_size": 8})
    values = yaml.safe_load(path.read_text())
    values["data"] = f"roleplay:0.5,{values['data']}:0.5"
    values["distill"]["tokens"] = 1024
    path.write_text(yaml.safe_dump(values))
    return path


class Teachers:
    """Hands the role-play stage a scripted teacher (the tiny random model would never write a sentence),
    built on the cards the stage reads; keeps each one it made."""

    def __init__(self):
        self.made: list[ScriptedTeacher] = []

    def __call__(self, s):
        teacher = ScriptedTeacher(load_half(s.personas, "train"), script=("good",), max_new_tokens=s.max_new_tokens)
        self.made.append(teacher)
        return teacher.engine()


def run_until_prefer(path: Path, capsys, monkeypatch) -> list[str]:
    """`taille run PATH --until prefer` with scripted teachers and a student whose every draw says what no character
    may (each turn gives a pair); returns the students the prefer stage drew from."""
    from taille.generate.generate import Engine

    monkeypatch.setattr("taille.generate.generate.pick_engine", Teachers())
    students = []

    def broken_student(s, out):
        students.append(s.student)
        return Engine("scripted", True, render=lambda p: p, render_text=lambda t: t, count=lambda t: len(t.split()),
                      sample=lambda rendered, n, seed: [("I am only a language model.", 6)] * len(rendered),
                      render_messages=lambda messages: messages[-1]["content"])

    monkeypatch.setattr("taille.characters.prefer.student_engine", broken_student)
    run_cli(capsys, "run", path, "--until", "prefer")
    return students


def evaluated(recipe, run: Path, monkeypatch) -> dict:
    """The eval stage of `run`, its evaluation replaced by a record of the models and labels it was given."""
    from taille.run import pipeline

    seen = {}
    monkeypatch.setattr("taille.eval.run.evaluate", lambda models, s, out: seen.setdefault("models", models) and {})
    monkeypatch.setattr("taille.eval.run.write_report", lambda report, out: seen.setdefault("labels", report["labels"]))
    pipeline.stage_eval(recipe, run, recipe.teacher)
    return seen


def refuse(s):
    raise AssertionError("the role-play stage asked for a teacher again")



def test_run_makes_cards_and_role_play_and_distils_on_them_once(tmp_path, capsys, monkeypatch):
    teachers = Teachers()
    monkeypatch.setattr("taille.generate.generate.pick_engine", teachers)
    recipe = character_recipe(tmp_path)
    run_cli(capsys, "run", recipe, "--until", "distill")
    run, data = tmp_path / "run", str(tmp_path / "train.txt")

    cards = json.loads((run / "personas" / "cards.json").read_text())
    train, heldout = load_half(run / "personas", "train"), load_half(run / "personas", "heldout")
    assert cards == {"count": 8, "seed": 0, "train": len(train), "heldout": len(heldout)}
    assert len(train) + len(heldout) == 8 and train and heldout

    own = run / "roleplay" / "roleplay.jsonl"
    records = [json.loads(line) for line in own.read_text().splitlines()]
    done = json.loads((run / "roleplay" / "done.json").read_text())
    assert done["finished"] and done["tokens_kept"] == sum(r["tokens"] for r in records) >= 200
    assert done["personas"] == str(run / "personas" / "train") and done["settings"]["turns"] == 2
    # the teacher played the train half only, with each card's own system prompt
    assert len(teachers.made) == 1
    seen = {conversation[0]["content"] for conversation in teachers.made[0].asked}
    assert seen and seen <= {p.system_prompt() for p in train.values()}
    assert not seen & {p.system_prompt() for p in heldout.values()}
    assert {r["persona"] for r in records} <= set(train)

    # the distillation drew from the run's role-play file and the text, half and half
    distilled = json.loads((run / "distilled" / "taille.json").read_text())["distill"]
    assert distilled["config"]["data"] == f"{own}:0.5,{data}:0.5"
    assert {part["source"]: part["weight"] for part in distilled["data"]} == {str(own): 0.5, data: 0.5}
    assert all(part["drawn"] > 0 for part in distilled["data"])
    assert not (run / "eval").exists()  # --until distill

    # again: cards and role-play are done, so nothing is rewritten and no teacher is asked for
    outputs = [run / "personas" / "cards.json", *sorted((run / "personas").glob("*/*.yaml")), own,
               Path(f"{own}.meta.json"), run / "roleplay" / "done.json", run / "distilled" / "taille.json"]
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    monkeypatch.setattr("taille.generate.generate.pick_engine", refuse)
    run_cli(capsys, "run", recipe, "--until", "distill")
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps


def test_characters_are_scored_on_the_runs_cards_against_the_teacher(tmp_path):
    recipe = load_recipe(character_recipe(tmp_path))
    run = tmp_path / "run"
    s = eval_settings(recipe, run, "CORRECTED")
    assert s.personas == str(run / "personas") and s.reference == "CORRECTED"
    assert eval_settings(recipe, run).reference == recipe.teacher
    assert s.ppl == [str(tmp_path / "train.txt")]  # the section's own evaluation stays
    # the recipe's `roleplay` is the run's file in a run, the shipped corpus outside one
    assert data_spec(recipe, run) == f"{run / 'roleplay' / 'roleplay.jsonl'}:0.5,{tmp_path / 'train.txt'}:0.5"
    assert data_spec(recipe) == recipe.data


def test_a_prefer_section_tunes_the_distilled_student_on_the_runs_role_play_and_the_rest_follow_it(tmp_path, capsys,
                                                                                                  monkeypatch):
    from taille.run import pipeline
    from taille.run.recipe import final_student

    path = character_recipe(tmp_path)
    values = yaml.safe_load(path.read_text())
    values["prefer"] = {"samples": 2, "epochs": 1, "batch_size": 2, "max_length": 8192, "precision": "fp32"}
    values["export"] = {"quants": ["f16"], "verify": False}
    path.write_text(yaml.safe_dump(values))
    students = run_until_prefer(path, capsys, monkeypatch)
    run = tmp_path / "run"
    record = json.loads((run / "preferred" / "taille.json").read_text())["prefer"]
    assert students == [str(run / "distilled")]
    assert record["settings"]["data"] == str(run / "roleplay" / "roleplay.jsonl")
    assert record["settings"]["personas"] == str(run / "personas")
    turns = sum(m["role"] == "assistant" for line in (run / "roleplay" / "roleplay.jsonl").read_text().splitlines()
                for m in json.loads(line)["messages"])
    assert record["pairs"]["pairs"] == turns and record["pairs"]["pairs_by_rejection"]["never"] == turns
    recipe = load_recipe(path)
    assert final_student(recipe, run) == run / "preferred"

    # the evaluation scores the preferred student beside the distilled one
    seen = evaluated(recipe, run, monkeypatch)
    assert seen["models"][-2:] == [str(run / "distilled"), str(run / "preferred")]
    assert seen["labels"][str(run / "preferred")] == "preferred"
    # the export writes the preferred student
    exported = []
    monkeypatch.setattr("taille.export.gguf.export_gguf", lambda student, out, quant, **kw: exported.append(student)
                        or {"out": out, "quant": quant, "bytes": 1})
    (run / "export").mkdir()
    pipeline.stage_export(recipe, run, recipe.teacher)
    assert exported == [str(run / "preferred")]
    pipeline.stage_report(recipe, run, recipe.teacher)
    report = (run / "report.md").read_text()
    assert "Preference tuning" in report and f"{turns:,} pairs from {turns:,} role-play turns" in report


def test_a_bad_prefer_section_fails_when_the_recipe_is_read(tmp_path):
    import pytest

    from taille.errors import TailleError

    path = character_recipe(tmp_path)
    for section, message in (({"sampels": 2}, r"unknown key\(s\) sampels"), ({"beta": 0}, "--beta"),
                             ({"student": "x"}, r"unknown key\(s\) student")):
        values = yaml.safe_load(path.read_text())
        values["prefer"] = section
        path.write_text(yaml.safe_dump(values))
        with pytest.raises(TailleError, match=message):
            load_recipe(path)


def test_hostile_answers_and_an_sft_stage_run_between_distillation_and_prefer(tmp_path, capsys, monkeypatch):
    """The character chain as sections: the teacher answers hostile lines on the train cards (RUN/hostile), a CE
    stage on the run's role-play and those answers follows distillation with no teacher (RUN/sft), DPO starts from
    it on the hostile answers, and the evaluation, the export and the report follow it."""
    from taille.characters.lines import ADVERSARIAL_TRAIN
    from taille.run import pipeline
    from taille.run.recipe import final_student

    path = character_recipe(tmp_path)
    values = yaml.safe_load(path.read_text())
    values["hostile"] = {"tokens": 100, "conversations": 1, "turns": 1, "max_new_tokens": 16, "batch_size": 8,
                         "kinds": "adversarial:1", "retries": 1}
    values["sft"] = {"data": "roleplay:0.6,hostile:0.4", "tokens": 512, "seq_len": 32, "batch_size": 4, "lr": 1e-3,
                     "warmup": 1, "save_every": 8, "loss_on": "replies", "precision": "fp32",
                     "loss": {"ce_weight": 1, "kd_weight": 0}}
    values["prefer"] = {"data": "hostile", "samples": 2, "epochs": 1, "batch_size": 2, "max_length": 8192,
                        "precision": "fp32"}
    path.write_text(yaml.safe_dump(values))
    students = run_until_prefer(path, capsys, monkeypatch)
    run = tmp_path / "run"
    hostile, roleplay = run / "hostile" / "hostile.jsonl", run / "roleplay" / "roleplay.jsonl"

    records = [json.loads(line) for line in hostile.read_text().splitlines()]
    done = json.loads((run / "hostile" / "done.json").read_text())
    assert done["finished"] and done["settings"]["kinds"] == "adversarial:1"
    assert records and {r["messages"][1]["content"] for r in records} <= set(ADVERSARIAL_TRAIN)
    assert {r["persona"] for r in records} <= set(load_half(run / "personas", "train"))

    sft = json.loads((run / "sft" / "taille.json").read_text())["distill"]
    assert sft["config"]["student"] == str(run / "distilled") and sft["config"]["teacher"] is None
    assert {part["source"]: part["weight"] for part in sft["data"]} == {str(roleplay): 0.6, str(hostile): 0.4}
    assert sft["tokens"] >= 512 and sft["config"]["loss"]["ce_weight"] == 1

    prefer = json.loads((run / "preferred" / "taille.json").read_text())["prefer"]
    assert students == [str(run / "sft")] and prefer["settings"]["data"] == str(hostile)
    assert prefer["pairs"]["turns"] == len(records)
    recipe = load_recipe(path)
    assert final_student(recipe, run) == run / "preferred"

    seen = evaluated(recipe, run, monkeypatch)
    assert seen["models"][-3:] == [str(run / "distilled"), str(run / "sft"), str(run / "preferred")]
    pipeline.stage_report(recipe, run, recipe.teacher)
    report = (run / "report.md").read_text()
    assert "Second training stage (sft)" in report and f"on {roleplay}:0.6,{hostile}:0.4" in report


def test_hostile_data_without_its_section_is_refused_when_the_recipe_is_read(tmp_path):
    import pytest

    from taille.errors import TailleError

    path = character_recipe(tmp_path)
    base = yaml.safe_load(path.read_text())
    for change, message in (({"sft": {"data": "roleplay:0.6,hostile:0.4"}}, "add a 'hostile' section"),
                            ({"prefer": {"data": "hostile"}}, "add a 'hostile' section"),
                            ({"sft": {"tokens": "64K", "student": "x"}}, r"section 'sft': unknown key\(s\) student"),
                            ({"sft": {"loss": {"ce": 1}}}, r"section 'sft.loss': unknown key\(s\) ce"),
                            ({"hostile": {"kinds": "adversarial:1"}, "personas": None}, "needs a 'personas' section"),
                            ({"hostile": {"tokens": "24K"}}, "section 'hostile' needs 'kinds'")):
        values = {**base, **change}
        if "personas" in change:  # no cards: no role-play either
            values.pop("roleplay")
        path.write_text(yaml.safe_dump(values))
        with pytest.raises(TailleError, match=message):
            load_recipe(path)


def run_until(path, values: dict, section: str, capsys, monkeypatch):
    """`taille run` of the recipe `values` (written to `path`) until the run-file stage `section`, with the scripted
    teachers: (the run folder, its train cards, the records the stage wrote)."""
    path.write_text(yaml.safe_dump(values))
    monkeypatch.setattr("taille.generate.generate.pick_engine", Teachers())
    run_cli(capsys, "run", path, "--until", section)
    run = path.parent / "run"
    records = [json.loads(line) for line in (run / section / f"{section}.jsonl").read_text().splitlines()]
    return run, load_half(run / "personas", "train"), records


def test_a_baits_section_writes_never_phrase_baits_for_the_prefer_stage_alone(tmp_path, capsys, monkeypatch):
    """RUN/baits holds the teacher's answers to lines that ask each train card for its own `never` phrases (the kind
    is the section's, not the user's); `hostile,baits` in the prefer section names both run files, and the
    recipe is refused at reading when it names `baits` without the section or gives the section a `kinds`."""
    import pytest

    from taille.characters.lines import never_baits
    from taille.errors import TailleError
    from taille.run.recipe import prefer_settings

    path = character_recipe(tmp_path)
    values = yaml.safe_load(path.read_text())
    hostile = {"tokens": 100, "conversations": 1, "turns": 1, "max_new_tokens": 16, "batch_size": 8,
               "kinds": "adversarial:1"}
    values["hostile"] = hostile
    values["baits"] = {k: v for k, v in hostile.items() if k != "kinds"}
    values["prefer"] = {"data": "hostile,baits", "samples": 2}
    run, cards, records = run_until(path, values, "baits", capsys, monkeypatch)
    assert records and json.loads((run / "baits" / "done.json").read_text())["settings"]["kinds"] == "bait:1"
    for r in records:
        assert r["kinds"] == ["bait"] and r["messages"][1]["content"] in never_baits(cards[r["persona"]])
    recipe = load_recipe(path)
    settings = prefer_settings(recipe, "STUDENT", "OUT", run)
    assert settings.data == f"{run / 'hostile' / 'hostile.jsonl'},{run / 'baits' / 'baits.jsonl'}"

    for change, message in (({"baits": None}, "add a 'baits' section"),
                            ({"baits": {"kinds": "hostile:1"}}, r"section 'baits': unknown key\(s\) kinds")):
        path.write_text(yaml.safe_dump({**values, **change}))
        with pytest.raises(TailleError, match=message):
            load_recipe(path)


def test_a_knowledge_section_writes_fact_questions_and_the_prefer_stage_takes_them_as_facts(tmp_path, capsys,
                                                                                          monkeypatch):
    """RUN/knowledge holds the teacher's answers to questions about the train cards' facts (the kind is the
    section's); `facts: knowledge` in the prefer section names that file, and is refused without the section."""
    import pytest

    from taille.characters.questions import _question, find_span
    from taille.errors import TailleError
    from taille.run.recipe import prefer_settings

    path = character_recipe(tmp_path)
    values = yaml.safe_load(path.read_text())
    values["knowledge"] = {"tokens": 100, "conversations": 1, "turns": 1, "max_new_tokens": 16, "batch_size": 8}
    values["prefer"] = {"data": "roleplay", "facts": "knowledge", "samples": 2}
    run, cards, records = run_until(path, values, "knowledge", capsys, monkeypatch)
    assert records and json.loads((run / "knowledge" / "done.json").read_text())["settings"]["kinds"] == "knowledge:1"
    for r in records:  # each first line asks about one of its own card's facts
        facts = [" ".join(f.split()) for f in cards[r["persona"]].knowledge]
        asked = [_question(f, find_span(f)) for f in facts if find_span(f) is not None]
        assert r["kinds"] == ["knowledge"] and any(a and a[0] in r["messages"][1]["content"] for a in asked)
    settings = prefer_settings(load_recipe(path), "STUDENT", "OUT", run)
    assert settings.facts == str(run / "knowledge" / "knowledge.jsonl") and settings.personas == str(run / "personas")

    for change, message in (({"knowledge": None}, "add a 'knowledge' section"),
                            ({"knowledge": {"kinds": "bait:1"}}, r"section 'knowledge': unknown key\(s\) kinds")):
        path.write_text(yaml.safe_dump({**values, **change}))
        with pytest.raises(TailleError, match=message):
            load_recipe(path)
