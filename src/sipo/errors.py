"""The one exception type a user can cause.

`SipoError` carries a single sentence that names the fix; the CLI prints it without a traceback.
Everything else is a bug and keeps its traceback.
"""


class SipoError(Exception):
    """A problem with the user's input (config, data, model directory) that they can fix."""


class TrainingInterrupted(SipoError):
    """SIGTERM or SIGINT stopped a run after its current step; a checkpoint was written where one
    could be. The CLI prints the sentence and exits with the conventional ``128 + signum``."""

    def __init__(self, message: str, signum: int, step: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step

    def rerun(self, where: str, command: str) -> "TrainingInterrupted":
        """The same stop as a command that trains inside itself (``sipo iterate``, ``sipo sweep``) words it:
        ``--resume`` and ``--overwrite`` are ``sipo train``'s flags, and that command continues by itself."""
        import signal

        return TrainingInterrupted(f"stopped by {signal.Signals(self.signum).name} in {where} after step {self.step}; "
                                   f"rerun the same {command} command to continue (it resumes from the newest "
                                   "checkpoint)", signum=self.signum, step=self.step)
