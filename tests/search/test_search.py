"""`taille search` end to end on a tiny teacher: the candidates it tries, the leaderboard it ranks them on
(held-out plays under --eval-data auto, train loss where there is no held-out text) and a search run
again, which redoes only what is missing."""

import json
import math

import pytest
import yaml

from tests.conftest import run_cli, save_tiny

TARGET, TOLERANCE = 80_000, 0.05  # the 2-layer tiny llama has 115,008: three distinct shapes land here
SEQ_LEN, EVAL_TOKENS = 32, 256


def search_args(teacher, data, out):
    return ["search", "--model", teacher, "--data", data, "--out", out, "--params", "80K", "--tolerance", TOLERANCE,
            "--candidates", 3, "--steps", 2, "--seq-len", SEQ_LEN, "--batch-size", 2, "--lr", 3e-3, "--top-k", 16,
            "--eval-tokens", EVAL_TOKENS, "--precision", "fp32", "--samples", 4]


@pytest.fixture
def teacher(tmp_path):
    return save_tiny(tmp_path / "teacher", "llama", seed=1)


@pytest.fixture
def text_file(tmp_path):
    """Local training text without the plays: no held-out text under --eval-data auto."""
    path = tmp_path / "train.txt"
    path.write_text("when shall we three meet again in thunder lightning or in rain upon the heath " * 200)
    return path


def metrics(board_row) -> list[dict]:
    from pathlib import Path

    return [json.loads(line) for line in Path(board_row["metrics"]).read_text().splitlines()]


def held_out_loss(model_dir, tokenizer_dir) -> float:
    """Mean next-token NLL of a model over the first EVAL_TOKENS of the held-out plays, in blocks of
    SEQ_LEN: computed here with the plain Hugging Face model, apart from the search's own evaluation."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taille.data.tokens import load_tokens

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = load_tokens("shakespeare:heldout", tokenizer, max_tokens=EVAL_TOKENS + 1, progress=False)
    ids = torch.from_numpy(stream.blocks(SEQ_LEN).astype("int64"))  # (N, T)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]  # (N, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_search_on_the_plays_ranks_candidates_by_held_out_loss_on_the_held_out_plays(teacher, text_file, tmp_path,
                                                                                      capsys, monkeypatch):
    from transformers import AutoConfig

    import taille.models.load
    import taille.prune.prune
    from taille.prune.shape import Shape, count_params

    out = tmp_path / "search"
    importance, real = [], taille.prune.prune.run_importance
    monkeypatch.setattr(taille.prune.prune, "run_importance", lambda cfg: importance.append(cfg) or real(cfg))
    loads, real_load = [], taille.models.load.load_model
    monkeypatch.setattr(taille.models.load, "load_model",
                        lambda spec, dtype="auto", device="auto": loads.append((spec, dtype)) or real_load(spec, dtype, device))
    args = search_args(teacher, f"{text_file}:0.5,shakespeare:0.5", out)
    stdout, _ = run_cli(capsys, *args)
    # the importance step runs here, in the search's precision (not importance's own default)
    assert [cfg.precision for cfg in importance] == [args[args.index("--precision") + 1]]
    # --precision fp32 holds the teacher's weights in fp32 too, for the importance pass, the teacher cache and pruning
    # (their "auto" would be bf16 on a bf16 GPU)
    assert [cfg.dtype for cfg in importance] == ["fp32"]
    assert {dtype for spec, dtype in loads if spec == str(teacher)} == {"fp32"}
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["candidates"]
    assert board["ranked_by"] == "eval_loss" and "ranked by eval loss" in board["summary"]

    # three distinct shapes, each within the tolerance of the target, each pruned and distilled to that shape
    config = AutoConfig.from_pretrained(teacher)
    shapes = [Shape(**r["shape"]) for r in rows]
    assert len(rows) == 3 and len(set(shapes)) == 3
    assert sorted(r["candidate"] for r in rows) == [0, 1, 2]
    for r, shape in zip(rows, shapes):
        assert r["params"] == count_params(config, shape)
        assert abs(r["params"] - TARGET) <= TOLERANCE * TARGET
        for stage in ("pruned", "run"):
            trained = AutoConfig.from_pretrained(out / f"cand-{r['candidate']:02d}" / stage)
            assert (trained.hidden_size, trained.intermediate_size, trained.num_attention_heads,
                    trained.num_key_value_heads, trained.num_hidden_layers) == (
                shape.hidden, shape.ffn, shape.heads, shape.kv_heads, shape.layers)

    # each score is its run's last held-out loss, and that loss is the student's loss on the held-out plays
    for r in rows:
        held = [m for m in metrics(r) if "eval_loss" in m]
        assert held and held[-1]["step"] == 2
        assert r["eval_loss"] == held[-1]["eval_loss"]
        run = out / f"cand-{r['candidate']:02d}" / "run"
        assert r["eval_loss"] == pytest.approx(held_out_loss(run, teacher), abs=1e-4)
    losses = [r["eval_loss"] for r in rows]
    assert losses == sorted(losses)

    # the winner is the first row, everywhere the search writes it
    winner = rows[0]
    assert board["winner"] == {"shape": winner["shape"], "params": winner["params"]}
    assert yaml.safe_load((out / "winner.yaml").read_text()) == {"prune": winner["shape"]}
    table = [line for line in (out / "leaderboard.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in table] == ["| 1", "| 2", "| 3"]
    for line, r in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:5] == [str(r["shape"]["layers"]), str(r["shape"]["hidden"]), str(r["shape"]["ffn"]),
                              f"{r['shape']['heads']} / {r['shape']['kv_heads']}"]
        assert cells[6] == f"{r['eval_loss']:.4f}" and cells[7] == f"{math.exp(r['eval_loss']):.2f}"
    assert (out / "leaderboard.png").stat().st_size > 0
    assert f"{winner['eval_loss']:.4f}" in stdout

    # the default width shape is among them, marked: what `prune --params 80K --axes mlp,hidden,heads` cuts
    run_cli(capsys, "prune", "--model", teacher, "--scores", out / "importance", "--params", "80K", "--axes",
            "mlp,hidden,heads", "--out", tmp_path / "default")
    pruned = AutoConfig.from_pretrained(tmp_path / "default")
    default = Shape(pruned.hidden_size, pruned.intermediate_size, pruned.num_attention_heads,
                    pruned.num_key_value_heads, pruned.num_hidden_layers)
    assert [r["default"] for r in rows] == [s == default for s in shapes] and default in shapes
    rank = shapes.index(default)
    assert table[rank].rstrip().endswith("default width shape |")
    if rank == 0:
        assert "The default width shape wins." in board["summary"]
    else:
        assert f"({rows[rank]['eval_loss']:.4f}, rank {rank + 1})" in board["summary"]


def test_search_without_held_out_text_ranks_by_train_loss(teacher, text_file, tmp_path, capsys):
    out = tmp_path / "search"
    run_cli(capsys, *search_args(teacher, text_file, out))
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["candidates"]
    assert board["ranked_by"] == "train_loss" and "ranked by train loss" in board["summary"]
    assert len(rows) == 3
    for r in rows:
        logged = metrics(r)
        assert not any("eval_loss" in m for m in logged) and r["eval_loss"] is None
        assert r["train_loss"] == [m["loss"] for m in logged if "loss" in m][-1]  # 1 line: its last 10% is itself
    losses = [r["train_loss"] for r in rows]
    assert losses == sorted(losses)
    assert yaml.safe_load((out / "winner.yaml").read_text()) == {"prune": rows[0]["shape"]}
    table = [line for line in (out / "leaderboard.md").read_text().splitlines() if line.startswith("| ")][1:]
    for line, r in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[6:9] == ["-", "-", f"{r['train_loss']:.4f}"]


def test_a_search_run_again_redoes_only_missing_candidates(teacher, text_file, tmp_path, capsys, monkeypatch):
    import shutil

    import taille.distill.cache
    import taille.distill.train
    import taille.prune.prune

    out = tmp_path / "search"
    args = search_args(teacher, text_file, out)
    run_cli(capsys, *args)
    first = json.loads((out / "leaderboard.json").read_text())
    logs = {p: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob("cand-*/run/metrics.jsonl")}
    assert len(logs) == 3

    # the same command again: no importance, no teacher cache, no pruning, no distillation
    def refuse(*a, **k):
        raise AssertionError("a finished search redid work")

    for module, name in [(taille.prune.prune, "run_importance"), (taille.prune.prune, "run_prune"),
                         (taille.distill.cache, "build_cache"), (taille.distill.train, "distill")]:
        monkeypatch.setattr(module, name, refuse)
    run_cli(capsys, *args)
    again = json.loads((out / "leaderboard.json").read_text())
    assert again["candidates"] == first["candidates"] and again["rows"] == first["rows"]
    assert {p: (p.stat().st_mtime_ns, p.read_text()) for p in logs} == logs

    # a search stopped before its last candidate: only that one is pruned and distilled, from the same cache
    monkeypatch.undo()
    redone = {"prune": [], "distill": []}
    real_prune, real_distill = taille.prune.prune.run_prune, taille.distill.train.distill
    monkeypatch.setattr(taille.prune.prune, "run_prune",
                        lambda cfg: redone["prune"].append(cfg.out) or real_prune(cfg))
    monkeypatch.setattr(taille.distill.train, "distill",
                        lambda cfg: redone["distill"].append(cfg.out) or real_distill(cfg))
    monkeypatch.setattr(taille.distill.cache, "build_cache", refuse)
    monkeypatch.setattr(taille.prune.prune, "run_importance", refuse)
    shutil.rmtree(out / "cand-02")
    run_cli(capsys, *args)
    assert redone == {"prune": [str(out / "cand-02" / "pruned")], "distill": [str(out / "cand-02" / "run")]}
    last = json.loads((out / "leaderboard.json").read_text())
    for p in logs:
        if "cand-02" not in str(p):
            assert (p.stat().st_mtime_ns, p.read_text()) == logs[p]
    # the redone candidate trains as it did the first time (same cache, same seed)
    before = {r["candidate"]: r["train_loss"] for r in first["candidates"]}
    after = {r["candidate"]: r["train_loss"] for r in last["candidates"]}
    assert after == pytest.approx(before, abs=1e-5)

    # another request in the same folder is refused in one line before anything runs: its shapes, cache and
    # runs would be reused for settings they were not made with
    monkeypatch.undo()
    for module, name in [(taille.prune.prune, "run_prune"), (taille.distill.cache, "build_cache"),
                         (taille.distill.train, "distill")]:
        monkeypatch.setattr(module, name, refuse)
    changed = [str(a) for a in args]
    changed[changed.index("--params") + 1] = "78K"
    changed[changed.index("--steps") + 1] = "4"
    _, err = run_cli(capsys, *changed, code=2)
    assert "holds a search asked with other settings (params 80000 -> 78000, steps 2 -> 4)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "leaderboard.json").read_text()) == last


def test_the_default_shape_joins_the_candidates_only_within_the_tolerance():
    """`prune --params` allows 1%; a search asked for less must not add a default shape outside its own
    tolerance (its summary would call every candidate within it)."""
    from transformers import LlamaConfig

    from taille.prune.shape import count_params, parse_params
    from taille.search.search import SearchSettings, default_shape, pick

    smollm2 = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    target = parse_params("88M")  # prune's shape for 88M lands 0.9% under it
    loose, tight = (SearchSettings(params="88M", tolerance=t, candidates=4) for t in (0.01, 0.005))
    default = default_shape(smollm2, "88M", loose.tolerance)
    assert default is not None and 0.005 < abs(count_params(smollm2, default) - target) / target <= 0.01
    assert default in [c.shape for c in pick(smollm2, loose, default)]
    assert default_shape(smollm2, "88M", tight.tolerance) is None
    chosen = pick(smollm2, tight, default_shape(smollm2, "88M", tight.tolerance))
    assert chosen and all(abs(c.params - target) <= 0.005 * target for c in chosen)
