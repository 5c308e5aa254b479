"""The fine-tuned checkpoints committed under models/ are the ones docs/REPRODUCTION.md
describes: their sha256 is the documented one, they load for certify, and on 500 of the
test JPEGs they certify at a rate consistent with the full-test-set figure of the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.compute.batches import load_image_folder
from scalecert import CertConfig, Certifier, load_model
from scalecert.models.registry import file_sha256

pytestmark = pytest.mark.slow

MODELS = Path(__file__).resolve().parents[1] / "models"
# (file, method, sha256, certified accuracy at 2.4% on all 10,000 test JPEGs, docs/REPRODUCTION.md)
COMMITTED = [
    ("cifar10-resnet20-scalecert-2.4.pt", "scalecert",
     "ba9ef3cb48ef55bd1d4a4776987288ea78bc594cfce3883a2f38c6dfb14cbfb9", 0.449),
    ("cifar10-resnet20-masking-2.4.pt", "masking",
     "6c8439a5c6632e7333a4849e35682b3f429110c54aeb6cacb6752706a8ed30fc", 0.617),
]


@pytest.mark.parametrize(("name", "method", "sha256", "full_set_rate"), COMMITTED)
def test_committed_checkpoint_matches_the_documented_run(
    cifar10_test_dir, name, method, sha256, full_set_rate
):
    path = MODELS / name
    assert file_sha256(path) == sha256
    assert sha256 in (MODELS / "README.md").read_text()
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar["method"] == method and sidecar["finetune"]["cert"]["patch_px"] == 5
    assert sidecar["data"]["usable"] == 50000 and len(sidecar["epochs"]) == 16

    images, labels = load_image_folder(cifar10_test_dir, per_class=50)
    model = load_model("cifar_resnet20", checkpoint=path)
    result = Certifier(model, CertConfig(patch_px=5, top_k=0.15, method=method),
                       full_map=False).certify(images, labels)
    rate = float(result.certified.float().mean())
    # a 500-image part of the 10,000: within 4 standard errors of the full-set rate
    tolerance = 4 * math.sqrt(full_set_rate * (1 - full_set_rate) / len(labels))
    assert abs(rate - full_set_rate) < tolerance, (rate, full_set_rate)
