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
    actions: a JSON schema (a YAML mapping) for structured replies (optional), e.g.
      {type: object, required: [say, emotion, action], properties: {say: {type: string, maxLength: 200},
       emotion: {enum: [calm, angry]}, action: {enum: [none, trade, attack]}, target: {type: string}}}
      The character then answers with one JSON object of that shape; `chat` and `serve` constrain decoding
      to it (a llama.cpp grammar), so every reply parses. `say` (a required string) is what the character
      says aloud: the `never` phrases are cut from it alone. Give strings a maxLength, so a reply closes
      before max_tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
    actions: str = ""
    """JSON schema of a structured reply, as JSON text ('' for plain speech); a mapping given here is checked
    and stored as JSON text, which keeps the persona frozen and hashable."""

    def __post_init__(self):
        if not self.name.strip() or not self.role.strip():
            raise TailleError("a persona needs a non-empty 'name' and 'role'")
        if (not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1 or self.max_tokens < 1
                or not 1 <= self.repeat_penalty <= 2):
            raise TailleError(f"persona {self.name}: temperature must be in [0, 2], top_p in (0, 1], max_tokens >= 1, "
                              "repeat_penalty in [1, 2]")
        if isinstance(self.actions, Mapping) or self.actions:
            try:
                object.__setattr__(self, "actions", check_actions(self.actions))  # frozen: set once, here
            except TailleError as e:
                raise TailleError(f"persona {self.name}: {e}") from None

    @property
    def action_schema(self) -> dict | None:
        """The `actions` JSON schema as a dict (a fresh copy), or None for a character that only speaks."""
        return json.loads(self.actions) if self.actions else None

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
        schema = self.action_schema
        if schema is None:
            lines.append("Answer in one to three short sentences, as the character would say them aloud.")
        else:
            required = schema.get("required", [])
            lines.append("Answer with one JSON object and nothing else, with the fields:\n" + "\n".join(
                _field_line(name, prop, name in required) for name, prop in schema["properties"].items()))
        return "\n".join(lines)


SAY = "say"
"""The field of a structured reply that the character says aloud (and the only one the never guard cuts)."""


def _field_line(name: str, prop: dict, required: bool) -> str:
    if "description" in prop:
        what = prop["description"]
    elif name == SAY:
        what = "what you say aloud, in one to three short sentences"
    elif "enum" in prop:
        what = "one of " + ", ".join(json.dumps(v) for v in prop["enum"])
    else:
        what = {"string": "text", "integer": "a whole number", "number": "a number", "boolean": "true or false",
                "array": "a list", "object": "an object"}.get(prop.get("type"), "a value")
    return f'- "{name}": {what}' + ("" if required else " (optional)")


def check_actions(schema) -> str:
    """Check an `actions` schema and return it as JSON text. It must be a JSON schema for an object with a
    required string `say`, which jsonschema (when installed) accepts and llama.cpp's grammar builder
    (llama-cpp-python's json_schema_to_gbnf, the same converter llama-server runs in C++) turns into a
    grammar. One line says what is wrong."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise TailleError(f"'actions' is not valid JSON: {e}") from None
    if not isinstance(schema, Mapping):
        raise TailleError(f"'actions' must be a mapping (a JSON schema), not {type(schema).__name__}")
    schema = json.loads(json.dumps(schema))  # plain dicts and lists, in the card's order (the grammar's order)
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, dict) or not all(
            isinstance(p, dict) for p in properties.values()):
        raise TailleError("'actions' must be {type: object, properties: {name: {schema}, ...}}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) and r in properties for r in required):
        raise TailleError("'actions': 'required' must be a list of names from 'properties'")
    if properties.get(SAY, {}).get("type") != "string" or SAY not in required:
        raise TailleError(f"'actions' needs a required string property '{SAY}' (what the character says aloud)")
    for name, prop in properties.items():
        if "enum" in prop and (not isinstance(prop["enum"], list) or not prop["enum"]):
            raise TailleError(f"'actions': '{name}'.enum must be a non-empty list")
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise TailleError(f"'actions' is not a valid JSON schema: {_one_line(e.message)}") from None
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:  # without the export extra nothing constrains decoding; the checks above still hold
        return json.dumps(schema)
    try:
        json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises assertions and type errors on what it cannot turn into rules
        raise TailleError(f"'actions': llama.cpp cannot build a grammar from it: {_one_line(str(e))}") from None
    return json.dumps(schema)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        if key == "actions":
            if not isinstance(value, dict):
                raise TailleError(f"{path}: 'actions' must be a mapping (a JSON schema: {{type: object, properties: "
                                  "...}}), not " + type(value).__name__)
        elif key in _LISTS:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
                raise TailleError(f"{path}: '{key}' must be a list of strings")
            value = tuple(str(v) for v in value if str(v).strip())
            if key == "knowledge" and not value:
                raise TailleError(f"{path}: 'knowledge' is empty; list at least one fact the character knows "
                                  "(or leave the key out)")
        elif key in ("temperature", "top_p", "repeat_penalty", "max_tokens"):
            try:
                value = int(value) if key == "max_tokens" else float(value)
            except (TypeError, ValueError):
                raise TailleError(f"{path}: '{key}' must be a number, not {value!r}") from None
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
