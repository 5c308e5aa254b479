"""The SIN statistics of the paper's Section 3.1 (Fig. 1): why pruning to a few superficial
positions works against patches.

An adversarial patch fools the network through a few superficial important neurons (SINs)
under it: its high-contrast pixels give the strongest activations of the superficial layer,
so the top neurons of a patched image crowd into one spot, while a benign image's spread over
the object. Measured here on the strongest ``count`` neurons (channel, row, col) of the
superficial layer:

- the spread (Eq. 4-5): the standard deviation of the neurons' distances to their centroid,
  small when they are localized;
- MeanShift cluster counts (scikit-learn, imported where used);
- M's accuracy before and after zeroing the superficial features in a box's footprint
  (Fig. 1d: occluding the localized SINs undoes the patch);
- the adaptive attack (Eq. 6) at several penalty weights alpha (Fig. 1e): a patch that keeps
  its superficial activation low to escape pruning fools M less often.

:func:`sin_statistics` gathers them for benign and per-image-attacked images, as plain JSON
values for ``scalecert analyze``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from statistics import median
from typing import Any

import numpy as np
import torch

from scalecert.attacks import (
    AttackConfig,
    attack_images,
    attack_logits,
    patch_activation,
)
from scalecert.certify import ALERT, Certifier
from scalecert.config import CertConfig
from scalecert.errors import InvalidOption
from scalecert.geometry import Footprints, Geometry, receptive_field
from scalecert.methods import method_info
from scalecert.models.base import StagedClassifier
from scalecert.sin import keep_count, keep_positions, prune, selection_order, sin_scores

# Images per forward pass of the statistics (no gradients).
STATS_BATCH = 256


@torch.no_grad()
def top_neuron_positions(
    model: StagedClassifier, layer: str | None, images: torch.Tensor, count: int = 200
) -> torch.Tensor:
    """``N x count x 2`` int64 (row, col) on the superficial feature map of each image's
    ``count`` strongest neurons.

    A neuron is one activation (channel, row, col) of the stem's output, ranked by its value
    (the paper ranks superficial neurons by activation; after the ReLU all are >= 0), ties by
    flat index so the choice is deterministic. Ranking single activations rather than
    positions' channel sums (the SIN score pruning uses) keeps the paper's unit: several
    channels at one position count as several neurons, which is how a patch concentrates."""
    split = model.split(layer)
    was_training = model.training
    model.eval()
    try:
        parts = []
        for start in range(0, len(images), STATS_BATCH):
            features = split.stem(images[start:start + STATS_BATCH])
            _, channels, height, width = features.shape
            if not 1 <= count <= channels * height * width:
                raise InvalidOption(f"count: must be in [1, {channels * height * width}] (the "
                                    f"neurons of layer {split.layer}), got {count}")
            top = torch.sort(features.flatten(1), dim=1, descending=True,
                             stable=True).indices[:, :count]
            position = top % (height * width)
            parts.append(torch.stack([position // width, position % width], dim=2).cpu())
    finally:
        model.train(was_training)
    return torch.cat(parts)


def footprint_share(
    model: StagedClassifier, layer: str | None, images: torch.Tensor, positions: torch.Tensor,
    boxes: torch.Tensor,
) -> torch.Tensor:
    """``N`` floats: per image, the share of its ``positions`` (``N x count x 2`` from
    :func:`top_neuron_positions`) inside the superficial footprint of its box (``N x 4``, e.g.
    the patch box). On a benign image at the same box it is about the footprint's share of
    the map; where a patch drew the strongest neurons to itself it is much larger: the
    localisation of Section 3.1, measured where the patch is."""
    split = model.split(layer)
    with torch.no_grad():
        feature_hw = tuple(split.stem(images[:1]).shape[2:])
    rows, cols = Footprints(split.geometry, feature_hw).axis_hits(boxes)
    positions = positions.cpu()
    inside = rows.gather(1, positions[..., 0]) & cols.gather(1, positions[..., 1])
    return inside.float().mean(dim=1)


def distance_spread(positions: torch.Tensor) -> torch.Tensor:
    """Eq. 4-5 per image: with c the centroid of the neurons' positions p_i (Eq. 4) and
    d_i = ||p_i - c||, the standard deviation of the d_i (Eq. 5, population form). Small:
    the neurons sit at a common distance from one spot (localized, as under a patch); large:
    dispersed (benign). ``positions``: ``N x count x 2``; returns ``N`` float32."""
    points = positions.to(torch.float64)
    centre = points.mean(dim=1, keepdim=True)
    distance = (points - centre).norm(dim=2)
    return distance.std(dim=1, correction=0).float()


def cluster_counts(positions: torch.Tensor, bandwidth: float | None = None) -> list[int]:
    """MeanShift (scikit-learn) clusters of each image's neuron positions: one int per image.

    ``bandwidth`` in feature-map cells; None: scikit-learn's per-image estimate
    (``estimate_bandwidth``), which adapts to each image's own scale. To compare images, give
    one bandwidth to all (:func:`common_bandwidth`)."""
    return [len(fit.cluster_centers_) for fit in _mean_shift_fits(positions, bandwidth)]


def common_bandwidth(positions: torch.Tensor) -> float:
    """One MeanShift bandwidth for a set of images: the median of scikit-learn's per-image
    estimates (``estimate_bandwidth``), at least one feature-map cell."""
    from sklearn.cluster import estimate_bandwidth

    estimates = [float(estimate_bandwidth(points)) for points in _as_arrays(positions)]
    return max(1.0, float(median(estimates)))


def densest_cluster_boxes(
    model: StagedClassifier, layer: str | None, positions: torch.Tensor,
    image_hw: tuple[int, int], patch_px: int, bandwidth: float | None = None,
) -> torch.Tensor:
    """``N x 4`` int64 pixel boxes of ``patch_px`` centred, per image, on the centre of the
    MeanShift cluster with the most neurons (mapped to pixels through the centre of its
    receptive field), moved inside the image."""
    return _densest_boxes(model.split(layer).geometry, _mean_shift_fits(positions, bandwidth),
                          image_hw, patch_px)


def _densest_boxes(geometry: Geometry, fits: list[Any], image_hw: tuple[int, int],
                   patch_px: int) -> torch.Tensor:
    height, width = image_hw
    boxes = []
    for fit in fits:
        densest = int(np.bincount(fit.labels_).argmax())
        centre = [sum(receptive_field(geometry, int(round(value)), axis)) / 2
                  for axis, value in enumerate(fit.cluster_centers_[densest])]
        top = min(max(int(round(centre[0] - (patch_px - 1) / 2)), 0), height - patch_px)
        left = min(max(int(round(centre[1] - (patch_px - 1) / 2)), 0), width - patch_px)
        boxes.append((top, left, top + patch_px, left + patch_px))
    return torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)


@torch.no_grad()
def occluded_accuracy(
    model: StagedClassifier, cert: CertConfig, images: torch.Tensor, labels: torch.Tensor,
    boxes: torch.Tensor,
) -> tuple[float, float]:
    """Accuracy of M before and after occluding the superficial features in the footprint of
    ``boxes`` (one per image; Fig. 1d). After: those features are zeroed and the head runs; for a
    pruned method (scalecert) the top-k SIN selection then runs on the rest, which is F(x, box)."""
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if len(labels) != len(images) or len(boxes) != len(images):
        raise InvalidOption(f"labels, boxes: expected {len(images)} of each, got "
                            f"{len(labels)} and {len(boxes)}")
    split = model.split(cert.layer)
    logits_of = attack_logits(model, cert, "defended")
    pruned = method_info(cert.method).pruned
    before = after = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), STATS_BATCH):
            batch = images[start:start + STATS_BATCH]
            truth = labels[start:start + STATS_BATCH]
            before += int((logits_of(batch).argmax(dim=1).cpu() == truth).sum())
            features = split.stem(batch)
            hw = tuple(features.shape[2:])
            foot = Footprints(split.geometry, hw)(boxes[start:start + STATS_BATCH])
            foot = foot.to(features.device)
            if pruned:
                order = selection_order(sin_scores(features))
                keep = keep_positions(order, foot, keep_count(cert.top_k, hw))
            else:
                keep = ~foot
            predicted = split.head(prune(features, keep)).argmax(dim=1).cpu()
            after += int((predicted == truth).sum())
    finally:
        model.train(was_training)
    return before / len(images), after / len(images)


def alpha_sweep(
    model: StagedClassifier, cert: CertConfig, images: torch.Tensor, labels: torch.Tensor,
    alphas: Sequence[float], config: AttackConfig,
) -> list[dict[str, Any]]:
    """The adaptive attack (Eq. 6) on M at each ``alpha`` (Fig. 1e), on the images M gets
    right: per alpha the attack success rate on M (wrong, or the target, under the patch), the
    detection (ALERT) rate of ``Certifier.detect``, the evasion rate (a wrong label without
    ALERT) and the mean superficial activation under the patch."""
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    logits_of = attack_logits(model, cert, "defended")
    with torch.no_grad():
        right = _predict(logits_of, images) == labels
    images, labels = images[right.to(images.device)], labels[right]
    certifier = Certifier(model, cert, device=images.device)
    rows = []
    for alpha in alphas:
        entry: dict[str, Any] = {"alpha": float(alpha), "images": len(labels)}
        if len(labels) == 0:
            rows.append(entry)
            continue
        adaptive = replace(config, attack="adaptive", alpha=float(alpha))
        result = attack_images(model, cert, images, labels, adaptive, attack_model="defended")
        with torch.no_grad():
            predicted = _predict(logits_of, result.images)
            activation = patch_activation(model, cert.layer, result.images, result.boxes)
        fooled = (predicted == config.target) if config.target is not None else (
            predicted != labels)
        output = certifier.detect(result.images).output
        alert = output == ALERT
        entry.update(
            attack_success_rate=_mean(fooled),
            alert_rate=_mean(alert),
            evasion_rate=_mean(~alert & (output != labels)),
            mean_patch_activation=float(activation.mean()),
        )
        rows.append(entry)
    return rows


def sin_statistics(
    model: StagedClassifier, cert: CertConfig, images: torch.Tensor, labels: torch.Tensor,
    config: AttackConfig, alphas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 4.0),
    count: int = 200, attack_model: str = "undefended",
) -> dict[str, Any]:
    """Fig. 1 on these images: the SIN spread and cluster counts of benign images and of the
    same images under the per-image attack (``config`` with attack "per-image", against
    ``attack_model``: the undefended model, as in the paper's analysis, by default); M's
    accuracy with the densest SIN cluster occluded (and, for patched images, the patch box);
    the adaptive attack's alpha sweep on M. JSON values only (floats, ints, lists, dicts).

    Cluster counts use one bandwidth for both sets, estimated on the benign images
    (:func:`common_bandwidth`), so that a count means the same on either side."""
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    image_hw = (images.shape[2], images.shape[3])
    per_image = replace(config, attack="per-image")
    attacked = attack_images(model, cert, images, labels, per_image, attack_model=attack_model)
    with torch.no_grad():
        fooled = _predict(attack_logits(model, cert, attack_model), attacked.images) != labels
    benign_positions = top_neuron_positions(model, cert.layer, images, count)
    patched_positions = top_neuron_positions(model, cert.layer, attacked.images, count)
    bandwidth = common_bandwidth(benign_positions)
    sides: dict[str, dict[str, Any]] = {}
    geometry = model.split(cert.layer).geometry
    for name, data, positions in (("benign", images, benign_positions),
                                  ("patched", attacked.images, patched_positions)):
        spread = distance_spread(positions).tolist()
        fits = _mean_shift_fits(positions, bandwidth)
        clusters = [len(fit.cluster_centers_) for fit in fits]
        densest = _densest_boxes(geometry, fits, image_hw, config.patch_px)
        before, after = occluded_accuracy(model, cert, data, labels, densest)
        sides[name] = {
            "distance_spread": _summary(spread),
            "clusters": _summary([float(c) for c in clusters], clusters),
            "occluded_accuracy": {"densest_cluster": {"before": before, "after": after}},
        }
    before, after = occluded_accuracy(model, cert, attacked.images, labels, attacked.boxes)
    sides["patched"]["occluded_accuracy"]["patch_box"] = {"before": before, "after": after}
    for name, data, positions in (("benign", images, benign_positions),
                                  ("patched", attacked.images, patched_positions)):
        share = footprint_share(model, cert.layer, data, positions, attacked.boxes)
        sides[name]["in_patch_share"] = _summary(share.tolist())
    sides["patched"]["fooled"] = [bool(f) for f in fooled.tolist()]
    return {
        "images": len(labels),
        "layer": model.split(cert.layer).layer,
        "count": count,
        "bandwidth": bandwidth,
        "attack_model": attack_model,
        "attack": per_image.to_dict(),
        "fooling_rate": _mean(fooled),
        "benign": sides["benign"],
        "patched": sides["patched"],
        "alpha_sweep": alpha_sweep(model, cert, images, labels, alphas, config),
    }


# -- helpers --------------------------------------------------------------------------------

def _as_arrays(positions: torch.Tensor) -> list[np.ndarray]:
    if positions.dim() != 3 or positions.shape[2] != 2:
        raise InvalidOption(f"positions: expected N x count x 2, got {tuple(positions.shape)}")
    return [points.numpy() for points in positions.to(torch.float64).cpu()]


def _mean_shift_fits(positions: torch.Tensor, bandwidth: float | None) -> list[Any]:
    """MeanShift fitted to each image's points, seeded from a bandwidth-sized grid of the
    occupied cells (``bin_seeding``) rather than from every point: about 4x faster on 200
    points, and the same cluster counts on 19 of 20 CIFAR-10 test images. A set of identical
    points is one cluster (scikit-learn's bandwidth estimate is 0 there, which MeanShift
    refuses)."""
    from sklearn.cluster import MeanShift

    if bandwidth is not None and not (_finite(bandwidth) and bandwidth > 0):
        raise InvalidOption(f"bandwidth: must be a finite number > 0 or None, got {bandwidth!r}")
    fits = []
    for points in _as_arrays(positions):
        width = bandwidth
        if width is None and np.ptp(points, axis=0).max() == 0:
            width = 1.0
        fits.append(MeanShift(bandwidth=width, bin_seeding=True).fit(points))
    return fits


def _finite(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def _predict(logits_of: Any, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([logits_of(images[start:start + STATS_BATCH]).argmax(dim=1).cpu()
                      for start in range(0, len(images), STATS_BATCH)])


def _mean(flags: torch.Tensor) -> float:
    """The share of True flags (exact: a count over a length, not a float32 mean)."""
    return int(flags.sum()) / len(flags) if len(flags) else 0.0


def _summary(values: list[float], shown: list | None = None) -> dict[str, Any]:
    """Mean, median and the per-image values (``shown``, if given: e.g. the ints)."""
    return {"mean": float(np.mean(values)), "median": float(np.median(values)),
            "values": values if shown is None else shown}
