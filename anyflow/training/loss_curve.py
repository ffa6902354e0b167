"""The loss curves of a run, drawn from its ``train_log.jsonl`` with matplotlib (the ``train`` extra)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np

MATPLOTLIB_HINT = "pip install matplotlib (or the project's train extra: pip install -e \".[train]\")"


def can_draw() -> bool:
    """Whether matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def write_loss_curve(log_path: str, png_path: str, width: int = 800, panel_height: int = 200) -> bool:
    """Draw every ``*loss`` series of a ``train_log.jsonl`` into ``png_path`` (``width`` x ``panel_height``
    pixels a panel), one panel each: the values faint, their moving average solid, over the steps.
    False when the log has no losses; an ImportError naming the extra without matplotlib."""
    from weights_convert.partials import discard, partial_path

    records = [json.loads(line) for line in open(log_path) if line.strip()]
    names = [k for k in records[0] if k.endswith("loss")] if records else []
    if not names:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot
    except ImportError:
        raise ImportError(f"drawing the loss curve needs matplotlib: {MATPLOTLIB_HINT}") from None
    dpi = 100
    figure, axes = pyplot.subplots(len(names), 1, figsize=(width / dpi, panel_height * len(names) / dpi), dpi=dpi,
                                   squeeze=False)
    for axis, name in zip(axes[:, 0], names):
        steps = np.array([r["step"] for r in records if isinstance(r.get(name), (int, float))], dtype=float)
        values = np.array([r[name] for r in records if isinstance(r.get(name), (int, float))], dtype=float)
        finite = np.isfinite(values)
        steps, values = steps[finite], values[finite]
        line, = axis.plot(steps, values, alpha=0.3, linewidth=1)
        window = max(1, len(values) // 50)
        if len(values) >= window:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps[window - 1:], smooth, color=line.get_color(), linewidth=2)
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    partial = partial_path(png_path)
    try:
        figure.savefig(partial, format="png")
        os.replace(partial, png_path)
    finally:
        pyplot.close(figure)
        discard(partial)
    return True
