"""Where a request goes, without a model: the personas it may name (a folder read again when it changes)
and the llama-server slot it runs in (a player's conversation back in its slot)."""

from __future__ import annotations

import logging
import shutil

import pytest

from taille.chat.persona import shipped_personas
from taille.errors import TailleError
from taille.serve import server as serve_module
from taille.serve.server import Catalog, Slots

EXTRA = "name: Wren\nrole: a stable hand\n"


@pytest.fixture
def cards(tmp_path, monkeypatch):
    monkeypatch.setattr(serve_module, "RELOAD_S", 0.0)  # look at the folder on every request
    for path in shipped_personas().glob("*.yaml"):
        shutil.copy(path, tmp_path)
    return tmp_path


def test_a_persona_folder_that_changes_is_read_again(cards):
    catalog = Catalog(cards, "smollm2")
    first = catalog.models()
    assert {"brenna-ironhand", "old-tam", "smollm2"} <= set(first) and "wren" not in first
    (cards / "wren.yaml").write_text(EXTRA)
    assert "wren" in catalog.models() and first is not catalog.models()  # replaced, not changed under a request
    (cards / "blacksmith.yaml").unlink()
    assert "brenna-ironhand" not in catalog.models()


def test_a_folder_that_stops_loading_leaves_the_old_set_serving(cards, caplog):
    catalog = Catalog(cards, "smollm2")
    (cards / "wren.yaml").write_text(EXTRA)
    good = catalog.models()
    with caplog.at_level(logging.WARNING, logger="taille.serve.server"):
        (cards / "broken.yaml").write_text("name: [unclosed\n")
        assert catalog.models() is good
        assert catalog.models() is good  # the same broken set is reported once
        (cards / "broken.yaml").write_text("name: Twin\nrole: a smith\nactions: {type: object}\n")
        assert catalog.models() is good  # a bad `actions` schema too
        shutil.rmtree(cards)
        assert catalog.models() is good  # the folder gone
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and "not valid YAML" in warnings[0] and "still serving" in warnings[0]
    assert "'actions'" in warnings[1] and "wren" in warnings[2]
    cards.mkdir()
    (cards / "wren.yaml").write_text(EXTRA)
    assert set(catalog.models()) == {"wren", "smollm2"}  # and it comes back when it loads again


def test_a_fixed_set_is_served_as_given():
    from taille.chat.persona import load_personas

    personas = load_personas(shipped_personas())
    assert set(Catalog(personas, "smollm2").models()) == {*personas, "smollm2"}
    with pytest.raises(TailleError, match="no .yaml persona files"):
        Catalog(shipped_personas().parent / "chat", "smollm2")  # a folder with no cards, at start: an error


def test_a_conversation_goes_back_to_its_slot():
    slots = Slots(2)
    first, held = slots.acquire("player-1", "old-tam")
    assert not held
    slots.release(first)
    other, _ = slots.acquire("player-2", "old-tam")  # not into player-1's conversation, though same persona
    assert other != first
    slots.release(other)
    again, held = slots.acquire("player-1", "old-tam")
    assert (again, held) == (first, True)
    slots.release(again)
    anyone, _ = slots.acquire(None, "halcyon")  # no user: the least recently used slot
    assert anyone == other


def test_a_busy_slot_is_never_given_twice():
    slots = Slots(2)
    first, _ = slots.acquire("player-1", "old-tam")
    second, held = slots.acquire("player-1", "old-tam")  # the same player again while the first reply runs
    assert second != first and not held
    slots.release(first)
    slots.release(second)
    third, held = slots.acquire("player-1", "old-tam")
    assert (third, held) == (second, True)  # the conversation moved with its newest turn
    slots.release(third)


def test_a_request_without_a_user_prefers_its_personas_slot_over_a_players_conversation():
    slots = Slots(3)
    for user, persona in (("player-1", "old-tam"), (None, "halcyon"), (None, "old-tam")):
        slot, _ = slots.acquire(user, persona)
        slots.release(slot)
    held_by_player = slots.holder.index("player-1")
    slot, _ = slots.acquire(None, "old-tam")
    assert slot != held_by_player and slots.persona[slot] == "old-tam" and slot == 2
    slots.release(slot)
    slots.forget()  # the engine started again: nothing is held
    assert slots.holder == [None] * 3
