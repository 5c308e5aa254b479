"""How g runs: eager fp32 (the reference), or a fast path whose decisions equal it.

g is the network after the superficial layer (scalecert's head) or the whole model (masking).
Certification takes two decisions from g's logits per (image, window) pair: the prediction
(argmax) and whether the margin (``logit[label] - max other``, or top-1 minus top-2 without a
label) reaches ``CertConfig.margin``. The fast path runs g with its BatchNorms folded into the
convolutions before them (eval mode: one op less per layer, about 1.25x on the CPU), under bf16
autocast and/or ``torch.compile``, then re-runs in eager fp32 every pair whose decision is a
close call:

    top-1 minus top-2 gap < tolerance,  or  |margin - CertConfig.margin| < tolerance.

Every decision is a comparison of a difference of two logits (``l_a - l_b``) with a threshold,
and the fast path moves such a difference by at most the spread of its per-class error,
``max_c d_c - min_c d_c <= 2 max_c |d_c|`` with ``d = fast - fp32``. So when ``tolerance``
exceeds that spread, a pair that is not a close call takes the same decisions in fp32, and a
close call is decided by its fp32 logits: predictions and certified / not certified equal the
fp32 path's. The default tolerance is well above the largest error measured on the CIFAR
ResNet-20s (see :data:`DEFAULT_TOLERANCE`); the runner also watches the error on the pairs it
re-runs and warns if it ever reaches the tolerance.

"Equal" is up to the float noise the fp32 path already has between batch compositions (about
1e-6 on the CPU; full-map and work-avoidance runs differ by it too): re-run rows run in a batch
of their own. On CUDA the fp32 reference is PyTorch's default, whose cuDNN convolutions may use
TF32.

The stem (SIN selection) never runs here: its features must be bit-identical outside a window's
footprint (see ``SinPredictor``), so it stays eager fp32 whatever the fast path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scalecert.errors import InvalidOption

PRECISIONS = ("fp32", "bf16")

# bf16-autocast minus fp32 logits measured on 1,000 CIFAR-10 test JPEGs x 37 (image, window)
# pairs each (CPU autocast, torch 2.13), for the CIFAR ResNet-20s: the committed fine-tuned
# checkpoints (scalecert's head, masking's whole model) and the akamaster weights (both methods).
# A single logit moved by 0.39 at most, a difference of two logits (the spread) by 0.65 at most.
# 1.5 is about twice 2 x 0.39 and 2.3 times the largest spread. The price: pairs whose top-1
# gap is below 1.5 (15% to 38% of them with these models) also run in fp32.
DEFAULT_TOLERANCE = 1.5

# fp32 fast paths (folded BatchNorm, compiled g) against eager fp32: at most 1.5e-5 on a logit of
# the CIFAR ResNet-20 and 3.4e-5 of a random-weight ResNet-50 (measured, torch 2.13 CPU). 1e-2
# is hundreds of times that, and few pairs have a top-1 gap that small.
FP32_TOLERANCE = 1e-2


@dataclass(frozen=True)
class FastPath:
    """How to run g.

    precision: "fp32" (eager reference) or "bf16" (autocast; close calls re-run in fp32).
    compile: wrap g in ``torch.compile`` (inputs padded to one batch shape); if compiling or a
        compiled call fails, warn once and run eager from then on.
    fuse_bn: fold g's BatchNorms into the convolutions before them (``torch.fx``); a g that
        cannot be traced runs unfolded, with a warning.
    tolerance: logit distance below which a decision is a close call and re-run in eager fp32
        (whenever g does not run as eager fp32). Must exceed the fast path's error on the
        difference of two logits for outcomes to equal fp32's; 0 turns the re-check off (fast
        outcomes, not guaranteed equal). None: :data:`DEFAULT_TOLERANCE` with bf16,
        :data:`FP32_TOLERANCE` otherwise.
    """

    precision: str = "fp32"
    compile: bool = False
    fuse_bn: bool = False
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidOption(
                f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise InvalidOption(f"compile: expected True or False, got {self.compile!r}")
        if not isinstance(self.fuse_bn, bool):
            raise InvalidOption(f"fuse_bn: expected True or False, got {self.fuse_bn!r}")
        if self.tolerance is None:
            object.__setattr__(self, "tolerance",
                               DEFAULT_TOLERANCE if self.precision == "bf16" else FP32_TOLERANCE)
        tolerance = self.tolerance
        if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                or not math.isfinite(tolerance) or tolerance < 0):
            raise InvalidOption(f"tolerance: expected a finite number >= 0, got {tolerance!r}")

    @property
    def is_reference(self) -> bool:
        """True when g runs as eager fp32: nothing to re-check."""
        return self.precision == "fp32" and not self.compile and not self.fuse_bn


def margins(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """logit[label] - max other logit, or top-1 minus top-2 without labels.

    ``amax``, not ``max(dim=...)``: the same values without the argmax indices, and on the
    CPU a plain loop on the calling thread, where ``max`` with indices hands even a 64 x 10
    batch to the thread pool (milliseconds per call when the cores are busy, per run of g)."""
    if labels is None:
        top2 = logits.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    labels = labels.to(logits.device)
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return own - others.amax(dim=1)


def close_calls(
    logits: torch.Tensor, labels: torch.Tensor | None, margin: float, tolerance: float,
    confidence_levels: tuple[float, ...] = (),
) -> torch.Tensor:
    """Rows whose prediction, margin or confidence decision could change within ``tolerance``.

    ``confidence_levels``: thresholds on the softmax probability of the predicted class
    (alert confidence); an error below ``tolerance`` on every difference of two logits moves
    that probability by less than tolerance / 2."""
    top2 = logits.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    close = (gap < tolerance) | ((margins(logits, labels) - margin).abs() < tolerance)
    if confidence_levels:
        top = top_confidence(logits)
        for level in confidence_levels:
            close |= (top - level).abs() < tolerance / 2
    return close


def top_confidence(logits: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each row's predicted class (the alert-confidence rule's)."""
    return torch.softmax(logits.float(), dim=1).amax(dim=1)


def fold_batchnorm(g: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of module ``g`` (eval mode) with every BatchNorm that follows a convolution folded
    into it, in channels_last; ``g`` itself if it cannot be traced (with a warning)."""
    from torch.fx.experimental.optimization import fuse

    layers = (torch.nn.Conv2d, torch.nn.BatchNorm2d)
    if not isinstance(g, torch.nn.Module) or any(
            module.training for module in g.modules() if isinstance(module, layers)):
        warnings.warn("fuse_bn: g is not a module in eval mode; running it unfolded",
                      RuntimeWarning, stacklevel=3)
        return g
    try:
        folded = fuse(g, inplace=False)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: run g as it is
        warnings.warn(f"fuse_bn: cannot trace g ({type(exc).__name__}: {exc}); running it "
                      "unfolded", RuntimeWarning, stacklevel=3)
        return g
    return folded.to(memory_format=torch.channels_last).eval()


class GRunner:
    """Runs g on batches of inputs and returns fp32 logits whose decisions equal eager fp32's.

    ``pairs`` counts the rows run (windows, M(x), recoveries, the undefended forward),
    ``rechecked`` those re-run in eager fp32 (close calls), and ``max_recheck_error`` is the
    largest spread of ``fast - fp32`` seen on re-run rows.
    """

    def __init__(
        self,
        g: Callable[[torch.Tensor], torch.Tensor],
        fast: FastPath,
        margin: float,
        device: str | torch.device,
        batch_size: int,
        confidence_levels: tuple[float, ...] = (),
    ) -> None:
        self.g = g
        self.confidence_levels = confidence_levels  # re-checked like margins (close_calls)
        self.g_fast = fold_batchnorm(g) if fast.fuse_bn else g
        self.fast = fast
        self.margin = margin
        self.device = torch.device(device)
        self.batch_size = batch_size
        if fast.precision == "bf16" and not torch.amp.is_autocast_available(self.device.type):
            raise InvalidOption(f"precision: bf16 autocast is not available on {self.device}")
        self.pairs = 0
        self.rechecked = 0
        self.max_recheck_error = 0.0
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._compile_failed = False
        self._warned_error = False

    @property
    def compiled(self) -> bool:
        """Whether g currently runs compiled (False after a fallback)."""
        return self.fast.compile and not self._compile_failed

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits of g on ``inputs``; ``labels`` (one per row, or None) set the margins."""
        self.pairs += len(inputs)
        if self.fast.is_reference:
            return self.g(inputs).float()
        logits = torch.cat([
            self._fast(inputs[start:start + self.batch_size])
            for start in range(0, len(inputs), self.batch_size)
        ]) if len(inputs) else self.g(inputs).float()
        if self.fast.tolerance > 0:
            close = close_calls(logits, labels, self.margin, self.fast.tolerance,
                                self.confidence_levels)
            rows = close.nonzero()[:, 0]
            if len(rows):
                self._recheck(inputs, logits, rows)
        return logits

    def _recheck(self, inputs: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace the logits of ``rows`` by eager fp32 ones (in place)."""
        with torch.autocast(self.device.type, enabled=False):
            reference = self.g(inputs[rows]).float()
        error = reference - logits[rows]
        spread = float((error.amax(dim=1) - error.amin(dim=1)).max())  # amax: see margins
        self.max_recheck_error = max(self.max_recheck_error, spread)
        if spread >= self.fast.tolerance and not self._warned_error:
            self._warned_error = True
            warnings.warn(
                f"tolerance: the fast path moved a difference of two logits by {spread:.3g}, "
                f"not less than the tolerance {self.fast.tolerance:g}; decisions of pairs that "
                "were not re-checked may differ from fp32 (raise the tolerance)",
                RuntimeWarning, stacklevel=3,
            )
        logits[rows] = reference
        self.rechecked += len(rows)

    def _fast(self, inputs: torch.Tensor) -> torch.Tensor:
        """g on at most ``batch_size`` rows with the fast path's precision and compilation."""
        count = len(inputs)
        g = self._compiled_g()
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.fast.precision == "bf16"):
            if g is not None:
                padded = self._padded(inputs)
                try:
                    # a copy: CUDA graphs reuse their output memory on the next call
                    return g(padded)[:count].to(torch.float32, copy=True)
                except Exception as exc:  # noqa: BLE001 - any compiler failure: run eager
                    self._give_up_compiling(exc)
            return self.g_fast(inputs).float()

    def _padded(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` zero-padded to ``batch_size`` rows, so compiled g sees one shape."""
        if len(inputs) == self.batch_size:
            return inputs
        padded = torch.empty(
            (self.batch_size, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device,
            memory_format=torch.channels_last if inputs.dim() == 4 else torch.contiguous_format)
        padded[:len(inputs)] = inputs
        padded[len(inputs):] = 0
        return padded

    def _compiled_g(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.compiled:
            return None
        if self._compiled is None:
            # CUDA graphs ("reduce-overhead") on GPUs, where g's many small kernels are
            # launch-bound; inductor's default elsewhere. Inputs have one shape (padded).
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            try:
                self._compiled = torch.compile(self.g_fast, mode=mode, dynamic=False)
            except Exception as exc:  # noqa: BLE001
                self._give_up_compiling(exc)
                return None
        return self._compiled

    def _give_up_compiling(self, exc: Exception) -> None:
        self._compile_failed = True
        self._compiled = None
        warnings.warn(
            f"compile: torch.compile of g failed ({type(exc).__name__}: {exc}); "
            "running g eager from now on", RuntimeWarning, stacklevel=4,
        )
