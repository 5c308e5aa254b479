"""The method registry: one module per method behind one name table, listed by `scalecert
methods`, consulted by CertConfig, the Certifier, fine-tuning and the command line."""

from __future__ import annotations

import subprocess
import sys
import types
from types import MappingProxyType

import pytest
import torch
from click.testing import CliRunner

import scalecert.methods.registry as registry
from pipeline.cli import main
from scalecert import CertConfig, Certifier, create_model
from scalecert.methods.masking import OcclusionPredictor
from scalecert.errors import InvalidOption
from scalecert.methods import available_methods, load_method, method_info
from scalecert.methods.scalecert import SinPredictor
from scalecert.training import defended_logits


METHODS = ("scalecert", "masking", "patchcleanser", "patchcleanser_sin",
           "patchcleanser_challenger")
GUARANTEE = {"scalecert": "detection", "masking": "detection", "patchcleanser": "recovery",
             "patchcleanser_sin": "recovery", "patchcleanser_challenger": "recovery"}


def test_the_registered_methods_and_their_modules() -> None:
    assert available_methods() == METHODS
    for name in available_methods():
        info = method_info(name)
        assert info.name == name and info.guarantee == GUARANTEE[name] and info.summary
        module = load_method(name)
        assert module.__name__ == f"scalecert.methods.{name}"
        assert callable(module.build) and callable(module.predictor)
        assert callable(module.defended_logits)
    assert [method_info(name).pruned for name in METHODS] == [True, False, False, True, False]


def test_each_method_owns_its_rule_and_what_it_shares() -> None:
    """The certifier drives every method through one protocol; what a method prepares is
    shared only under its own key: pixel methods share the images, SIN methods the stems of
    one layer and top-k; the undefended model is computed apart only for pruned ones."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet20")
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    certifiers = {name: Certifier(model, CertConfig(patch_px=5, masks_per_axis=3, method=name))
                  for name in METHODS}
    keys = {name: certifier.preparation_key for name, certifier in certifiers.items()}
    assert keys["masking"] == keys["patchcleanser"] == keys["patchcleanser_challenger"]
    assert keys["scalecert"] == keys["patchcleanser_sin"] != keys["masking"]
    assert keys["scalecert"] != Certifier(model, CertConfig(patch_px=5, top_k=0.3)).preparation_key
    results = {name: certifier.certify(images, labels) for name, certifier in certifiers.items()}
    for name in ("masking", "patchcleanser", "patchcleanser_challenger"):
        assert torch.equal(results[name].vanilla_prediction, results[name].prediction)
    for name in ("scalecert", "patchcleanser_sin"):
        assert torch.equal(results[name].vanilla_prediction, results["masking"].prediction)
    # the two recovery rules share the certificate and the one-mask map
    cleanser, challenger = results["patchcleanser"], results["patchcleanser_challenger"]
    assert torch.equal(cleanser.certified, challenger.certified)
    assert torch.equal(cleanser.mask_predictions, challenger.mask_predictions)


def test_certifier_takes_the_methods_predictor() -> None:
    model = create_model("cifar_resnet20")
    kinds = {name: type(Certifier(model, CertConfig(patch_px=5, method=name)).predictor)
             for name in available_methods()}
    assert kinds == {"scalecert": SinPredictor, "masking": OcclusionPredictor,
                     "patchcleanser": OcclusionPredictor, "patchcleanser_sin": SinPredictor,
                     "patchcleanser_challenger": OcclusionPredictor}


@pytest.mark.parametrize("name", [None, "nope", "Masking", 3])
def test_unknown_methods_are_refused_with_the_registered_ones(name) -> None:
    with pytest.raises(InvalidOption, match="^method: unknown method .*available: scalecert, "
                                            "masking, patchcleanser, patchcleanser_sin, "
                                            "patchcleanser_challenger$"):
        CertConfig(patch_px=5, method=name)


def test_cli_lists_the_methods_and_offers_only_them(tmp_path) -> None:
    listed = CliRunner().invoke(main, ["methods"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert [line.split()[:2] for line in lines] == [[name, GUARANTEE[name]] for name in METHODS]
    refused = CliRunner().invoke(main, ["certify", "--data", str(tmp_path), "--model",
                                        "cifar_resnet20", "--patch", "5", "--out",
                                        str(tmp_path / "out"), "--method", "nope"])
    assert refused.exit_code == 2 and ("'nope' is not one of 'scalecert', 'masking', "
                                       "'patchcleanser', 'patchcleanser_sin', "
                                       "'patchcleanser_challenger'") in refused.output


def test_the_name_table_needs_no_torch() -> None:
    """Options and the report validate method names without importing torch."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from scalecert.methods import available_methods, describe_methods\n"
            "from scalecert.config import CertConfig\n"
            "CertConfig(patch_px=5, method='masking')\n"
            "print(available_methods(), len(describe_methods()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{METHODS} {len(METHODS)}"


def test_a_new_method_is_one_module_and_one_entry(monkeypatch) -> None:
    """Registering a module under a new name is all it takes: the config accepts it, the
    Certifier drives the method it builds and fine-tuning uses its forward pass."""
    module = types.ModuleType("scalecert.methods.masking_again")
    masking = load_method("masking")
    calls = []
    module.build = lambda model, config: calls.append("build") or masking.build(model, config)
    module.predictor = masking.predictor
    module.defended_logits = lambda *args: calls.append("logits") or masking.defended_logits(*args)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entries = dict(registry._METHODS)
    entries["masking_again"] = registry.MethodInfo(
        name="masking_again", guarantee="detection", pruned=False, summary="masking, again")
    monkeypatch.setattr(registry, "_METHODS", MappingProxyType(entries))

    torch.manual_seed(0)
    model = create_model("cifar_resnet20")
    images, labels = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    again = Certifier(model, CertConfig(patch_px=5, method="masking_again")).certify(
        images, labels)
    reference = Certifier(model, CertConfig(patch_px=5, method="masking")).certify(images, labels)
    assert torch.equal(again.mask_predictions, reference.mask_predictions)
    assert torch.equal(again.vanilla_prediction, again.prediction)  # not pruned: M is the model
    cert = CertConfig(patch_px=5, method="masking_again")
    windows = torch.tensor([[0, 0, 9, 9]] * 3)
    assert torch.equal(defended_logits(model, cert, images, windows),
                       masking.defended_logits(model, cert, images, windows))
    assert calls == ["build", "logits"]
    assert "masking_again" in "\n".join(registry.describe_methods())
