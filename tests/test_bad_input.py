"""Every verb, fed what users get wrong: each case must end as exit status 2 with one `taille: error:`
line and no traceback. The table must cover every verb `taille -h` lists (a new verb without rows fails).

Cases run in-process (taille.cli.main) on tiny files made here; none reaches a long computation: each
mistake must be caught when the settings are built or when the input is first read.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.conftest import save_tiny

GARBAGE = b"GGUF\x03\x00\x00\x00" + os.urandom(256)

# (verb, arguments, a fragment the one error line must contain). Paths: M = a tiny model folder,
# B = a model folder with a corrupt config.json, E = an empty text file, T = a short text file, G = a
# corrupt .gguf file, N = a path that does not exist, D = an empty folder, Y = a corrupt YAML file,
# P = a persona without a name, O = an output path.
CASES = [
    # info
    ("info", ["N"], "N"),
    ("info", ["B"], "config.json"),
    ("info", ["D"], "config.json"),
    ("info", ["G"], "G"),
    ("info", [], "Missing argument"),
    ("info", ["M", "--bogus"], "No such option"),
    # eval
    ("eval", ["M"], "nothing to evaluate"),
    ("eval", ["M", "--ppl", "T", "--window", "1"], "--window"),
    ("eval", ["M", "--ppl", "T", "--window", "abc"], "--window"),
    ("eval", ["M", "--ppl", "N"], "N"),
    ("eval", ["M", "--ppl", "E"], "E"),
    ("eval", ["M", "--tasks", "no_such_task"], "no_such_task"),
    ("eval", ["M", "--ppl", "T", "--precision", "fp8"], "--precision"),
    ("eval", ["M", "--ppl", "T", "--stride", "0"], "--stride"),
    ("eval", ["M", "--ppl", "T", "--limit", "0"], "--limit"),
    ("eval", ["M", "--personas", "D"], "--reference"),
    ("eval", ["M", "--personas", "N", "--reference", "M"], "not a folder"),
    ("eval", ["M", "--personas", "D", "--reference", "M"], "no .yaml persona files"),
    ("eval", ["M", "--personas", "PF_NAMELESS", "--reference", "M"], "missing name"),
    ("eval", ["M", "--personas", "D", "--reference", "M", "--persona-cards", "0"], "--persona-cards"),
    ("eval", ["M", "--personas", "D", "--reference", "M", "--persona-lines", "0"], "--persona-lines"),
    # importance
    ("importance", [], "--model"),
    ("importance", ["-m", "M", "--depth-metric", "foo"], "--depth-metric foo"),
    ("importance", ["-m", "M", "--depth-metric", "ppl", "--block-sizes", "1,x"], "--block-sizes 1,x"),
    ("importance", ["-m", "M", "--block-sizes", "0"], "--block-sizes"),
    ("importance", ["-m", "M", "--samples", "0"], "--samples"),
    ("importance", ["-m", "M", "--data", "N", "--out", "O"], "N"),
    ("importance", ["-m", "M", "--data", "E", "--out", "O"], "E"),
    ("importance", ["-m", "B", "--data", "T", "--out", "O"], "config.json"),
    # prune
    ("prune", ["-m", "M", "--out", "O"], "nothing to prune to"),
    ("prune", ["-m", "M", "--out", "O", "--params", "90M", "--ratio", "0.5"], "not both"),
    ("prune", ["-m", "M", "--out", "O", "--params", "abc"], "--params abc"),
    ("prune", ["-m", "M", "--out", "O", "--ratio", "1.5"], "--ratio"),
    ("prune", ["-m", "M", "--out", "O", "--params", "100K", "--axes", "mlp,foo"], "--axes"),
    ("prune", ["-m", "M", "--out", "O", "--hidden", "32", "--criterion", "foo"], "--criterion foo"),
    ("prune", ["-m", "M", "--out", "O", "--params", "1B", "--data", "T"], "not smaller"),
    ("prune", ["-m", "M", "--out", "O", "--drop-layers", "5-9", "--data", "T"], "5-9"),
    ("prune", ["-m", "M", "--out", "O", "--params", "100K", "--scores", "N"], "N"),
    ("prune", ["-m", "M", "--out", "O", "--hidden", "0", "--data", "T"], "--hidden"),
    ("prune", ["-m", "M", "--out", "O", "--hidden", "32"], "--scores"),
    # distill
    ("distill", ["--student", "M", "--out", "O", "--data", "T"], "--ce-weight"),
    ("distill", ["--student", "M", "--out", "O", "--teacher", "M", "--teacher-cache", "D"], "not both"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--teacher", "M", "--loss", "foo"], "--loss foo"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--teacher", "M", "--tokens", "1Q"], "--tokens 1Q"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--teacher", "M", "--seq-len", "0"], "--seq-len"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--teacher", "M", "--lr", "0.1", "--min-lr", "1"],
     "--min-lr"),
    ("distill", ["--student", "M", "--out", "O", "--data", "N", "--teacher", "M"], "N"),
    ("distill", ["--student", "M", "--out", "O", "--data", "E", "--teacher", "M"], "E"),
    ("distill", ["--student", "M", "--out", "O", "--teacher-cache", "D"], "no complete cache"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--ce-weight", "1", "--kd-weight", "1"],
     "--kd-weight"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--teacher", "M", "--report-to", "foo"],
     "--report-to foo"),
    ("distill", ["--student", "B", "--out", "O", "--data", "T", "--teacher", "M"], "config.json"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--teacher", "M", "--batch-size", "x"], "--batch-size"),
    ("distill", ["--student", "M", "--out", "O", "--data", "T", "--teacher", "M", "--beta", "1"], "--beta"),
    # correct
    ("correct", ["--teacher", "M", "--data", "T", "--out", "O", "--tokens", "0"], "--tokens"),
    ("correct", ["--teacher", "M", "--data", "T", "--out", "O", "--lr", "-1"], "--lr"),
    ("correct", ["--teacher", "M", "--out", "O"], "--data"),
    # teacher-cache
    ("teacher-cache", ["--out", "O"], "--teacher and --data"),
    ("teacher-cache", ["--out", "O", "--from", "D", "--teacher", "M"], "--from"),
    ("teacher-cache", ["--out", "O", "--teacher", "M", "--data", "T", "--top-k", "0"], "--top-k"),
    ("teacher-cache", ["--out", "O", "--teacher", "M", "--data", "E"], "E"),
    ("teacher-cache", ["--out", "O", "--from", "D"], "no complete cache"),
    ("teacher-cache", ["--out", "O", "--teacher", "M", "--data", "T", "--temperature", "0"], "--temperature"),
    ("teacher-cache", ["--out", "O", "--teacher", "M", "--data", "T", "--sampling", "nucleus"], "one of top, random"),
    ("teacher-cache", ["--out", "O", "--from", "D", "--sampling", "random"], "--temperature and --sampling"),
    ("teacher-cache", ["--out", "O", "--teacher", "M", "--data", "T", "--seed", "3"], "a top-K cache has none"),
    # select
    ("prefer", ["--student", "M", "--data", "T", "--out", "O"], "give chat JSONL"),
    ("prefer", ["--student", "M", "--data", "free", "--out", "O"], "one of roleplay, chat"),  # plain text: no turns
    ("prefer", ["--student", "N", "--data", "roleplay", "--out", "O"], "N"),
    ("prefer", ["--student", "M", "--data", "roleplay", "--out", "O", "--sft-weight", "-1"], "--sft-weight"),
    ("select", ["--out", "O", "--teacher", "M", "--reference", "M", "--data", "T"], "give a .jsonl file"),
    ("select", ["--out", "sel.jsonl", "--teacher", "M", "--reference", "M", "--data", "T", "--pool", "1"], "--pool 1.0"),
    ("select", ["--out", "sel.jsonl", "--teacher", "M", "--reference", "N", "--data", "T"], "N"),
    ("select", ["--out", "sel.jsonl", "--teacher", "M", "--reference", "M", "--data", "T", "--tokens", "1M"],
     "has 20 blocks of 256 tokens, not more than the 3906 to keep"),
    ("select", ["--out", "sel.jsonl", "--teacher", "M", "--data", "T"], "--reference"),
    # plan
    ("plan", ["M"], "give a target"),
    ("plan", ["M", "--memory", "6Q"], "--memory 6Q"),
    ("plan", ["M", "--params", "1M", "--memory", "6G"], "not both"),
    ("plan", ["M", "--params", "50K", "--quant", "q3"], "--quant q3"),
    ("plan", ["M", "--params", "10"], "no shape"),
    ("plan", ["N", "--params", "1M"], "N"),
    ("plan", ["M", "--params", "50K", "--tolerance", "2"], "--tolerance"),
    ("plan", ["M", "--distill"], "needs the student"),
    ("plan", ["M", "--distill", "--student", "M", "--params", "1M"], "leave out --params"),
    ("plan", ["M", "--params", "1M", "--gpus", "4"], "add --distill"),
    ("plan", ["M", "--distill", "--student", "wide=3"], "--student wide=3"),
    ("plan", ["M", "--distill", "--student", "hidden=128"], "larger than"),
    ("plan", ["M", "--distill", "--student", "N"], "N"),
    ("plan", ["M", "--distill", "--student", "B"], "config.json"),
    ("plan", ["M", "--distill", "--recipe", "N"], "no recipe"),
    ("plan", ["M", "--distill", "--student", "M", "--gpus", "0"], "--gpus 0"),
    ("plan", ["M", "--distill", "--student", "M", "--gpu-memory", "80Q"], "--gpu-memory 80Q"),
    ("plan", ["M", "--distill", "--student", "M", "--device", "tpu"], "--device tpu"),
    ("plan", ["M", "--distill", "--student", "M", "--seq-len", "1"], "--seq-len"),
    # generate
    ("generate", ["--teacher", "M", "--out", "O", "--engine", "foo"], "--engine foo"),
    ("generate", ["--teacher", "M", "--out", "O", "--prompts", "N"], "N"),
    ("generate", ["--teacher", "M", "--out", "O", "--prompts", "E"], "E"),
    ("generate", ["--teacher", "M", "--out", "O", "--top-p", "2"], "--top-p"),
    ("generate", ["--teacher", "M", "--out", "O", "--language", "fr"], "--language fr"),
    ("generate", ["--teacher", "M", "--out", "O", "--tokens", "lots"], "--tokens lots"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "N"], "not a folder"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "D"], "no .yaml persona files"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "PF_NAMELESS"], "missing name"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "PF_UNKNOWN"], "known: "),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "PF_EMPTY_KNOWLEDGE"], "'knowledge' is empty"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "PF_KNOWLEDGE_MAP"], "'knowledge' must be a list"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "PF_ACTIONS"], "actions"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "D", "--prompts", "T"], "not both"),
    ("generate", ["--teacher", "M", "--out", "O", "--personas", "D", "--turns", "0"], "--turns"),
    # personas make
    ("personas", ["make", "--out", "O", "--count", "0"], "--count 0"),
    ("personas", ["make", "--out", "O", "--count", "many"], "--count"),
    ("personas", ["make"], "--out"),
    ("personas", ["shuffle"], "No such command"),
    # search
    ("search", ["-m", "M", "--data", "T", "--params", "50K", "--out", "O", "--candidates", "1"], "--candidates"),
    ("search", ["-m", "M", "--data", "T", "--params", "abc", "--out", "O"], "--params abc"),
    ("search", ["-m", "M", "--data", "T", "--out", "O"], "--params"),
    ("search", ["-m", "M", "--data", "T", "--params", "50K", "--out", "O", "--depth-criterion", "x"],
     "--depth-criterion x"),
    # run
    ("run", ["N"], "no recipe"),
    ("run", ["Y"], "not valid YAML"),
    ("run", ["R_SECTION"], "unknown section"),
    ("run", ["R_KEY"], "unknown key"),
    ("run", ["R_VALUE"], "--tokens abc"),
    ("run", ["R_MISSING"], "'teacher' is required"),
    ("run", ["smollm2-135m-to-90m", "--until", "foo"], "--until foo"),
    # demo
    ("demo", ["--out"], "--out"),
    ("demo", ["--bogus"], "No such option"),
    # export
    ("export", ["M", "--out", "O", "--quant", "q3"], "q3"),
    ("export", ["M", "--out", "O", "--format", "onnx"], "--format onnx"),
    ("export", ["N", "--out", "O.gguf"], "N"),
    ("export", ["M", "--out", "O", "--format", "hf", "--verify"], "--verify"),
    ("export", ["M", "--out", "O", "--verify-blocks", "0"], "--verify-blocks"),
    ("export", ["B", "--out", "O.gguf"], "config.json"),
    # bench
    ("bench", ["N"], "N"),
    ("bench", ["G"], "G"),
    ("bench", ["G", "--budgets", "4,x"], "--budgets 4,x"),
    ("bench", ["G", "--prompt", "4000", "--ctx", "2048"], "--ctx"),
    ("bench", ["G", "--contexts", "0"], "--contexts"),
    # chat
    ("chat", ["G"], "G"),
    ("chat", ["N"], "N"),
    ("chat", ["G", "--persona", "N"], "N"),
    ("chat", ["G", "--persona", "P"], "name"),
    ("chat", ["G", "--top-p", "2"], "--top-p"),
    ("chat", ["G", "--quant", "q3"], "q3"),
    # serve
    ("serve", ["G", "--personas", "D"], "D"),
    ("serve", ["G", "--max-tokens", "5000", "--ctx", "2048"], "--max-tokens"),
    ("serve", ["G", "--port", "abc"], "--port"),
    ("serve", ["G"], "G"),
    ("serve", ["G", "--personas", "N"], "N"),
    # no verb / --config
    ("", ["no-such-verb"], "No such command"),
    ("", ["eval", "M", "--config", "Y"], "not valid YAML"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (root / "empty-dir").mkdir()
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("upon the heath there to meet with macbeth " * 200)
    (root / "garbage.gguf").write_bytes(GARBAGE)
    (root / "bad.yaml").write_text("name: [unclosed\n  teacher: x")
    (root / "nameless.yaml").write_text("role: a smith\nbackstory: forges swords\n")
    model = save_tiny(root / "tiny")
    cards = {"PF_NAMELESS": "role: a smith\nknowledge: [The forge is 30 years old.]\n",
             "PF_UNKNOWN": "name: A\nrole: a smith\nknowlege: [typo]\n",
             "PF_EMPTY_KNOWLEDGE": "name: A\nrole: a smith\nknowledge: []\n",
             "PF_KNOWLEDGE_MAP": "name: A\nrole: a smith\nknowledge: {forge: 30}\n",
             "PF_ACTIONS": "name: A\nrole: a smith\nactions: [say, emotion]\n"}
    folders = {}
    for key, text in cards.items():
        folders[key] = root / key.lower()
        folders[key].mkdir()
        (folders[key] / "card.yaml").write_text(text)
    recipe = f"name: r\nteacher: {model}\ndata: {root / 'short.txt'}\nprune: {{params: 50K}}\n"
    (root / "r_section.yaml").write_text(recipe + "finetune: {lr: 1}\n")
    (root / "r_key.yaml").write_text(recipe + "distill: {tokns: 1M}\n")
    (root / "r_value.yaml").write_text(recipe + "distill: {tokens: abc}\n")
    (root / "r_missing.yaml").write_text("name: r\ndata: shakespeare\nprune: {params: 50K}\n")
    return {"M": model, "B": broken, "E": root / "empty.txt", "T": root / "short.txt", "G": root / "garbage.gguf",
            "N": root / "does-not-exist", "D": root / "empty-dir", "Y": root / "bad.yaml", "P": root / "nameless.yaml",
            "O": root / "out", "O.gguf": root / "out.gguf", "R_SECTION": root / "r_section.yaml", "R_KEY": root / "r_key.yaml",
            "R_VALUE": root / "r_value.yaml", "R_MISSING": root / "r_missing.yaml", **folders}


def test_every_verb_has_bad_input_rows():
    import typer

    from taille.cli import app

    verbs = set(typer.main.get_command(app).commands)
    covered = {verb for verb, _, _ in CASES}
    assert verbs - covered == set(), f"verbs without bad-input rows: {sorted(verbs - covered)}"
    assert len(CASES) >= 60


@pytest.mark.parametrize("verb,args,fragment", CASES, ids=[f"{v or 'taille'}-{i}" for i, (v, _, _) in enumerate(CASES)])
def test_bad_input_is_one_clear_line(paths, capsys, verb, args, fragment):
    from taille.cli import main

    argv = ([verb] if verb else []) + [str(paths.get(a, a)) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    _, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("taille: error:")]
    assert "Traceback" not in err, err
    assert exit_info.value.code == 2, err
    assert len(errors) == 1, err
    expected = str(paths.get(fragment, fragment)) if fragment in paths else fragment
    if "needs llama.cpp's Python binding" in errors[0] and importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: the binding is asked for (one line) before the file is read")
    assert expected in errors[0], errors[0]
