"""Plots of simulator timelines (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from typing import Any, Sequence


def plot_timelines(results: Sequence[Any], prepared: Any, cfg: Any, out_path: str, title: str = "") -> None:
    """One panel per policy: the load (as replicas it needs at full use), ready replicas, all replicas, nodes.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(results)
    fig, axes = plt.subplots(n, 1, figsize=(12, 2.4 * n + 0.6), sharex=True, squeeze=False)
    long = prepared.duration_s > 2 * 86400
    unit, div = ("days", 86400.0) if long else (("hours", 3600.0) if prepared.duration_s > 7200 else ("minutes", 60.0))
    def peaks(x: Any, width: int) -> Any:
        # Long runs have more points than pixels: keep each bucket's maximum so spikes stay visible.
        x = np.asarray(x, dtype=float)
        if width <= 1:
            return x
        pad = (-len(x)) % width
        return np.concatenate([x, np.full(pad, x[-1])]).reshape(-1, width).max(axis=1)

    for ax, r in zip(axes[:, 0], results):
        tl = r.timeline
        width = max(1, len(tl["t_s"]) // 2000)
        t = np.asarray(tl["t_s"], dtype=float)[::width] / div
        need = peaks(tl["arrivals_per_s"], width) * prepared.work_s / cfg.slots_per_replica
        t = t[: len(need)]
        ax.fill_between(t, 0, need, color="0.85", label="load (replicas at full use)", step="post")
        ax.step(t, peaks(tl["nodes"], width), where="post", color="tab:orange", lw=0.8, label="GPU nodes")
        ax.step(t, peaks(tl["replicas"], width), where="post", color="tab:blue", lw=0.6, alpha=0.6, label="replicas asked")
        ax.step(t, peaks(tl["ready_replicas"], width), where="post", color="tab:green", lw=0.9, label="replicas serving")
        ax.set_ylabel("count")
        ax.set_title(
            f"{r.policy}: SLO {r.slo_attainment:.4f}, {r.gpu_hours:.1f} GPU-h, {r.scale_events} scale events",
            fontsize=9,
            loc="left",
        )
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel(unit)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
