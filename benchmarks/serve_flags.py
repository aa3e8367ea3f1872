"""Which llama-server settings give `taille serve` the most requests/s at 4 clients on this machine.

The same 90M student GGUF as benchmarks/serve_load.py (run that first: it makes the file), each setting in
its own `taille serve` process, one after the other: a warm-up, 1 client x 6 requests, 4 clients x 8. The
one-at-a-time engine (llama-cpp-python in process) first, as the same-run baseline. Extra llama-server
arguments are appended to the command taille builds (EXTRA_LLAMA_ARGS, read by a wrapper around `taille`).

Run:  .venv/bin/python benchmarks/serve_flags.py [--model FILE.gguf]   (~4 min alone on 2 cores)
Writes benchmarks/results/serve_flags.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import serve_load as sl

WRAPPER = """
import os, runpy, sys
import taille.serve.engine as engine
original = engine.LlamaServer.command
extra = os.environ.get("EXTRA_LLAMA_ARGS", "").split()
engine.LlamaServer.command = lambda self: original(self) + extra
sys.argv = ["taille", *sys.argv[1:]]
runpy.run_module("taille", run_name="__main__")
"""
SERVER = ["--engine", "llama-server", "--parallel", "4"]
CONFIGS = [("one-at-a-time", ["--engine", "llama-cpp-python"], ""),
           ("llama-server (taille's settings)", SERVER, ""),
           ("llama-server --poll 0", SERVER, "--poll 0"),
           ("llama-server, 1 thread", [*SERVER, "--threads", "1"], ""),
           ("llama-server --poll 0 -ub 16", SERVER, "--poll 0 -ub 16"),
           ("llama-server (taille's settings, again)", SERVER, "")]
PERSONAS = ["brenna-ironhand", "old-tam", "halcyon"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(tempfile.gettempdir()) / "taille-serve-load" / "student-90m-q8_0.gguf"))
    args = parser.parse_args()
    results = {}
    for name, engine_args, extra in CONFIGS:
        port = sl.free_port()
        threads = [] if "--threads" in engine_args else ["--threads", "2"]
        cmd = [sys.executable, "-c", WRAPPER, "serve", args.model, "--port", str(port), "--queue", "64", "--ctx", "2048",
               "--max-tokens", "256", *threads, *engine_args]
        log = tempfile.NamedTemporaryFile(prefix="serve-flags-", suffix=".log", delete=False)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "EXTRA_LLAMA_ARGS": extra, "TAILLE_LOG": "WARNING"})
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit(f"{name}: taille serve did not start; log: {log.name}")
                time.sleep(0.3)
        try:
            sl.load(port, PERSONAS, 1, 2, 64)  # warm-up
            results[name] = {"extra": extra, "engine_args": engine_args, "1": sl.load(port, PERSONAS, 1, 6, 64),
                             "4": sl.load(port, PERSONAS, 4, 8, 64)}
        finally:
            proc.terminate()
            proc.wait(60)
        write(results)


def write(results: dict) -> None:
    base = results.get("one-at-a-time", {}).get("4", {}).get("requests_per_s")
    lines = ["# llama-server settings under `taille serve` (90M student, q8_0, 64 tokens, 2 cores)", "",
             "| setting | 1 client req/s | 1 client decode tok/s | 4 clients req/s (x one-at-a-time) | 4 clients decode tok/s "
             "| 4 clients first token p50 (s) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        one, four = r["1"], r["4"]
        ratio = f" ({four['requests_per_s'] / base:.2f}x)" if base else ""
        lines.append(f"| {name} | {one['requests_per_s']:.3f} | {one['decode_tokens_per_s']:.1f} | "
                     f"{four['requests_per_s']:.3f}{ratio} | {four['decode_tokens_per_s']:.1f} | {four['first_token_p50']} |")
    (sl.RESULTS / "serve_flags.md").write_text("\n".join(lines) + "\n")
    (sl.RESULTS / "serve_flags.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
