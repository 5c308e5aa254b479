"""Thumbnails of the images that alert on their clean input, read and preprocessed as the run
did, for report.html."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

from pipeline.io import storage
from pipeline.io.images import Preprocess, decode


@dataclass(frozen=True)
class Thumbnail:
    image_id: str
    method: str
    patch_px: int
    label: int
    prediction: int
    box: list[int] | None
    png_base64: str | None  # None: the image could not be read (see ``problem``)
    problem: str | None


def run_preprocess(run: dict[str, Any]) -> Preprocess:
    """How the run decoded its images: the manifest's resolved preprocessing, or (runs of
    earlier versions, built-in models only) the standard one for its image side."""
    recorded = run.get("preprocessing")
    if recorded and recorded.get("input_size"):
        if recorded.get("resize") is None:
            return Preprocess("exact", int(recorded["input_size"]))
        return Preprocess("resize", int(recorded["input_size"]), int(recorded["resize"]),
                          recorded.get("interpolation") or "bilinear")
    return Preprocess.for_input_size(int(run["image_side"]))


def alert_thumbnails(report: dict[str, Any], s3: storage.S3Options | None,
                     limit: int = 24) -> list[Thumbnail]:
    """Thumbnails of the first ``limit`` clean alerts, read from the dataset and preprocessed
    as the run did; an image that cannot be read gets ``problem`` instead of pixels."""
    from PIL import Image

    source = report["run"]["dataset"]["source"]
    side = report["run"]["image_side"]
    thumbs = []
    for item in report["clean_alerts"]["items"][:limit]:
        png, problem = None, None
        try:
            pixels = decode(storage.read_bytes(storage.join(source, item["image_id"]), s3),
                            run_preprocess(report["run"]))
            image = Image.fromarray(pixels)
            if side > 112:
                image = image.resize((112, 112), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            png = base64.b64encode(buffer.getvalue()).decode("ascii")
        except Exception as exc:  # any failure becomes a note in the page, never a failed report
            problem = f"cannot read {item['image_id']} from {source}: {exc}"
        thumbs.append(Thumbnail(item["image_id"], item["method"], item["patch_px"], item["label"],
                                item["prediction"], item["alert_box"], png, problem))
    return thumbs

