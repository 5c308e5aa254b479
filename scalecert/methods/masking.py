"""The masking baseline: Minority Reports certified detection (McCoyd et al., 2020) with
PatchCleanser-style windows.

F(x, m) is the unpruned model on the image with window m's pixels set to
``config.occlusion_value`` (:class:`OcclusionPredictor`); every window changes the input, so
none is skipped. The certificate is certified detection's (:mod:`scalecert.methods.detection`).
With work avoidance (r = 1, ``full_map=False``) windows run centre first, where occlusion most
often changes the prediction of a centred object, and stop at the first disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scalecert.config import CertConfig
from scalecert.methods.detection import DetectionRule
from scalecert.models.base import StagedClassifier

PIXELS_KEY = "pixels"  # preparation key: the prepared state is the images themselves


def predictor(model: StagedClassifier, config: CertConfig) -> "OcclusionPredictor":
    """F(x, m) for certification: the whole model on occluded pixels."""
    if config.layer is not None:  # a layer named for every method must exist; no split needed
        model.split(config.layer)
    return OcclusionPredictor(model, config.occlusion_value)


def build(model: StagedClassifier, config: CertConfig) -> DetectionRule:
    """Certified detection with pixel occlusion; the prepared images (and M(x), the whole
    model on them) are shared by every method of the run that occludes pixels."""
    return DetectionRule(predictor(model, config), config,
                         preparation_key=(PIXELS_KEY,))


def defended_logits(
    model: StagedClassifier, config: CertConfig, images: torch.Tensor, windows: torch.Tensor
) -> torch.Tensor:
    """Logits of the unpruned model on the images occluded by ``windows`` (empty: none)."""
    masks = box_masks(windows.to(images.device), images.shape[2:])
    return model(torch.where(masks, torch.full_like(images, config.occlusion_value), images))


@dataclass(frozen=True)
class Images:
    """The prepared state of the baseline is the images themselves."""

    pixels: torch.Tensor  # B x 3 x H x W in [0, 1], channels_last like g's inputs
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # see PreparedBatch

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def select(self, rows: slice) -> "Images":
        return Images(self.pixels[rows],
                      memo=self.memo.setdefault(("rows", rows.start, rows.stop), {}))


def box_masks(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """``n x 1 x H x W`` bool: True inside each (top, left, bottom, right) box."""
    height, width = image_hw
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    top, left, bottom, right = (boxes[:, i, None] for i in range(4))
    in_rows = (rows[None] >= top) & (rows[None] < bottom)
    in_cols = (cols[None] >= left) & (cols[None] < right)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


class OcclusionPredictor:
    """Predictions of the unpruned model on images with a window's pixels occluded."""

    def __init__(self, model: StagedClassifier, occlusion_value: float = 0.0) -> None:
        self.model = model
        self.occlusion_value = occlusion_value

    def prepare(self, images: torch.Tensor) -> Images:
        """The images, stored channels_last once: g takes channels_last inputs, and the pairs'
        occluded copies (:meth:`g_inputs`) then come out channels_last with no further copy."""
        return Images(pixels=images.contiguous(memory_format=torch.channels_last))

    def evaluation_priority(self, batch: Images, boxes: torch.Tensor) -> torch.Tensor:
        """Every window changes the input, so every priority is positive (none is skipped).
        Windows nearer the image centre rank higher: the datasets centre their objects, and
        occluding the object is what changes a prediction (on CIFAR-10 with the ResNet-20, this
        order finds the first disagreement about as early as the per-window disagreement
        frequency measured on the test set would)."""
        height, width = batch.pixels.shape[2:]
        box = boxes.to(torch.float32)
        centre_y = (box[:, 0] + box[:, 2]) / 2 - height / 2
        centre_x = (box[:, 1] + box[:, 3]) / 2 - width / 2
        distance = (centre_y.square() + centre_x.square()).sqrt()
        priority = 1.0 + float(distance.max()) - distance  # >= 1, the centre highest
        return priority.cpu()[None].expand(len(batch), -1)

    @property
    def g(self) -> torch.nn.Module:
        return self.model

    def g_inputs(
        self, batch: Images, image_index: torch.Tensor, boxes: torch.Tensor
    ) -> torch.Tensor:
        """Each pair's image with the box's pixels set to ``occlusion_value`` (for ``E x J x 4``
        boxes, the pixels of all J boxes)."""
        pixels = batch.pixels[image_index]
        boxes = torch.as_tensor(boxes, dtype=torch.int64).to(pixels.device)
        if boxes.dim() == 2:
            masks = box_masks(boxes, pixels.shape[2:])
        else:
            masks = box_masks(boxes.reshape(-1, 4), pixels.shape[2:]).view(
                *boxes.shape[:2], 1, *pixels.shape[2:]).any(dim=1)
        value = torch.tensor(self.occlusion_value, dtype=pixels.dtype, device=pixels.device)
        occluded = torch.where(masks, value, pixels)
        return occluded.contiguous(memory_format=torch.channels_last)

    def unmasked_inputs(self, batch: Images) -> torch.Tensor:
        return batch.pixels.contiguous(memory_format=torch.channels_last)
