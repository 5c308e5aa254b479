"""Reading, decoding and preprocessing labelled images with Pillow (never torchvision, no torch).

Every way an input can be unusable (unreadable, no label, a label the model lacks, an
undecodable file) ends in one short reason (:func:`read_labelled`), which the certify worker
writes into the certificate row (status ``error``) and fine-tuning lists as skipped, instead of
crashing the run.
Preprocessing follows the model's declared :class:`~scalecert.models.Preprocessing`
(:meth:`Preprocess.of`) and matches torchvision's evaluation transforms on PIL images
(``Resize`` of the short side with Pillow's bilinear or bicubic filter, ``CenterCrop``) so
accuracies compare with published ones.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.io import storage
from pipeline.io.sources import ImageRecord
from scalecert.errors import EnvironmentFault, InvalidOption

MIN_SIDE = 8
KINDS = ("resize", "exact")
IMAGENET_RESIZE = 256
IMAGENET_SIZE = 224
# Pillow's filters by the names --interpolation takes
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class DeclaredPreprocessing(Protocol):
    """What :meth:`Preprocess.of` reads of a :class:`scalecert.models.Preprocessing` (named
    here without importing it: ``scalecert.models`` imports torch, this module does not)."""

    input_size: int | None
    resize: int | None
    interpolation: str | None


class ImageError(ValueError):
    """An input that cannot become a model input; ``str(error)`` is a short human reason."""


@dataclass(frozen=True)
class Preprocess:
    """How decoded pixels become a ``size x size`` model input.

    - ``resize``: resize the short side to ``resize`` with ``interpolation`` (Pillow's
      bilinear or bicubic filter), then centre-crop ``size`` (the standard evaluation
      transform: 256 -> 224 for ImageNet models, or a timm model's ``crop_pct``).
    - ``exact``: the image must already be ``size x size`` (CIFAR); nothing is resampled, so
      masks act on the original pixels.
    """

    kind: str
    size: int
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.kind == "imagenet":  # the earlier name of ``resize``, still accepted
            object.__setattr__(self, "kind", "resize")
        if self.kind not in KINDS:
            raise InvalidOption(f"Preprocess.kind {self.kind!r}: expected one of {KINDS}")
        if not isinstance(self.size, int) or self.size < MIN_SIDE:
            raise InvalidOption(f"Preprocess.size {self.size!r}: expected an int >= {MIN_SIDE}")
        if self.kind == "exact" and self.resize is not None:
            raise InvalidOption(f"Preprocess: exact preprocessing takes no resize (got {self.resize})")
        if self.kind == "resize" and (
            not isinstance(self.resize, int) or self.resize < self.size
        ):
            raise InvalidOption(
                f"Preprocess: resize preprocessing needs resize >= size ({self.size}), "
                f"got {self.resize!r}"
            )
        if self.interpolation not in FILTERS:
            raise InvalidOption(f"Preprocess.interpolation {self.interpolation!r}: expected "
                                f"one of {', '.join(FILTERS)}")

    @classmethod
    def of(cls, preprocessing: DeclaredPreprocessing) -> Preprocess:
        """The decoding step of a model's resolved preprocessing (its ``input_size``,
        ``resize`` and ``interpolation``; ``mean`` and ``std`` act inside the model)."""
        if preprocessing.input_size is None:
            raise InvalidOption("Preprocess.of: the preprocessing declares no input size")
        if preprocessing.resize is None:
            return cls("exact", preprocessing.input_size)
        return cls("resize", preprocessing.input_size, preprocessing.resize,
                   preprocessing.interpolation or "bilinear")

    @classmethod
    def for_input_size(cls, size: int) -> Preprocess:
        """The built-ins' preprocessing for an input size: 224 -> resize 256 (bilinear) and
        crop 224, 32 -> exact 32x32. Other sizes come from a model's declared preprocessing
        (:meth:`of`)."""
        if size == IMAGENET_SIZE:
            return cls("resize", IMAGENET_SIZE, IMAGENET_RESIZE)
        if size == 32:
            return cls("exact", 32)
        raise InvalidOption(
            f"no standard preprocessing for input size {size} (known: 224, 32); "
            "use Preprocess.of(model.preprocessing) or construct Preprocess(kind=..., "
            "size=..., resize=...) explicitly"
        )


def decode(data: bytes, preprocess: Preprocess) -> np.ndarray:
    """Decode image bytes into a ``size x size x 3`` uint8 RGB array, or raise ImageError.

    Truncated files are errors (Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at
    its default, False, and the image is fully loaded here). Images over Pillow's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, checked from the header before any
    pixels are decoded) are errors. Multi-frame files (GIF, TIFF) give their first frame; EXIF
    orientation is ignored (as in the standard ImageNet evaluation).

    Colour: every mode becomes RGB by Pillow's ``convert("RGB")``, as torchvision's default
    loader does: greyscale (L) is replicated, CMYK converted naively (no ICC profile), palette
    images (P) take their palette colours, and alpha (RGBA, LA, PA) is dropped, not composited
    (transparent pixels keep whatever colour they store).
    """
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise ImageError(
                    f"image is {width}x{height} px, over the decompression-bomb limit of "
                    f"{limit} px"
                )
            if min(width, height) < MIN_SIDE:
                raise ImageError(
                    f"image is {width}x{height} px, too small (minimum {MIN_SIDE} px per side)"
                )
            image.load()
            # fit inside the block: close() invalidates the pixels of an image not converted
            return _fit(_to_rgb(image), preprocess)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression bomb): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"not an image: unrecognised format (starts with {data[:8]!r})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise OSError, SyntaxError, struct.error, ...
        raise ImageError(f"truncated or corrupt image: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """``convert("RGB")``; palette images go through RGBA so Pillow does not warn about
    palette transparency (the colours are the same)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported colour mode {image.mode}: {exc}") from exc


def _fit(image: Image.Image, preprocess: Preprocess) -> np.ndarray:
    width, height = image.size
    size = preprocess.size
    if preprocess.kind == "exact":
        if (width, height) != (size, size):
            raise ImageError(
                f"image is {width}x{height} px, expected exactly {size}x{size} px "
                "(exact preprocessing does not resize)"
            )
        return np.array(image, dtype=np.uint8)
    # torchvision Resize(int): short side -> resize, long side truncated like int(); then
    # CenterCrop with round() offsets. Same arithmetic, same pixels.
    assert preprocess.resize is not None
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(preprocess.resize * long / short)
    new_size = (preprocess.resize, new_long) if width <= height else (new_long, preprocess.resize)
    if new_size != (width, height):
        image = image.resize(new_size, FILTERS[preprocess.interpolation], reducing_gap=None)
    width, height = new_size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


@dataclass(frozen=True)
class ReadOutcome:
    """One record read: its ``H x W x 3`` uint8 pixels, or the ``reason`` it has none; and the
    sha256 of its bytes when they could be read (fine-tuning fingerprints the content)."""

    pixels: np.ndarray | None
    reason: str | None
    sha256: str | None


def label_problem(label: int, num_classes: int) -> str | None:
    """Why ``label`` cannot be certified or trained on by a model of ``num_classes`` classes."""
    if label < 0:
        return "no label: the image is not in a class folder or the ground truth"
    if label >= num_classes:
        return f"label {label} is outside the model's {num_classes} classes"
    return None


def read_labelled(
    record: ImageRecord, preprocess: Preprocess, num_classes: int,
    s3: storage.S3Options | None = None, with_sha256: bool = False,
) -> ReadOutcome:
    """Read ``record``'s bytes, check its label and decode it: the one way every job (certify,
    fine-tune, in-memory loading) turns a listed image into pixels or a reason.
    ``with_sha256``: also hash the bytes (``sha256`` stays None otherwise)."""
    try:
        data = storage.read_bytes(record.location, s3)
    except EnvironmentFault as exc:
        # The store failing (a disk error, S3 unreachable or denying) is no fault of the image:
        # it stops the shard, which a rerun redoes. A local file that this user may not read
        # is the file's own problem, as a missing or corrupt one is.
        if not isinstance(exc.__cause__, PermissionError) or storage.is_s3(record.location):
            raise
        return ReadOutcome(None, f"cannot read {record.location}: {exc.problem}", None)
    except OSError as exc:
        return ReadOutcome(None, f"cannot read {record.location}: {exc}", None)
    digest = hashlib.sha256(data).hexdigest() if with_sha256 else None
    problem = label_problem(record.label, num_classes)
    if problem is not None:
        return ReadOutcome(None, problem, digest)
    try:
        return ReadOutcome(decode(data, preprocess), None, digest)
    except ImageError as exc:
        return ReadOutcome(None, str(exc), digest)
