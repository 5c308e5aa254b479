"""Progress of a run on the terminal: images done, images/s and ETA (tqdm, on stderr)."""

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
