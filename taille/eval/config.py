"""Settings of `taille eval` (flags, the recipe's `eval` section and the Python API at once; see
taille/options.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from taille.characters.settings import PersonaEvalSettings
from taille.errors import TailleError
from taille.options import Names, Texts, coerce, from_mapping

from taille.models.precision import check_precision


@dataclass
class EvalSettings:
    ppl: Texts = field(default_factory=list)
    """Held-out text for perplexity; repeat for several: shakespeare (its held-out plays),
    wikitext2:PATH/wiki.test.raw, a file or folder, hf://name:split."""
    window: int = 1024
    """Tokens per perplexity window."""
    stride: int | None = None
    """Tokens between window starts (default: --window, non-overlapping). With stride < window each scored
    token has at least window - stride tokens of context."""
    batch_size: int = 4
    """Windows or task requests per forward pass."""
    max_tokens: int | None = None
    """Only the first N tokens of each text."""
    tasks: Names = field(default_factory=tuple)
    """Zero-shot tasks through lm-evaluation-harness, comma-separated: arc_easy,arc_challenge,piqa,
    winogrande,hellaswag,lambada_openai,boolq,copa,openbookqa,sciq (any lm-eval task online)."""
    task_data: str | None = None
    """Offline: folder with local copies of the task files (the layout of shared/data/eval)."""
    limit: int | None = None
    """At most N examples per task."""
    num_fewshot: int = 0
    """Few-shot examples per prompt."""
    speed: bool = False
    """Prefill and decode tokens/s and peak memory at batch 1 and 8."""
    reference: str | None = None
    """A model (e.g. the teacher) to measure each model's KL to."""
    reference_data: str = "shakespeare"
    """Held-out text for --reference."""
    reference_tokens: int = 16384
    """Held-out tokens of --reference-data the KL is measured on."""
    precision: str = "auto"
    """auto (bf16-mixed on GPUs and on CPUs with AMX/AVX512-BF16, else fp32), bf16-mixed or fp32."""
    dtype: str = "auto"
    """Weight dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    seed: int = 1234
    """Seed for lm-eval (few-shot sampling)."""
    personas: str | None = None
    """Score each model as a game character on these cards (a folder of persona YAML files, or a `taille
    personas make` folder: its held-out half): knowledge, breaks, coherence, fidelity, transcripts. Needs
    --reference (the teacher: it judges coherence and writes the fidelity replies)."""
    persona: PersonaEvalSettings = field(default_factory=PersonaEvalSettings)

    def __post_init__(self):
        coerce(self)
        self.tasks = list(self.tasks)
        if not isinstance(self.persona, PersonaEvalSettings):
            self.persona = from_mapping(PersonaEvalSettings, self.persona, "eval.persona")
        if not (self.ppl or self.tasks or self.speed or self.reference or self.personas):
            raise TailleError("nothing to evaluate: give --ppl DATA, --tasks, --speed, --reference or --personas")
        if self.personas is not None and not self.reference:
            raise TailleError("--personas needs --reference TEACHER (it judges coherence and writes the fidelity replies)")
        if self.window < 2 or self.batch_size < 1:
            raise TailleError("--window must be at least 2 and --batch-size at least 1")
        if self.stride is not None and not 1 <= self.stride <= self.window:
            raise TailleError(f"--stride {self.stride}: between 1 and --window {self.window}")
        for name in ("limit", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TailleError(f"--{name.replace('_', '-')} must be at least 1")
        if self.num_fewshot < 0 or self.reference_tokens < 2:
            raise TailleError("--num-fewshot must be 0 or more and --reference-tokens at least 2")
        check_precision(self.precision)
