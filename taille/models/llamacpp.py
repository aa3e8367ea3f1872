"""llama.cpp, the on-device runtime, through llama-cpp-python: one place that opens a GGUF file.

`export --verify`, `bench`, `chat`, `serve` and `generate` all run GGUF files through `open_gguf`, so thread
count, logging and the missing-package message are the same everywhere; `prompt_ids` renders a
conversation with the file's own chat template.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from taille.errors import TailleError

log = logging.getLogger(__name__)

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Plain turns for a model whose file has no chat template."""

INSTALL = 'pip install -e ".[export]"  (llama-cpp-python builds llama.cpp from source, ~5 min on 2 cores)'


def llama_cpp():
    """The llama_cpp module, or a clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise TailleError(f"this needs llama.cpp's Python binding; install it with: {INSTALL}") from None
    return llama_cpp


def default_threads() -> int:
    """Every core this process may use. llama.cpp's own default is half the cores, which on a 2-core
    machine leaves one idle."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read(1 << 16)
    except OSError:
        return False


def extra_buffers_wanted() -> bool:
    """Whether llama.cpp may move weights into its CPU-specific buffers (AMX, repacked layouts).

    On CPUs with AMX, llama.cpp (llama-cpp-python 0.3.36) puts quantized weights in its AMX buffer, and
    decoding then crashed with a segmentation fault here for every quantized type (q8_0, q4_0, q4_k_m;
    f16 ran). So on AMX machines taille keeps the plain CPU buffers unless TAILLE_LLAMA_EXTRA_BUFFERS=1.
    Machines without AMX keep llama.cpp's default, including its repacked q4_0 kernels."""
    forced = os.environ.get("TAILLE_LLAMA_EXTRA_BUFFERS")
    if forced is not None:
        return forced not in ("0", "", "false")
    return not has_amx()


_params_lock = threading.Lock()


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """llama-cpp-python's `Llama` builds its model parameters from `llama_model_default_params()` and
    offers no argument for `use_extra_bufts`; swap the default while one model loads."""
    import llama_cpp.llama_cpp as raw

    if use_extra_bufts:
        yield
        return
    with _params_lock:
        original = raw.llama_model_default_params

        def defaults():
            params = original()
            params.use_extra_bufts = False
            return params

        raw.llama_model_default_params = defaults
        try:
            yield
        finally:
            raw.llama_model_default_params = original


def open_gguf(path: str | Path, n_ctx: int = 2048, logits_all: bool = False, threads: int | None = None,
              n_batch: int = 512, seed: int = 1234, **kwargs):
    """Load a GGUF file into llama.cpp (`llama_cpp.Llama`). `logits_all` keeps every position's logits
    (for comparing with PyTorch); generation needs only the last."""
    path = Path(path)
    if not path.is_file():
        raise TailleError(f"no such GGUF file: {path}")
    lc = llama_cpp()
    threads = threads or default_threads()
    try:
        with _model_params(extra_buffers_wanted()):
            return lc.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
                n_threads=threads, n_threads_batch=threads, logits_all=logits_all, seed=seed, verbose=False,
                **kwargs,
            )
    except ValueError as e:  # llama-cpp-python raises ValueError when llama.cpp refuses the file
        raise TailleError(f"llama.cpp cannot load {path}: {e}") from None


def last_logits(llm):
    """(V,) logits of the last evaluated position, read from llama.cpp without a copy (valid until the
    next eval). Works whether or not the model keeps every position's logits."""
    import numpy as np

    lc = llama_cpp()
    return np.ctypeslib.as_array(lc.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def _template(llm) -> str:
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        if not getattr(llm, "_taille_warned", False):
            log.warning("the model file has no chat template; using plain 'User: / Assistant:' turns")
            llm._taille_warned = True
        return FALLBACK_TEMPLATE
    return template


def _special(llm, token_id: int) -> str:
    if token_id < 0:
        return ""
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")


def render(llm, messages: list[dict]) -> str:
    """The prompt text: the file's chat template (Jinja, as transformers and llama.cpp render it)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TailleError(f"the model's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(_template(llm)).render(
        messages=messages, add_generation_prompt=True,
        bos_token=_special(llm, llm.token_bos()), eos_token=_special(llm, llm.token_eos()),
    )


def prompt_ids(llm, messages: list[dict]) -> list[int]:
    text = render(llm, messages)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    bos = _special(llm, llm.token_bos())
    if add_bos and bos and text.startswith(bos):
        add_bos = False  # the template wrote it already
    return llm.tokenize(text.encode(), add_bos=add_bos, special=True)
