"""`taille export --format hf`: a clean Hugging Face folder anyone can load with `from_pretrained`."""

from __future__ import annotations

import logging
from pathlib import Path

from taille.errors import TailleError

log = logging.getLogger(__name__)


def export_hf(model: str, out: str | Path, dtype: str = "auto") -> dict:
    """A clean Hugging Face folder: config, generation config, safetensors weights, tokenizer and chat
    template; taille's own files (prune record, training state) are left behind."""
    from taille.models.load import load_model, resolve_dtype

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TailleError(f"--out {out} exists and is not empty; pick a new folder")
    lm, tokenizer = load_model(model, dtype="fp32", device="cpu")
    if dtype != "auto":
        lm.to(resolve_dtype(dtype, "cpu"))
    lm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = sorted(p.name for p in out.iterdir())
    log.info("wrote %s: %s", out, ", ".join(files))
    return {"model": model, "out": str(out), "files": files, "dtype": str(next(lm.parameters()).dtype)}
