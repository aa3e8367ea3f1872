"""A recipe: the whole pipeline for one teacher as one YAML file.

```yaml
name: smollm2-90m
teacher: smollm2-135m-instruct      # Hub id, folder, .gguf or embedded name
data: shakespeare                   # distillation and calibration text (any --data form)
correct: {tokens: 200K, lr: 2e-5}   # optional teacher correction
importance: {samples: 128, seq_len: 512}   # optional `data:` of its own: calibration text other than `data`
search: {params: 90M, candidates: 6, steps: 40}   # optional: pick the shape by short distillations
prune: {params: 90M, axes: [mlp, hidden, heads]}  # or an explicit shape {hidden: 480, ffn: 1152, ...}
distill: {tokens: 512K, seq_len: 256, batch_size: 8, lr: 5e-4, loss: {kind: fkl}}
sft: {data: "roleplay:0.6,hostile:0.4", tokens: 64K, lr: 1e-4, loss: {ce_weight: 1, kd_weight: 0}}  # optional
eval: {ppl: [shakespeare], max_tokens: 32768, tasks: [arc_easy]}
```

Each section maps onto the arguments of one stage (the same names as the CLI flags, with underscores);
an unknown key is an error that lists the known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from taille.errors import TailleError

SECTIONS = ("name", "teacher", "data", "out", "personas", "roleplay", "hostile", "baits", "knowledge", "correct", "importance", "search",
            "prune", "distill", "sft", "prefer", "eval", "export")
ROLEPLAY_FIXED = ("teacher", "out", "personas", "prompts")
"""What the run decides for the role-play and hostile stages: the teacher, the file, the cards (the personas
stage's)."""
RUN_FILES = {"roleplay": "roleplay/roleplay.jsonl", "hostile": "hostile/hostile.jsonl", "baits": "baits/baits.jsonl",
             "knowledge": "knowledge/knowledge.jsonl"}
"""The names a stage's `data` (or the prefer stage's `facts`) may give to the files the run writes (with a section of
the same name)."""
FIXED_KINDS = {"baits": "bait:1", "knowledge": "knowledge:1"}
"""The run-file sections whose player lines are of one kind, fixed: the section may not give `kinds`."""
DISTILL_FIXED = ("student", "out", "teacher", "teacher_cache", "resume", "progress")
"""What the run decides for a training stage: the student, the folder, the teacher."""
PREFER_FIXED = ("student", "out")
"""What the run decides for the prefer stage: the distilled student, the folder."""
EXPORT_KEYS = ("quants", "verify", "verify_data", "verify_blocks", "verify_len", "pre_tokenizer")
PRUNE_OWN = ("criterion", "depth_criterion", "seed", "dtype", "device", "precision")
"""The prune section's keys besides the target's: how to prune, whatever the shape (also with a search)."""


@dataclass
class Recipe:
    name: str
    teacher: str
    data: str
    out: str | None = None
    personas: dict | None = None
    """Cards the run composes ({count, seed}: `taille personas make`) into RUN/personas; the role-play stage
    writes from its train half, the evaluation scores characters on its held-out half."""
    roleplay: dict | None = None
    """Role-play data the run has the teacher write from its cards ({tokens, conversations, turns, ...}:
    `taille generate --personas`) into RUN/roleplay/roleplay.jsonl; `roleplay` in `data` then names that
    file (else the shipped corpus)."""
    hostile: dict | None = None
    """The teacher's in-character answers to hostile player lines (`taille generate --personas --kinds ...`: say
    `kinds: adversarial:0.25,hostile:0.75`, `retries: 3`) from the train cards into RUN/hostile/hostile.jsonl;
    `hostile` in a stage's `data` names that file."""
    baits: dict | None = None
    """The teacher's in-character answers to lines that ask each train card to say its own `never` phrases
    (`taille generate --personas --kinds bait:1`; its other keys as `hostile`'s) into RUN/baits/baits.jsonl; `baits` in
    a stage's `data` names that file (the npc recipe's prefer stage: `data: hostile,baits`)."""
    knowledge: dict | None = None
    """The teacher's in-character answers to questions about the train cards' facts (`taille generate --personas
    --kinds knowledge:1`; its other keys as `hostile`'s) into RUN/knowledge/knowledge.jsonl; `knowledge` as the
    prefer stage's `facts` names that file (its knowledge pairs: `taille prefer --facts`)."""
    correct: dict | None = None
    importance: dict = field(default_factory=dict)
    """`taille importance`'s flags; its `data` (else the recipe's) is the calibration text."""
    search: dict | None = None
    prune: dict | None = None
    distill: dict = field(default_factory=dict)
    sft: dict | None = None
    """A second training stage from RUN/distilled into RUN/sft: `taille distill`'s settings with a `data` of its own
    (else the recipe's); the teacher only when its `loss` sets a kd_weight above 0, so `loss: {ce_weight: 1,
    kd_weight: 0}` is cross-entropy on the data's kept replies alone (sequence-level KD). `prefer` starts from it."""
    prefer: dict | None = None
    """DPO on the trained student's own broken replies (RUN/sft, else RUN/distilled; `taille prefer`: {samples,
    max_prompts, beta, ...}) into RUN/preferred, which the evaluation scores beside it and the export writes. Its `data`
    defaults to the run's role-play file (else the shipped corpus), its `personas` to the run's cards."""
    eval: dict = field(default_factory=dict)
    export: dict | None = None
    """GGUF files of the distilled student: {quants: [q4_k_m, ...], verify: true, pre_tokenizer: null}."""
    source: str | None = None
    """The file it was read from."""

    def run_dir(self, out: str | None = None) -> Path:
        return Path(out or self.out or Path("runs") / self.name)


def _check_keys(section: str, values, known) -> dict | None:
    if values is None:
        return None
    if not isinstance(values, dict):
        raise TailleError(f"recipe section '{section}' must be a mapping, not {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TailleError(f"recipe section '{section}': unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return values


def _keys(cls, *fixed: str) -> tuple[str, ...]:
    """A section's keys: the fields of the stage's settings, less those the recipe itself decides."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed)


def parse_recipe(values: dict, source: str | None = None) -> Recipe:
    if not isinstance(values, dict):
        raise TailleError(f"{source or 'the recipe'}: a recipe is a YAML mapping (name:, teacher:, data:, ...)")
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise TailleError(f"{source or 'recipe'}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    for required in ("name", "teacher", "data"):
        if not values.get(required):
            raise TailleError(f"{source or 'recipe'}: '{required}' is required")
    if values.get("search") is None and values.get("prune") is None:
        raise TailleError(f"{source or 'recipe'}: give a 'prune' target or a 'search' section (or both)")
    from taille.distill.config import CorrectConfig, DistillConfig, LossConfig
    from taille.eval.config import EvalSettings
    from taille.prune.config import ImportanceConfig, Target
    from taille.search.search import SearchSettings

    distill = _check_keys("distill", values.get("distill") or {}, _keys(DistillConfig, "data", *DISTILL_FIXED))
    sft = _check_keys("sft", values.get("sft"), _keys(DistillConfig, *DISTILL_FIXED))
    for name, section in (("distill", distill), ("sft", sft)):
        if section and "loss" in section:
            _check_keys(f"{name}.loss", section["loss"], _keys(LossConfig))
    from taille.characters.prefer import PreferSettings
    from taille.characters.settings import CardSettings
    from taille.generate.generate import GenerateSettings

    for section in RUN_FILES:  # the stages that play the run's cards
        if values.get(section) is not None and values.get("personas") is None:
            raise TailleError(f"{source or 'recipe'}: a '{section}' section needs a 'personas' section (the cards it plays)")
    if values.get("hostile") is not None and not (values["hostile"] or {}).get("kinds"):
        raise TailleError(f"{source or 'recipe'}: section 'hostile' needs 'kinds' (say adversarial:0.25,hostile:0.75): "
                          "without it the teacher answers ordinary role-play lines")
    recipe = Recipe(
        name=str(values["name"]), teacher=str(values["teacher"]), data=str(values["data"]), out=values.get("out"),
        personas=_check_keys("personas", values.get("personas"), _keys(CardSettings, "out")),
        roleplay=_check_keys("roleplay", values.get("roleplay"), _keys(GenerateSettings, *ROLEPLAY_FIXED)),
        hostile=_check_keys("hostile", values.get("hostile"), _keys(GenerateSettings, *ROLEPLAY_FIXED)),
        baits=_check_keys("baits", values.get("baits"), _keys(GenerateSettings, *ROLEPLAY_FIXED, "kinds")),
        knowledge=_check_keys("knowledge", values.get("knowledge"), _keys(GenerateSettings, *ROLEPLAY_FIXED, "kinds")),
        correct=_check_keys("correct", values.get("correct"), _keys(CorrectConfig, "teacher", "data", "out", "resume")),
        importance=_check_keys("importance", values.get("importance") or {}, _keys(ImportanceConfig, "model", "out")),
        search=_check_keys("search", values.get("search"), _keys(SearchSettings)),
        prune=_check_keys("prune", values.get("prune"), _keys(Target) + PRUNE_OWN),
        distill=distill, sft=sft, prefer=_check_keys("prefer", values.get("prefer"), _keys(PreferSettings, *PREFER_FIXED)),
        eval=_check_keys("eval", values.get("eval") or {}, _keys(EvalSettings)),
        export=_check_keys("export", values.get("export"), EXPORT_KEYS), source=source)
    # build every stage's settings now: a bad value fails before hours of work, not at that stage
    if recipe.personas is not None:
        CardSettings(out="OUT", **recipe.personas)
    for section in RUN_FILES:
        if getattr(recipe, section) is not None:
            run_file_settings(recipe, section, recipe.teacher, Path("RUN"))
    if recipe.correct is not None:
        correct_config(recipe, "OUT")
    importance_config(recipe, recipe.teacher, "OUT")
    if recipe.search:
        SearchSettings(**recipe.search)
    prune_config(recipe, recipe.teacher, "OUT", "SCORES", shape={"hidden": 1} if recipe.search else None)
    distill_config(recipe, "STUDENT", "OUT")
    if recipe.sft is not None:
        sft_config(recipe, "STUDENT", "OUT")
    if recipe.prefer is not None:
        prefer_settings(recipe, "STUDENT", "OUT", check_files=False)
    if recipe.eval:
        eval_settings(recipe)
    export_settings(recipe, "OUT.gguf", "q4_k_m")
    export_quants(recipe)
    return recipe


def export_quants(recipe: Recipe) -> list[str]:
    """The GGUF types the export stage writes (checked names; none without an 'export' section)."""
    if not recipe.export:
        return []
    from taille.models.quant import get_quant

    quants = recipe.export.get("quants", ["q4_k_m"])
    quants = [quants] if isinstance(quants, str) else quants
    if not isinstance(quants, list) or not quants:
        raise TailleError("recipe section 'export': 'quants' is a list of GGUF types (f16, q8_0, q4_k_m, q4_0)")
    for quant in quants:
        get_quant(str(quant))
    return [str(q).lower() for q in quants]


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        from taille.paths import package_dir

        shipped = package_dir("taille") / "recipes" / f"{path.name.removesuffix('.yaml')}.yaml"
        if not shipped.is_file():
            names = sorted(p.stem for p in (package_dir("taille") / "recipes").glob("*.yaml"))
            raise TailleError(f"no recipe {path}: give a YAML file or a shipped recipe ({', '.join(names)})")
        path = shipped
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TailleError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(values, str(path))


# --- each stage's settings: the section's values, and what the run decides (paths, the teacher) -------


def data_spec(recipe: Recipe, run: Path | None = None, spec: str | None = None) -> str:
    """The recipe's `data` (or `spec`, a stage's own), with `roleplay` and `hostile` naming the files the run writes
    (RUN_FILES) when it has their sections (`roleplay` is otherwise the shipped corpus; `hostile` has none: refused)."""
    from taille.data.mixture import parse_mixture

    spec = recipe.data if spec is None else str(spec)
    parts = parse_mixture(spec)
    sources = [src.strip() for src, _ in parts] if parts is not None else [src.strip() for src in spec.split(",")]
    for name, what in (("hostile", "answers to hostile lines"), ("baits", "answers to its cards' never-phrase baits"),
                       ("knowledge", "answers to questions about its cards' facts")):
        if name in sources and getattr(recipe, name) is None:
            raise TailleError(f"{recipe.source or 'recipe'}: data {spec} names '{name}', the run's {what}: add a "
                              f"'{name}' section (with 'personas') that writes them")
    if run is None:
        return spec
    own = {name: str(run / path) for name, path in RUN_FILES.items() if getattr(recipe, name) is not None}
    if parts is None:  # one source, or the files of a prefer stage (comma-separated, no weights)
        return ",".join(own.get(src, src) for src in sources)
    return ",".join(f"{own.get(src.strip(), src)}:{w:g}" for src, w in parts)


def run_file_settings(recipe: Recipe, section: str, teacher: str, run: Path):
    """The settings of a stage that has the teacher write one of RUN_FILES (`roleplay`, `hostile`) from the run's
    train cards."""
    from taille.generate.generate import GenerateSettings

    fixed = {"kinds": FIXED_KINDS[section]} if section in FIXED_KINDS else {}
    return GenerateSettings(teacher=teacher, out=str(run / RUN_FILES[section]), personas=str(run / "personas" / "train"),
                            **getattr(recipe, section), **fixed)


def prefer_settings(recipe: Recipe, student: str, out: str, run: Path | None = None, check_files: bool = True):
    """The prefer stage's settings: its data the run's role-play file when the run writes one (else the shipped
    corpus), its cards the run's, unless the section names others. `check_files` False while the run's file is
    not written yet (a recipe checked before it runs)."""
    from taille.characters.prefer import PreferSettings

    values = {"data": "roleplay", **(recipe.prefer or {})}
    for key in ("data", "facts"):  # `roleplay`, `hostile`, `baits`, `knowledge`: the run's files
        if values.get(key) is not None:
            spec = str(values[key])
            values[key] = data_spec(recipe, run or Path("RUN"), spec)
            if not check_files and values[key] != spec:
                values[key] = "roleplay"  # the settings' own checks, without the file the run will write
    if "personas" not in values and recipe.personas is not None:
        values["personas"] = str((run or Path("RUN")) / "personas")
    return PreferSettings(student=student, out=out, **values)


def trained_student(recipe: Recipe, run: Path) -> Path:
    """The student the training stages end with: RUN/sft when the recipe has `sft`, else RUN/distilled."""
    return run / ("sft" if recipe.sft is not None else "distilled")


def final_student(recipe: Recipe, run: Path) -> Path:
    """The student the run ends with: RUN/preferred when the recipe has `prefer`, else trained_student's."""
    return run / "preferred" if recipe.prefer is not None else trained_student(recipe, run)


def importance_config(recipe: Recipe, teacher: str, out: str, run: Path | None = None):
    """The importance stage's settings: its calibration blocks from the section's own `data` if it names one,
    else from the recipe's (what distillation reads)."""
    from taille.prune.config import ImportanceConfig

    section = dict(recipe.importance)
    if "data" in section and not str(section["data"] or "").strip():
        raise TailleError(f"{recipe.source or 'recipe'}: section 'importance': 'data' is a --data spec (calibration "
                          "text), not empty")
    data = data_spec(recipe, run, section.pop("data", None))
    return ImportanceConfig(model=teacher, data=data, out=out, **section)


def prune_config(recipe: Recipe, teacher: str, out: str, scores: str, shape: dict | None = None):
    """The prune stage's settings: the recipe's target, or an explicit shape (the search's winner)."""
    from taille.prune.config import PruneConfig, Target

    section = recipe.prune or {}
    own = {k: v for k, v in section.items() if k in PRUNE_OWN}
    target = {k: v for k, v in section.items() if k not in PRUNE_OWN}
    if recipe.search and target:
        raise TailleError("a recipe with 'search' prunes to the search's winner; its 'prune' section may only "
                          f"set {', '.join(PRUNE_OWN)} (not {', '.join(sorted(target))})")
    return PruneConfig(model=teacher, out=out, scores=scores, target=Target(**(shape or target)), **own)


def distill_config(recipe: Recipe, student: str, out: str, teacher: str | None = None, run: Path | None = None):
    from taille.distill.config import DistillConfig

    return DistillConfig(student=student, data=data_spec(recipe, run), out=out, teacher=teacher or recipe.teacher, resume=True,
                         **recipe.distill)


def sft_config(recipe: Recipe, student: str, out: str, teacher: str | None = None, run: Path | None = None):
    """The sft stage's settings: its own `data` (else the recipe's), the teacher only for a loss with a KD term."""
    from taille.distill.config import DistillConfig

    section = dict(recipe.sft)
    data = data_spec(recipe, run, section.pop("data", None))
    kd = (section.get("loss") or {}).get("kd_weight")
    return DistillConfig(student=student, data=data, out=out, teacher=(teacher or recipe.teacher) if kd else None,
                         resume=True, **section)


def correct_config(recipe: Recipe, out: str, run: Path | None = None):
    from taille.distill.config import CorrectConfig

    return CorrectConfig(teacher=recipe.teacher, data=data_spec(recipe, run), out=out, resume=True, **recipe.correct)


def export_settings(recipe: Recipe, out: str, quant: str):
    """The settings of one GGUF file of the export stage (its verification's amount of text among them)."""
    from taille.export.config import ExportSettings

    values = {k: v for k, v in (recipe.export or {}).items() if k != "quants"}
    values.setdefault("verify", True)  # a recipe's files are checked in llama.cpp unless it says not to
    return ExportSettings(out=out, quant=quant, **values)


def eval_settings(recipe: Recipe, run: Path | None = None, teacher: str | None = None):
    """The eval section; with a personas section, characters are scored on the run's held-out cards (unless
    the section names other cards) against the teacher."""
    from taille.eval.config import EvalSettings

    values = dict(recipe.eval)
    if not values:  # perplexity on each source of the data (held-out plays for shakespeare)
        from taille.data.mixture import parse_mixture

        spec = data_spec(recipe, run)
        values = {"ppl": [src for src, _ in parse_mixture(spec) or [(spec, 1.0)]]}
    if recipe.personas is not None and "personas" not in values:
        values["personas"] = str((run or Path("RUN")) / "personas")
    if values.get("personas"):
        values.setdefault("reference", teacher or recipe.teacher)
    return EvalSettings(**values)


def plan_recipe(recipe: Recipe, config=None) -> dict:
    """The shapes a recipe will produce, from the teacher's config alone (no weights): the prune target's
    shape and parameter count, and the search's candidates."""
    from taille.models.load import load_config
    from taille.prune.prune import resolve_shape
    from taille.prune.shape import count_params, shape_of

    config = config or load_config(recipe.teacher)
    out = {"teacher": {"shape": shape_of(config).to_dict(), "params": count_params(config)}}
    if not recipe.search:
        shape, drop = resolve_shape(config, prune_config(recipe, recipe.teacher, "OUT", "SCORES").target)
        out["prune"] = {"shape": shape.to_dict(), "params": count_params(config, shape), "drop_layers": drop}
    if recipe.search:
        from taille.search.search import SearchSettings, default_shape, pick

        s = SearchSettings(**recipe.search)
        default = default_shape(config, s.params, s.tolerance)
        out["search"] = [{"shape": c.shape.to_dict(), "params": c.params, "default": c.shape == default}
                         for c in pick(config, s, default)]
    return out
