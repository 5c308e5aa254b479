"""Published clean / certified accuracies, shipped as ``published_results.json`` beside this module.

They are other people's numbers, printed beside ours for context and always labelled
"published": the reducer never mixes them into measured rows. Every row names its source (a
key into ``sources``: title, URL, where in it), the defense, the model (None when the source
does not say), the dataset and its image side, the patch as a share of the image area (%),
clean and certified accuracy (%), and the kind of guarantee: ``certified detection`` (the
defense may alert) or ``certified recovery`` (it must output the label).
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


def load_published(text: str | None = None) -> tuple[PublishedRow, ...]:
    """The shipped published rows (or those of ``text``, a JSON document of the same form);
    a row with an unknown source or kind is a ValueError naming it."""
    if text is None:
        text = resources.files("pipeline.report").joinpath(DATA_FILE).read_text(encoding="utf-8")
    document = json.loads(text)
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


def relevant(rows: tuple[PublishedRow, ...], image_side: int, classes: int) -> tuple[PublishedRow, ...]:
    """The rows comparable with a run: same image side and, for the two datasets we ship,
    the same class count (CIFAR-10: 10 classes at 32 px; ImageNet: 1000 at 224 px)."""
    expected = {"CIFAR-10": 10, "ImageNet": 1000}
    return tuple(
        row for row in rows
        if row.image_side == image_side and expected.get(row.dataset, classes) == classes
    )
