"""Settings of `taille personas make` (flags and the Python API at once; see taille/options.py). Light:
no torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from taille.errors import TailleError
from taille.options import coerce


SAMPLERS = ("model", "chat")


@dataclass
class CardSettings:
    out: str
    """Folder to write the cards into (OUT/train, OUT/heldout)."""
    count: int = 200
    """Cards to compose (about a fifth are held out)."""
    seed: int = 0
    """The same count and seed give the same cards."""

    def __post_init__(self):
        from taille.characters.cards import capacity

        coerce(self)
        if not 1 <= self.count <= capacity():
            raise TailleError(f"--count {self.count}: between 1 and {capacity()} (the distinct names the tables hold)")


@dataclass
class PersonaEvalSettings:
    """How `taille eval --personas` scores characters (the `persona` part of EvalSettings)."""

    cards: int | None = field(default=None, metadata={"flag": "persona_cards"})
    """Sample replies (breaks, coherence, fidelity, transcripts) on the first N held-out cards only (default:
    all of them)."""
    knowledge_cards: int | None = field(default=None, metadata={"flag": "persona_knowledge_cards"})
    """Ask the knowledge questions on the first N held-out cards (default: all of them; scoring answers is
    cheap next to sampling replies, and a few cards give a few dozen questions, too few to compare models)."""
    seed: int = field(default=1234, metadata={"flag": "persona_seed"})
    """Seed of the sampled replies: the same seed gives the same replies to the same lines."""
    max_new_tokens: int = field(default=64, metadata={"flag": "persona_tokens"})
    """Longest sampled reply, in tokens."""
    temperature: float = field(default=0.7, metadata={"flag": "persona_temperature"})
    """Sampling temperature of the replies."""
    top_p: float = field(default=0.9, metadata={"flag": "persona_top_p"})
    """Nucleus sampling of the replies."""
    sampler: str = field(default="model", metadata={"flag": "persona_sampler"})
    """How the breaks' and transcripts' replies are sampled: model (temperature and top-p alone: the model
    itself) or chat (the chain llama-cpp-python runs for `taille chat`: control tokens banned, each card's
    repeat penalty over the reply's last 64 tokens, top-k 40, top-p, min-p 0.05, then temperature: what a
    player sees). The teacher's fidelity replies are sampled with `model` either way."""
    batch_size: int = field(default=16, metadata={"flag": "persona_batch_size"})
    """Replies sampled together."""
    lines: int | None = field(default=None, metadata={"flag": "persona_lines"})
    """Ask only the first N of the 40 adversarial lines on each card (default: all; the demo samples fewer
    to stay short)."""
    fidelity_lines: int = 4
    """Player lines per held-out card the teacher answers for the fidelity score."""

    def __post_init__(self):
        coerce(self)
        for flag, value in (("--persona-cards", self.cards), ("--persona-knowledge-cards", self.knowledge_cards)):
            if value is not None and value < 1:
                raise TailleError(f"{flag} {value}: must be at least 1")
        if self.lines is not None and self.lines < 1:
            raise TailleError(f"--persona-lines {self.lines}: must be at least 1")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.fidelity_lines < 1:
            raise TailleError("--persona-tokens, --persona-batch-size and --fidelity-lines must be at least 1")
        if self.sampler not in SAMPLERS:
            raise TailleError(f"--persona-sampler {self.sampler}: use one of {', '.join(SAMPLERS)}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise TailleError("--persona-temperature must be positive and --persona-top-p in (0, 1]")
