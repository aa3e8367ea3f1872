"""`taille personas make`: many varied character cards, composed deterministically from tables.

Role-play training needs hundreds of characters, and an honest in-character evaluation needs characters the
student never saw. Each card is drawn from tables of settings (fantasy, sci-fi, modern), archetypes, names,
places, speaking styles and goals; its knowledge facts are sentences with numbers, names and places in them
(what the knowledge questions of `taille eval --personas` ask about). The same (count, seed) always gives the
same cards.

The split is fixed by the card's name, not by its position: `split_of(name)` hashes the name, so a card is
held out whatever the count or seed that made it, and a name is never in both halves. `make_cards` draws
names without repetition, so two cards never share a name (nor an id).

    OUT/train/*.yaml     cards for role-play data (`taille generate --personas OUT/train`)
    OUT/heldout/*.yaml   cards the student never sees in training (`taille eval --personas OUT/heldout`)
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from taille.errors import TailleError

HELDOUT_SHARE = 0.2
"""Share of names held out for evaluation (by a hash of the name: the split does not move with --count)."""


def split_of(name: str) -> str:
    """'heldout' for about HELDOUT_SHARE of all names, else 'train'; fixed forever for a name."""
    h = int.from_bytes(hashlib.sha256(name.strip().lower().encode()).digest()[:8], "little")
    return "heldout" if h % 1000 < HELDOUT_SHARE * 1000 else "train"


@dataclass(frozen=True)
class Setting:
    name: str
    first: tuple[str, ...]
    last: tuple[str, ...]
    places: tuple[str, ...]
    features: tuple[str, ...]
    """What a place is: 'a mountain village', 'a mining station on Ceres'."""
    archetypes: tuple[tuple[str, str], ...]
    """(role, what the character handles: the item of its trade)."""
    never: tuple[str, ...]
    """Phrases out of this world."""
    facts: tuple[str, ...]
    """Fact templates: {n} a number, {year} a year-like number, {place} another place, {other} another name,
    {item} the trade's item, {home} the character's place."""


_COMMON_FACTS = (
    "The road from {home} to {place} takes {n} days on foot.",
    "{other} owes me {debt} coins and has not paid since the spring.",
    "My sister lives in {place} and writes to me every {n} weeks.",
    "Last winter {n} travellers came through {home} asking about {place}.",
    "The old bridge near {home} was rebuilt {n} years ago by {other}.",
    "I keep {n} {item} hidden for people I trust.",
    "{other} is the only one in {home} who knows the way to {place}.",
)

SETTINGS = (
    Setting(
        name="fantasy",
        first=("Brenna", "Aldric", "Maren", "Tobin", "Isolde", "Garrick", "Wren", "Elowen", "Corwin", "Sabine",
               "Hadrian", "Liora", "Osric", "Thea", "Rowan", "Ysolde", "Bram", "Seren", "Alaric", "Fenna",
               "Dorian", "Mirela", "Edric", "Nessa", "Caspian", "Ilse", "Perrin", "Rhoswen", "Tamsin", "Ulric"),
        last=("Ironhand", "Ashdown", "Thornbury", "Greymantle", "Oakheart", "Stonebrook", "Hollowell", "Brightwater",
              "Blackmere", "Fairweather", "Redfern", "Coldwell", "Marchbank", "Whitlock", "Duskwood", "Amberly",
              "Holloway", "Kettleby", "Ravensworth", "Underhill"),
        places=("Harrow's Rest", "Greyhollow", "Eldmoor", "Thornwick", "Saltmarsh", "Kingsbridge", "Dunmere",
                "Ravenscar", "Westerhold", "Briarwood", "Stonehaven", "Millbrook", "Ashfall", "Highcairn"),
        features=("a mountain village", "a river town", "a walled city", "a fishing village", "a border fort",
                  "a crossroads market", "a mining town"),
        archetypes=(("blacksmith", "horseshoes"), ("innkeeper", "rooms"), ("herbalist", "remedies"),
                    ("city guard captain", "patrol logs"), ("ferryman", "crossings"), ("alchemist", "potions"),
                    ("bard", "songs"), ("merchant", "spices"), ("hunter", "furs"), ("priestess", "candles"),
                    ("stablemaster", "horses"), ("cartographer", "maps")),
        never=("as an AI", "language model", "internet", "smartphone", "computer"),
        facts=_COMMON_FACTS + (
            "The mine above {home} collapsed {n} years ago, burying the road to {place}.",
            "The lord of {place} pays {n} silver for every wolf pelt.",
            "{other} saw a dragon over {place} {n} nights ago.",
            "The {item} from {place} are the best, and they cost {n} silver each.",
            "The festival of the harvest moon lasts {n} days in {home}.",
        ),
    ),
    Setting(
        name="sci-fi",
        first=("Vega", "Juno", "Orin", "Kira", "Talon", "Nova", "Cass", "Rhea", "Dax", "Lyra", "Zeke", "Mira",
               "Soren", "Ione", "Kade", "Elara", "Rook", "Tycho", "Nadia", "Quill"),
        last=("Okafor", "Reyes", "Lindqvist", "Tanaka", "Voss", "Achterberg", "Marlowe", "Chen", "Sato", "Kovac",
              "Ibarra", "Halvorsen", "Nakamura", "Osei", "Drummond", "Petrov"),
        places=("Ceres Station", "Tycho Deep", "Port Armstrong", "Kepler Ring", "Hale's Landing", "Vesta Yards",
                "New Lagos", "the Ganymede Docks", "Arcadia Dome", "Outpost Nine"),
        features=("a mining station in the asteroid belt", "an orbital shipyard", "a domed colony on Mars",
                  "a research base under the ice of Europa", "a trading hub at a jump gate"),
        archetypes=(("ship mechanic", "fusion cells"), ("station doctor", "med-kits"), ("cargo broker", "crates"),
                    ("security chief", "access codes"), ("hydroponics farmer", "seed packs"),
                    ("bartender", "drinks"), ("pilot", "flight plans"), ("salvager", "wrecks")),
        never=("as an AI", "language model", "I am a chatbot", "OpenAI"),
        facts=_COMMON_FACTS + (
            "The air scrubbers on {home} were last replaced {n} days ago.",
            "A cargo run to {place} pays {n} credits if you do not ask questions.",
            "{other} lost {n} crew when the hull breached near {place}.",
            "The dock at {place} charges {n} credits a day for a berth.",
            "The shuttle to {place} leaves every {n} hours.",
        ),
    ),
    Setting(
        name="modern",
        first=("Maya", "Daniel", "Priya", "Marcus", "Elena", "Sam", "Grace", "Luis", "Hannah", "Omar", "Chloe",
               "Theo", "Aisha", "Ben", "Nora", "Diego", "Ruth", "Felix", "Zoe", "Victor"),
        last=("Delgado", "Whitaker", "Nguyen", "Brennan", "Castillo", "Fischer", "Holm", "Adeyemi", "Moreau",
              "Sullivan", "Park", "Lindgren", "Rossi", "Kowalski", "Baptiste", "Hughes"),
        places=("Maple Street", "Riverside", "the Old Port", "Elm Park", "Northgate Mall", "Harbor Heights",
                "the train station", "Cedar Lane", "Westfield", "the university district"),
        features=("a small coastal town", "a busy city neighbourhood", "a mountain ski resort",
                  "a college town", "a desert truck stop"),
        archetypes=(("barista", "coffee beans"), ("taxi driver", "fares"), ("detective", "case files"),
                    ("mechanic", "spare parts"), ("librarian", "books"), ("chef", "recipes"),
                    ("park ranger", "trail maps"), ("shop owner", "antiques")),
        never=("as an AI", "language model", "I am an assistant", "OpenAI"),
        facts=_COMMON_FACTS + (
            "The bakery on {place} closes at {hour} o'clock on Sundays.",
            "{other} has run the garage in {place} for {n} years.",
            "The bus to {place} costs {n} dollars and is always late.",
            "There were {n} break-ins near {place} last month.",
            "I moved to {home} {n} years ago from {place}.",
        ),
    ),
)

STYLES = (
    "Gruff and short; calls people 'friend'.", "Warm and chatty, full of local gossip.",
    "Formal and precise; never uses slang.", "Dry humour, answers questions with questions.",
    "Nervous and quick, apologises often.", "Cheerful; hums between sentences.",
    "Suspicious of strangers until they prove themselves.", "Speaks slowly, likes old sayings.",
    "Blunt and practical; talks about work more than feelings.", "Poetic, fond of weather metaphors.",
)

GOALS = (
    "Sell {item} to anyone who looks able to pay.", "Find out who has been stealing from {home}.",
    "Get news from {place}.", "Hire someone brave to travel to {place}.",
    "Keep strangers out of trouble in {home}.", "Collect the {debt} coins {other} owes.",
    "Find a rare ingredient said to be sold in {place}.", "Protect the secret of the hidden {item}.",
)

GREETINGS = (
    "Well met. What brings you to {home}?", "Ah, a new face. Looking for {item}?",
    "Mind your step, stranger. What do you need?", "Welcome, welcome! Sit, tell me your news.",
    "You're not from {home}, are you?",
)


_NUMBERS = (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15, 17, 20, 24, 30, 40, 60)


def _fill(template: str, rng: random.Random, s: Setting, card: dict) -> str:
    """A template with the card's own home, item, debtor and debt; a fresh number and place each time."""
    places = [p for p in s.places if p != card["home"]]
    text = template.format(n=rng.choice(_NUMBERS), hour=rng.randint(1, 12), place=rng.choice(places), other=card["other"],
                           item=card["item"], home=card["home"], debt=card["debt"])
    return text[0].upper() + text[1:]


def make_card(rng: random.Random, name: str, setting: Setting) -> dict:
    """One card: a mapping of Persona fields (taille.chat.persona)."""
    role, item = rng.choice(setting.archetypes)
    home = rng.choice(setting.places)
    feature = rng.choice(setting.features)
    other = name
    while other.split()[0] == name.split()[0] or other.split()[1] == name.split()[1]:
        other = f"{rng.choice(setting.first)} {rng.choice(setting.last)}"
    ctx = {"home": home, "item": item, "other": other, "debt": rng.choice(_NUMBERS)}
    knowledge = [_fill(f, rng, setting, ctx) for f in rng.sample(setting.facts, 5)]
    goals = [_fill(g, rng, setting, ctx) for g in rng.sample(GOALS, 2)]
    first = name.split()[0]
    years = rng.choice((3, 6, 9, 12, 18, 25, 31))
    return {
        "name": name,
        "role": f"the {role} of {home}, {feature}",
        "backstory": f"{first} has been the {role} of {home} for {years} years and knows everyone who passes "
                     "through.",
        "knowledge": knowledge,
        "style": rng.choice(STYLES),
        "goals": goals,
        "never": list(setting.never),
        "greeting": _fill(rng.choice(GREETINGS), rng, setting, ctx),
        "temperature": 0.7,
        "max_tokens": 96,
    }


def capacity() -> int:
    """The most cards with distinct names: all (first, last) pairs of every setting."""
    return sum(len(s.first) * len(s.last) for s in SETTINGS)


def make_cards(count: int, seed: int = 0) -> list[dict]:
    """`count` cards with distinct names, settings taken in turn; the first N cards of any count are the cards of
    count N (the same seed)."""
    if not 1 <= count <= capacity():
        raise TailleError(f"--count {count}: between 1 and {capacity()} (the distinct names the tables hold)")
    rng = random.Random(seed)
    taken: set[str] = set()
    cards = []
    for k in range(count):
        setting = SETTINGS[k % len(SETTINGS)]
        while True:  # names drawn without repetition (and the setting's space is never exhausted first)
            name = f"{rng.choice(setting.first)} {rng.choice(setting.last)}"
            if name not in taken:
                break
            if sum(n.split()[0] in setting.first for n in taken) >= len(setting.first) * len(setting.last):
                setting = SETTINGS[(SETTINGS.index(setting) + 1) % len(SETTINGS)]
        taken.add(name)
        cards.append(make_card(rng, name, setting))
    return cards


def _file_name(name: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split()) + ".yaml"


def write_cards(out: str | Path, count: int, seed: int = 0) -> dict[str, int]:
    """Write `count` cards into OUT/train and OUT/heldout; return how many went where. Existing cards in OUT
    are replaced (the set is a function of count and seed)."""
    import yaml

    from taille.chat.persona import load_persona

    out = Path(out)
    cards = make_cards(count, seed)  # a bad count fails before anything is deleted
    counts = {"train": 0, "heldout": 0}
    for split in counts:
        (out / split).mkdir(parents=True, exist_ok=True)
        for old in (out / split).glob("*.yaml"):
            old.unlink()
    for card in cards:
        split = split_of(card["name"])
        path = out / split / _file_name(card["name"])
        path.write_text(yaml.safe_dump(card, sort_keys=False, allow_unicode=True, width=110))
        load_persona(path)  # every written card loads
        counts[split] += 1
    return counts


def load_half(spec: str | Path, half: str) -> dict:
    """The personas of --personas SPEC: a folder of cards, or a `taille personas make` folder, of which
    `half` (train for role-play data, heldout for evaluation) is read."""
    from taille.chat.persona import load_personas

    folder = Path(spec)
    if folder.is_dir() and (folder / half).is_dir() and not any(folder.glob("*.y*ml")):
        folder = folder / half
    return load_personas(folder)
