"""The client card: what a client knows of its task and the server cannot learn from tensors.

A spec says what a client trains (shapes); the head's class *names* exist only in the client's
data set. Each client therefore sends a small card with its registration (``POST /v1/register``
body key ``card``)::

    {"version": 1, "family": "minilm-l6", "classes": ["arts", "sports", ...]}

The server pins the first card of a family, refuses a client of that family whose class names
differ (409 ``classes_mismatch``: its head's rows would mean other classes), and writes the
names into ``<state>/final/<family>/`` so ``edgetune export`` labels the classes itself.
``classes`` lists exactly ``spec.n_classes`` names in head-row order (none for the ``lm``
task, whose spec has no head). Torch-free.

Bounds (`CARD_BOUNDS`): at most 4,096 classes of at most 128 printable characters each, so a
card stays under ~600 KB, within the server's 1 MiB cap on a registration body; a client with
more classes is refused by name rather than having its names silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgetune.protocol.names import CARD_CLASSES, CARD_FAMILY, CARD_VERSION, CARD_VERSION_KEY
from edgetune.protocol.spec import AdapterSpec, ProtocolError

CARD_BOUNDS = {"classes": 4096, "class_chars": 128}
CARD_KEYS = (CARD_VERSION_KEY, CARD_FAMILY, CARD_CLASSES)


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_card", message)


def check_class_name(index: int, name: Any) -> None:
    """A class name is a non-empty printable string of at most 128 characters."""
    limit = CARD_BOUNDS["class_chars"]
    if not isinstance(name, str) or not 1 <= len(name) <= limit or not name.isprintable():
        shown = repr(name)[:40]
        raise _bad(
            f"card classes[{index}]={shown} must be a printable string of 1..{limit} characters"
        )


@dataclass(frozen=True)
class ClientCard:
    """A client's card: its family and the class names of its head, in row order."""

    family: str
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or not self.family:
            raise _bad(f"card family={self.family!r} must be a non-empty string")
        if not isinstance(self.classes, tuple):
            raise _bad("card classes must be a list of strings")
        if len(self.classes) > CARD_BOUNDS["classes"]:
            raise _bad(f"card lists {len(self.classes)} classes; at most {CARD_BOUNDS['classes']}")
        for index, name in enumerate(self.classes):
            check_class_name(index, name)
        seen: dict[str, int] = {}
        for index, name in enumerate(self.classes):
            if name in seen:
                raise _bad(f"card class {name!r} is listed twice (at {seen[name]} and {index})")
            seen[name] = index

    def to_dict(self) -> dict[str, Any]:
        return {
            CARD_VERSION_KEY: CARD_VERSION,
            CARD_FAMILY: self.family,
            CARD_CLASSES: list(self.classes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> ClientCard:
        """Strict parse; raises ProtocolError (code ``bad_card``) naming the first problem."""
        if not isinstance(data, Mapping):
            raise _bad("card must be a JSON object")
        unknown = sorted(set(data) - set(CARD_KEYS))
        if unknown:
            raise _bad(f"unknown card fields: {unknown[:5]}; a card has {list(CARD_KEYS)}")
        version = data.get(CARD_VERSION_KEY)
        if version != CARD_VERSION or isinstance(version, bool):
            raise _bad(f"card version {version!r} is not supported; this side reads {CARD_VERSION}")
        classes = data.get(CARD_CLASSES, [])
        if not isinstance(classes, list):
            raise _bad("card classes must be a list of strings")
        return cls(family=data.get(CARD_FAMILY), classes=tuple(classes))  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, text: str) -> ClientCard:
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _bad(f"card is not valid JSON: {exc}") from exc

    def check_spec(self, spec: AdapterSpec) -> None:
        """The card describes the client that registers with ``spec``: same family, one name
        per row of its head."""
        if self.family != spec.family:
            raise _bad(f"card family {self.family!r} != spec family {spec.family!r}")
        if len(self.classes) != spec.n_classes:
            raise _bad(
                f"card lists {len(self.classes)} class names for a head of "
                f"{spec.n_classes} classes (spec n_classes)"
            )

    def disagreement(self, pinned: ClientCard) -> str | None:
        """Why this card's class names are not the ``pinned`` ones of its family, or None."""
        if self.classes == pinned.classes:
            return None
        for index, (mine, theirs) in enumerate(zip(self.classes, pinned.classes)):
            if mine != theirs:
                return (
                    f"class names differ from those of family {self.family!r}'s first client: "
                    f"classes[{index}] is {mine!r}, pinned {theirs!r}"
                )
        return (
            f"class names differ from those of family {self.family!r}'s first client: "
            f"{len(self.classes)} names, pinned {len(pinned.classes)}"
        )
