"""benchmarks/recovery_general.py's bookkeeping: on a new machine (no work folder) the committed measurements
count as done, a curve's committed points are not trained again and its missing ones are, one at a time."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from taille.options import parse_count

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def recovery(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "recovery_general", raising=False)
    monkeypatch.delitem(sys.modules, "distill_recovery", raising=False)
    import recovery_general

    monkeypatch.setattr(recovery_general, "RESULTS", tmp_path / "results")
    return recovery_general


def point(wikitext2: float) -> dict:
    tasks = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "lambada_openai")
    return {"ppl": {"wikitext2": wikitext2, "plays": 40.0}, "tasks": {t: {"score": 40.0, "stderr": 2.0} for t in tasks}}


def settings(**changed) -> dict:
    return {"limit": 500, "eval_tokens": 65536, "tokens": "512K", "seq_len": 256, "batch_size": 8, "lr": 5e-4, **changed}


def test_committed_curve_points_are_not_trained_again(recovery, tmp_path, monkeypatch):
    args = SimpleNamespace(**settings())
    recovery.RESULTS.mkdir()
    committed = {"measured": {"teacher": point(25.0), "demo-mix-replies": point(98.7)},
                 "curves": {"demo-mix-replies": {"64K": point(300.0), "128K": point(200.0)}}, "settings": settings()}
    (recovery.RESULTS / "recovery_general.json").write_text(json.dumps(committed))
    work = tmp_path / "work"
    recovery.adopt_committed(work, args)

    trained, measured = [], []
    monkeypatch.setattr(recovery, "taille", lambda *a: trained.append(a[a.index("--out") - 1]))
    monkeypatch.setattr(recovery, "measure", lambda model, args, folder: measured.append(Path(model).name) or point(1.0))
    row = ("student", "roleplay:0.45,chat:0.35,shakespeare:0.2", ["--loss-on", "replies"])

    def measured_once(name, model):  # main's: the row's own measurement, kept by adopt_committed
        return json.loads((work / "measured" / f"{name}-{args.limit}.json").read_text())

    monkeypatch.setattr(recovery, "train_args", lambda args, source: ["--data", source, "--lr", "5e-4", "--tokens", "512K"])
    points = dict(recovery.curve_points(work, "demo-mix-replies", row, args, measured_once))

    assert list(points) == ["64K", "128K", "256K", "512K", "1M"]
    assert trained == ["256K", "1M"]  # the committed 64K and 128K and the row's own 512K are not trained again
    assert measured == ["demo-mix-replies-256K", "demo-mix-replies-1M"]
    assert points["64K"]["ppl"]["wikitext2"] == 300.0 and points["512K"]["ppl"]["wikitext2"] == 98.7


def test_results_of_another_protocol_are_not_adopted(recovery, tmp_path):
    recovery.RESULTS.mkdir()
    committed = {"measured": {"teacher": point(25.0)}, "curves": {"plays": {"64K": point(300.0)}},
                 "settings": settings(limit=100)}
    (recovery.RESULTS / "recovery_general.json").write_text(json.dumps(committed))
    recovery.adopt_committed(tmp_path / "work", SimpleNamespace(**settings()))
    assert not (tmp_path / "work" / "measured").exists()


def fake_run(folder: Path, tokens: int, rate: float) -> None:
    """A finished `taille distill` folder as run_summary reads it."""
    folder.mkdir(parents=True)
    lines = [{"step": s, "loss": 2.0, "loss_avg": 2.0, "tokens_per_s": rate} for s in range(1, 5)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    (folder / "taille.json").write_text(json.dumps({"distill": {"precision": "bf16-mixed", "tokens": tokens,
                                                                "seconds": tokens / rate}}))


def test_main_on_a_new_machine_trains_only_the_missing_curve_points(recovery, tmp_path, monkeypatch):
    """The whole script with `--only none --curves ROW`: committed rows stay in the tables, the missing curve
    points are trained and written one by one, a two-stage row's rate counts both stages."""
    recovery.RESULTS.mkdir()
    committed = {"measured": {"teacher": point(25.0), "pruned": point(1300.0), "plays": point(131.0),
                              "demo-mix-replies": point(98.7), "demo-mix-replies-then-sft": point(113.5)},
                 "trained": {"plays": {"data": "shakespeare", "tokens_per_s": 295.1}},
                 "curves": {"demo-mix-replies": {"64K": point(158.6)}}, "settings": settings(tokens="512000")}
    (recovery.RESULTS / "recovery_general.json").write_text(json.dumps(committed))
    work = tmp_path / "work"
    fake_run(work / "then-sft" / "kd", 448_000, 400.0)  # a two-stage row trained on this machine
    fake_run(work / "runs" / "demo-mix-replies-then-sft", 64_000, 560.0)
    trained, written = [], []
    monkeypatch.setattr(recovery, "pruned_students", lambda work: (work / "width-90m", work / "depth-90m"))
    monkeypatch.setattr(recovery, "taille", lambda *a: trained.append(a[a.index("--out") - 1]))
    monkeypatch.setattr(recovery, "measure", lambda model, args, folder: point(float(len(trained))))
    write_tables = recovery.write_tables
    monkeypatch.setattr(recovery, "write_tables", lambda *a: written.append({k: dict(v) for k, v in (a[3] or {}).items()}) or write_tables(*a))
    monkeypatch.setattr(sys, "argv", ["recovery_general.py", "--wikitext2", "wiki.test.raw", "--task-data", "eval",
                                      "--only", "none", "--curves", "demo-mix-replies", "--work", str(work)])
    recovery.main()

    assert trained == ["128K", "256K", "1M"]  # 64K was committed, 512K is the row itself
    results = json.loads((recovery.RESULTS / "recovery_general.json").read_text())
    assert set(results["measured"]) >= {"plays", "demo-mix-replies", "demo-mix-replies-then-sft"}
    curve = results["curves"]["demo-mix-replies"]
    assert {b: m["ppl"]["wikitext2"] for b, m in curve.items()} == {"64K": 158.6, "128K": 1.0, "256K": 2.0,
                                                                    "512K": 98.7, "1M": 3.0}
    assert [len(c.get("demo-mix-replies", {})) for c in written][-4:] == [2, 3, 4, 5]  # written after every point
    rate = results["trained"]["demo-mix-replies-then-sft"]["tokens_per_s"]
    assert rate == pytest.approx(512_000 / (448_000 / 400 + 64_000 / 560), abs=0.1)
    assert "| demo-mix-replies | 1M | 3.0 " in (recovery.RESULTS / "recovery_general.md").read_text()


def test_a_curve_of_a_calibrated_row_prunes_its_student_before_the_first_point(recovery, tmp_path, monkeypatch):
    """`--curves deep-calib-mix-replies` on a machine where the row never ran: the mix's scores and the deep
    student are made first, and every point distils that student (not a folder nothing wrote)."""
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "none", "--curves", "deep-calib-mix-replies")
    assert [c[0] for c in calls] == ["importance", "prune", *["distill"] * len(recovery.CURVE_TOKENS)]
    student = calls[1][calls[1].index("--out") + 1]
    assert student == str(work / "deep-calib-90m")
    assert {c[c.index("--student") + 1] for c in calls[2:]} == {student}
    budgets = [c[max(i for i, x in enumerate(c) if x == "--tokens") + 1] for c in calls[2:]]  # the last one counts
    assert budgets == list(recovery.CURVE_TOKENS)


def test_two_stage_rows_refuse_seed_repeats_and_curves(recovery, tmp_path, monkeypatch):
    monkeypatch.setattr(recovery, "pruned_students", lambda work: (work / "width-90m", work / "depth-90m"))
    monkeypatch.setattr(recovery, "taille", lambda *a: pytest.fail("nothing may train"))
    monkeypatch.setattr(recovery, "measure", lambda *a: pytest.fail("nothing may be measured"))
    monkeypatch.setattr(sys, "argv", ["recovery_general.py", "--wikitext2", "w", "--task-data", "e", "--only", "none",
                                      "--curves", "demo-mix-replies-then-sft", "--work", str(tmp_path / "work")])
    with pytest.raises(SystemExit, match="two stages"):
        recovery.main()


def run_after_kd_stage(recovery, work: Path, monkeypatch, *options: str) -> list[list[str]]:
    """main() with `options`, the then-sft rows' first stage already trained in `work`: the taille commands it ran
    (a distillation leaves a finished 64K run), nothing measured for real."""
    recovery.RESULTS.mkdir()
    fake_run(work / "then-sft" / "kd", 448_000, 400.0)
    calls = []

    def taille(*a):
        calls.append([str(x) for x in a])
        if a[0] == "distill":
            fake_run(Path(a[a.index("--out") + 1]), 64_000, 560.0)
        if a[0] == "prefer":  # a finished `taille prefer` folder: TRL's log and the prefer record
            out = Path(a[a.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)  # pairs copied from a twin make it first
            (out / "metrics.jsonl").write_text(json.dumps({"loss": 0.5, "step": 1}) + "\n")
            (out / "taille.json").write_text(json.dumps({"prefer": {
                "steps": 40, "seconds": 960.0, "final_loss": 0.5, "final_reward_accuracy": 0.97,
                "final_reward_margin": 0.8, "pairs": {"pairs": 153}}}))

    monkeypatch.setattr(recovery, "pruned_students", lambda work: (work / "width-90m", work / "depth-90m"))
    monkeypatch.setattr(recovery, "taille", taille)
    monkeypatch.setattr(recovery, "measure", lambda model, args, folder: point(100.0))
    monkeypatch.setattr(sys, "argv", ["recovery_general.py", "--wikitext2", "w", "--task-data", "e", *options,
                                      "--work", str(work)])
    recovery.main()
    return calls


def test_the_hostile_lines_rows_write_their_corpora_and_share_the_kd_stage(recovery, tmp_path, monkeypatch):
    """demo-mix-replies-then-sft-adv: the corpus of in-character answers to hostile lines is generated (on the
    shipped corpus's cards, rejection-sampled), then only the SFT stage trains, from then-sft's KD stage; the
    wide row's corpus is its own, larger one."""
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "demo-mix-replies-then-sft-adv,"
                               "demo-mix-replies-then-sft-adv-anchor,demo-mix-replies-then-sft-adv-wide")

    assert [c[:2] for c in calls] == [["personas", "make"], ["generate", "--teacher"], ["personas", "make"],
                                      ["generate", "--teacher"], *[["distill", "--student"]] * 3]  # adv's corpus once
    make, generate, _, generate_wide, distill, anchored, distill_wide = calls
    assert make[make.index("--count") + 1] == "200" and make[make.index("--seed") + 1] == "0"
    assert generate[generate.index("--personas") + 1] == make[make.index("--out") + 1]
    assert generate[generate.index("--kinds") + 1] == "adversarial:1" and int(generate[generate.index("--retries") + 1]) > 0
    corpus, wide = (g[g.index("--out") + 1] for g in (generate, generate_wide))
    assert corpus != wide and generate_wide[generate_wide.index("--kinds") + 1] == "adversarial:1"
    tokens = [parse_count(g[g.index("--tokens") + 1]) for g in (generate, generate_wide)]
    assert tokens[1] > tokens[0]
    assert distill[distill.index("--student") + 1] == str(work / "then-sft" / "kd")  # not trained again
    assert distill[distill.index("--data") + 1] == f"roleplay:0.6,{corpus}:0.4"
    assert distill[distill.index("--kd-weight") + 1] == "0" and "--teacher" not in distill
    assert distill_wide[distill_wide.index("--data") + 1] == f"roleplay:0.6,{wide}:0.4"
    assert distill_wide[distill_wide.index("--student") + 1] == str(work / "then-sft" / "kd")
    # the anchored row: the same data and start, its KL to the first stage's student, not to the teacher
    assert anchored[anchored.index("--data") + 1] == distill[distill.index("--data") + 1]
    assert anchored[anchored.index("--teacher") + 1] == str(work / "then-sft" / "kd")
    assert float(anchored[anchored.index("--kd-weight") + 1]) > 0
    results = json.loads((recovery.RESULTS / "recovery_general.json").read_text())
    rate = results["trained"]["demo-mix-replies-then-sft-adv"]["tokens_per_s"]
    assert rate == pytest.approx(512_000 / (448_000 / 400 + 64_000 / 560), abs=0.1)  # both stages counted
    # the committed results name the corpora from the work folder, not from this machine's paths
    assert results["trained"]["demo-mix-replies-then-sft-adv-wide"]["data"].endswith(
        "then roleplay:0.6,WORK/adversarial-wide.jsonl:0.4")
    assert str(tmp_path) not in json.dumps(results["trained"])


def test_a_staged_sft_rows_seed_repeat_repeats_its_sft_stage_only(recovery, tmp_path, monkeypatch):
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "demo-mix-replies-then-sft-seed1", "--seeds",
                               "demo-mix-replies-then-sft")
    assert len(calls) == 1 and calls[0][:2] == ["distill", "--student"]
    (distill,) = calls
    assert distill[distill.index("--student") + 1] == str(work / "then-sft" / "kd")
    assert distill[distill.index("--seed") + 1] == "1" and distill[distill.index("--data") + 1] == "roleplay"
    assert distill[distill.index("--out") + 1] == str(work / "runs" / "demo-mix-replies-then-sft-seed1")
    results = json.loads((recovery.RESULTS / "recovery_general.json").read_text())
    assert results["trained"]["demo-mix-replies-then-sft-seed1"]["tokens_per_s"] == pytest.approx(
        512_000 / (448_000 / 400 + 64_000 / 560), abs=0.1)


def test_the_prefer_row_tunes_the_wide_rows_student_and_its_repeat_redraws_with_another_seed(recovery, tmp_path,
                                                                                            monkeypatch):
    work = tmp_path / "work"
    row = "demo-mix-replies-then-sft-adv-wide-prefer"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", f"{row},{row}-seed1", "--seeds", row)
    prefers = [c for c in calls if c[0] == "prefer"]
    wide = work / "runs" / "demo-mix-replies-then-sft-adv-wide"
    assert [c[c.index("--student") + 1] for c in prefers] == [str(wide)] * 2  # the wide row's student, trained once
    assert sum(c[0] == "distill" for c in calls) == 1
    assert "--seed" not in prefers[0] and prefers[1][prefers[1].index("--seed") + 1] == "1"
    assert [c[c.index("--out") + 1] for c in prefers] == [str(work / "runs" / row), str(work / "runs" / f"{row}-seed1")]
    assert prefers[0][prefers[0].index("--data") + 1] == f"{work / 'adversarial-wide.jsonl'},roleplay"
    results = json.loads((recovery.RESULTS / "recovery_general.json").read_text())
    for name in (row, f"{row}-seed1"):  # the distillation's tokens and rate are the wide row's; the DPO stage beside
        trained = results["trained"][name]
        assert trained["prefer"]["pairs"] == 153 and trained["tokens"] == 512_000
        assert trained["tokens_per_s"] == pytest.approx(512_000 / (448_000 / 400 + 64_000 / 560), abs=0.1)


def test_a_hostile_corpus_is_whole_only_at_its_own_budget(recovery, tmp_path, monkeypatch):
    """The wide corpus (12K) is not taken for done because it holds the small one's 4K: it generates on."""
    calls = []
    monkeypatch.setattr(recovery, "taille", lambda *a: calls.append([str(x) for x in a]))
    out = tmp_path / "adversarial-wide.jsonl"
    Path(f"{out}.meta.json").write_text(json.dumps({"tokens_kept": 5000}))
    recovery.hostile_lines(tmp_path, out, recovery.WIDE_ADVERSARIAL_TOKENS)
    assert [c[0] for c in calls] == ["personas", "generate"]
    generate = calls[1]
    assert generate[generate.index("--tokens") + 1] == recovery.WIDE_ADVERSARIAL_TOKENS
    calls.clear()
    recovery.hostile_lines(tmp_path, out, recovery.ADVERSARIAL_TOKENS)  # 5,000 kept: 4K is whole
    assert calls == []
    assert generate[generate.index("--kinds") + 1] == "adversarial:1"  # the hand-written lines only
    composed = tmp_path / "adversarial-composed.jsonl"  # the composed corpus asks the composed lines too
    recovery.hostile_lines(tmp_path, composed, recovery.COMPOSED_ADVERSARIAL_TOKENS)
    kinds = dict(k.split(":") for k in calls[1][calls[1].index("--kinds") + 1].split(","))
    assert float(kinds["hostile"]) > float(kinds["adversarial"]) > 0


def test_the_free_mix_row_writes_the_free_corpus_first_and_mixes_it_in(recovery, tmp_path, monkeypatch):
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "demo-mix-free-replies")
    assert [c[:2] for c in calls] == [["generate", "--teacher"], ["distill", "--student"]]
    generate, distill = calls
    free = generate[generate.index("--out") + 1]
    assert generate[generate.index("--prompts") + 1] == "free" and free == str(work / "free.jsonl")
    assert generate[generate.index("--tokens") + 1] == recovery.FREE_TOKENS  # the `free` row's corpus, shared
    mix = dict(part.rsplit(":", 1) for part in distill[distill.index("--data") + 1].split(","))
    assert float(mix[free]) > 0 and set(mix) == {"roleplay", "chat", free, "shakespeare"}
    assert distill[distill.index("--loss-on") + 1] == "replies"


def test_the_general_mix_row_trains_the_searched_calibrated_student_on_free_text_chat_and_plays(recovery, tmp_path,
                                                                                                 monkeypatch):
    """The row changes the data alone: the same student as searched-calib-mix-replies (scores calibrated on the
    default's mix, the search's shape), distilled on no role-play and on the free corpus, written first."""
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "searched-calib-general-mix-replies")
    assert [c[0] for c in calls] == ["generate", "importance", "prune", "distill"]
    generate, importance, prune, distill = calls
    assert importance[importance.index("--data") + 1] == "roleplay:0.45,chat:0.35,shakespeare:0.2"
    searched = recovery.searched_shape(json.loads(recovery.SEARCH.read_text()))
    assert prune[prune.index("--layers") + 1] == str(searched["layers"]) != "30" and "--params" not in prune
    assert distill[distill.index("--student") + 1] == prune[prune.index("--out") + 1] == str(work / "searched-calib-90m")
    free = generate[generate.index("--out") + 1]
    mix = dict(part.rsplit(":", 1) for part in distill[distill.index("--data") + 1].split(","))
    assert set(mix) == {free, "chat", "shakespeare"} and float(mix["shakespeare"]) > 0.2
    assert distill[distill.index("--loss-on") + 1] == "replies"


def test_the_free_plays_row_trains_the_same_student_on_the_shipped_free_text_and_more_plays(recovery, tmp_path,
                                                                                             monkeypatch):
    """The general mix's student and mask with the chat share given to the plays: the shipped `free` corpus (the
    bench's bytes) is read as it is, so nothing is generated first."""
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "searched-calib-free-plays")
    assert [c[0] for c in calls] == ["importance", "prune", "distill"]
    importance, prune, distill = calls
    assert importance[importance.index("--data") + 1] == "roleplay:0.45,chat:0.35,shakespeare:0.2"
    assert distill[distill.index("--student") + 1] == prune[prune.index("--out") + 1] == str(work / "searched-calib-90m")
    mix = {name: float(share) for name, share in
           (part.rsplit(":", 1) for part in distill[distill.index("--data") + 1].split(","))}
    assert set(mix) == {"free", "shakespeare"} and mix["shakespeare"] > 0.4 and sum(mix.values()) == 1.0
    assert "--loss-on" not in distill  # no chat turns: `taille distill` refuses a reply mask on plain text
    assert not (work / "free.jsonl").exists()


def test_the_deep_row_prunes_fewer_layers_from_the_mix_scores_and_stays_under_the_target(recovery, tmp_path,
                                                                                         monkeypatch):
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "deep-calib-mix-replies")
    assert [c[0] for c in calls] == ["importance", "prune", "distill"]
    importance, prune, distill = calls
    assert prune[prune.index("--scores") + 1] == importance[importance.index("--out") + 1]
    layers, ffn = recovery.DEEP["layers"], recovery.DEEP["ffn"]
    assert (prune[prune.index("--layers") + 1], prune[prune.index("--ffn") + 1]) == (str(layers), str(ffn))
    assert 21 < layers < 30  # fewer layers cut than the searched shape's 9
    assert "--hidden" not in prune and "--params" not in prune  # the residual width and the heads whole
    assert distill[distill.index("--student") + 1] == prune[prune.index("--out") + 1]
    assert distill[distill.index("--data") + 1] == "roleplay:0.45,chat:0.35,shakespeare:0.2"
    from dataclasses import replace

    from taille.prune.shape import count_params, shape_of
    from tests.run.test_recipes import SMOLLM2

    params = count_params(SMOLLM2, replace(shape_of(SMOLLM2), layers=layers, ffn=ffn))
    assert 89e6 < params <= 90e6


def test_the_corrected_row_corrects_the_teacher_first_and_prunes_and_distils_from_it(recovery, tmp_path, monkeypatch):
    """Teacher correction (Minitron): the teacher fine-tuned on the mix's replies, then the importance, the deep
    shape's prune and the distillation all read the corrected teacher, not the original; a repeat is refused."""
    work = tmp_path / "work"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", recovery.CORRECTED)
    assert [c[0] for c in calls] == ["correct", "importance", "prune", "distill"]
    correct, importance, prune, distill = calls
    teacher = correct[correct.index("--out") + 1]
    mix = "roleplay:0.45,chat:0.35,shakespeare:0.2"
    assert correct[correct.index("--teacher") + 1] == recovery.TEACHER and teacher != recovery.TEACHER
    assert correct[correct.index("--data") + 1] == mix and correct[correct.index("--loss-on") + 1] == "replies"
    assert parse_count(correct[correct.index("--tokens") + 1]) == parse_count(recovery.CORRECTION_TOKENS)
    assert importance[importance.index("-m") + 1] == teacher and prune[prune.index("-m") + 1] == teacher
    assert prune[prune.index("--scores") + 1] == importance[importance.index("--out") + 1]
    assert (prune[prune.index("--layers") + 1], prune[prune.index("--ffn") + 1]) == \
        (str(recovery.DEEP["layers"]), str(recovery.DEEP["ffn"]))
    assert distill[distill.index("--teacher") + 1] == teacher
    assert distill[distill.index("--student") + 1] == prune[prune.index("--out") + 1]
    assert distill[distill.index("--data") + 1] == mix and distill[distill.index("--loss-on") + 1] == "replies"
    assert parse_count(distill[distill.index("--tokens") + 1]) == 512_000  # the student's budget, as every row's
    monkeypatch.setattr(sys, "argv", ["recovery_general.py", "--wikitext2", "w", "--task-data", "e", "--only", "none",
                                      "--seeds", recovery.CORRECTED, "--work", str(work)])
    with pytest.raises(SystemExit, match="two stages"):
        recovery.main()


def test_two_rounds_on_the_mix_prunes_twice_on_its_data_and_a_measured_row_stays_in_the_tables(recovery, tmp_path,
                                                                                               monkeypatch):
    work = tmp_path / "work"
    # the plays' two-rounds row, trained and measured by an earlier run: it stays when another row is run
    fake_run(work / "two-rounds" / "kd-112m", 256_000, 430.0)
    fake_run(work / "runs" / "two-rounds", 256_000, 460.0)
    (work / "measured").mkdir(parents=True)
    (work / "measured" / "two-rounds-500.json").write_text(json.dumps(point(113.0)))
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", "two-rounds-mix")

    assert [c[0] for c in calls] == ["prune", "distill", "importance", "prune", "distill"]
    prune1, kd1, importance, prune2, kd2 = calls
    folder = work / "two-rounds-mix"
    assert prune1[prune1.index("--params") + 1] == "112M" and prune1[prune1.index("--out") + 1] == str(folder / "112m")
    mix = "roleplay:0.45,chat:0.35,shakespeare:0.2"
    for distill, start in ((kd1, folder / "112m"), (kd2, folder / "90m")):
        assert distill[distill.index("--student") + 1] == str(start)
        assert distill[distill.index("--data") + 1] == mix and distill[distill.index("--loss-on") + 1] == "replies"
        assert parse_count(distill[len(distill) - 1 - distill[::-1].index("--tokens") + 1]) == 256_000  # the last wins
    assert importance[importance.index("-m") + 1] == str(folder / "kd-112m")
    assert importance[importance.index("--data") + 1] == mix
    assert prune2[prune2.index("--params") + 1] == "90M" and prune2[prune2.index("-m") + 1] == str(folder / "kd-112m")
    results = json.loads((recovery.RESULTS / "recovery_general.json").read_text())
    assert results["measured"]["two-rounds"]["ppl"]["wikitext2"] == 113.0
    assert results["trained"]["two-rounds"]["tokens"] == 512_000  # both rounds counted
    assert "| two-rounds |" in (recovery.RESULTS / "recovery_general.md").read_text()


def test_the_composed_prefer_row_writes_the_composed_corpus_trains_on_it_and_draws_its_pairs_there(recovery, tmp_path,
                                                                                                 monkeypatch):
    work = tmp_path / "work"
    row = "demo-mix-replies-then-sft-adv-composed-prefer-hostile"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", row)
    assert [c[0] for c in calls] == ["personas", "generate", "distill", "prefer"]
    corpus = str(work / "adversarial-composed.jsonl")
    generate, distill, prefer = calls[1:]
    assert generate[generate.index("--out") + 1] == corpus and "hostile" in generate[generate.index("--kinds") + 1]
    assert generate[generate.index("--tokens") + 1] == recovery.COMPOSED_ADVERSARIAL_TOKENS
    assert f"{corpus}:0.4" in distill[distill.index("--data") + 1]
    assert prefer[prefer.index("--student") + 1] == str(work / "runs" / "demo-mix-replies-then-sft-adv-composed")
    assert prefer[prefer.index("--data") + 1] == corpus  # its own corpus alone, not the wide one
    assert prefer[prefer.index("--max-prompts") + 1] == str(recovery.PREFER_COMPOSED_PROMPTS)
    results = json.loads((recovery.RESULTS / "recovery_general.json").read_text())
    assert "adversarial-composed.jsonl alone" in results["trained"][row]["data"]


def test_the_searched_row_prunes_the_best_ranked_shape_not_over_the_target(recovery, tmp_path, monkeypatch):
    header = ["rank", "layers", "hidden", "MLP", "heads / KV", "params", "held-out loss"]
    leaderboard = {"header": header, "settings": {"params": "90M"},  # ranks out of order: the rank column decides
                   "rows": [["3", "30", "480", "1152", "6 / 3", "89.98M", "4.44"],
                            ["1", "23", "576", "1152", "9 / 3", "94.47M", "4.24"],  # the winner, 5% over the target
                            ["2", "21", "576", "1184", "9 / 3", "89.88M", "4.36"]]}
    search = tmp_path / "leaderboard.json"
    search.write_text(json.dumps(leaderboard))
    monkeypatch.setattr(recovery, "SEARCH", search)
    commands = []
    monkeypatch.setattr(recovery, "taille", lambda *a: commands.append([str(x) for x in a]))

    out = recovery.searched_student(tmp_path / "work")

    (command,) = commands
    assert command[0] == "prune" and command[command.index("--out") + 1] == str(out)
    shape = {flag: command[command.index(flag) + 1] for flag in ("--layers", "--hidden", "--ffn", "--heads", "--kv-heads")}
    assert shape == {"--layers": "21", "--hidden": "576", "--ffn": "1184", "--heads": "9", "--kv-heads": "3"}

    leaderboard["rows"] = [r for r in leaderboard["rows"] if r[0] == "1"]
    search.write_text(json.dumps(leaderboard))
    with pytest.raises(SystemExit, match="no shape at or under 90M"):
        recovery.searched_student(tmp_path / "other")


@pytest.mark.parametrize("student, layers", [("searched-calib", None), ("deep-calib", "24")])
def test_the_character_chain_on_a_calibrated_student_has_its_own_stages_and_pairs(recovery, tmp_path, monkeypatch,
                                                                                  student, layers):
    """The width chain's KD stage (then-sft/kd) and DPO pairs are not reused: the chain starts from the searched
    (or the deep) shape pruned from mix-calibrated scores, trains its own first stage, and draws its own pairs."""
    work = tmp_path / "work"
    width_pairs = work / "runs" / "demo-mix-replies-then-sft-adv-composed-prefer-hostile"
    width_pairs.mkdir(parents=True)
    for file in ("pairs.jsonl", "pairs.meta.json"):
        (width_pairs / file).write_text("{}\n")
    row = f"{student}-mix-replies-then-sft-adv-composed-prefer-hostile-ul-loops"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", row)

    assert [c[0] for c in calls] == ["personas", "generate", "importance", "prune", "distill", "distill", "prefer"]
    importance, prune, kd, sft, prefer = calls[2:]
    mix = "roleplay:0.45,chat:0.35,shakespeare:0.2"
    assert importance[importance.index("--data") + 1] == mix
    assert prune[prune.index("--scores") + 1] == importance[importance.index("--out") + 1]
    assert prune[prune.index("--layers") + 1] != "30"  # the search's shape, not the width student's 30 layers
    assert layers is None or prune[prune.index("--layers") + 1] == layers
    start, first = work / f"{student}-90m", work / "then-sft" / f"kd-{student}"
    assert prune[prune.index("--out") + 1] == str(start)
    assert kd[kd.index("--student") + 1] == str(start) and kd[kd.index("--out") + 1] == str(first)
    assert kd[kd.index("--data") + 1] == mix and kd[kd.index("--loss-on") + 1] == "replies"
    assert parse_count(kd[len(kd) - 1 - kd[::-1].index("--tokens") + 1]) == 448_000  # the last --tokens wins
    assert sft[sft.index("--student") + 1] == str(first)
    assert f"{work / 'adversarial-composed.jsonl'}:0.4" in sft[sft.index("--data") + 1]
    assert prefer[prefer.index("--student") + 1] == str(work / "runs" / f"{student}-mix-replies-then-sft-adv-composed")
    assert "--unlikelihood" in prefer and "--repeat-unlikelihood" in prefer
    assert not (work / "runs" / row / "pairs.jsonl").exists()  # another student's pairs are not its own
    trained = json.loads((recovery.RESULTS / "recovery_general.json").read_text())["trained"][row]
    assert trained["tokens"] == 128_000  # its own two stages (64K each here), not the width chain's 448K first stage


def test_the_baits_prefer_row_writes_the_baits_and_draws_its_dpo_turns_from_them_and_the_composed_corpus(
        recovery, tmp_path, monkeypatch):
    """The never-baits corpus is the DPO stage's alone: written with `--kinds bait:1` at its own budget, added to
    the composed hostile corpus as the stage's turns, never to the CE stage's data, which stays the deep chain's."""
    work = tmp_path / "work"
    row = "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops"
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", row)

    assert [c[0] for c in calls] == ["personas", "generate", "personas", "generate", "importance", "prune", "distill",
                                     "distill", "prefer"]
    composed, baits = str(work / "adversarial-composed.jsonl"), str(work / "never-baits.jsonl")
    bait = calls[3]
    assert bait[bait.index("--out") + 1] == baits and bait[bait.index("--kinds") + 1] == "bait:1"
    assert bait[bait.index("--tokens") + 1] == recovery.BAIT_TOKENS
    sft, prefer = calls[7:]
    assert sft[sft.index("--data") + 1] == f"roleplay:0.6,{composed}:0.4"
    assert prefer[prefer.index("--student") + 1] == str(work / "runs" / "deep-calib-mix-replies-then-sft-adv-composed")
    assert prefer[prefer.index("--data") + 1] == f"{composed},{baits}"
    assert "--unlikelihood" in prefer and "--repeat-unlikelihood" in prefer
    trained = json.loads((recovery.RESULTS / "recovery_general.json").read_text())["trained"][row]
    assert trained["data"].endswith("then prefer on WORK/adversarial-composed.jsonl,WORK/never-baits.jsonl alone"
                                    " + unlikelihood + repeat unlikelihood")


def test_the_facts_prefer_row_writes_the_knowledge_corpus_and_trains_on_the_baits_row_s_pairs_and_its_facts(
        recovery, tmp_path, monkeypatch):
    """The -facts row is the baits row's DPO stage plus knowledge pairs: the knowledge corpus is written with
    `--kinds knowledge:1` at its own budget and passed as --facts (capped), never as drawn turns; the baits row's
    finished pairs are copied so the two rows differ in the knowledge pairs alone."""
    work = tmp_path / "work"
    baits_row = "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-ul-loops"
    row = "deep-calib-mix-replies-then-sft-adv-composed-prefer-baits-facts-ul-loops"
    drawn = work / "runs" / baits_row
    drawn.mkdir(parents=True)
    (drawn / "pairs.jsonl").write_text('{"prompt": []}\n')
    (drawn / "pairs.meta.json").write_text('{"pairs": 1}\n')
    calls = run_after_kd_stage(recovery, work, monkeypatch, "--only", row)

    generated = {c[c.index("--out") + 1]: c for c in calls if c[0] == "generate"}
    knowledge, composed, baits = (str(work / f) for f in ("knowledge.jsonl", "adversarial-composed.jsonl",
                                                          "never-baits.jsonl"))
    assert set(generated) == {knowledge, composed, baits}
    assert generated[knowledge][generated[knowledge].index("--kinds") + 1] == "knowledge:1"
    assert generated[knowledge][generated[knowledge].index("--tokens") + 1] == recovery.KNOWLEDGE_TOKENS
    prefer = calls[-1]
    assert prefer[0] == "prefer" and prefer[prefer.index("--data") + 1] == f"{composed},{baits}"
    assert prefer[prefer.index("--facts") + 1] == knowledge
    assert prefer[prefer.index("--max-facts") + 1] == str(recovery.MAX_FACTS)
    assert (work / "runs" / row / "pairs.jsonl").read_text() == '{"prompt": []}\n'  # the baits row's draws
    trained = json.loads((recovery.RESULTS / "recovery_general.json").read_text())["trained"][row]
    assert trained["data"].endswith(f"+ repeat unlikelihood + {recovery.MAX_FACTS} knowledge pairs from "
                                    "WORK/knowledge.jsonl")
