"""taille: cut a large language model down to a small one that keeps its quality (Minitron pruning +
knowledge distillation), then run it on an ordinary PC (GGUF for llama.cpp).

`import taille` stays light: torch, transformers and friends load inside the functions that need them.
"""

__version__ = "0.1.0"
