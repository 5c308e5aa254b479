"""``--model SPEC``: which classifier to build, parsed once and built on demand.

The forms (``scalecert models`` lists them):

- a built-in name (``cifar_resnet20``, ...);
- ``file:PATH.py:CALLABLE``: a Python file and a callable in it that takes no required
  arguments and returns an ``nn.Module`` (or a ``torch.export`` program);
- ``module:IMPORT.PATH:CALLABLE``: the same, from an importable module;
- ``export:PATH.pt2``: a program saved by ``torch.export.save`` (local; the pipeline downloads
  an ``s3://`` one first), so no model code is needed at run time;
- ``torchvision:NAME`` and ``timm:NAME``: those packages' architectures, imported only when
  asked for.

:func:`parse_spec` checks the text alone (no import, no file read); :func:`build_module`
builds the plain ``nn.Module`` of a non-built-in spec from it. Every refusal is an
:class:`~scalecert.errors.InvalidOption` (:class:`~scalecert.errors.MissingInput` for a
missing file) whose message starts with ``model:`` and names the spec. An exception raised
inside the user's own code is not a refusal: it keeps its traceback, with a note naming the
spec.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import inspect
import io
import math
import re
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from scalecert.errors import InvalidOption, MissingInput
from scalecert.models.preprocessing import INTERPOLATIONS, Preprocessing

BUILTIN = "builtin"
USER_KINDS = ("file", "module", "export")  # they declare their preprocessing themselves
PACKAGE_KINDS = ("torchvision", "timm")
KINDS = (BUILTIN, *USER_KINDS, *PACKAGE_KINDS)

# One line per form, for `scalecert models`, --help and messages.
FORMS = (
    ("file:PATH.py:CALLABLE", "a callable in a Python file, no required arguments, returning "
     "an nn.Module"),
    ("module:IMPORT.PATH:CALLABLE", "the same from an importable module (package versions "
     "enter the run fingerprint)"),
    ("export:PATH.pt2", "a torch.export program (local or s3://) exported with a dynamic "
     "batch dimension; no model code needed"),
    ("torchvision:NAME", "a torchvision architecture (where torchvision imports)"),
    ("timm:NAME", "a timm architecture, preprocessing from its pretrained_cfg (where timm "
     "imports)"),
)

_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def forms_text() -> str:
    return "; ".join(form for form, _ in FORMS)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model`` value.

    ``text``: as given (the model's name in reports and fingerprints). ``kind``: one of
    :data:`KINDS`. ``target``: the built-in name, the file or program path, the import path,
    or the package's model name. ``attribute``: the callable (``file:`` and ``module:``).
    """

    text: str
    kind: str
    target: str
    attribute: str | None = None

    @property
    def is_builtin(self) -> bool:
        return self.kind == BUILTIN

    @property
    def declares_preprocessing(self) -> bool:
        """A user model (``file:``, ``module:``, ``export:``): it must declare its input size,
        since nothing else says it."""
        return self.kind in USER_KINDS

    @property
    def path(self) -> str | None:
        """The file the spec reads (``file:``, ``export:``); None for the others."""
        return self.target if self.kind in ("file", "export") else None

    @property
    def slug(self) -> str:
        """A short file-name-safe name (fine-tuning names its checkpoint after it)."""
        if self.kind == BUILTIN:
            return self.target
        if self.kind == "file":
            base = f"{Path(self.target).stem}-{self.attribute}"
        elif self.kind == "module":
            base = f"{self.target}-{self.attribute}"
        elif self.kind == "export":
            base = Path(self.target.rstrip("/")).stem
        else:
            base = f"{self.kind}-{self.target}"
        return _UNSAFE.sub("_", base).strip("._-") or self.kind

    def with_absolute_path(self) -> ModelSpec:
        """The same spec with a local ``file:`` or ``export:`` path made absolute (for workers
        that run in other folders)."""
        if self.path is None or self.target.startswith("s3://"):
            return self
        target = str(Path(self.target).expanduser().resolve())
        text = f"{self.kind}:{target}" + (f":{self.attribute}" if self.attribute else "")
        return ModelSpec(text, self.kind, target, self.attribute)


def _bad(text: str, why: str) -> InvalidOption:
    return InvalidOption(f"model: {text!r}: {why}")


def parse_spec(text: str | ModelSpec) -> ModelSpec:
    """Parse ``--model`` text (module docstring), checking its form only: no import, no file
    read. Refuses an unknown built-in (listing them and the forms), an unknown prefix, and
    empty or malformed parts."""
    if isinstance(text, ModelSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise InvalidOption(f"model: expected a built-in name or a spec ({forms_text()}), "
                            f"got {text!r}")
    text = text.strip()
    prefix, colon, rest = text.partition(":")
    if not colon:
        from scalecert.models.registry import available_models

        if text in available_models():
            return ModelSpec(text, BUILTIN, text)
        raise InvalidOption(
            f"model: unknown model {text!r}; built-ins: {', '.join(available_models())}; "
            f"or a spec: {forms_text()}")
    if prefix not in KINDS or prefix == BUILTIN:
        raise _bad(text, f"unknown form {prefix + ':'!r}; the forms are {forms_text()}, or "
                         "a built-in name (`scalecert models` lists them)")
    if prefix in ("file", "module"):
        where, colon, attribute = rest.rpartition(":")
        form = "file:PATH.py:CALLABLE" if prefix == "file" else "module:IMPORT.PATH:CALLABLE"
        if not colon or not where or not attribute:
            raise _bad(text, f"expected {form}: both parts, separated by ':', are needed")
        if not _DOTTED.match(attribute):
            raise _bad(text, f"the callable {attribute!r} is not a Python name (expected {form})")
        if prefix == "file":
            if where.startswith("s3://"):
                raise _bad(text, "file: takes a local Python file; for a model stored on S3, "
                                 "export it (torch.export) and use export:s3://...")
            if not where.endswith(".py"):
                raise _bad(text, f"{where!r} is not a Python file (.py); expected {form}")
        elif not _DOTTED.match(where):
            raise _bad(text, f"{where!r} is not an import path (expected {form})")
        return ModelSpec(text, prefix, where, attribute)
    if not rest:
        example = "export:PATH.pt2" if prefix == "export" else f"{prefix}:NAME"
        raise _bad(text, f"nothing after {prefix + ':'!r}; expected {example}")
    if prefix in PACKAGE_KINDS and not re.match(r"^[\w.\-]+$", rest):
        raise _bad(text, f"{rest!r} is not a {prefix} model name")
    return ModelSpec(text, prefix, rest)


@dataclass(frozen=True)
class BuiltModule:
    """The plain ``nn.Module`` of a spec and its provenance.

    ``source_sha256``: of the file or program bytes it was built from (``file:``,
    ``export:``; for ``module:``, the imported module's file when its package is no installed
    distribution, whose version would say nothing). ``package_versions``: the installed
    versions of the top-level packages the spec imports: the package of a ``module:`` path
    (None: not an installed distribution), ``torchvision`` or ``timm``, and the installed
    distributions that the ``file:`` or ``module:`` source's own import statements name (a
    factory file that loads weights shipped in a package records that package's version). ``defaults``: the preprocessing the
    architecture states (timm's ``pretrained_cfg``, torchvision's weights), else None.
    ``input_size``: the side an exported program was traced at, when fixed.
    """

    module: nn.Module
    source_sha256: str | None = None
    package_versions: Mapping[str, str | None] = field(default_factory=dict)
    defaults: Preprocessing | None = None
    input_size: int | None = None


def build_module(
    spec: ModelSpec, *, data: bytes | None = None, num_classes: int | None = None,
    declared: Preprocessing | None = None,
) -> BuiltModule:
    """Build the ``nn.Module`` of a non-built-in ``spec``.

    ``data``: the bytes of the spec's file or program (``file:``, ``export:``), read and
    checked by the caller (:func:`scalecert.models.registry.load_model`), so that what is
    hashed is exactly what is built. ``num_classes``: passed to timm and torchvision
    constructors; other forms build what their code says (the caller checks the count). ``declared``: the user's
    preprocessing, which may settle what a package's defaults leave open.
    """
    if spec.kind == "file":
        assert data is not None and spec.path is not None
        module = _exec_file(spec, Path(spec.path), data)
        return BuiltModule(_call(spec, _attribute(spec, module, f"{spec.path} defines")),
                           hashlib.sha256(data).hexdigest(), _imported_versions(data))
    if spec.kind == "module":
        return _from_module(spec)
    if spec.kind == "export":
        assert data is not None
        return _from_program(spec, data)
    if spec.kind == "torchvision":
        return _from_torchvision(spec, num_classes)
    if spec.kind == "timm":
        return _from_timm(spec, num_classes, declared)
    raise AssertionError(f"build_module: a built-in spec {spec.text!r} is built by the registry")


def _exec_file(spec: ModelSpec, path: Path, data: bytes) -> types.ModuleType:
    """The module made by running ``data`` (the bytes of ``path``) as Python, under a name
    derived from its hash: loading the same bytes twice in one process gives the same module.
    The file's folder is on ``sys.path`` while it runs, as for ``python PATH.py``, so that it
    can import its neighbours."""
    name = f"scalecert_user_model_{hashlib.sha256(data).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = str(path)
    try:
        code = compile(data, str(path), "exec")
    except SyntaxError as exc:
        raise InvalidOption(f"model: {spec.text!r}: {path} is not valid Python: {exc}") from exc
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        exec(code, module.__dict__)  # noqa: S102 - running the user's model file is the point
    except BaseException as exc:
        sys.modules.pop(name, None)
        exc.add_note(f"(raised while running {path} for --model {spec.text})")
        raise
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _attribute(spec: ModelSpec, owner: Any, where: str) -> Callable[..., Any]:
    """``spec.attribute`` (dotted) of ``owner``; refused when absent or not callable."""
    assert spec.attribute is not None
    value = owner
    for part in spec.attribute.split("."):
        if not hasattr(value, part):
            names = sorted(n for n, v in vars(owner).items()
                           if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == getattr(owner, "__name__", None))
            listed = ", ".join(names[:12]) if names else "none"
            raise InvalidOption(f"model: {spec.text!r}: no callable {spec.attribute!r}: {where} "
                                f"no {part!r} (callables defined there: {listed})")
        value = getattr(value, part)
    if not callable(value):
        raise InvalidOption(f"model: {spec.text!r}: {spec.attribute!r} is a "
                            f"{type(value).__name__}, not a callable returning an nn.Module")
    return value


def _call(spec: ModelSpec, factory: Callable[..., Any]) -> nn.Module:
    """``factory()``; refused when it needs arguments or returns no ``nn.Module``. A
    ``torch.export`` program it returns is run as its ``module()``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: just call it
        signature = None
    if signature is not None:
        required = [p.name for p in signature.parameters.values()
                    if p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if required:
            raise InvalidOption(
                f"model: {spec.text!r}: {spec.attribute} needs argument(s) {', '.join(required)}; "
                "the spec takes a callable with no required arguments (write a factory "
                f"function: def make(): return {spec.attribute}(...))")
    try:
        made = factory()
    except BaseException as exc:
        exc.add_note(f"(raised by {spec.attribute}() of --model {spec.text})")
        raise
    exported = _as_program_module(made)
    if exported is not None:
        return exported
    if not isinstance(made, nn.Module):
        raise InvalidOption(f"model: {spec.text!r}: {spec.attribute}() returned a "
                            f"{type(made).__name__}, not an nn.Module")
    return made


def _as_program_module(value: Any) -> nn.Module | None:
    try:
        from torch.export import ExportedProgram
    except ImportError:  # pragma: no cover - torch without export
        return None
    return value.module() if isinstance(value, ExportedProgram) else None


def _distribution_version(package: str) -> str | None:
    """The installed version of the distribution that provides top-level ``package``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
    for name in importlib.metadata.packages_distributions().get(package, []):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _imported_versions(source: bytes) -> dict[str, str]:
    """Installed versions of the non-standard top-level packages that ``source``'s import
    statements name (relative imports and uninstalled names are left out), sorted by name."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | {"__future__", "scalecert"}
    versions = {name: _distribution_version(name) for name in sorted(names)}
    return {name: version for name, version in versions.items() if version is not None}


def _import(spec: ModelSpec, name: str) -> types.ModuleType:
    """``import name`` for ``spec``: a missing module or dependency is refused, naming it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or name
        if spec.kind in PACKAGE_KINDS:
            raise InvalidOption(
                f"model: {spec.text!r} needs the package {spec.kind}, which does not import "
                f"here ({exc}); install it beside torch, or use file:, module: or export:"
            ) from None
        if name == missing or name.startswith(missing + "."):
            raise InvalidOption(f"model: {spec.text!r}: no module named {missing!r} on the "
                                "Python path (module: takes an importable module; "
                                "file:PATH.py:CALLABLE takes a file)") from None
        raise InvalidOption(f"model: {spec.text!r}: importing {name} needs {missing!r}, which "
                            f"is not installed ({exc})") from exc
    except ImportError as exc:
        if spec.kind in PACKAGE_KINDS:
            raise InvalidOption(
                f"model: {spec.text!r} needs the package {spec.kind}, which does not import "
                f"here ({type(exc).__name__}: {exc}); install a build that matches torch, or "
                "use file:, module: or export:") from exc
        raise


def _from_module(spec: ModelSpec) -> BuiltModule:
    imported = _import(spec, spec.target)
    module = _call(spec, _attribute(spec, imported, f"module {spec.target} has"))
    top = spec.target.split(".")[0]
    version = _distribution_version(top)
    source_sha256, versions = None, {}
    if getattr(imported, "__file__", None) and str(imported.__file__).endswith(".py"):
        source = Path(imported.__file__).read_bytes()
        versions = _imported_versions(source)
        if version is None:
            source_sha256 = hashlib.sha256(source).hexdigest()
    return BuiltModule(module, source_sha256, {**versions, top: version})


def _from_program(spec: ModelSpec, data: bytes) -> BuiltModule:
    """``torch.export.load`` of ``data``; refused unless it takes one ``N x C x H x W``
    input with a dynamic batch dimension."""
    import torch.export

    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many types for a file that is no program
        raise InvalidOption(f"model: {spec.text!r}: {spec.target} is not a torch.export "
                            f"program: {type(exc).__name__}: {exc}") from exc
    inputs = list(program.graph_signature.user_inputs)
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    if len(inputs) != 1:
        raise InvalidOption(f"model: {spec.text!r}: the program takes {len(inputs)} inputs "
                            f"({', '.join(map(str, inputs))}); a classifier takes one image batch")
    value = placeholders[inputs[0]].meta.get("val") if inputs[0] in placeholders else None
    shape = tuple(getattr(value, "shape", ()))
    if len(shape) != 4:
        raise InvalidOption(f"model: {spec.text!r}: the program's input is {list(shape)}, not an "
                            "N x C x H x W image batch")
    if isinstance(shape[0], int):
        raise InvalidOption(
            f"model: {spec.text!r}: the program was exported with a fixed batch size of "
            f"{shape[0]}; certification runs it on batches of every size. Re-export with a "
            "dynamic batch dimension, from an example batch of 2 or more: "
            "torch.export.export(model.eval(), (x,), dynamic_shapes={'x': {0: "
            "torch.export.Dim('batch')}}) (name the key after forward's argument), then "
            "torch.export.save(program, PATH.pt2)")
    side = shape[2] if isinstance(shape[2], int) and shape[2] == shape[3] else None
    return BuiltModule(program.module(), hashlib.sha256(data).hexdigest(), input_size=side)


def _from_torchvision(spec: ModelSpec, num_classes: int | None) -> BuiltModule:
    """``torchvision.models.get_model(NAME)`` with random weights (``--checkpoint`` loads
    the user's); its default weights' transforms give the preprocessing defaults."""
    torchvision = _import(spec, "torchvision")
    models = torchvision.models
    available = tuple(models.list_models())
    if spec.target not in available:
        raise InvalidOption(f"model: {spec.text!r}: torchvision has no model {spec.target!r} "
                            f"({len(available)} known, e.g. {', '.join(available[:8])})")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    module = models.get_model(spec.target, weights=None, **kwargs)
    defaults = None
    try:
        transforms = models.get_model_weights(spec.target).DEFAULT.transforms()
        crop, resize = transforms.crop_size[0], transforms.resize_size[0]
        interpolation = getattr(transforms.interpolation, "value", str(transforms.interpolation))
        defaults = Preprocessing(
            input_size=int(crop), resize=int(resize),
            interpolation=interpolation if interpolation in INTERPOLATIONS else None,
            mean=tuple(transforms.mean), std=tuple(transforms.std))
    except Exception:  # no weights enum or other transforms: the user declares it
        defaults = None
    return BuiltModule(module, None, {"torchvision": _distribution_version("torchvision")},
                       defaults)


def _from_timm(spec: ModelSpec, num_classes: int | None,
               declared: Preprocessing | None) -> BuiltModule:
    """``timm.create_model(NAME)`` with random weights; ``pretrained_cfg`` gives the
    preprocessing defaults (``input_size``, ``crop_pct`` -> resize, interpolation, mean,
    std)."""
    timm = _import(spec, "timm")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        module = timm.create_model(spec.target, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        raise InvalidOption(f"model: {spec.text!r}: timm has no model {spec.target!r} "
                            "(timm.list_models() lists them)") from None
    return BuiltModule(module, None, {"timm": _distribution_version("timm")},
                       timm_defaults(spec, getattr(module, "pretrained_cfg", None), declared))


def timm_defaults(spec: ModelSpec, cfg: Any, declared: Preprocessing | None) -> Preprocessing | None:
    """A timm ``pretrained_cfg`` (dict or dataclass) as preprocessing defaults: the side of
    ``input_size``, ``resize = floor(side / crop_pct)`` (timm's evaluation transform),
    ``interpolation``, ``mean``, ``std``. An interpolation other than bilinear or bicubic is
    refused unless ``declared`` sets one."""
    if cfg is None:
        return None

    def get(name: str) -> Any:
        return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)

    size = get("input_size")
    if not size:
        return None
    side = int(size[-1])
    if int(size[-2]) != side:
        raise InvalidOption(f"model: {spec.text!r}: timm's input size {tuple(size)} is not "
                            "square; declare --input-size (and --resize)")
    crop_pct = get("crop_pct")
    resize = max(side, int(math.floor(side / float(crop_pct)))) if crop_pct else None
    interpolation = get("interpolation")
    if interpolation not in INTERPOLATIONS:
        if declared is None or declared.interpolation is None:
            raise InvalidOption(f"model: {spec.text!r}: timm's interpolation {interpolation!r} "
                                f"is not one of {', '.join(INTERPOLATIONS)}; declare "
                                "--interpolation")
        interpolation = None
    mean, std = get("mean"), get("std")
    return Preprocessing(input_size=side, resize=resize, interpolation=interpolation,
                         mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
