"""The shard worker without Ray: chunked decode ahead of certification, error rows, outcomes.

Shared ResNet-20 weights and CIFAR-10 test JPEGs (3 per class), plus unusable inputs.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import copy_class_subset

from pipeline.certify.worker import CertifyWorker
from pipeline.compute.batches import load_image_folder
from pipeline.io.certificates import part_location
from pipeline.io.sources import ImageRecord, open_dataset
from pipeline.run.config import RunConfig
from pipeline.run.worker import ShardTask, WorkerSettings
from scalecert import CertConfig, Certifier, load_model
from scalecert.errors import ModelChanged
from scalecert.models import file_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0  # a failure guard only: the events below are set within milliseconds


@pytest.fixture
def shard(tmp_path: Path, cifar10_test_dir: Path) -> tuple[Path, tuple[ImageRecord, ...]]:
    """30 good JPEGs in class folders, and two records that cannot be certified."""
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=3)
    (data / "cat" / "zz-broken.jpg").write_bytes(b"not a jpeg")
    records = open_dataset(str(data)).records
    stray = ImageRecord(image_id="stray.jpg", label=-1, location=str(data / "cat" / "0000.jpg"))
    return data, (*records, stray)


def make_worker(
    tmp_path: Path, checkpoint: Path, data: Path, chunk: int, planned_sha256: str | None = None
) -> CertifyWorker:
    run = RunConfig(data=str(data), model="cifar_resnet20", out=str(tmp_path / "out"),
                    patches=("5",), checkpoint=str(checkpoint), device="cpu")
    return CertifyWorker(WorkerSettings(
        run=run, run_id="test", metadata={}, patch_pixels=(5,), image_side=32,
        checkpoint_sha256=planned_sha256 or file_sha256(checkpoint), chunk_images=chunk))


def test_chunked_shard_gives_the_librarys_outcomes_and_error_rows(
    tmp_path, shard, resnet20_checkpoint
) -> None:
    data, records = shard
    worker = make_worker(tmp_path, resnet20_checkpoint, data, chunk=7)  # 5 chunks, one partial
    summary = worker.run(ShardTask(index=0, records=records))
    assert (summary.images, summary.errors, summary.rows) == (32, 2, 32)
    rows = {row["image_id"]: row
            for row in pq.read_table(part_location(str(tmp_path / "out"), 0)).to_pylist()}
    assert set(rows) == {record.image_id for record in records}
    assert rows["stray.jpg"]["status"] == "error" and "no label" in rows["stray.jpg"]["error"]
    assert rows["cat/zz-broken.jpg"]["status"] == "error"
    assert rows["cat/zz-broken.jpg"]["prediction"] is None

    images, labels = load_image_folder(data, per_class=3)
    good = [record.image_id for record in records if record.image_id in rows
            and rows[record.image_id]["status"] == "ok"]
    assert len(good) == 30
    model = load_model("cifar_resnet20", checkpoint=resnet20_checkpoint)
    library = Certifier(model, CertConfig(patch_px=5, top_k=0.15, masks_per_axis=6),
                        full_map=False).certify(images, labels)
    for name in ("prediction", "certified", "clean_output", "recovered_prediction"):
        assert [rows[image_id][name] for image_id in good] == getattr(library, name).tolist(), name
    assert summary.certified == {"5px/scalecert": int(library.certified.sum())}


def test_the_next_chunk_decodes_while_the_current_one_is_certified(
    tmp_path, shard, resnet20_checkpoint
) -> None:
    data, records = shard
    worker = make_worker(tmp_path, resnet20_checkpoint, data, chunk=10)
    first_chunk = {record.image_id for record in records[:10]}
    certifying_first = threading.Event()
    seen_while_certifying: list[bool] = []
    lock = threading.Lock()
    decode, certify = worker._read, worker._chunk_rows

    def watched_decode(record: ImageRecord):
        if record.image_id not in first_chunk:
            with lock:  # the second chunk's first decode: the first chunk is being certified
                if not seen_while_certifying:
                    seen_while_certifying.append(certifying_first.wait(WAIT_S))
        return decode(record)

    def watched_certify(context, chunk, certified):
        if chunk[0][0].image_id in first_chunk:
            certifying_first.set()
        return certify(context, chunk, certified)

    worker._read = watched_decode  # type: ignore[method-assign]
    worker._chunk_rows = watched_certify  # type: ignore[method-assign]
    summary = worker.run(ShardTask(index=0, records=records))
    assert seen_while_certifying == [True]
    assert summary.rows == len(records)


def test_a_checkpoint_other_than_the_planned_one_certifies_nothing(
    tmp_path, shard, resnet20_checkpoint
) -> None:
    """The planned sha256 is the akamaster file's; the path now holds other weights."""
    data, records = shard
    planned = file_sha256(resnet20_checkpoint)
    swapped = tmp_path / "latest.pt"
    swapped.write_bytes((REPO_ROOT / "models" / "cifar10-resnet20-masking-2.4.pt").read_bytes())
    worker = make_worker(tmp_path, swapped, data, chunk=10, planned_sha256=planned)
    with pytest.raises(ModelChanged) as caught:
        worker.run(ShardTask(index=0, records=records))
    message = str(caught.value)
    assert str(swapped) in message and planned in message and file_sha256(swapped) in message
    assert not (tmp_path / "out").exists()  # no row of the unplanned model is written
