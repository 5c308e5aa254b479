"""Attack names -> what each attack is, without importing torch (options, the CLI and the
pipeline validate and list attacks through this); :mod:`scalecert.attacks` holds each attack's
objective, looked up by the same name.

One immutable mapping, like the method registry. Adding an attack is its entry here and its
objective in :mod:`scalecert.attacks`; the CLI's choices and help come from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from scalecert.errors import InvalidOption

DEFAULT_ATTACK = "per-image"


@dataclass(frozen=True)
class AttackInfo:
    """A registered attack: its name, one line on what it does (the CLI's help), and what
    sets it apart from the per-image attack for the code that runs it."""

    name: str
    summary: str
    trains_patch: bool = False  # one patch, trained before the run on --universal-data
    uses_alpha: bool = False  # --alpha weighs its activation penalty (the rows' alpha column)
    defended_only: bool = False  # it fools the defense itself: only against the defended model


_ATTACKS: Mapping[str, AttackInfo] = MappingProxyType({
    "per-image": AttackInfo(
        name="per-image", summary="optimise each image's patch"),
    "universal": AttackInfo(
        name="universal", trains_patch=True,
        summary="one patch trained on --universal-data (Eq. 3), pasted at random positions"),
    "adaptive": AttackInfo(
        name="adaptive", uses_alpha=True,
        summary="per-image with the activation penalty --alpha (Eq. 6)"),
    "detector": AttackInfo(
        name="detector", defended_only=True,
        summary="fool M while every window agrees with the wrong label"),
})


def available_attacks() -> tuple[str, ...]:
    """Registered attack names, in registry order (the CLI's choices)."""
    return tuple(_ATTACKS)


def attack_info(name: str) -> AttackInfo:
    """The registry entry of ``name``; an unknown name is refused with the choices."""
    try:
        return _ATTACKS[name]
    except (KeyError, TypeError):
        raise InvalidOption(
            f"attack: one of {', '.join(available_attacks())}, got {name!r}") from None


def describe_attacks() -> str:
    """Every attack with its summary, in one sentence: the CLI's ``--attack`` help."""
    return "; ".join(f"{info.name}: {info.summary}" for info in _ATTACKS.values()) + "."
