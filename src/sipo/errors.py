"""The one exception type a user can cause.

`SipoError` carries a single sentence that names the fix; the CLI prints it without a traceback.
Everything else is a bug and keeps its traceback.

The sentence is written once, in the command line's words (``--resume``, ``--overwrite``), and
carries both forms: ``str(error)`` reads as a Python caller calls sipo (``sipo.train(config,
resume=True)``: ``resume=True``, ``overwrite=True``), ``error.cli_message`` as a shell user types it
(the CLI prints that one).
"""

import re

#: the CLI flags an error may advise -> the same advice to a caller of the Python function
PYTHON_FORM = {"--resume": "resume=True", "--overwrite": "overwrite=True"}
_FLAG = re.compile(r"(?<![\w-])(" + "|".join(re.escape(flag) for flag in PYTHON_FORM) + r")(?![\w-])")


def python_form(sentence: str) -> str:
    """``sentence`` with each CLI flag of ``PYTHON_FORM`` as the keyword argument a Python caller passes."""
    return _FLAG.sub(lambda match: PYTHON_FORM[match.group(1)], sentence)


class SipoError(Exception):
    """A problem with the user's input (config, data, model directory) that they can fix."""

    @property
    def cli_message(self) -> str:
        """The sentence as the command line words it (the form it was written in)."""
        return super().__str__()

    def __str__(self) -> str:
        return python_form(super().__str__())


class TrainingInterrupted(SipoError):
    """SIGTERM or SIGINT stopped a run after its current step; a checkpoint was written where one
    could be. The CLI prints the sentence and exits with the conventional ``128 + signum``."""

    def __init__(self, message: str, signum: int, step: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step

    def __reduce__(self):
        # crosses process boundaries whole (a `sipo sweep --workers` cell stopped in its own process)
        return type(self), (self.args[0], self.signum, self.step)

    def rerun(self, where: str, command: str) -> "TrainingInterrupted":
        """The same stop as a command that trains inside itself (``sipo iterate``, ``sipo sweep``) words it:
        ``--resume`` and ``--overwrite`` are ``sipo train``'s flags, and that command continues by itself."""
        import signal

        return TrainingInterrupted(f"stopped by {signal.Signals(self.signum).name} in {where} after step {self.step}; "
                                   f"rerun the same {command} command to continue (it resumes from the newest "
                                   "checkpoint)", signum=self.signum, step=self.step)
