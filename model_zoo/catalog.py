"""The zoo's card files, read without importing torch.

Cards are JSON (``cards/<id>.json``); listing them needs neither torch nor the architectures, so
``salbench zoo list`` starts in a fraction of a second. ``model_zoo.zoo`` re-exports these names
(``zoo.list_cards``, ``zoo.get_card``, ...) beside what needs torch (loading and writing weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from salbench.model_zoo.safe_files import read_regular

ZOO_DIR = Path(__file__).resolve().parent  # the bundled zoo: cards/ + checkpoints/


def zoo_dir() -> Path:
    """``$SALBENCH_ZOO_DIR`` (a folder with ``cards/`` and ``checkpoints/``) or the bundled zoo."""
    return Path(os.environ.get("SALBENCH_ZOO_DIR") or ZOO_DIR)


def default_cards_dir() -> Path:
    return zoo_dir() / "cards"


# the most bytes a card may hold: the committed cards are about 10 KB, so 4 MiB is a margin of ~400x
MAX_CARD_BYTES = 4 << 20


def read_card(path: Path) -> dict:
    """A card file as a dict; a damaged one is a ``ValueError`` that names the file, and so is a link,
    a FIFO, a device or a file over :data:`MAX_CARD_BYTES` (``safe_files.UnsafeFileError``: never
    followed or read)."""
    try:
        card = json.loads(read_regular(path, max_bytes=MAX_CARD_BYTES, what="zoo card"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"zoo card {path} is unreadable ({e}); restore it from git or delete it") from None
    if not isinstance(card, dict) or not isinstance(card.get("id"), str):
        raise ValueError(f"zoo card {path} is not a card (expected a JSON object with an 'id')")
    return card


def list_cards(dataset: str | None = None, cards_dir: Path | None = None) -> list[dict]:
    cards = []
    for p in sorted((cards_dir or default_cards_dir()).glob("*.json")):
        card = read_card(p)
        if dataset is None or card.get("dataset") == dataset:
            cards.append(card)
    return cards


def get_card(model_id: str, cards_dir: Path | None = None) -> dict:
    p = (cards_dir or default_cards_dir()) / f"{model_id}.json"
    if not os.path.lexists(p):  # a link or FIFO in its place is named by read_card, not called missing
        known = ", ".join(c["id"] for c in list_cards(cards_dir=cards_dir)) or "none"
        raise KeyError(f"no zoo card {model_id!r} (known: {known})")
    return read_card(p)
