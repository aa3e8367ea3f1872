"""A bounded load test of `taille serve`: 8 concurrent clients x 10 requests through the openai client.

The server runs as users start it (`taille serve MODEL`, on 127.0.0.1, a free port) in its own process;
each client thread sends its requests one after another, alternating plain and streaming, to the three
shipped personas. Reported: failures, latency p50/p95 (whole request), time to first token p50/p95
(streaming requests), completion tokens/s over the run.

Run:  .venv/bin/python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--clients 8 --requests 10]
Writes benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PERSONAS = ("brenna-ironhand", "old-tam", "halcyon")
QUESTIONS = ("Where can I find coal?", "What news from the north pass?", "How much is a room?",
             "Is the reactor safe?", "What do you want from me?", "Tell me about the mine.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "taille", "serve", args.model, "--port", str(port),
                               "--queue", str(args.clients * 2)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    sys.exit(f"the server did not start:\n{server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

        def client(c: int) -> list[dict]:
            out = []
            for r in range(args.requests):
                i = c * args.requests + r
                stream = i % 2 == 0
                start, first, text, error = time.perf_counter(), None, "", None
                try:
                    reply = api.chat.completions.create(
                        model=PERSONAS[i % 3], messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        max_tokens=args.max_tokens, stream=stream, seed=i)
                    if stream:
                        for chunk in reply:
                            piece = chunk.choices[0].delta.content or ""
                            if piece and first is None:
                                first = time.perf_counter() - start
                            text += piece
                        tokens = None
                    else:
                        text, tokens = reply.choices[0].message.content, reply.usage.completion_tokens
                except openai.OpenAIError as e:
                    error = f"{type(e).__name__}: {e}"
                out.append({"client": c, "request": r, "stream": stream, "seconds": time.perf_counter() - start,
                            "first_token_s": first, "chars": len(text), "tokens": tokens, "error": error})
            return out

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    ok = [r for r in results if r["error"] is None]
    latencies = [r["seconds"] for r in ok]
    firsts = [r["first_token_s"] for r in ok if r["first_token_s"] is not None]
    plain_tokens = [r["tokens"] for r in ok if r["tokens"] is not None]
    summary = {
        "model": args.model, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "requests": len(results), "failures": len(results) - len(ok),
        "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p95_s": round(percentile(latencies, 95), 3),
        "first_token_p50_s": round(percentile(firsts, 50), 3) if firsts else None,
        "first_token_p95_s": round(percentile(firsts, 95), 3) if firsts else None,
        "wall_s": round(wall, 1), "requests_per_s": round(len(ok) / wall, 2),
        "mean_completion_tokens_plain": round(statistics.mean(plain_tokens), 1) if plain_tokens else None,
        "errors": sorted({r["error"] for r in results if r["error"]}),
    }
    table = "\n".join([
        "| requests | failures | latency p50 | latency p95 | first token p50 | first token p95 | requests/s |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['requests']} ({args.clients} clients x {args.requests}) | {summary['failures']} | "
        f"{summary['latency_p50_s']} s | {summary['latency_p95_s']} s | {summary['first_token_p50_s']} s | "
        f"{summary['first_token_p95_s']} s | {summary['requests_per_s']} |",
    ])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps({"summary": summary, "requests": results}, indent=1))
    (RESULTS / "serve_load.md").write_text(
        f"# `taille serve` under load\n\n{args.model} on llama.cpp, one request at a time from the queue; "
        f"max_tokens {args.max_tokens}; half the requests streaming.\n\n{table}\n")


if __name__ == "__main__":
    main()
