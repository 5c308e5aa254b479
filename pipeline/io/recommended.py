"""``models/best.json``: the recommended CIFAR-10 checkpoint of each method, with the settings it
is certified with and the figure it certified on the full test set.

The README, the benchmark and ``make reproduce-cifar`` read it from here, so that one file says
which weights are "the" weights of a method. Reading it checks every field; ``verify`` checks
the file's sha256 against the recorded one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalecert.errors import InvalidOption

REPO = Path(__file__).resolve().parents[2]
BEST = REPO / "models" / "best.json"
# CertConfig fields a recommendation fixes (the rest keep CertConfig's defaults)
CERT_FIELDS = ("top_k", "layer", "masks_per_axis", "mask_stride", "r", "vote",
               "alert_confidence")
ENTRY_FIELDS = ("checkpoint", "sha256", "model", "patch", "certified", "made_by")


@dataclass(frozen=True)
class Recommendation:
    """One method's recommended checkpoint.

    checkpoint: path relative to the repository root; sha256: of that file; model: registry
    name; patch: the patch it was trained and certified for ("2.4%"); cert: the CertConfig
    fields of ``CERT_FIELDS`` (``cert_options`` adds the method); certified: the certified
    share of the 10,000 CIFAR-10 test JPEGs with those settings, docs/REPRODUCTION.md;
    made_by: how the file was made, in words.
    """

    method: str
    checkpoint: str
    sha256: str
    model: str
    patch: str
    cert: dict[str, Any]
    certified: float
    made_by: str

    def path(self, repo: Path = REPO) -> Path:
        return repo / self.checkpoint

    def cert_options(self) -> dict[str, Any]:
        """Keyword arguments for ``CertConfig`` besides ``patch_px``."""
        return {"method": self.method, **self.cert}

    def verify(self, repo: Path = REPO) -> None:
        """Refuse a missing file or one whose sha256 is not the recorded one."""
        path = self.path(repo)
        if not path.is_file():
            raise InvalidOption(f"{BEST.name}: {self.method}: {self.checkpoint} not found")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != self.sha256:
            raise InvalidOption(f"{BEST.name}: {self.method}: {self.checkpoint} has sha256 "
                                f"{digest}, the file records {self.sha256}")


def _field(entry: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in entry:
        raise InvalidOption(f"{where}: missing {name!r}")
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidOption(f"{where}: {name} has the wrong type ({value!r})")
    return value


def read_recommendations(path: Path = BEST) -> dict[str, Recommendation]:
    """method -> its recommendation, every field checked (the file is hand-edited).

    The file maps each method to one flat object: ``checkpoint``, ``sha256``, ``model``,
    ``patch``, the ``CERT_FIELDS``, ``certified`` and ``made_by``.
    """
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidOption(f"{path}: not readable as JSON ({error})") from error
    if not isinstance(document, dict) or not document:
        raise InvalidOption(f"{path}: expected an object of methods")
    found = {}
    for method, entry in document.items():
        where = f"{path.name}: {method}"
        if not isinstance(entry, dict):
            raise InvalidOption(f"{where}: expected an object")
        unknown = sorted(set(entry) - set(ENTRY_FIELDS) - set(CERT_FIELDS))
        if unknown:
            raise InvalidOption(f"{where}: unknown fields {unknown}")
        sha256 = _field(entry, "sha256", str, where)
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InvalidOption(f"{where}: sha256 must be 64 lower-case hex digits")
        certified = _field(entry, "certified", float, where)
        if not (0.0 <= certified <= 1.0) or math.isnan(certified):
            raise InvalidOption(f"{where}: certified must be a share in [0, 1]")
        found[method] = Recommendation(
            method=method, checkpoint=_field(entry, "checkpoint", str, where), sha256=sha256,
            model=_field(entry, "model", str, where), patch=_field(entry, "patch", str, where),
            cert={name: entry[name] for name in CERT_FIELDS if name in entry},
            certified=certified, made_by=_field(entry, "made_by", str, where))
    return found
