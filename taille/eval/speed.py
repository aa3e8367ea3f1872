"""Speed and memory on the current device: prefill and decode tokens/s at a few batch sizes.

prefill  one forward pass over B prompts of `prompt_len` tokens: B * prompt_len / seconds
decode   greedy generation of `new_tokens` tokens with the KV cache after that prefill:
         B * new_tokens / (generate seconds - prefill seconds)
memory   on CUDA the peak allocated by torch; on the CPU the rise of the process's peak RSS over the run
         (Linux), beside the weights' own size. A process that already freed memory (an earlier model)
         reuses it without its RSS rising, so `measure_in_subprocess` runs each model in a fresh process.
"""

from __future__ import annotations

import time

import torch

from taille.models.precision import autocast


def reset_peak_memory(device: torch.device) -> int:
    """Reset the peak-memory counter; return the current baseline in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        return _proc_status("VmRSS:")
    except OSError:
        return 0


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        return _proc_status("VmHWM:")
    except OSError:
        return None


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(key)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, batch_sizes=(1, 8), prompt_len: int = 256, new_tokens: int = 32,
                  precision: str = "fp32", repeats: int = 2) -> dict:
    """{'b1': {'prefill_tok_s', 'decode_tok_s', 'peak_mib'}, 'b8': ..., 'weights_mib', settings}."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    result = {"prompt_len": prompt_len, "new_tokens": new_tokens, "precision": precision, "device": str(device),
              "weights_mib": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)}
    generator = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
        prefill, total = float("inf"), float("inf")
        with autocast(precision, device.type):
            model(ids[:, :8], use_cache=False)  # warm-up; also pages in memory-mapped weights before the baseline
        baseline = reset_peak_memory(device)
        with autocast(precision, device.type):
            for _ in range(repeats):  # best of `repeats`: the least disturbed run
                _sync(device)
                start = time.perf_counter()
                model(ids, use_cache=False)
                _sync(device)
                prefill = min(prefill, time.perf_counter() - start)
                start = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                _sync(device)
                total = min(total, time.perf_counter() - start)
        peak = peak_memory(device)
        result[f"b{batch}"] = {
            "prefill_tok_s": round(batch * prompt_len / prefill, 1),
            "decode_tok_s": round(batch * new_tokens / max(total - prefill, 1e-9), 1),
            "peak_mib": round((peak - baseline) / 2**20, 1) if peak is not None else None,
        }
    return result


def measure_in_subprocess(spec: str, dtype: str, device: str, precision: str) -> dict:
    """`measure_speed` for model `spec` in a fresh Python process, so memory starts clean."""
    import json
    import subprocess
    import sys

    from taille.errors import TailleError

    cmd = [sys.executable, "-m", "taille.eval.speed", spec, dtype, device, precision]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise TailleError(f"speed measurement of {spec} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    from taille.models.load import load_model

    spec, dtype, device, precision = sys.argv[1:5]
    model, _ = load_model(spec, dtype=dtype, device=device)
    print(json.dumps(measure_speed(model, precision=precision)))
