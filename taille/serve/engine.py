"""llama.cpp's own HTTP server, `llama-server`, as the engine behind `taille serve`.

It already does what a game needs and what a thin layer should not rewrite: parallel slots with
continuous batching, prompt caching (a slot keeps its last prompt's KV cache and a new request is sent
to the slot whose prompt it shares most of; `--cache-ram` keeps evicted prompts in memory), JSON-schema
constrained output, `/health` and `/metrics`. taille builds it once from the same llama.cpp source as the
`export` extra (the llama-cpp-python sdist, from the package index like any install), keeps the binary
in the cache, and runs it on a private loopback port for as long as taille runs: the engine gets SIGTERM
when its parent dies, however the parent dies (Linux PR_SET_PDEATHSIG).

    python -m taille.serve.engine build     # once (make setup does it): ~5 min on 2 cores, into .venv/bin
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from taille.errors import TailleError

log = logging.getLogger(__name__)

CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF")
"""A static llama-server without its web UI (whose prebuilt copy would be downloaded) or TLS (loopback only)."""


def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise TailleError("taille serve runs llama.cpp: pip install -e '.[export]'") from None


def binary_path() -> Path:
    """Beside the environment's other programs (a venv's bin/), like the console scripts pip installs."""
    return Path(sys.prefix) / "bin" / "taille-llama-server"


def find_binary() -> Path:
    """The llama-server to run: $TAILLE_LLAMA_SERVER, or the one built into this environment for the
    installed llama-cpp-python (a build for another version is refused: rebuild)."""
    given = os.environ.get("TAILLE_LLAMA_SERVER")
    if given:
        if not Path(given).is_file():
            raise TailleError(f"TAILLE_LLAMA_SERVER={given}: no such file")
        return Path(given)
    path, stamp = binary_path(), binary_path().with_suffix(".json")
    if not path.is_file():
        raise TailleError(f"no llama-server at {path}: build it once with `python -m taille.serve.engine build` "
                          "(make setup does), or set TAILLE_LLAMA_SERVER to one")
    built_for = json.loads(stamp.read_text()).get("llama_cpp_python") if stamp.is_file() else None
    if built_for != llama_cpp_version():
        raise TailleError(f"{path} was built for llama-cpp-python {built_for}, installed is {llama_cpp_version()}: "
                          "rebuild with `python -m taille.serve.engine build`")
    return path


def build(jobs: int | None = None, keep: Path | None = None) -> Path:
    """Compile llama-server from the sdist of the installed llama-cpp-python (the same llama.cpp as the
    `export` extra) into the cache; returns the binary. Its output goes to a log file named on failure."""
    out = binary_path()
    version = llama_cpp_version()
    work = Path(tempfile.mkdtemp(prefix="llama-server-build-")) if keep is None else keep
    log_path = out.with_suffix(".build.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        def run(cmd, **kwargs):
            log_file.write("$ " + " ".join(map(str, cmd)) + "\n")
            log_file.flush()
            if subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, **kwargs).returncode:
                raise TailleError(f"building llama-server failed at `{Path(str(cmd[0])).name} ...`; see {log_path}")

        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", str(work)])
        archive = next(work.glob("llama_cpp_python-*.tar.gz"))
        run(["tar", "xzf", str(archive), "-C", str(work)])
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        run(["cmake", "-S", str(source), "-B", str(work / "build"), *CMAKE_FLAGS])
        run(["cmake", "--build", str(work / "build"), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 2)])
    shutil.copy2(work / "build" / "bin" / "llama-server", out)
    out.with_suffix(".json").write_text(json.dumps({"llama_cpp_python": version, "cmake": list(CMAKE_FLAGS),
                                                    "seconds": round(time.perf_counter() - started)}))
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    log.info("built %s in %.0f s", out, time.perf_counter() - started)
    return out


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent process dies (even by SIGKILL), so no engine
    outlives taille."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def control_tokens(gguf: str | Path) -> list[int]:
    """The GGUF's control tokens that do not end generation (taille.chat.engine.control_ids), read from its
    vocabulary alone, with no device list (no GPU context in this process)."""
    import ctypes

    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from taille.chat.engine import vocab_controls

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    no_devices = (ctypes.c_void_p * 1)(None)  # an empty, NULL-terminated list
    params.devices = ctypes.cast(no_devices, ctypes.c_void_p)
    model = LlamaModel(path_model=str(gguf), params=params, verbose=False)
    try:
        return sorted(vocab_controls(model.vocab))
    finally:
        model.close()


class LlamaServer:
    """One llama-server process on a private loopback port."""

    def __init__(self, gguf: str | Path, parallel: int = 4, n_ctx: int = 2048, threads: int | None = None,
                 cache_ram_mib: int = 256, log_path: str | Path | None = None):
        self.gguf, self.parallel, self.n_ctx, self.threads = Path(gguf), parallel, n_ctx, threads
        self.cache_ram_mib = cache_ram_mib
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        from taille.models.llamacpp import extra_buffers_wanted

        cmd = [str(find_binary()), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               # each slot holds a whole conversation of n_ctx tokens
               "-c", str(self.n_ctx * self.parallel), "--parallel", str(self.parallel), "--no-kv-unified",
               "--metrics", "--slots", "--no-webui", "--cache-ram", str(self.cache_ram_mib), "--jinja"]
        if self.threads:
            cmd += ["-t", str(self.threads)]
        if not extra_buffers_wanted():
            cmd.append("--no-repack")  # the AMX work-around llama-cpp-python gets too (see models/llamacpp.py)
        return cmd

    def start(self, timeout: float = 120.0) -> "LlamaServer":
        self.port = free_port()
        with open(self.log_path, "ab") as log_file:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TailleError(f"llama-server exited with status {self.proc.returncode} while starting; its log: "
                                  f"{self.log_path}")
            if self.healthy():
                log.info("llama-server ready on %s (%d slots, %d tokens each; log %s)", self.url, self.parallel,
                         self.n_ctx, self.log_path)
                return self
            time.sleep(0.2)
        self.stop()
        raise TailleError(f"llama-server did not answer /health within {timeout:.0f} s; its log: {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read().decode()

    def slots(self) -> list[dict]:
        return json.loads(self.get("/slots"))

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv: list[str]) -> None:
    if argv[:1] != ["build"]:
        print("usage: python -m taille.serve.engine build [--if-missing]", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "--if-missing" in argv and binary_path().is_file():
        print(f"llama-server already built: {binary_path()}")
        return
    try:
        print(f"built {build()}")
    except TailleError as e:
        print(f"taille: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
