"""Progress on the terminal (tqdm, on stderr): certification images done, images/s and ETA;
fine-tuning steps per epoch and each finished epoch's metrics."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


class ProgressLine:
    """Receives the plan and each finished shard from the driver."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._shards_total = 0
        self._shards_done = 0
        self._errors = 0

    def start(self, plan: Any, todo: list[int]) -> None:
        total = sum(plan.shards[i][1] - plan.shards[i][0] for i in todo)
        skipped = len(plan.shards) - len(todo)
        self._shards_total = len(todo)
        if skipped:
            print(f"resuming: {skipped} of {len(plan.shards)} shards already done")
        if self.enabled and total:
            self._bar = tqdm(total=total, unit="img", desc="certifying", dynamic_ncols=True,
                             smoothing=0.1)

    def shard_done(self, summary: Any) -> None:
        self._shards_done += 1
        self._errors += summary.errors
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"shards {self._shards_done}/{self._shards_total}, errors {self._errors}",
                refresh=False)
            self._bar.update(summary.images)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TrainingProgress:
    """Receives ``run_finetune``'s events: a bar over each epoch's steps, a line per epoch."""

    def __init__(self, epochs: int, enabled: bool = True) -> None:
        self.epochs = epochs
        self.enabled = enabled
        self._bar: Any = None
        self._epoch = 0

    @staticmethod
    def describe(metrics: dict[str, Any]) -> str:
        line = (f"epoch {metrics['epoch']}: loss {metrics['loss']:.3f}, train accuracy "
                f"{100 * metrics['accuracy']:.1f}%, {metrics['seconds']:.0f} s")
        if "eval_accuracy" in metrics:
            line += (f"; held-out accuracy {100 * metrics['eval_accuracy']:.1f}%, certified "
                     f"{100 * metrics['eval_certified']:.1f}% ({metrics['eval_images']} images)")
        return line

    def event(self, event: tuple) -> None:
        if event[0] == "step":
            _, epoch, step, steps = event
            if epoch != self._epoch:
                self.close()
                self._epoch = epoch
                if self.enabled:
                    self._bar = tqdm(total=steps, unit="step", dynamic_ncols=True,
                                     desc=f"epoch {epoch}/{self.epochs}")
            if self._bar is not None:
                self._bar.update(step - self._bar.n)
        elif event[0] == "epoch":
            self.close()
            if self.enabled:
                tqdm.write(self.describe(event[1]))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
