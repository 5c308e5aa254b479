"""The fine-tuned checkpoints committed under models/ are the ones the docs describe: every file's
sha256 is the one models/README.md (and, for the recommended ones, models/best.json) records,
and each recommended checkpoint, certified with the settings best.json gives it, certifies 500
of the test JPEGs at a rate consistent with its full-test-set figure."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.compute.batches import load_image_folder
from pipeline.io.recommended import BEST, Recommendation, read_recommendations
from scalecert import CertConfig, Certifier, load_model
from scalecert.errors import InvalidOption
from scalecert.models.registry import file_sha256

MODELS = Path(__file__).resolve().parents[1] / "models"
RECOMMENDED = read_recommendations()


def test_every_committed_checkpoint_is_documented_with_its_sha256() -> None:
    readme = (MODELS / "README.md").read_text()
    checkpoints = sorted(MODELS.glob("*.pt"))
    assert len(checkpoints) >= 4
    for path in checkpoints:
        digest = file_sha256(path)
        assert f"`{path.name}` | `{digest}`" in readme, f"{path.name}: sha256 {digest} not in README"
        sidecar = json.loads(Path(f"{path}.json").read_text())
        assert sidecar["finetune"]["cert"]["patch_px"] == 5 and sidecar["data"]["usable"] == 50000


def test_best_json_names_a_committed_checkpoint_per_method_with_its_sha256() -> None:
    assert set(RECOMMENDED) == {"scalecert", "masking"}
    for method, best in RECOMMENDED.items():
        best.verify()  # the file exists and its sha256 is the recorded one
        assert file_sha256(best.path()) == best.sha256
        sidecar = json.loads(Path(f"{best.path()}.json").read_text())
        assert sidecar["method"] == method and sidecar["model"] == best.model
        trained = sidecar["finetune"]["cert"]
        assert all(trained[name] == value for name, value in best.cert.items()
                   if name in ("top_k", "layer", "r")), (method, trained, best.cert)
        CertConfig(patch_px=5, **best.cert_options())  # valid settings


def test_a_changed_checkpoint_or_a_bad_entry_is_refused(tmp_path: Path) -> None:
    best = RECOMMENDED["masking"]
    (tmp_path / "models").mkdir()
    copy = tmp_path / best.checkpoint
    copy.write_bytes(best.path().read_bytes() + b"\0")
    with pytest.raises(InvalidOption, match="has sha256 .* the file records"):
        best.verify(tmp_path)
    with pytest.raises(InvalidOption, match="not found"):
        replace(best, checkpoint="models/absent.pt").verify(tmp_path)
    document = json.loads(BEST.read_text())
    document["masking"]["topk"] = 0.2
    bad = tmp_path / "best.json"
    bad.write_text(json.dumps(document))
    with pytest.raises(InvalidOption, match=r"masking: unknown fields \['topk'\]"):
        read_recommendations(bad)
    del document["masking"]["topk"]
    document["scalecert"]["sha256"] = "abc"
    bad.write_text(json.dumps(document))
    with pytest.raises(InvalidOption, match="scalecert: sha256 must be 64"):
        read_recommendations(bad)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(RECOMMENDED))
def test_recommended_checkpoint_certifies_as_documented(cifar10_test_dir, method: str) -> None:
    best: Recommendation = RECOMMENDED[method]
    images, labels = load_image_folder(cifar10_test_dir, per_class=50)
    model = load_model(best.model, checkpoint=best.path())
    result = Certifier(model, CertConfig(patch_px=5, **best.cert_options()),
                       full_map=False).certify(images, labels)
    rate = float(result.certified.float().mean())
    # a 500-image part of the 10,000: within 4 standard errors of the full-set rate
    tolerance = 4 * math.sqrt(best.certified * (1 - best.certified) / len(labels))
    assert abs(rate - best.certified) < tolerance, (rate, best.certified)
