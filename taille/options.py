"""Options declared once: a stage's settings dataclass is its `taille VERB` flags, its recipe section and
its Python API.

A field's type, default and the docstring under it are the whole declaration: the CLI (cli.py) turns
each field into a `--flag` whose help is that docstring and whose default is read from the field, a
recipe section is checked against the same fields, and the stage takes the same object. Values users
write as text (sizes such as 96K or 6GiB, comma lists such as 1,4,8) are annotated with a `Text`
parser; `coerce` applies it in the dataclass's `__post_init__`, so the CLI, a recipe and a Python caller
that passes "96K" all get the same number and the same one-line error.

This module imports nothing heavy: the CLI reads it (and every settings module) to build `taille -h`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from taille.errors import TailleError


@dataclass(frozen=True)
class Text:
    """Marks a field that users write as text: the CLI takes a string, `coerce` parses it."""

    parse: Callable[[str, str], Any]
    """(text, flag name) -> value; raises TailleError naming the flag."""
    metavar: str


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_COUNT = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBtT]?)\s*")
_BYTES = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kKmMgGtT])(i?[bB])?|([bB]))?\s*")


def parse_count(text, name: str = "params") -> int:
    """'90M', '8.4B', '96K', '134515008' -> an integer count (K, M, B, T: powers of 1000)."""
    if isinstance(text, bool):
        raise TailleError(f"{flag(name)} {text}: expected a count such as 96K, 90M, 4.5B or 90000000")
    if isinstance(text, (int, float)) and text == int(text):
        return int(text)
    m = _COUNT.fullmatch(str(text))
    if not m:
        raise TailleError(f"{flag(name)} {text}: expected a count such as 96K, 90M, 4.5B or 90000000")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()])


def parse_bytes(text, name: str = "memory") -> int:
    """'6G', '6GB', '6GiB', '6.5 GB', '512M', '1048576' -> bytes. A memory budget is read the way memory
    is sold and reported by operating systems: K, M, G, T with or without B or iB are powers of 1024."""
    m = _BYTES.fullmatch(str(text))
    if not m:
        raise TailleError(f"{flag(name)} {text}: expected a size such as 6G, 6GB, 6GiB, 6.5 GB or 512M")
    unit = (m.group(2) or "").lower()
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


def _numbers(text, name: str, kind, what: str, example: str) -> tuple:
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        values = tuple(kind(str(v).strip()) for v in items if str(v).strip())
    except ValueError:
        raise TailleError(f"{flag(name)} {text}: expected {what} separated by commas, e.g. {example}") from None
    if not values:
        raise TailleError(f"{flag(name)}: give at least one number, e.g. {example}")
    return values


def parse_ints(text, name: str) -> tuple[int, ...]:
    """'1,4,8' (or a YAML list) -> (1, 4, 8)."""
    return _numbers(text, name, int, "whole numbers", "1,4,8")


def parse_floats(text, name: str) -> tuple[float, ...]:
    """'4,6,8.5' (or a YAML list) -> (4.0, 6.0, 8.5)."""
    return _numbers(text, name, float, "numbers", "4,6,8")


def parse_names(text, name: str) -> tuple[str, ...]:
    """'mlp,hidden' (or a YAML list) -> ('mlp', 'hidden')."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return tuple(str(v).strip() for v in items if str(v).strip())


def parse_texts(text, name: str) -> list[str]:
    """A repeatable flag or a YAML list (or one string) -> a list of strings."""
    return [str(v) for v in (text if isinstance(text, (list, tuple)) else [text])]


Count = Annotated[int, Text(parse_count, "N")]
"""A count users write as 96K, 90M or 4.5B."""
Bytes = Annotated[int, Text(parse_bytes, "SIZE")]
"""A memory size users write as 6G, 6GB, 6GiB, 6.5 GB or 512M."""
Ints = Annotated[tuple, Text(parse_ints, "N,N")]
Floats = Annotated[tuple, Text(parse_floats, "X,X")]
Names = Annotated[tuple, Text(parse_names, "A,B")]
Texts = Annotated[list, Text(parse_texts, "TEXT")]


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the PEP 257 attribute docstring)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def text_parser(annotation) -> Text | None:
    if typing.get_origin(annotation) is typing.Union:  # X | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    if typing.get_origin(annotation) is Annotated:
        return next((m for m in annotation.__metadata__ if isinstance(m, Text)), None)
    return None


def coerce(obj) -> None:
    """Parse the text-valued fields of a settings object in place (call it first in `__post_init__`)."""
    for name, annotation in field_types(type(obj)).items():
        parser = text_parser(annotation)
        value = getattr(obj, name, None)
        if parser is not None and value is not None:
            object.__setattr__(obj, name, parser.parse(value, name))


def from_mapping(cls, values: dict, where: str, **fixed):
    """A settings object from a recipe section or a --config file: unknown keys are one error listing
    the known ones (a typo never falls back to a default silently). Dashes and underscores both work."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise TailleError(f"{where} must be a mapping of option names to values, not {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
    given = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TailleError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**given, **fixed)
