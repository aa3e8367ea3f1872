"""Token cache: the first `load_tokens` tokenizes and writes the stream, the second memory-maps it.

Run:  .venv/bin/python benchmarks/token_cache.py [--data shakespeare:train] [--model smollm2-135m-instruct]
Prints a table and writes benchmarks/results/token_cache.json. Both runs happen in this process, one
after the other, in a fresh cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="shakespeare:train")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "token_cache.json"))
    args = parser.parse_args()

    from taille.models.load import load_tokenizer

    tokenizer = load_tokenizer(args.model)  # before the cache moves: the converted model stays where it is
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TAILLE_CACHE"] = cache
        from taille.data.tokens import load_tokens

        timings = []
        for _ in range(2):
            start = time.perf_counter()
            stream = load_tokens(args.data, tokenizer, progress=False)
            checksum = int(stream.tokens[:: max(1, len(stream) // 4096)].sum())  # touch the data
            timings.append(time.perf_counter() - start)
        tokens = len(stream)
    result = {
        "data": args.data, "model": args.model, "tokens": tokens, "checksum": checksum,
        "first_s": round(timings[0], 4), "second_s": round(timings[1], 4),
        "speedup": round(timings[0] / timings[1], 1), "tokenize_tokens_per_s": round(tokens / timings[0]),
    }
    print(f"| data | tokens | first run (tokenize) | second run (cache) | speed-up |\n|---|---|---|---|---|\n"
          f"| {args.data} | {tokens:,} | {timings[0]:.3f} s | {timings[1]:.4f} s | {result['speedup']}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
