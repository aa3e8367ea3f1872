"""A game character as data: a YAML file becomes the system prompt and the guard list of a conversation.

    name: Brenna Ironhand
    role: the blacksmith of Harrow's Rest, a mountain village
    backstory: ...
    knowledge: [facts the character knows and may share]
    style: how the character speaks
    goals: [what the character wants from the conversation]
    never: [phrases the character must never say; replies are cut before them]
    greeting: the first line, shown before the player speaks (optional)
    temperature / top_p / max_tokens / repeat_penalty: sampling defaults for this character (optional)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from taille.errors import TailleError


@dataclass(frozen=True)
class Persona:
    name: str
    """What the character is called; `serve` exposes it as a model id (lower-case, dashes)."""
    role: str
    """Who the character is, in one line."""
    backstory: str = ""
    """Where the character comes from."""
    knowledge: tuple[str, ...] = ()
    """Facts the character knows and may share."""
    style: str = ""
    """How the character speaks."""
    goals: tuple[str, ...] = ()
    """What the character wants."""
    never: tuple[str, ...] = ()
    """Phrases the character must never say: the prompt forbids them and replies are cut before them."""
    greeting: str = ""
    """The character's opening line (optional)."""
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 160
    """Longest reply in tokens."""
    repeat_penalty: float = 1.1
    """llama.cpp's penalty on recently used tokens (1: none); small models loop without one."""

    def __post_init__(self):
        if not self.name.strip() or not self.role.strip():
            raise TailleError("a persona needs a non-empty 'name' and 'role'")
        if (not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1 or self.max_tokens < 1
                or not 1 <= self.repeat_penalty <= 2):
            raise TailleError(f"persona {self.name}: temperature must be in [0, 2], top_p in (0, 1], max_tokens >= 1, "
                              "repeat_penalty in [1, 2]")

    @property
    def id(self) -> str:
        """The model id clients use for this character: 'Brenna Ironhand' -> 'brenna-ironhand'."""
        return "-".join("".join(c if c.isalnum() else " " for c in self.name.lower()).split())

    def system_prompt(self) -> str:
        lines = [f"You are {self.name}, {self.role}. Stay in character and never say you are an AI or a model."]
        if self.backstory:
            lines.append(f"Backstory: {self.backstory.strip()}")
        if self.knowledge:
            lines.append("You know:\n" + "\n".join(f"- {fact}" for fact in self.knowledge))
        if self.goals:
            lines.append("Your goals:\n" + "\n".join(f"- {goal}" for goal in self.goals))
        if self.style:
            lines.append(f"Speaking style: {self.style.strip()}")
        if self.never:
            lines.append("Never say any of: " + "; ".join(f'"{p}"' for p in self.never) + ".")
        lines.append("Answer in one to three short sentences, as the character would say them aloud.")
        return "\n".join(lines)


_LISTS = {"knowledge", "goals", "never"}


def load_persona(path: str | Path) -> Persona:
    """Read and check a persona YAML file; errors name the file and the bad key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TailleError(f"no such persona file: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TailleError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise TailleError(f"{path}: a persona is a mapping of keys (name, role, ...), not {type(raw).__name__}")
    known = {f.name for f in fields(Persona)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TailleError(f"{path}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = sorted(k for k in ("name", "role") if k not in raw)
    if missing:
        raise TailleError(f"{path}: missing {', '.join(missing)}")
    values = {}
    for key, value in raw.items():
        if key in _LISTS:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                raise TailleError(f"{path}: '{key}' must be a list of strings")
            value = tuple(str(v) for v in value)
        elif key in ("temperature", "top_p", "repeat_penalty"):
            value = float(value)
        elif key == "max_tokens":
            value = int(value)
        elif not isinstance(value, str):
            raise TailleError(f"{path}: '{key}' must be a string")
        values[key] = value
    try:
        return Persona(**values)
    except TailleError as e:
        raise TailleError(f"{path}: {e}") from None


def load_personas(folder: str | Path) -> dict[str, Persona]:
    """Every *.yaml / *.yml persona in `folder`, by id; two files with the same id are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TailleError(f"--personas {folder}: not a folder")
    personas: dict[str, Persona] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        persona = load_persona(path)
        if persona.id in personas:
            raise TailleError(f"{path}: persona id '{persona.id}' is already taken by another file in {folder}")
        personas[persona.id] = persona
    if not personas:
        raise TailleError(f"--personas {folder}: no .yaml persona files")
    return personas


def shipped_personas() -> Path:
    """The example characters that come with taille."""
    return Path(__file__).resolve().parent.parent / "personas"
