"""pipeline.io.sources: deterministic listing and labels for folder and ImageNet-val layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.io import storage
from pipeline.io.sources import Dataset, ImageRecord, open_dataset

# A folder-layout tree: classes out of order on purpose, mixed extension case, non-image and
# hidden files, a stray image at the root and one nested a level deeper.
FOLDER_TREE = {
    "zebra/2.png": b"z2",
    "zebra/1.JPG": b"z1",
    "ant/b.jpeg": b"a2",
    "ant/a.webp": b"a1",
    "ant/notes.txt": b"not an image",
    "ant/.hidden.jpg": b"hidden",
    ".cache/x.jpg": b"hidden folder",
    "moth/sub/deep.tiff": b"m1",
    "stray.bmp": b"no class",
    "README": b"a readme",
    "empty-class/.keep": b"",
}
EXPECTED_FOLDER = [  # (image_id, label) with classes ant=0, moth=1, zebra=2
    ("ant/a.webp", 0),
    ("ant/b.jpeg", 0),
    ("moth/sub/deep.tiff", 1),
    ("stray.bmp", -1),
    ("zebra/1.JPG", 2),
    ("zebra/2.png", 2),
]


def _write_tree(root: str, tree: dict[str, bytes]) -> None:
    for key, data in tree.items():
        storage.write_bytes_atomic(storage.join(root, key), data)


def _pairs(dataset: Dataset) -> list[tuple[str, int]]:
    return [(r.image_id, r.label) for r in dataset.records]


def test_folder_layout(tmp_path: Path) -> None:
    _write_tree(str(tmp_path / "ds"), FOLDER_TREE)
    dataset = open_dataset(str(tmp_path / "ds") + "/")
    assert dataset.layout == "folder"
    assert dataset.root == str(tmp_path / "ds")
    assert dataset.classes == ("ant", "moth", "zebra")  # folders without images are no class
    assert _pairs(dataset) == EXPECTED_FOLDER
    assert len(dataset) == len(EXPECTED_FOLDER)
    first = dataset.records[0]
    assert first == ImageRecord("ant/a.webp", 0, str(tmp_path / "ds" / "ant" / "a.webp"))
    assert storage.read_bytes(first.location) == b"a1"


def test_folder_layout_with_class_list(tmp_path: Path) -> None:
    _write_tree(str(tmp_path / "ds"), FOLDER_TREE)
    (tmp_path / "classes.txt").write_text("zebra  striped horse\nbee\nant\n")
    dataset = open_dataset(str(tmp_path / "ds"), synsets=str(tmp_path / "classes.txt"))
    assert dataset.classes == ("zebra", "bee", "ant")  # file order, first token
    labels = dict(_pairs(dataset))
    assert labels["ant/a.webp"] == 2 and labels["zebra/1.JPG"] == 0
    assert labels["moth/sub/deep.tiff"] == -1  # not in the class list: an error row later


def test_folder_layout_on_s3_lists_like_local(tmp_path: Path, s3_env: str) -> None:
    local = str(tmp_path / "ds")
    remote = f"s3://{s3_env}/datasets/ds"
    _write_tree(local, FOLDER_TREE)
    _write_tree(remote, FOLDER_TREE)
    here, there = open_dataset(local), open_dataset(remote + "/")
    assert there.root == remote
    assert there.classes == here.classes
    assert _pairs(there) == _pairs(here) == EXPECTED_FOLDER
    assert there.records[0].location == f"{remote}/ant/a.webp"
    assert storage.read_bytes(there.records[0].location) == b"a1"


def test_imagenet_val_on_s3_with_ground_truth_there(tmp_path: Path, s3_env: str) -> None:
    remote = f"s3://{s3_env}/imagenet"
    _write_tree(f"{remote}/val", {name: b"jpeg" for name in VAL_IMAGES})
    storage.write_text_atomic(f"{remote}/LOC_val_solution.csv", LOC_CSV)
    dataset = open_dataset(f"{remote}/val", ground_truth=f"{remote}/LOC_val_solution.csv")
    assert [label for _, label in _pairs(dataset)] == [0, 2, 1, -1]
    assert dataset.records[0].location == f"{remote}/val/{VAL_IMAGES[0]}"


VAL_IMAGES = [f"ILSVRC2012_val_{n:08d}.JPEG" for n in (1, 2, 3, 4)]
LOC_CSV = (
    "ImageId,PredictionString\n"
    "ILSVRC2012_val_00000003,n02000000 1 2 3 4 n02000000 5 6 7 8\n"
    "ILSVRC2012_val_00000001,n01000000 10 20 30 40\n"
    "ILSVRC2012_val_00000002,n03000000 0 0 9 9\n"
)


def _val_folder(tmp_path: Path, names: list[str] = VAL_IMAGES) -> str:
    folder = tmp_path / "val"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"jpeg")
    (folder / "LICENSE.txt").write_text("skipped")
    return str(folder)


def test_imagenet_val_with_loc_csv(tmp_path: Path) -> None:
    folder = _val_folder(tmp_path)
    (tmp_path / "LOC_val_solution.csv").write_text(LOC_CSV)
    dataset = open_dataset(folder, ground_truth=str(tmp_path / "LOC_val_solution.csv"))
    assert dataset.layout == "imagenet-val"
    assert dataset.classes == ("n01000000", "n02000000", "n03000000")  # sorted CSV synsets
    assert _pairs(dataset) == [(VAL_IMAGES[0], 0), (VAL_IMAGES[1], 2), (VAL_IMAGES[2], 1),
                               (VAL_IMAGES[3], -1)]  # image 4 has no entry

    # With the full synset list the indices follow it, not the CSV.
    (tmp_path / "synsets.txt").write_text("n00000000\nn01000000\nn02000000\nn03000000\n")
    dataset = open_dataset(
        folder, ground_truth=str(tmp_path / "LOC_val_solution.csv"),
        synsets=str(tmp_path / "synsets.txt"),
    )
    assert [label for _, label in _pairs(dataset)] == [1, 3, 2, -1]

    (tmp_path / "other.txt").write_text("n01000000\n")
    with pytest.raises(ValueError, match="not in the synsets file"):
        open_dataset(folder, ground_truth=str(tmp_path / "LOC_val_solution.csv"),
                     synsets=str(tmp_path / "other.txt"))


def test_imagenet_val_with_index_txt(tmp_path: Path) -> None:
    folder = _val_folder(tmp_path)
    (tmp_path / "gt.txt").write_text("66\n1\n1000\n")  # 1-based; image 4 has no line
    dataset = open_dataset(folder, ground_truth=str(tmp_path / "gt.txt"))
    assert dataset.layout == "imagenet-val" and dataset.classes == ()
    assert [label for _, label in _pairs(dataset)] == [65, 0, 999, -1]


def test_imagenet_val_subset_uses_the_number_in_the_name(tmp_path: Path) -> None:
    folder = _val_folder(tmp_path, [VAL_IMAGES[1], VAL_IMAGES[3]])  # images 2 and 4 only
    (tmp_path / "gt.txt").write_text("10\n20\n30\n40\n")
    dataset = open_dataset(folder, ground_truth=str(tmp_path / "gt.txt"))
    assert _pairs(dataset) == [(VAL_IMAGES[1], 19), (VAL_IMAGES[3], 39)]


def test_index_txt_errors_name_the_file_and_the_devkit_order(tmp_path: Path) -> None:
    folder = _val_folder(tmp_path)
    (tmp_path / "gt.txt").write_text("1\n1001\n")
    outside = r"gt\.txt: line 2 has label 1001, outside 1\.\.1000.*meta"
    with pytest.raises(ValueError, match=outside):
        open_dataset(folder, ground_truth=str(tmp_path / "gt.txt"))
    (tmp_path / "gt.txt").write_text("1\n0\n")
    with pytest.raises(ValueError, match="ILSVRC2012_ID"):
        open_dataset(folder, ground_truth=str(tmp_path / "gt.txt"))
    (tmp_path / "gt.txt").write_text("1\ncat\n")
    with pytest.raises(ValueError, match=r"line 2 is 'cat'"):
        open_dataset(folder, ground_truth=str(tmp_path / "gt.txt"))

    other = tmp_path / "other"
    other.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (other / name).write_bytes(b"x")
    (tmp_path / "two.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        open_dataset(str(other), ground_truth=str(tmp_path / "two.txt"))


def test_missing_empty_and_unlabelled_sources(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "README.md").write_text("no images")
    with pytest.raises(ValueError, match=r"empty: no image files"):
        open_dataset(str(tmp_path / "empty"))
    flat = _val_folder(tmp_path)
    with pytest.raises(ValueError, match="none labelled.*ground_truth"):
        open_dataset(flat)  # a flat folder needs its ground truth
    with pytest.raises(ValueError, match="unsupported scheme"):
        open_dataset("gs://bucket/val")


def test_shared_imagenet_sample_as_class_folders(shared_dir: Path, tmp_path: Path) -> None:
    sample = shared_dir / "data" / "imagenet-sample"
    synsets_file = sample / "synsets.txt"
    if not synsets_file.is_file():
        pytest.skip(f"{synsets_file} not found (see ../shared/data/README.md)")
    synsets = synsets_file.read_text().split()
    assert len(synsets) == 1000 and synsets == sorted(set(synsets)), "one sorted synset per line"
    files = sorted(sample.glob("*.JPEG"))
    root = tmp_path / "imagenet"
    for path in files:
        synset = path.name.split("_", 1)[0]
        (root / synset).mkdir(parents=True, exist_ok=True)
        (root / synset / path.name).symlink_to(path)

    dataset = open_dataset(str(root), synsets=str(synsets_file))
    assert dataset.classes == tuple(synsets)
    assert len(dataset) == len(files)
    for record in dataset.records:
        synset = record.image_id.split("/", 1)[0]
        assert record.label == synsets.index(synset), record.image_id

    # Without the class list the index is the position among the folders present, which for a
    # partial sample is not the ImageNet class index: that is what ``synsets`` is for.
    partial = open_dataset(str(root))
    assert partial.classes == tuple(sorted({r.image_id.split("/")[0] for r in dataset.records}))
