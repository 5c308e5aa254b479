"""Model names, construction, and checkpoint I/O: the one front door for models.

:func:`load_model` takes any ``--model`` spec (:mod:`scalecert.models.spec`): a built-in name
(one immutable name -> constructor mapping), or the user's model from a file, a module, an
exported program, torchvision or timm, wrapped in a
:class:`~scalecert.models.graph.GraphClassifier` that applies the declared normalisation
(:mod:`scalecert.models.preprocessing`) inside the model.

Checkpoints are plain state_dicts (the architecture's own keys); loading tolerates the common
wrappings (``{"state_dict": ...}``, ``{"model": ...}``, a ``module.`` prefix from
DataParallel) but otherwise checks keys and shapes strictly, because a silently half-loaded
model would produce meaningless certificates. The sha256 of the checkpoint, the sha256 of the
model's file or program and the versions of the packages it comes from are the model's
fingerprint; a caller that planned with them passes them back, and other bytes are refused
(:class:`~scalecert.errors.ModelChanged`).
"""

from __future__ import annotations

import hashlib
import importlib
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
from scalecert.models.preprocessing import Preprocessing, resolve
from scalecert.models.resnet import resnet18, resnet50
from scalecert.models.spec import PACKAGE_KINDS, ModelSpec, build_module, parse_spec

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

# The built-ins' own preprocessing (their normalisation is their first stage): CIFAR models
# take 32 x 32 images as they are, ImageNet models the standard 256 -> 224 evaluation crop.
_CIFAR = Preprocessing(input_size=32, interpolation="bilinear")
_IMAGENET = Preprocessing(input_size=224, resize=256, interpolation="bilinear")
_PREPROCESSING: Mapping[str, Preprocessing] = MappingProxyType(
    {name: _IMAGENET if name in ("resnet18", "resnet50") else _CIFAR for name in _MODELS}
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


def builtin_preprocessing(name: str) -> Preprocessing:
    """The preprocessing built-in ``name`` was made for."""
    return _PREPROCESSING[name]


def check_preprocessing(spec: str | ModelSpec, declared: Preprocessing | None) -> None:
    """Refuse, before any work, preprocessing that ``spec`` cannot take: ``mean``/``std`` for
    a built-in (it normalises in its own first stage), no input size for a user model
    (``file:``, ``module:``, ``export:``), or values that contradict the model's defaults.
    timm and torchvision defaults are known only once the model is built
    (:func:`load_model` checks them there)."""
    parsed = parse_spec(spec)
    declared = declared or Preprocessing()
    if parsed.is_builtin:
        for name in ("mean", "std"):
            if getattr(declared, name) is not None:
                raise InvalidOption(
                    f"{name}: built-in model {parsed.text} normalises inside its own first "
                    "stage; --mean and --std are for models that do not (file:, module:, "
                    "export:, torchvision:, timm:)")
        resolve(declared, builtin_preprocessing(parsed.target), parsed.text)
    elif parsed.declares_preprocessing:
        resolve(declared, None, parsed.text)


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


def _check_versions(spec: ModelSpec, found: Mapping[str, str | None],
                    expected: Mapping[str, str | None] | None) -> None:
    """Refuse packages whose installed versions differ from those the run was planned with."""
    if expected is None:
        return
    changed = [f"{name} {found.get(name)} (planned with {expected.get(name)})"
               for name in sorted(set(found) | set(expected)) if found.get(name) != expected.get(name)]
    if changed:
        raise ModelChanged(
            f"model: {spec.text}: the packages it imports differ from those the run was planned "
            f"with: {'; '.join(changed)}; no result is written. Install the planned versions "
            "on every worker, or start a new run (a new --out)")


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


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                name: str | None = None) -> None:
    """Strict key and shape check; missing ``num_batches_tracked`` buffers are tolerated.
    ``name``: the model in the message (default: its ``name``, else its class)."""
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
        name = name or getattr(model, "name", type(model).__name__)
        raise InvalidOption(
            f"checkpoint: {path} does not match model {name}: " + "; ".join(problems)
        )


def load_model(
    spec: str | ModelSpec,
    checkpoint: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    preprocessing: Preprocessing | None = None,
    expect_sha256: str | None = None,
    location: str | None = None,
    *,
    expect_source_sha256: str | None = None,
    expect_package_versions: Mapping[str, str | None] | None = None,
    source_path: str | os.PathLike[str] | None = None,
    source_location: str | None = None,
) -> nn.Module:
    """Build the model of ``spec``, load ``checkpoint`` if given, and return it in eval mode.

    ``spec``: a built-in name or any form of :mod:`scalecert.models.spec`. A built-in comes
    back as itself (a :class:`StagedClassifier`); any other model is wrapped in a
    :class:`~scalecert.models.graph.GraphClassifier` that normalises with the resolved
    ``mean``/``std`` and splits on the model's own graph.

    ``preprocessing``: what the user declared, over the model's defaults (the built-ins' own,
    timm's ``pretrained_cfg``, torchvision's weights). A user model without an input size
    and ``mean``/``std`` for a built-in are refused before anything is read.

    Without ``num_classes`` the class count is read from the checkpoint's classifier weight
    (built-ins, timm, torchvision) or from the model's output. The checkpoint's keys and
    shapes must match the module's own state_dict (a ``module.`` prefix is tolerated).

    Provenance on the returned model: ``checkpoint_sha256`` (of the checkpoint bytes loaded,
    None without one), ``source_sha256`` (of the ``file:`` or ``export:`` bytes loaded, or of
    an uninstalled ``module:``'s file), ``package_versions`` (top-level package -> installed
    version, for ``module:``, ``torchvision:`` and ``timm:``) and ``preprocessing`` (resolved).

    ``expect_sha256``, ``expect_source_sha256``, ``expect_package_versions``: what the caller
    planned with (a run's workers); anything else raises
    :class:`~scalecert.errors.ModelChanged`, naming ``location`` / ``source_location``
    (default: the paths). ``source_path``: a local copy of the spec's file (the pipeline
    downloads an ``export:s3://`` program there).
    """
    parsed = parse_spec(spec)
    check_preprocessing(parsed, preprocessing)
    if parsed.is_builtin:
        return _load_builtin(parsed, checkpoint, num_classes, preprocessing, expect_sha256,
                             location)
    data = None
    if parsed.path is not None:
        if source_path is None and parsed.path.startswith("s3://"):
            raise InvalidOption(f"model: {parsed.text!r}: the library reads local files; "
                                "download the program first (the pipeline's commands do)")
        path = Path(source_path if source_path is not None else parsed.path)
        if not path.is_file():
            raise MissingInput(f"model: {parsed.text!r}: no such file: {path}")
        data = path.read_bytes()
        check_sha256(data, expect_source_sha256, source_location or str(path), "model")
    state, checkpoint_sha = None, None
    if checkpoint is not None:
        state, checkpoint_sha = _read_state_dict(Path(checkpoint), expect_sha256, location)
    built = build_module(parsed, data=data, num_classes=num_classes, declared=preprocessing)
    if parsed.kind == "module" and expect_source_sha256 is not None \
            and built.source_sha256 != expect_source_sha256:
        where = getattr(importlib.import_module(parsed.target), "__file__", parsed.target)
        check_sha256(Path(where).read_bytes(), expect_source_sha256, str(where), "model")
    _check_versions(parsed, built.package_versions, expect_package_versions)
    module = built.module
    if state is not None:
        if num_classes is None and parsed.kind in PACKAGE_KINDS:
            inferred = _classes_in(module, state)
            if inferred is not None:
                built = build_module(parsed, num_classes=inferred, declared=preprocessing)
                module = built.module
        _check_keys(module, state, Path(checkpoint), name=parsed.text)
        module.load_state_dict(state, strict=False)
    resolved = resolve(preprocessing, built.defaults, parsed.text)
    if built.input_size is not None and resolved.input_size != built.input_size:
        raise InvalidOption(
            f"input_size: {resolved.input_size} for {parsed.text}, whose program was exported "
            f"for {built.input_size} x {built.input_size} images; declare --input-size "
            f"{built.input_size}, or export it again with dynamic height and width")
    from scalecert.models.graph import GraphClassifier  # torch.fx machinery: on demand

    model = GraphClassifier(module, name=parsed.text, input_size=resolved.input_size,
                            mean=resolved.mean, std=resolved.std)
    if num_classes is not None and model.num_classes != num_classes:
        raise InvalidOption(f"num_classes: {num_classes} asked for, but model {parsed.text} "
                            f"gives {model.num_classes} logits")
    model.checkpoint_sha256 = checkpoint_sha
    model.source_sha256 = built.source_sha256
    model.package_versions = dict(built.package_versions)
    model.preprocessing = resolved
    return model.eval()  # an exported program stays as exported (GraphClassifier.train)


def _classes_in(module: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The checkpoint's class count when its classifier weight differs from ``module``'s."""
    key = _final_linear_key(module)
    if key is None or key not in state or state[key].ndim != 2:
        return None
    inferred = int(state[key].shape[0])
    return inferred if inferred != int(module.state_dict()[key].shape[0]) else None


def _load_builtin(
    spec: ModelSpec, checkpoint: str | os.PathLike[str] | None, num_classes: int | None,
    preprocessing: Preprocessing | None, expect_sha256: str | None, location: str | None,
) -> StagedClassifier:
    """A built-in with its checkpoint (module docstring); the declared input size, when
    another than the architecture's, becomes the instance's ``input_size``."""
    name = spec.target
    model = create_model(name, num_classes)
    if checkpoint is not None:
        path = Path(checkpoint)
        state, sha256 = _read_state_dict(path, expect_sha256, location)
        inferred = _classes_in(model, state) if num_classes is None else None
        if inferred is not None:
            model = create_model(name, inferred)
        _check_keys(model, state, path)
        model.load_state_dict(state, strict=False)
        model.checkpoint_sha256 = sha256
    resolved = resolve(preprocessing, builtin_preprocessing(name), spec.text)
    if resolved.input_size != model.input_size:
        model.input_size = resolved.input_size
    model.source_sha256 = None
    model.package_versions = {}
    model.preprocessing = resolved
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
