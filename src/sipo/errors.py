"""The one exception type a user can cause.

`SipoError` carries a single sentence that names the fix; the CLI prints it without a traceback.
Everything else is a bug and keeps its traceback.
"""


class SipoError(Exception):
    """A problem with the user's input (config, data, model directory) that they can fix."""
