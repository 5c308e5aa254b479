"""Published clean / certified accuracies, shipped as ``published_results.json`` beside this module.

They are other people's numbers, printed beside ours for context and always labelled
"published": the reducer never mixes them into measured rows. Every row names its source (a
key into ``sources``: title, URL, where in it), the defense, the model (None when the source
does not say), the dataset and its image side, the patch as a share of the image area (%),
clean and certified accuracy (%), and the kind of guarantee: ``certified detection`` (the
defense may alert) or ``certified recovery`` (it must output the label).

``attack_rows`` hold published *empirical* figures of attacks (the attack report's): each
names its source, the figure (a name of :data:`ATTACK_FIGURES`, defined as in
:mod:`pipeline.report.attacks`), model, dataset, image side, patch area (%) and value (%).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from scalecert.errors import InvalidOption

DATA_FILE = "published_results.json"
KINDS = ("certified detection", "certified recovery")
ATTACK_FIGURES = ("undefended_success", "pruned_success", "alert_rate", "defended_fooled",
                  "localized", "empirical_recovery", "undefended_accuracy_attacked")


@dataclass(frozen=True)
class PublishedRow:
    """One published result (percentages as printed in the source)."""

    source: str
    title: str
    url: str
    where: str
    defense: str
    model: str | None
    dataset: str
    image_side: int
    patch_area_percent: float
    clean_accuracy: float
    certified_accuracy: float
    kind: str
    note: str

    def patch_px(self) -> int:
        """Patch side in pixels by the same rule as ``--patch N%`` (smallest side covering the
        share, to 0.1 px): ImageNet 2% is 32 px at 224, CIFAR 2.4% is 5 px at 32."""
        return max(1, math.ceil(math.sqrt(self.patch_area_percent / 100.0) * self.image_side - 0.1))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "patch_px": self.patch_px(), "published": True}


@dataclass(frozen=True)
class PublishedAttackRow:
    """One published empirical attack figure (a percentage as printed in the source)."""

    source: str
    title: str
    url: str
    where: str
    figure: str
    model: str | None
    dataset: str
    image_side: int
    patch_area_percent: float
    value: float
    note: str

    @property
    def citation(self) -> str:
        """``title, where``: how the report names the source."""
        return f"{self.title}, {self.where}"

    def patch_px(self) -> int:
        """Patch side in pixels by the rule of :meth:`PublishedRow.patch_px`."""
        return max(1, math.ceil(math.sqrt(self.patch_area_percent / 100.0) * self.image_side - 0.1))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "citation": self.citation, "patch_px": self.patch_px(),
                "published": True}


def _document(text: str | None) -> dict[str, Any]:
    if text is None:
        text = resources.files("pipeline.report").joinpath(DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def load_published_attacks(text: str | None = None) -> tuple[PublishedAttackRow, ...]:
    """The shipped published attack figures (``attack_rows``; or those of ``text``); a row
    with an unknown source or figure is an InvalidOption naming it."""
    document = _document(text)
    sources = document["sources"]
    rows = []
    for index, raw in enumerate(document.get("attack_rows", [])):
        source = sources.get(raw["source"])
        if source is None:
            raise InvalidOption(f"{DATA_FILE}: attack row {index} names unknown source "
                                f"{raw['source']!r}")
        if raw["figure"] not in ATTACK_FIGURES:
            raise InvalidOption(f"{DATA_FILE}: attack row {index} has figure {raw['figure']!r}, "
                                f"not one of {ATTACK_FIGURES}")
        rows.append(PublishedAttackRow(
            source=raw["source"], title=source["title"], url=source["url"], where=source["where"],
            figure=raw["figure"], model=raw["model"], dataset=raw["dataset"],
            image_side=int(raw["image_side"]), patch_area_percent=float(raw["patch_area_percent"]),
            value=float(raw["value"]), note=raw.get("note", ""),
        ))
    return tuple(rows)


def load_published(text: str | None = None) -> tuple[PublishedRow, ...]:
    """The shipped published rows (or those of ``text``, a JSON document of the same form);
    a row with an unknown source or kind is a ValueError naming it."""
    document = _document(text)
    sources = document["sources"]
    rows = []
    for index, raw in enumerate(document["rows"]):
        source = sources.get(raw["source"])
        if source is None:
            raise InvalidOption(f"{DATA_FILE}: row {index} names unknown source {raw['source']!r}")
        if raw["kind"] not in KINDS:
            raise InvalidOption(f"{DATA_FILE}: row {index} has kind {raw['kind']!r}, not one of {KINDS}")
        rows.append(PublishedRow(
            source=raw["source"], title=source["title"], url=source["url"], where=source["where"],
            defense=raw["defense"], model=raw["model"], dataset=raw["dataset"],
            image_side=int(raw["image_side"]), patch_area_percent=float(raw["patch_area_percent"]),
            clean_accuracy=float(raw["clean_accuracy"]),
            certified_accuracy=float(raw["certified_accuracy"]), kind=raw["kind"],
            note=raw.get("note", ""),
        ))
    return tuple(rows)


def comparable(row: PublishedRow | PublishedAttackRow, image_side: int, classes: int) -> bool:
    """Whether a published row is comparable with a run: same image side and, for the two
    datasets we ship, the same class count (CIFAR-10: 10 classes at 32 px; ImageNet: 1000 at
    224 px)."""
    expected = {"CIFAR-10": 10, "ImageNet": 1000}
    return row.image_side == image_side and expected.get(row.dataset, classes) == classes


def relevant(rows: tuple[PublishedRow, ...], image_side: int, classes: int) -> tuple[PublishedRow, ...]:
    """The rows comparable with a run (:func:`comparable`)."""
    return tuple(row for row in rows if comparable(row, image_side, classes))
