"""Settings of `taille export` (see taille/options.py)."""

from __future__ import annotations

from dataclasses import dataclass

from taille.errors import TailleError

FORMATS = ("gguf", "hf")


@dataclass
class ExportSettings:
    out: str
    """The .gguf file (--format gguf) or folder (--format hf) to write."""
    format: str = "gguf"
    """gguf (llama.cpp) or hf (a clean safetensors folder)."""
    quant: str = "q4_k_m"
    """GGUF type: f16, q8_0, q4_k_m, q4_0 (also f32, bf16, q6_k, q5_k_m)."""
    verify: bool = False
    """Run the file in llama.cpp against the PyTorch model: perplexity ratio and mean KL against what a
    correct export of that type reaches, top-1 agreement, tokenizer and chat template."""
    verify_data: str = "shakespeare"
    """Held-out text for --verify."""
    verify_blocks: int = 8
    """Blocks of --verify-len tokens compared."""
    verify_len: int = 128
    """Tokens per compared block."""
    name: str | None = None
    """general.name in the file (default: the model's name)."""
    pre_tokenizer: str | None = None
    """llama.cpp pre-tokenizer name to write when the converter does not recognize the tokenizer's
    (qwen2, llama-bpe...)."""
    dtype: str = "auto"
    """--format hf: weight dtype (auto keeps fp32; bf16, fp16)."""
    verbose: bool = False
    """Show the converter's and quantizer's own logs (per-tensor lines)."""

    def __post_init__(self):
        from taille.models.quant import get_quant

        if self.format not in FORMATS:
            raise TailleError(f"--format {self.format}: use gguf or hf")
        if self.format == "gguf":
            get_quant(self.quant)
            self.quant = self.quant.lower()
        if self.verify_blocks < 1 or self.verify_len < 2:
            raise TailleError("--verify-blocks must be at least 1 and --verify-len at least 2")
        if self.verify and self.format != "gguf":
            raise TailleError("--verify compares a GGUF file with PyTorch: use it with --format gguf")
