"""Labelled image datasets, listed deterministically from a local folder or an S3 prefix.

The listing (records sorted by ``image_id``) is what the driver cuts into shards, so the same
source always gives the same shards. Images that have no label get ``label = -1`` and become
error rows later ("no label") rather than being dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.io import storage
from pipeline.io.storage import S3Options
from scalecert.errors import InvalidOption

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
LAYOUTS = ("folder", "imagenet-val")
NO_LABEL = -1
IMAGENET_CLASSES = 1000
_ILSVRC_VAL = re.compile(r"^ILSVRC2012_val_(\d{8})$")
_DEVKIT_NOTE = (
    "labels must be 1-based class indices in sorted-synset order (the standard 0..999 order "
    "plus one); the devkit's ILSVRC2012_validation_ground_truth.txt uses ILSVRC2012_ID order, "
    "which differs and must first be mapped through the devkit's meta.mat (not read here)"
)


@dataclass(frozen=True)
class ImageRecord:
    """One image: ``image_id`` is its key relative to the dataset root ('/'-separated),
    ``label`` its class index (-1 when unknown), ``location`` the full path or S3 URI to read."""

    image_id: str
    label: int
    location: str


@dataclass(frozen=True)
class Dataset:
    """A listed dataset: ``classes[i]`` names class index i; ``records`` sorted by image_id."""

    root: str
    layout: str
    classes: tuple[str, ...]
    records: tuple[ImageRecord, ...]

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise InvalidOption(f"Dataset.layout {self.layout!r}: expected one of {LAYOUTS}")

    def __len__(self) -> int:
        return len(self.records)


def listing_sha256(records: Iterable[ImageRecord]) -> str:
    """sha256 over ``image_id<TAB>label`` of each record, in order: the dataset part of every
    run fingerprint (certification and fine-tuning alike)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.image_id}\t{record.label}\n".encode())
    return digest.hexdigest()


def is_image_key(key: str) -> bool:
    """An image file by extension (case-insensitive), with no hidden component in its path."""
    if any(part.startswith(".") for part in key.split("/")):
        return False
    return posixpath.splitext(key)[1].lower() in IMAGE_EXTENSIONS


def open_dataset(
    source: str,
    s3: S3Options | None = None,
    ground_truth: str | None = None,
    synsets: str | None = None,
) -> Dataset:
    """List a labelled image set (local folder or ``s3://bucket/prefix``).

    Folder layout (no ``ground_truth``): ``source/<class>/<image>`` (deeper nesting allowed: the
    first folder is the class). The class list is ``synsets`` when given (a text file, one class
    per line, first token; class index = line position, so pass the sorted 1000-synset list to
    get the standard ImageNet order even when only some classes are present), else the sorted
    names of the folders that hold images. Images directly under ``source``, or under a folder
    not in ``synsets``, get label -1.

    ImageNet validation as distributed (``ground_truth`` given, layout ``imagenet-val``): a flat
    folder of ``ILSVRC2012_val_XXXXXXXX.JPEG`` and either

    - ``LOC_val_solution.csv`` (header ``ImageId,PredictionString``; the first token of
      PredictionString is the synset; images match by file name without extension). Classes:
      ``synsets`` if given, else the sorted set of synsets in the CSV.
    - a text file with one 1-based label per line (``ILSVRC2012_validation_ground_truth.txt``
      style). The labels must be indices in sorted-synset order: the devkit's original file
      uses ILSVRC2012_ID order, which differs and needs mapping through its meta file, which is
      not read here. Line i labels the i-th image in sorted order; when every image is named
      ``ILSVRC2012_val_<n>``, line n labels image n instead, so a subset of the validation set
      is labelled correctly too (for the full set the two rules agree). Classes: ``synsets`` if
      given (labels range over it), else empty (labels in 1..1000).

    Images without an entry get label -1. Image files are recognised by extension; other and
    hidden files are skipped. A missing source is a FileNotFoundError, a source with no images
    or none labelled a ValueError, both naming the source.
    """
    root = storage.normalise(source)
    keys = [key for key in storage.list_files(root, s3) if is_image_key(key)]
    if not keys:
        raise InvalidOption(
            f"{source}: no image files found (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    class_list = _read_synsets(synsets, s3) if synsets is not None else None
    if ground_truth is None:
        classes, labels = _folder_labels(keys, class_list)
        layout = "folder"
    else:
        classes, labels = _ground_truth_labels(keys, ground_truth, s3, class_list)
        layout = "imagenet-val"
    if all(label == NO_LABEL for label in labels):
        if ground_truth is not None:
            reason = f"no image has an entry in {ground_truth}"
        elif synsets is not None:
            reason = f"no image is in a class folder named in {synsets}"
        else:
            reason = "no image is in a class folder; for a flat ImageNet folder pass ground_truth"
        raise InvalidOption(f"{source}: {len(keys)} images but none labelled ({reason})")
    records = tuple(
        ImageRecord(key, label, storage.join(root, key)) for key, label in zip(keys, labels)
    )
    return Dataset(root=root, layout=layout, classes=classes, records=records)


def _read_synsets(location: str, s3: S3Options | None) -> tuple[str, ...]:
    names = [line.split()[0] for line in _text_lines(location, s3) if line.strip()]
    if not names:
        raise InvalidOption(f"{location}: synsets file is empty")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidOption(f"{location}: synset {name!r} listed twice")
        seen.add(name)
    return tuple(names)


def _text_lines(location: str, s3: S3Options | None) -> list[str]:
    try:
        return storage.read_bytes(location, s3).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidOption(f"{location}: not a UTF-8 text file ({exc})") from exc


def _folder_labels(
    keys: list[str], class_list: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[int]]:
    folders = [key.split("/", 1)[0] if "/" in key else None for key in keys]
    classes = class_list or tuple(sorted({f for f in folders if f is not None}))
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index.get(f, NO_LABEL) if f is not None else NO_LABEL for f in folders]


def _stem(key: str) -> str:
    return posixpath.splitext(posixpath.basename(key))[0]


def _ground_truth_labels(
    keys: list[str], ground_truth: str, s3: S3Options | None, class_list: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[int]]:
    lines = _text_lines(ground_truth, s3)
    first = next((line for line in lines if line.strip()), "")
    if first.replace(" ", "").startswith("ImageId,"):
        return _csv_labels(keys, ground_truth, lines, class_list)
    return _index_labels(keys, ground_truth, lines, class_list)


def _csv_labels(
    keys: list[str], ground_truth: str, lines: list[str], class_list: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[int]]:
    reader = csv.DictReader(io.StringIO("\n".join(lines)), skipinitialspace=True)
    if not reader.fieldnames or "PredictionString" not in reader.fieldnames:
        raise InvalidOption(f"{ground_truth}: expected a header 'ImageId,PredictionString'")
    synset_of: dict[str, str] = {}
    for row_number, row in enumerate(reader, start=2):
        image, prediction = (row.get("ImageId") or "").strip(), (row.get("PredictionString") or "")
        tokens = prediction.split()
        if not image or not tokens:
            raise InvalidOption(f"{ground_truth}: line {row_number} has no ImageId or no synset")
        if synset_of.setdefault(image, tokens[0]) != tokens[0]:
            raise InvalidOption(f"{ground_truth}: {image} has two synsets")
    classes = class_list or tuple(sorted(set(synset_of.values())))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(synset_of.values()) - index.keys())
    if unknown:
        raise InvalidOption(
            f"{ground_truth}: {len(unknown)} synsets not in the synsets file "
            f"(first: {unknown[0]}); the two files do not belong together"
        )
    labels = [index[synset_of[_stem(k)]] if _stem(k) in synset_of else NO_LABEL for k in keys]
    return classes, labels


def _index_labels(
    keys: list[str], ground_truth: str, lines: list[str], class_list: tuple[str, ...] | None
) -> tuple[tuple[str, ...], list[int]]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    n_classes = len(class_list) if class_list else IMAGENET_CLASSES
    values = list(_parse_indices(ground_truth, lines, n_classes))
    numbers = [_ILSVRC_VAL.match(_stem(key)) for key in keys]
    if all(numbers):  # line n labels ILSVRC2012_val_<n>
        positions = [int(match.group(1)) - 1 for match in numbers if match]
    else:
        if len(values) != len(keys):
            raise InvalidOption(
                f"{ground_truth}: {len(values)} labels for {len(keys)} images; line i labels "
                "the i-th image in sorted order, so the counts must match"
            )
        positions = list(range(len(keys)))
    labels = [values[p] - 1 if 0 <= p < len(values) else NO_LABEL for p in positions]
    return (class_list or ()), labels


def _parse_indices(ground_truth: str, lines: Iterable[str], n_classes: int) -> Iterable[int]:
    for number, line in enumerate(lines, start=1):
        try:
            value = int(line.strip())
        except ValueError:
            raise InvalidOption(
                f"{ground_truth}: line {number} is {line.strip()!r}, expected one integer label "
                "(or a CSV with header 'ImageId,PredictionString')"
            ) from None
        if not 1 <= value <= n_classes:
            raise InvalidOption(
                f"{ground_truth}: line {number} has label {value}, outside 1..{n_classes}; "
                + _DEVKIT_NOTE
            )
        yield value


def dataset_name(source: str) -> str:
    """The last path component of a dataset source, safe as one S3 key segment."""
    last = source.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "dataset"
