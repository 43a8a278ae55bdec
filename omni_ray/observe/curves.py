"""``curves.png``: the run at a glance (train and eval loss, learning rate, tokens/s against step).

Drawn with matplotlib's Agg backend (no display, no server) from the run's metric history, so a
user who opens the run folder or the S3 prefix sees how training went.
"""

from __future__ import annotations

import io

from omni_ray.train.metrics import panels


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in history if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def render_curves(history: list[dict], title: str = "") -> bytes:
    """PNG bytes of the curves for ``history`` (one dict per report, each with ``step``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), dpi=100)  # a Figure without pyplot: no global state, thread-safe
    # train.metrics: each metric's panel; a panel with nothing to draw (DPO's rewards in an SFT run) is left out.
    drawn = [(label, keys) for label, keys in panels() if any(_series(history, k)[0] for k in keys)] or panels()[:1]
    axes = fig.subplots(1, len(drawn), squeeze=False)[0]
    for ax, (label, keys) in zip(axes, drawn):
        for key in keys:
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                        label=key.replace("_", " "))
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
