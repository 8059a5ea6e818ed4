"""PNG plots: learning curves with a band over seeds, effect charts with verdicts, the classic-to-modern waterfall."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd

from ablation.metrics import BEST_VAL_ACC, VAL_ACC, VAL_LOSS
from ablation.paths import write_bytes
from ablation.states import COUNTED
from analysis.results import Results
from analysis.stats import BASELINE, BETTER, EQUIVALENCE, EQUIVALENT, INCONCLUSIVE, VERDICTS, WORSE
from analysis.tables import counted, effects, factors, levels

JPEG_NOTE = "CIFAR-10 re-encoded as JPEG (cifar10-jpg)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def learning_curves(results: Results, sweep_id: str, factor: str, path: Path) -> Path:
    """Val accuracy and loss against epoch: per level of `factor`, the mean over runs with a ±1 std band."""
    plt = _pyplot()
    config = results.sweeps[sweep_id]["config"]
    runs = counted(results.runs[results.runs["sweep_id"] == sweep_id])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for level in levels(config, factor, runs):
        ids = runs[runs[factor] == level]["run_id"]
        hist = results.history[results.history["run_id"].isin(ids)]
        if hist.empty:
            continue
        for ax, metric in zip(axes, (VAL_ACC, VAL_LOSS)):
            stats = hist.groupby("epoch")[metric].agg(["mean", "std"]).fillna(0.0)
            (line,) = ax.plot(stats.index, stats["mean"], label=f"{level} (n={len(ids)})")
            ax.fill_between(
                stats.index,
                stats["mean"] - stats["std"],
                stats["mean"] + stats["std"],
                color=line.get_color(),
                alpha=0.2,
            )
    for ax, label in zip(axes, ("validation accuracy (%)", "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title=factor)
    pooled = [f for f in factors(config) if f != factor]
    over = "runs, pooled over " + ", ".join(pooled) if pooled else "seeds"
    band = "one run each" if factor == "seed" else f"mean ± 1 std over {over}"
    fig.suptitle(
        f"{results.sweeps[sweep_id]['name']}: learning curves by {factor} ({band}; {_dataset(results)})", fontsize=10
    )
    return _save(fig, path)


VERDICT_COLOURS = {
    BETTER: "tab:green",
    WORSE: "tab:red",
    EQUIVALENT: "tab:blue",
    INCONCLUSIVE: "tab:gray",
    BASELINE: "black",
}


def effect_chart(results: Results, sweep_id: str, path: Path, equivalence: float = EQUIVALENCE) -> Path:
    """Per factor (and context), each level's difference from the baseline in val (filled, coloured by its
    verdict) and test accuracy (hollow) with simultaneous 95% intervals, the ±equivalence band shaded."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _pyplot()
    table = effects(results, sweep_id, equivalence)
    panels = list(table.groupby(["factor", "context"], sort=False))
    rows = [len(group) + 2 for _, group in panels]  # a panel's height follows its levels (+ title and axis)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(10, 1.8 + 0.4 * sum(rows)),
        squeeze=False,
        sharex=True,
        gridspec_kw={"height_ratios": rows},
    )
    for ax, ((factor, context), group) in zip(axes[:, 0], panels):
        _effect_panel(ax, group, equivalence)
        ax.set_title(f"{factor}" + (f" ({context})" if context else ""), fontsize=10)
    handles = [Patch(color=VERDICT_COLOURS[v], label=v) for v in VERDICTS]
    handles += [
        Line2D([], [], marker="o", color="black", linestyle="", label="val (verdict colour)"),
        Line2D([], [], marker="D", color="tab:gray", markerfacecolor="none", linestyle="", label="test"),
        Patch(color="tab:blue", alpha=0.15, label=f"±{equivalence:g} equivalence band"),
    ]
    fig.legend(handles=handles, fontsize=8, ncol=len(handles), loc="lower center", frameon=False)
    fig.suptitle(f"{results.sweeps[sweep_id]['name']}: effects vs baseline ({_dataset(results)})")
    return _save(fig, path, bottom=0.4)


def _effect_panel(ax, group: pd.DataFrame, equivalence: float) -> None:
    """One table: Δ val and Δ test per level with their intervals, the band, and each level's val verdict."""
    y = list(range(len(group)))
    ax.axvspan(-equivalence, equivalence, color="tab:blue", alpha=0.15, linewidth=0)
    ax.axvline(0, color="black", linewidth=0.8)
    colours = [VERDICT_COLOURS.get(v, "tab:gray") for v in group["verdict"]]
    for i, (diff, half, colour) in enumerate(zip(group["diff_val_acc"], group["diff_val_acc_ci"], colours)):
        ax.errorbar(diff, i - 0.12, xerr=0 if math.isnan(half) else half, fmt="o", color=colour, capsize=3)
    test_ci = [0 if math.isnan(h) else h for h in group["diff_test_acc_ci"]]
    ax.errorbar(
        group["diff_test_acc"], [i + 0.12 for i in y], xerr=test_ci, fmt="D", color="tab:gray", mfc="none", capsize=2
    )
    names = [
        f"{level} (baseline, val {mean:.1f}%)" if verdict == BASELINE else str(level)
        for level, verdict, mean in zip(group["level"], group["verdict"], group["val_acc"])
    ]
    ax.set_yticks(y, names)
    for i, (verdict, colour) in enumerate(zip(group["verdict"], colours)):
        ax.annotate(verdict, (1.01, i), xycoords=("axes fraction", "data"), va="center", fontsize=8, color=colour)
    ax.set_ylim(len(group) - 0.5, -0.5)  # first level on top
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel("Δ accuracy vs baseline (points), simultaneous 95% interval")
    ax.tick_params(labelbottom=True)  # shared x scale, but every panel keeps its numbers


def waterfall(results: Results, sweep_id: str, path: Path) -> Path:
    """Cumulative gains in test accuracy from the first level (classic) through each added technique."""
    plt = _pyplot()
    table = effects(results, sweep_id)
    steps = table[table["factor"] == factors(results.sweeps[sweep_id]["config"])[0]].dropna(subset=["test_acc"])
    means = list(steps["test_acc"])
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(means)), 4.8))
    ax.bar(0, means[0], color="tab:gray")
    for i in range(1, len(means)):
        gain = means[i] - means[i - 1]
        ax.bar(i, gain, bottom=means[i - 1], color="tab:green" if gain >= 0 else "tab:red")
        ax.text(i, max(means[i], means[i - 1]) + 0.3, f"{gain:+.1f}", ha="center", fontsize=8)
    ax.text(0, means[0] + 0.3, f"{means[0]:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(means)), [str(level) for level in steps["level"]], rotation=30, ha="right")
    low = min(means) - 5
    ax.set_ylim(max(0, low), max(means) + 3)
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{results.sweeps[sweep_id]['name']}: cumulative gain of each technique ({_dataset(results)})")
    return _save(fig, path)


def search_progress(results: Results, sweep_id: str, path: Path) -> Path:
    """A search at a glance: every run's val accuracy by epoch (stopped runs thin), and each run's best
    val accuracy in the order the search proposed them, with the best so far."""
    plt = _pyplot()
    runs = results.runs[results.runs["sweep_id"] == sweep_id].reset_index(drop=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs.itertuples():
        hist = results.history[results.history["run_id"] == run.run_id].reindex(columns=["epoch", VAL_ACC])
        done = run.state in COUNTED
        left.plot(
            hist["epoch"],
            hist[VAL_ACC],
            color="tab:blue" if done else "tab:gray",
            linewidth=1.6 if done else 0.7,
            alpha=0.9 if done else 0.6,
        )
    best = runs[BEST_VAL_ACC]
    colours = ["tab:blue" if s in COUNTED else "tab:gray" for s in runs["state"]]
    right.scatter(runs.index, best, c=colours, s=18)
    right.step(runs.index, best.cummax(), where="post", color="tab:orange", label="best so far")
    left.set(
        xlabel="epoch",
        ylabel="validation accuracy (%)",
        title="runs (blue: trained to the end or early-stopped; grey: stopped by hyperband, failed)",
    )
    right.set(xlabel="run, in the order proposed", ylabel="best validation accuracy (%)", title="search progress")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"{results.sweeps[sweep_id]['name']}: search ({_dataset(results)})", fontsize=10)
    return _save(fig, path)


def is_path_study(results: Results, sweep_id: str) -> bool:
    """A study that adds one technique at a time: a single preset factor from classic to modern."""
    keys = factors(results.sweeps[sweep_id]["config"])
    values = results.sweeps[sweep_id]["config"]["parameters"].get("preset", {}).get("values", [])
    return keys == ["preset"] and len(values) > 2 and values[0] == "classic" and values[-1] == "modern"


def _dataset(results: Results) -> str:
    names = sorted({str(d) for d in results.runs.get("dataset", pd.Series(dtype=str)).dropna()})
    return JPEG_NOTE if names == ["cifar10-jpg"] else ", ".join(names) or "no dataset recorded"


def _save(fig, path: Path, bottom: float = 0.0) -> Path:
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - 0.6 / height))  # keep 0.6 in for the suptitle, `bottom` in
    buffer = io.BytesIO()  # rendered first, then written atomically: a full disk is one OutputError line
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    write_bytes(path, buffer.getvalue(), "plot", "pass --out a folder on a disk with space")
    return path
