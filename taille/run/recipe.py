"""A recipe: the whole pipeline for one teacher as one YAML file.

```yaml
name: smollm2-90m
teacher: smollm2-135m-instruct      # Hub id, folder, .gguf or embedded name
data: shakespeare                   # distillation and calibration text (any --data form)
correct: {tokens: 200K, lr: 2e-5}   # optional teacher correction
importance: {samples: 128, seq_len: 512}
search: {params: 90M, candidates: 6, steps: 40}   # optional: pick the shape by short distillations
prune: {params: 90M, axes: [mlp, hidden, heads]}  # or an explicit shape {hidden: 480, ffn: 1152, ...}
distill: {tokens: 512K, seq_len: 256, batch_size: 8, lr: 5e-4, loss: {kind: fkl}}
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

SECTIONS = ("name", "teacher", "data", "out", "correct", "importance", "search", "prune", "distill", "eval", "export")
CORRECT_KEYS = ("tokens", "seq_len", "batch_size", "grad_accum", "lr", "min_lr", "warmup", "precision", "seed")
IMPORTANCE_KEYS = ("samples", "seq_len", "batch_size", "depth_samples", "depth_metric", "block_sizes")
PRUNE_KEYS = ("params", "ratio", "axes", "tolerance", "hidden", "ffn", "heads", "kv_heads", "layers", "drop_layers",
              "criterion", "depth_criterion", "seed")
DISTILL_SKIP = ("student", "data", "out", "teacher", "teacher_cache", "resume", "progress", "loss")
EXPORT_KEYS = ("quants", "verify", "pre_tokenizer")
LOSS_KEYS = ("kind", "beta", "temperature", "ce_weight", "kd_weight")


@dataclass
class Recipe:
    name: str
    teacher: str
    data: str
    out: str | None = None
    correct: dict | None = None
    importance: dict = field(default_factory=dict)
    search: dict | None = None
    prune: dict | None = None
    distill: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    export: dict | None = None
    """GGUF files of the distilled student: {quants: [q4_k_m, ...], verify: true, pre_tokenizer: null}."""
    source: str | None = None
    """The file it was read from."""

    def run_dir(self, out: str | None = None) -> Path:
        return Path(out or self.out or Path("runs") / self.name)


def _check_keys(section: str, values, known) -> dict:
    if values is None:
        return None
    if not isinstance(values, dict):
        raise TailleError(f"recipe section '{section}' must be a mapping, not {type(values).__name__}")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TailleError(f"recipe section '{section}': unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return dict(values)


def distill_keys() -> tuple[str, ...]:
    from taille.distill.train import DistillConfig

    return tuple(f.name for f in dataclasses.fields(DistillConfig) if f.name not in DISTILL_SKIP) + ("loss",)


def search_keys() -> tuple[str, ...]:
    from taille.search.search import SearchSettings

    return tuple(f.name for f in dataclasses.fields(SearchSettings))


def eval_keys() -> tuple[str, ...]:
    from taille.eval.run import EvalSettings

    return tuple(f.name for f in dataclasses.fields(EvalSettings))


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
    distill = _check_keys("distill", values.get("distill") or {}, distill_keys())
    if "loss" in distill:
        _check_keys("distill.loss", distill["loss"], LOSS_KEYS)
    recipe = Recipe(
        name=str(values["name"]), teacher=str(values["teacher"]), data=str(values["data"]), out=values.get("out"),
        correct=_check_keys("correct", values.get("correct"), CORRECT_KEYS),
        importance=_check_keys("importance", values.get("importance") or {}, IMPORTANCE_KEYS),
        search=_check_keys("search", values.get("search"), search_keys()),
        prune=_check_keys("prune", values.get("prune"), PRUNE_KEYS),
        distill=distill, eval=_check_keys("eval", values.get("eval") or {}, eval_keys()),
        export=_check_keys("export", values.get("export"), EXPORT_KEYS), source=source)
    # build every stage's settings now: a bad value fails before hours of work, not at that stage
    target(recipe)
    if recipe.search:
        from taille.search.search import SearchSettings

        SearchSettings(**recipe.search)
    distill_config(recipe, "STUDENT", "OUT")
    if recipe.eval:
        eval_settings(recipe)
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


# --- each stage's settings --------------------------------------------------------------------------


def calibration(recipe: Recipe):
    from taille.prune.prune import Calibration

    keys = {k: v for k, v in recipe.importance.items() if k in ("samples", "seq_len", "batch_size", "depth_samples")}
    return Calibration(data=recipe.data, **keys)


def target(recipe: Recipe, shape: dict | None = None):
    """The prune target: the recipe's, or an explicit shape (the search's winner)."""
    from taille.prune.prune import Target

    if shape is not None:
        return Target(**shape)
    values = {k: v for k, v in (recipe.prune or {}).items() if k not in ("criterion", "depth_criterion", "seed")}
    if "axes" in values:
        axes = values["axes"]
        values["axes"] = tuple(axes.split(",") if isinstance(axes, str) else axes)
    if "params" in values:
        values["params"] = str(values["params"])
    if recipe.search:
        if values:
            raise TailleError("a recipe with 'search' prunes to the search's winner; its 'prune' section may only "
                              f"set criterion, depth_criterion, seed (not {', '.join(sorted(values))})")
        return None  # the search decides the shape
    return Target(**values)


def distill_config(recipe: Recipe, student: str, out: str, teacher: str | None = None):
    from taille.distill.losses import LossConfig
    from taille.distill.train import DistillConfig
    from taille.prune.shape import parse_params

    values = dict(recipe.distill)
    loss = LossConfig(**values.pop("loss", {}))
    if "tokens" in values:
        values["tokens"] = parse_params(str(values["tokens"]))
    if values.get("eval_data") == "none":
        values["eval_data"] = None
    return DistillConfig(student=student, data=recipe.data, out=out, teacher=teacher or recipe.teacher, loss=loss,
                         resume=True, **values)


def correct_config(recipe: Recipe, out: str):
    from taille.distill.losses import LossConfig
    from taille.distill.train import DistillConfig
    from taille.prune.shape import parse_params

    values = dict(recipe.correct)
    values["tokens"] = parse_params(str(values.get("tokens", "1M")))
    values.setdefault("lr", 1e-5)
    values.setdefault("min_lr", values["lr"] / 10)
    return DistillConfig(student=recipe.teacher, data=recipe.data, out=out, loss=LossConfig(ce_weight=1.0, kd_weight=0.0),
                         resume=True, **values)


def eval_settings(recipe: Recipe):
    from taille.eval.run import EvalSettings

    values = dict(recipe.eval)
    if not values:
        values = {"ppl": [recipe.data]}
    return EvalSettings(**values)


def plan_recipe(recipe: Recipe, config=None) -> dict:
    """The shapes a recipe will produce, from the teacher's config alone (no weights): the prune target's
    shape and parameter count, and the search's candidates."""
    from taille.models.load import load_config
    from taille.prune.prune import resolve_shape
    from taille.prune.shape import count_params, shape_of

    config = config or load_config(recipe.teacher)
    out = {"teacher": {"shape": shape_of(config).to_dict(), "params": count_params(config)}}
    t = target(recipe)
    if t is not None:
        shape, drop = resolve_shape(config, t)
        out["prune"] = {"shape": shape.to_dict(), "params": count_params(config, shape), "drop_layers": drop}
    if recipe.search:
        from taille.search.search import SearchSettings, default_shape, pick

        s = SearchSettings(**recipe.search)
        default = default_shape(config, s.params)
        out["search"] = [{"shape": c.shape.to_dict(), "params": c.params, "default": c.shape == default}
                         for c in pick(config, s, default)]
    return out
