"""matplotlib for the files sipo writes (analysis, validation, the demo's report): the Agg backend,
so a plot never needs a display, imported on first use (a run that plots nothing never loads it)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
