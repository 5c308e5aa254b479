"""How g runs: eager fp32 (the reference), or a fast path whose decisions equal it.

g is the network after the superficial layer (scalecert's head) or the whole model (masking).
Certification takes two decisions from g's logits per (image, window) pair: the prediction
(argmax) and whether the margin (``logit[label] - max other``, or top-1 minus top-2 without a
label) reaches ``CertConfig.margin``. The fast path runs g under bf16 autocast and/or
``torch.compile``, then re-runs in eager fp32 every pair whose decision is a close call:

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

PRECISIONS = ("fp32", "bf16")

# bf16-autocast minus fp32 logits measured on 1,000 CIFAR-10 test JPEGs x 37 (image, window)
# pairs each (CPU autocast, torch 2.13), for the CIFAR ResNet-20s: the committed fine-tuned
# checkpoints (scalecert's head, masking's whole model) and the akamaster weights (both methods).
# A single logit moved by 0.39 at most, a difference of two logits (the spread) by 0.65 at most.
# 1.5 is about twice 2 x 0.39 and 2.3 times the largest spread. The price: pairs whose top-1
# gap is below 1.5 (15% to 38% of them with these models) also run in fp32.
DEFAULT_TOLERANCE = 1.5


@dataclass(frozen=True)
class FastPath:
    """How to run g.

    precision: "fp32" (eager reference) or "bf16" (autocast; close calls re-run in fp32).
    compile: wrap g in ``torch.compile`` (inputs padded to one batch shape); if compiling or a
        compiled call fails, warn once and run eager from then on.
    tolerance: logit distance below which a decision is a close call and re-run in eager fp32
        (whenever g does not run as eager fp32). Must exceed the fast path's error on the
        difference of two logits for outcomes to equal fp32's; 0 turns the re-check off (bf16
        outcomes, not guaranteed equal).
    """

    precision: str = "fp32"
    compile: bool = False
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: expected True or False, got {self.compile!r}")
        tolerance = self.tolerance
        if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                or not math.isfinite(tolerance) or tolerance < 0):
            raise ValueError(f"tolerance: expected a finite number >= 0, got {tolerance!r}")

    @property
    def is_reference(self) -> bool:
        """True when g runs as eager fp32: nothing to re-check."""
        return self.precision == "fp32" and not self.compile


def margins(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """logit[label] - max other logit, or top-1 minus top-2 without labels."""
    if labels is None:
        top2 = logits.topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    labels = labels.to(logits.device)
    own = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return own - others.max(dim=1).values


def close_calls(
    logits: torch.Tensor, labels: torch.Tensor | None, margin: float, tolerance: float
) -> torch.Tensor:
    """Rows whose prediction or margin decision could change within ``tolerance``."""
    top2 = logits.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    return (gap < tolerance) | ((margins(logits, labels) - margin).abs() < tolerance)


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
    ) -> None:
        self.g = g
        self.fast = fast
        self.margin = margin
        self.device = torch.device(device)
        self.batch_size = batch_size
        if fast.precision == "bf16" and not torch.amp.is_autocast_available(self.device.type):
            raise ValueError(f"precision: bf16 autocast is not available on {self.device}")
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
            close = close_calls(logits, labels, self.margin, self.fast.tolerance)
            rows = close.nonzero()[:, 0]
            if len(rows):
                self._recheck(inputs, logits, rows)
        return logits

    def _recheck(self, inputs: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace the logits of ``rows`` by eager fp32 ones (in place)."""
        with torch.autocast(self.device.type, enabled=False):
            reference = self.g(inputs[rows]).float()
        error = reference - logits[rows]
        spread = float((error.max(dim=1).values - error.min(dim=1).values).max())
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
            return self.g(inputs).float()

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
                self._compiled = torch.compile(self.g, mode=mode, dynamic=False)
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
