"""Model names, construction, and checkpoint I/O.

One immutable name -> constructor mapping. Checkpoints are plain state_dicts (torchvision-style
keys); loading tolerates the common wrappings (``{"state_dict": ...}``, ``{"model": ...}``, a
``module.`` prefix from DataParallel) but otherwise checks keys and shapes strictly, because a
silently half-loaded model would produce meaningless certificates. The sha256 of the file is
the model's fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from scalecert.errors import InvalidOption, MissingInput, ModelChanged
from scalecert.models.base import StagedClassifier
from scalecert.models.cifar_resnet import CifarResNet, CifarResNet18
from scalecert.models.resnet import resnet18, resnet50

# name -> constructor taking ``num_classes`` (keyword, optional: each has its own default).
_MODELS: Mapping[str, Callable[..., StagedClassifier]] = MappingProxyType(
    {
        "cifar_resnet20": partial(CifarResNet, 20),
        "cifar_resnet32": partial(CifarResNet, 32),
        "cifar_resnet44": partial(CifarResNet, 44),
        "cifar_resnet56": partial(CifarResNet, 56),
        "cifar_resnet18": CifarResNet18,
        "resnet18": resnet18,
        "resnet50": resnet50,
    }
)

_PREFIX = "module."
_SHOWN = 5  # keys listed per kind in a mismatch message


def available_models() -> tuple[str, ...]:
    """Registered model names, sorted."""
    return tuple(sorted(_MODELS))


def create_model(name: str, num_classes: int | None = None) -> StagedClassifier:
    """Build ``name`` with random weights (``num_classes`` defaults to the architecture's)."""
    try:
        constructor = _MODELS[name]
    except KeyError:
        raise InvalidOption(
            f"model: unknown model {name!r}; available: {', '.join(available_models())}"
        ) from None
    return constructor() if num_classes is None else constructor(num_classes=num_classes)


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(data: bytes, expect_sha256: str | None, location: str, what: str) -> str:
    """The sha256 of ``data``; raises :class:`ModelChanged` when ``expect_sha256`` is given and
    differs (the file at ``location`` was replaced since the run was planned)."""
    sha256 = hashlib.sha256(data).hexdigest()
    if expect_sha256 is not None and sha256 != expect_sha256:
        raise ModelChanged(
            f"{what}: {location} changed since the run was planned: its sha256 is now {sha256}, "
            f"the run was planned with {expect_sha256}; no result of the changed file is "
            "written. Restore the file, or start a new run (a new --out) to certify the new one"
        )
    return sha256


def _read_state_dict(
    path: Path, expect_sha256: str | None = None, location: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's state_dict (unwrapped, ``module.`` stripped) and the sha256 of exactly
    the bytes that were loaded (checked against ``expect_sha256`` when given; ``location``
    names the file in messages, default ``path``)."""
    if not path.exists():
        raise MissingInput(f"checkpoint: no such file: {path}")
    data = path.read_bytes()
    sha256 = check_sha256(data, expect_sha256, location or str(path), "checkpoint")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a bad file
        raise InvalidOption(f"checkpoint: cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InvalidOption(
            f"checkpoint: {path} holds no state_dict (expected a dict of tensors, possibly "
            "under 'state_dict' or 'model')"
        )
    state = {k.removeprefix(_PREFIX): v for k, v in obj.items()}
    return state, sha256


def _final_linear_key(model: nn.Module) -> str | None:
    """State-dict key of the weight of the last ``nn.Linear`` (the classifier)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return f"{names[-1]}.weight" if names else None


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Strict key and shape check; missing ``num_batches_tracked`` buffers are tolerated."""
    expected = model.state_dict()
    missing = sorted(
        k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected.keys() & state.keys()
        if state[k].shape != expected[k].shape
    )
    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    problems = [
        f"{len(keys)} {kind}: {', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''}"
        for kind, keys in kinds
        if keys
    ]
    if problems:
        name = getattr(model, "name", type(model).__name__)
        raise InvalidOption(
            f"checkpoint: {path} does not match model {name}: " + "; ".join(problems)
        )


def load_model(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    expect_sha256: str | None = None,
    location: str | None = None,
) -> StagedClassifier:
    """Build ``name``, load ``checkpoint`` if given, and return it in eval mode.

    Without ``num_classes`` the class count is read from the checkpoint's classifier weight.
    ``model.checkpoint_sha256`` is the sha256 of the bytes loaded (None without a checkpoint).
    ``expect_sha256``: the sha256 the caller planned with (a run's workers); other bytes raise
    :class:`~scalecert.errors.ModelChanged`, naming ``location`` (default: the path).
    """
    model = create_model(name, num_classes)
    if checkpoint is not None:
        path = Path(checkpoint)
        state, sha256 = _read_state_dict(path, expect_sha256, location)
        key = _final_linear_key(model)
        if num_classes is None and key in state and state[key].ndim == 2:
            inferred = int(state[key].shape[0])
            if inferred != model.num_classes:
                model = create_model(name, inferred)
        _check_keys(model, state, path)
        model.load_state_dict(state, strict=False)
        model.checkpoint_sha256 = sha256
    return model.eval()


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through a temp file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike[str], metadata: dict | None = None
) -> str:
    """Save the plain state_dict (CPU tensors, no ``module.`` prefix) to ``path`` and, when
    ``metadata`` is given, a JSON sidecar ``path + ".json"``; both atomically. Returns the
    checkpoint's sha256."""
    path = Path(path)
    state = {
        k.removeprefix(_PREFIX): v.detach().cpu().clone() for k, v in model.state_dict().items()
    }
    _atomic_write(path, lambda f: torch.save(state, f))
    if metadata is not None:
        text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
        _atomic_write(Path(f"{path}.json"), lambda f: f.write(text.encode()))
    return file_sha256(path)
