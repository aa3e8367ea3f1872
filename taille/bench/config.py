"""Settings of `taille bench` (see taille/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from taille.errors import TailleError
from taille.options import Floats, Ints, coerce


@dataclass
class BenchSettings:
    prompt: int = 256
    """Prompt tokens (prefill)."""
    decode: int = 64
    """Tokens generated one by one (decode)."""
    ctx: int = 2048
    """Context window the model is loaded with."""
    repeats: int = 3
    """Measured runs (the median is shown) after one warm-up."""
    threads: int | None = None
    """CPU threads (default: every core)."""
    budgets: Floats = (4, 6, 8, 12)
    """Memory budgets in GB for the fit table."""
    contexts: Ints = (2048, 4096, 8192, 32768)
    """Context lengths for the fit table."""

    def __post_init__(self):
        coerce(self)
        if min(self.prompt, self.decode, self.repeats) < 1:
            raise TailleError("--prompt, --decode and --repeats must be at least 1")
        if self.prompt + self.decode > self.ctx:
            raise TailleError(f"--prompt {self.prompt} + --decode {self.decode} do not fit in --ctx {self.ctx}")
        if self.threads is not None and self.threads < 1:
            raise TailleError(f"--threads {self.threads}: must be at least 1")
        if min(self.budgets) <= 0 or min(self.contexts) < 1:
            raise TailleError("--budgets and --contexts must be positive")
