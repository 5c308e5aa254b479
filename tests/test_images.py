"""pipeline.io.images: the bad-image zoo, mode conversions and the ImageNet transform."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from pipeline.compute.batches import to_batch
from pipeline.io.images import ImageError, Preprocess, decode

IMAGENET = Preprocess.for_input_size(224)
EXACT32 = Preprocess.for_input_size(32)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR (CRC fixed) claims another size: a header-only bomb."""
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR payload starts at byte 16
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _palette_png() -> bytes:
    image = _noise(40, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, "PNG", transparency=0)


GOOD = {
    # name: (bytes factory, preprocess, expected shape)
    "rgb jpeg 300x200": (lambda: _encode(_noise(300, 200), "JPEG"), IMAGENET, (224, 224, 3)),
    "cmyk jpeg": (lambda: _encode(_noise(64, 48).convert("CMYK"), "JPEG"), IMAGENET, (224, 224, 3)),
    "greyscale jpeg": (
        lambda: _encode(_noise(48, 64).convert("L"), "JPEG"), IMAGENET, (224, 224, 3)
    ),
    "palette png": (_palette_png, IMAGENET, (224, 224, 3)),
    "rgba png": (lambda: _encode(_noise(32, 32).convert("RGBA"), "PNG"), EXACT32, (32, 32, 3)),
    "la png": (lambda: _encode(_noise(32, 32).convert("LA"), "PNG"), EXACT32, (32, 32, 3)),
    "32x32 png exact": (lambda: _encode(_noise(32, 32), "PNG"), EXACT32, (32, 32, 3)),
    "8x8 bmp (minimum)": (lambda: _encode(_noise(8, 8), "BMP"), IMAGENET, (224, 224, 3)),
    "gif": (lambda: _encode(_noise(50, 20).convert("P"), "GIF"), IMAGENET, (224, 224, 3)),
}

BAD = {
    # name: (bytes factory, preprocess, expected reason (regex))
    "zero bytes": (lambda: b"", IMAGENET, r"^empty file$"),
    "text file": (lambda: b"label,file\n3,cat.jpg\n", IMAGENET, r"^not an image: "),
    "truncated jpeg": (
        lambda: (lambda d: d[: len(d) // 2])(_encode(_noise(120, 90), "JPEG")),
        IMAGENET,
        r"^truncated or corrupt image: ",
    ),
    "truncated png": (
        lambda: (lambda d: d[: len(d) // 2])(_encode(_noise(120, 90), "PNG")),
        IMAGENET,
        r"^truncated or corrupt image: ",
    ),
    "1x1 pixel": (
        lambda: _encode(_noise(1, 1), "PNG"),
        IMAGENET,
        r"^image is 1x1 px, too small \(minimum 8 px per side\)$",
    ),
    "7 px high": (
        lambda: _encode(_noise(300, 7), "PNG"), IMAGENET, r"^image is 300x7 px, too small"
    ),
    "64x48 exact 32": (
        lambda: _encode(_noise(64, 48), "PNG"),
        EXACT32,
        r"^image is 64x48 px, expected exactly 32x32 px",
    ),
    "decompression bomb": (lambda: _png_claiming_size(20000, 20000), IMAGENET, r"decompression"),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_decodes(name: str) -> None:
    make, preprocess, shape = GOOD[name]
    array = decode(make(), preprocess)
    assert array.shape == shape and array.dtype == np.uint8 and array.flags.writeable


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_image_is_an_image_error_with_reason(name: str) -> None:
    make, preprocess, reason = BAD[name]
    with pytest.raises(ImageError, match=reason):
        decode(make(), preprocess)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # decode never flips the global


def test_image_over_the_warning_limit_is_refused_before_decoding() -> None:
    # 100 M px: Pillow only warns (the hard error is at 2x its limit); decode refuses it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match=r"^image is 10000x10000 px, over the decompression"):
            decode(_png_claiming_size(10000, 10000), IMAGENET)


def test_colour_conversions() -> None:
    grey = Image.new("L", (32, 32), 77)
    assert (decode(_encode(grey, "PNG"), EXACT32) == 77).all()
    rgba = Image.new("RGBA", (32, 32), (10, 20, 30, 0))  # fully transparent: alpha dropped
    assert (decode(_encode(rgba, "PNG"), EXACT32) == [10, 20, 30]).all()
    cmyk = Image.new("RGB", (32, 32), (200, 30, 90)).convert("CMYK")  # not inverted
    assert np.abs(decode(_encode(cmyk, "JPEG"), EXACT32).astype(int) - [200, 30, 90]).max() <= 3


def test_imagenet_geometry_matches_torchvision_arithmetic() -> None:
    # A 300x200 image with a marker column: resize short side 200 -> 256 gives 384x256, centre
    # crop offsets left = round((384-224)/2) = 80, top = round((256-224)/2) = 16.
    array = np.zeros((200, 300, 3), dtype=np.uint8)
    array[:, 150:] = 255  # right half white: after resize the edge is at x = 192
    out = decode(_encode(Image.fromarray(array), "PNG"), IMAGENET)
    assert out.shape == (224, 224, 3)
    # The edge sits at 192 - 80 = 112 in the crop (bilinear blurs at most one pixel around it).
    assert (out[:, :111] == 0).all() and (out[:, 113:] == 255).all()
    assert Preprocess.for_input_size(224) == Preprocess("resize", 224, 256)
    assert Preprocess.for_input_size(32) == Preprocess("exact", 32)


def test_preprocess_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        Preprocess("bicubic", 224, 256)
    with pytest.raises(ValueError, match="resize >= size"):
        Preprocess("resize", 224, 200)
    with pytest.raises(ValueError, match="no resize"):
        Preprocess("exact", 32, 36)
    with pytest.raises(ValueError, match="input size 96"):
        Preprocess.for_input_size(96)


def _shared_sample(shared_dir: Path) -> list[Path]:
    folder = shared_dir / "data" / "imagenet-sample"
    files = sorted(folder.glob("*.JPEG"))
    if not files:
        pytest.skip(f"no JPEGs in {folder} (see ../shared/data/README.md)")
    return files


def _mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def test_real_imagenet_jpegs(shared_dir: Path) -> None:
    files = _shared_sample(shared_dir)
    rgb = files[0]
    grey = next((p for p in files if _mode(p) == "L"), None)
    assert grey is not None, "the shared sample should contain greyscale JPEGs"
    for path in (rgb, grey):
        array = decode(path.read_bytes(), IMAGENET)
        assert array.shape == (224, 224, 3) and array.dtype == np.uint8
    grey_array = decode(grey.read_bytes(), IMAGENET)
    assert (grey_array[..., 0] == grey_array[..., 1]).all()
    assert (grey_array[..., 0] == grey_array[..., 2]).all()
    batch = to_batch([decode(p.read_bytes(), IMAGENET) for p in files[:4]])
    assert batch.shape == (4, 3, 224, 224) and batch.dtype == torch.float32


def test_to_batch() -> None:
    a = np.zeros((4, 5, 3), dtype=np.uint8)
    b = np.full((4, 5, 3), 255, dtype=np.uint8)
    b[1, 2] = (0, 51, 255)
    batch = to_batch([a, b])
    assert batch.shape == (2, 3, 4, 5) and batch.dtype == torch.float32
    assert batch.is_contiguous() and batch.min() == 0.0 and batch.max() == 1.0
    assert batch[1, :, 1, 2].tolist() == pytest.approx([0.0, 0.2, 1.0])
    with pytest.raises(ValueError, match="array 1"):
        to_batch([a, np.zeros((5, 4, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        to_batch([a.astype(np.float32)])
    with pytest.raises(ValueError, match="no arrays"):
        to_batch([])
