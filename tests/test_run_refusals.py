"""A bad run is refused before any work: no output folder, no Ray."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import main


def certify(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["certify", "--quiet", *args])
    return result.exit_code, result.output + (repr(result.exception) if result.exception else "")


@pytest.mark.parametrize(("change", "message"), [
    ({"--checkpoint": "resnet56"}, "does not match model cifar_resnet20"),
    ({"--checkpoint": "missing"}, "--checkpoint"),
    ({"--data": "missing-data"}, "missing-data"),
    ({"--patch": "40"}, "larger than the 32 px images"),
])
def test_bad_runs_are_refused_before_any_work(
    tmp_path, cifar10_test_dir, resnet20_checkpoint, resnet56_checkpoint, change, message
) -> None:
    import ray

    options = {"--data": str(cifar10_test_dir), "--model": "cifar_resnet20",
               "--checkpoint": str(resnet20_checkpoint), "--patch": "5", "--out": str(tmp_path / "run")}
    replacements = {"resnet56": str(resnet56_checkpoint), "missing": str(tmp_path / "missing.th"),
                    "missing-data": str(tmp_path / "missing-data")}
    for flag, value in change.items():
        options[flag] = replacements.get(value, value)
    code, output = certify(*[item for pair in options.items() for item in pair])
    assert code != 0 and message in output, output
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()
