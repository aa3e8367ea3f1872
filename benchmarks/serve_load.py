"""`taille serve` under load: the one-at-a-time engine (llama-cpp-python in process) and llama.cpp's own
server (llama-server, --parallel 4) side by side in one run, on the same GGUF, prompts and token budget.

Each engine is started as users start it (`taille serve FILE --engine E`, 127.0.0.1, a free port), in its
own process, one after the other (never both at once: they would share the cores). For 1, 2, 4 and 8
clients, each client thread sends its requests one after another (streaming, with usage), to the three
shipped personas in turn. Reported per engine and client count: requests/s, aggregate decode tokens/s
(completion tokens over the wall time), time to first token p50/p95, latency p50/p95, failures.

Then the persona prompt cache, on a fresh server of each engine: a persona whose system prompt is long
(about 1,700 tokens: its knowledge list padded with numbered facts), asked twice: time to first token
cold (each persona's first request) and warm (its second, another question, after the other personas
spoke in between, as characters take turns in a game), median over 3 personas. And the
engine's peak memory with 1 and with 4 slots (llama-server's VmHWM), for the memory one extra slot costs.

Run:  .venv/bin/python benchmarks/serve_load.py [--model FILE.gguf] [--max-tokens 64]
Without --model it makes the 90M width student of SmolLM2-135M-Instruct (prune to 90M, q8_0 export) once
in --work. Writes benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
QUESTIONS = ("Where can I find coal?", "What news from the north pass?", "How much is a room?",
             "Is the reactor safe?", "What do you want from me?", "Tell me about the mine.",
             "Tell me a long story about your life.", "Describe your village in detail.")
ENGINES = (("one-at-a-time (today)", ["--engine", "llama-cpp-python"]),
           ("llama.cpp server, --parallel 4", ["--engine", "llama-server", "--parallel", "4"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def student(work: Path) -> Path:
    """The 90M width student (hidden 480, MLP 1152, 6/3 heads) as q8_0: pruned, not distilled (serving speed
    does not depend on what the weights learned)."""
    gguf = work / "student-90m-q8_0.gguf"
    if not gguf.is_file():
        pruned = work / "student-90m"
        run("prune", "-m", "smollm2-135m-instruct", "--data", "shakespeare", "--samples", "32", "--params", "90M",
            "--axes", "mlp,hidden,heads", "--out", pruned)
        run("export", pruned, "--quant", "q8_0", "--out", gguf)
    return gguf


def run(*args) -> None:
    out = subprocess.run([sys.executable, "-m", "taille", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"taille {' '.join(map(str, args))} failed:\n{out.stderr[-2000:]}")


def long_personas(folder: Path) -> list[str]:
    """The shipped personas with ~1,700-token system prompts (numbered facts added to their knowledge)."""
    from taille.chat.persona import shipped_personas

    ids = []
    for path in sorted(shipped_personas().glob("*.yaml")):
        card = yaml.safe_load(path.read_text())
        card["knowledge"] = list(card.get("knowledge", [])) + [
            f"Ledger entry {i}: on day {i * 7 % 31 + 1} the {('north', 'east', 'south', 'west')[i % 4]} road carried "
            f"{i * 13 % 90 + 10} carts of ore, {i * 5 % 40} of grain and {i % 9} travellers from {card['name'].split()[0]}'s "
            f"old home." for i in range(48)]
        (folder / path.name).write_text(yaml.safe_dump(card, sort_keys=False))
        ids.append(card["name"].lower().replace(" ", "-"))
    return ids


class Server:
    def __init__(self, model: Path, engine_args: list[str], personas: Path | None, ctx: int, threads: int):
        self.port = free_port()
        cmd = [sys.executable, "-m", "taille", "serve", str(model), "--port", str(self.port), "--queue", "64",
               "--ctx", str(ctx), "--threads", str(threads), "--max-tokens", "256", *engine_args]
        if personas:
            cmd += ["--personas", str(personas)]
        self.log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TAILLE_LOG": "WARNING"})
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    sys.exit(f"taille serve did not start; log: {self.log.name}")
                time.sleep(0.3)

    def engine_peak_mib(self) -> float | None:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        for pid in out.stdout.split():
            status = Path(f"/proc/{pid}/status").read_text()
            return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
        return None  # in-process engine

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def ask(api, model: str, question: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                         max_tokens=max_tokens, temperature=0.7, stream=True,
                                         stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return {"latency": time.perf_counter() - start, "first_token": first, "tokens": tokens}


def load(port: int, personas: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    results, failures = [], 0

    def client(c: int) -> list[dict]:
        # each request's persona drawn from a fixed seed: numbered in turn, the clients' first requests all named
        # one persona, then all the next one, and a one-slot engine reused the cached card prompt where a game's
        # characters, asking at once, would not have let it
        rng = random.Random(1000 * clients + c)
        out = []
        for r in range(requests):
            i = c * requests + r
            out.append(ask(api, rng.choice(personas), QUESTIONS[i % len(QUESTIONS)], max_tokens))
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client, c) for c in range(clients)]:
            try:
                results += future.result()
            except Exception as e:  # a failed request counts, and the load goes on
                failures += 1
                print(f"  failure: {e}", file=sys.stderr)
    wall = time.perf_counter() - start
    firsts = [r["first_token"] for r in results if r["first_token"] is not None]
    return {"clients": clients, "requests": len(results), "failures": failures, "seconds": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 3),
            "decode_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "first_token_p50": round(percentile(firsts, 50), 3), "first_token_p95": round(percentile(firsts, 95), 3),
            "latency_p50": round(percentile([r["latency"] for r in results], 50), 3),
            "latency_p95": round(percentile([r["latency"] for r in results], 95), 3)}


def prompt_cache(model: Path, engine_args: list[str], folder: Path, ids: list[str], ctx: int, threads: int) -> dict:
    import openai

    server = Server(model, engine_args, folder, ctx, threads)
    try:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                            timeout=600)
        # the personas take turns, as characters do in a game: a cache of the last prompt alone never hits
        cold = [ask(api, persona, "Who are you?", 8)["first_token"] for persona in ids]
        warm = [ask(api, persona, "What do you sell?", 8)["first_token"] for persona in ids]
        return {"cold_first_token_s": round(statistics.median(cold), 3),
                "warm_first_token_s": round(statistics.median(warm), 3),
                "speedup": round(statistics.median(cold) / statistics.median(warm), 1)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a GGUF file (default: the 90M student as q8_0, made in --work)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "taille-serve-load"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=6, help="per client; 10 at the largest client count")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else student(work)
    personas = ["brenna-ironhand", "old-tam", "halcyon"]
    counts = [int(c) for c in args.clients.split(",")]
    rows, cache, memory = [], {}, {}
    for name, engine_args in ENGINES:
        server = Server(model, engine_args, None, 2048, args.threads)
        try:
            for clients in counts:
                requests = 10 if clients == max(counts) else args.requests
                row = {"engine": name, **load(server.port, personas, clients, requests, args.max_tokens)}
                print(row, flush=True)
                rows.append(row)
        finally:
            server.stop()
        long_folder = work / "long-personas"
        long_folder.mkdir(exist_ok=True)
        ids = long_personas(long_folder)
        cache[name] = prompt_cache(model, engine_args, long_folder, ids, 4096, args.threads)
        print(name, cache[name], flush=True)
    for slots in (1, 4):
        server = Server(model, ["--engine", "llama-server", "--parallel", str(slots)], None, 2048, args.threads)
        try:
            load(server.port, personas, slots, 2, args.max_tokens)  # every slot used once
            memory[slots] = server.engine_peak_mib()
        finally:
            server.stop()
    per_slot = round((memory[4] - memory[1]) / 3, 1)

    header = ["clients", "engine", "requests/s", "aggregate decode tok/s", "first token p50 / p95 (s)",
              "latency p50 / p95 (s)", "failures"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["clients"], r["engine"] != ENGINES[0][0])):
        lines.append(f"| {r['clients']} | {r['engine']} | {r['requests_per_s']} | {r['decode_tokens_per_s']} | "
                     f"{r['first_token_p50']} / {r['first_token_p95']} | {r['latency_p50']} / {r['latency_p95']} | "
                     f"{r['failures']} of {r['requests']} |")
    lines += ["", "| persona prompt (~1,700 tokens) | cold first token (s) | warm first token (s) | warm speed-up |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {c['cold_first_token_s']} | {c['warm_first_token_s']} | {c['speedup']}x |"
              for name, c in cache.items()]
    lines += ["", f"llama-server peak memory: {memory[1]:.1f} MiB with 1 slot, {memory[4]:.1f} MiB with 4 "
                  f"(2,048 tokens each): {per_slot} MiB per extra slot."]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    meta = {"model": str(model), "max_tokens": args.max_tokens, "threads": args.threads, "cpus": os.cpu_count()}
    (RESULTS / "serve_load.json").write_text(json.dumps({"meta": meta, "rows": rows, "prompt_cache": cache,
                                                         "engine_peak_mib": memory, "mib_per_slot": per_slot},
                                                        indent=1))
    (RESULTS / "serve_load.md").write_text(f"# taille serve under load\n\n{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
