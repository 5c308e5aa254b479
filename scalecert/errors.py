"""The errors the project raises on purpose, each with a message meant for the user.

Everything else (a bug in the project, in torch, in Ray) is not one of these, and the command
line lets it through with its traceback instead of printing it as if the user had erred.
"""

from __future__ import annotations


class Refusal(Exception):
    """A request refused before (or instead of) doing the work; ``str()`` says why, naming the
    option, input or location at fault."""


class InvalidOption(Refusal, ValueError):
    """An option or input that is wrong in itself: a bad value, a missing file, a shape that
    does not fit. A ``ValueError`` too, so callers of the library can catch it as one."""


class OutputConflict(Refusal):
    """The output location holds results that this run must not mix with or overwrite."""


class RunFailed(Refusal):
    """Work that started could not finish (a shard that kept killing its worker, training
    that failed, rows that do not add up); the message says what and where."""


class MissingInput(InvalidOption, FileNotFoundError):
    """A file or folder named by the user that does not exist (a ``FileNotFoundError`` too)."""


class ModelChanged(RunFailed):
    """A model file (a checkpoint) whose bytes are not those the run was planned with, for
    example rewritten by a training job after the plan was made. Work done with it would be
    filed under the planned model's fingerprint, so it is refused, never done."""


class EnvironmentFault(Refusal):
    """The environment failed at a location: a full disk, a read-only or denied folder, a
    missing bucket, denied access, an S3 endpoint that does not answer, credentials refused,
    or retries used up on a flaky store. Neither a bug (no traceback helps) nor a bad option;
    nothing half-written is kept, and the same command, rerun once it is mended, resumes.

    ``location``: where it failed; ``problem``: what failed, one phrase; ``detail``: what it
    means for the work (once a run stops on it: how much of the run is kept)."""

    def __init__(self, location: str, problem: str, detail: str = "") -> None:
        self.location, self.problem, self.detail = location, problem, detail
        super().__init__(f"{location}: {problem}" + (f"; {detail}" if detail else ""))

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:  # pickled whole through Ray
        return type(self), (self.location, self.problem, self.detail)
