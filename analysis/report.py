"""Reports: report.md with tables and plots, CSV files, and (online) a W&B Report."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from ablation.errors import TrackingError
from ablation.metrics import BEST_VAL_ACC, TEST_ACC, VAL_ACC, VAL_LOSS
from ablation.paths import writable_dir, write_bytes, write_text
from ablation.states import COUNTED
from ablation.tracking import one_line
from analysis.plots import JPEG_NOTE, effect_chart, is_path_study, learning_curves, search_progress, waterfall
from analysis.results import Results
from analysis.stats import ADJUSTMENT, EQUIVALENCE, LEGEND
from analysis.tables import (
    best_configs,
    check_tune,
    current_look,
    effects,
    factors,
    format_effects,
    format_tuned,
    model_summary,
    search_table,
    seed_table,
    step_gains,
    sweep_alpha,
    sweep_comparison,
    teacher_table,
    tunable,
    tuned_effects,
)


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (no extra dependency); cells are stringified and pipes escaped."""
    cols = [str(c) for c in table.columns]

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_csv(frame: pd.DataFrame, path: Path, fix: str = "pass --out a folder on a disk with space") -> None:
    """Write `frame` as CSV (no index) through `write_bytes`: atomic, and a failed write is one OutputError."""
    write_bytes(path, frame.to_csv(index=False).encode("utf-8"), "table", fix)


def slug(text: str) -> str:
    """A file-name-safe version of `text`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def file_stem(results: Results, sweep_id: str) -> str:
    """The prefix of a sweep's CSV and PNG files: its name, plus its id where another sweep shares the name."""
    name = results.sweeps[sweep_id]["name"]
    shared = sum(meta["name"] == name for meta in results.sweeps.values()) > 1
    return slug(f"{name}-{sweep_id}" if shared else name)


def sweep_section(
    results: Results, sweep_id: str, out: Path, equivalence: float = EQUIVALENCE, tune: str | None = None
) -> list[str]:
    """Markdown for one sweep: question, tables, plots; writes its CSV and PNG files into `out`. `tune`: a factor
    also picked per level on val (tables.tuned_effects), when the sweep varies it."""
    meta = results.sweeps[sweep_id]
    name = file_stem(results, sweep_id)
    runs = results.runs[results.runs["sweep_id"] == sweep_id]
    table, effect = seed_table(results, sweep_id), effects(results, sweep_id, equivalence)
    write_csv(table, out / f"{name}-table.csv")
    write_csv(effect, out / f"{name}-effects.csv")
    write_csv(runs, out / f"{name}-runs.csv")
    states = ", ".join(f"{n} {s}" for s, n in runs["state"].value_counts().items())
    lines = [
        f"## {meta['name']} (sweep `{sweep_id}`, {meta['backend']})",
        "",
        f"{_question(meta['config'])}",
        "",
        f"Runs: {len(runs)} ({states}).",
        "",
        *looks_note(meta),
        "### Comparison (mean ± std over seeds, n = runs counted)",
        "",
        markdown(table),
        "",
    ]
    teachers = teacher_table(runs)
    if not teachers.empty:
        lines += [
            "### Teachers (their own cost and accuracy; each distilled setting is its own arm above)",
            "",
            markdown(teachers),
            "",
        ]
    if factors(meta["config"]):
        lines += [
            f"### Effects (Δ: the difference from the first level, the baseline, ± the half-width of its 95% "
            f"interval simultaneous over the table; verdicts at δ = {equivalence:g} points, see the legend)",
            "",
            markdown(format_effects(effect)),
            "",
            "Per table: the model fitted, the pooled residual sd (its degrees of freedom) and the measured seed "
            "correlation between levels (intra-class correlation of the seed block; – where seeds are not shared).",
            "",
            markdown(model_summary(effect)),
            "",
            "### Best configurations (by mean validation accuracy)",
            "",
            markdown(best_configs(results, sweep_id)),
            "",
        ]
        if tunable(meta["config"], tune):
            lines += tuned_section(results, sweep_id, out, name, tune, equivalence)
        if is_path_study(results, sweep_id):
            lines += [
                "### Step by step (each technique added to the ones before it; Δ from the previous step, "
                "intervals simultaneous over the steps)",
                "",
                markdown(step_gains(results, sweep_id, equivalence)),
                "",
            ]
        lines += _plots(results, sweep_id, out, name, equivalence)
    elif meta["config"].get("method") == "grid" and len(runs) > 1:  # one recipe over seeds
        png = learning_curves(results, sweep_id, "seed", out / f"{name}-curves-seed.png")
        lines += [f"![learning curves by seed]({png.name})", ""]
    elif meta["config"].get("method") != "grid":
        png = search_progress(results, sweep_id, out / f"{name}-search.png")
        lines += [
            "### Search runs, best first (stopped runs show what they reached before hyperband stopped them)",
            "",
            markdown(search_table(results, sweep_id)),
            "",
            f"![search progress]({png.name})",
            "",
        ]
    return lines


def tuned_section(results: Results, sweep_id: str, out: Path, name: str, tune: str, equivalence: float) -> list[str]:
    """Markdown for `--tune`: every other factor's levels compared, each at its own best `tune` value."""
    tuned = tuned_effects(results, sweep_id, tune, equivalence)
    write_csv(tuned, out / f"{name}-tuned-{slug(tune)}.csv")
    return [
        f"### Each level at its own best {tune} (picked per level on mean val accuracy, among cells whose runs all "
        f"finished)",
        "",
        "The pick used these runs' validation accuracy, so Δ val is optimistic: **the test verdict decides here**. "
        "Each run's test set is evaluated once and never used to pick, but a seed's val and test accuracy move "
        "together, so a pick lifts test a little too (alike for levels with as many candidate values): test is less "
        "biased, not unbiased. When no cell of a level has all its runs finished, all are candidates. "
        "One table (family) per factor and context, "
        "as above, at the same α; the seed is a block where the picked cells share seeds. A pick at the grid's "
        "edge (its smallest or largest value) may have its best value beyond the grid.",
        "",
        markdown(format_tuned(tuned, tune)),
        "",
    ]


def _plots(results: Results, sweep_id: str, out: Path, name: str, equivalence: float) -> list[str]:
    lines = [f"![effects]({effect_chart(results, sweep_id, out / f'{name}-effects.png', equivalence).name})", ""]
    for factor in factors(results.sweeps[sweep_id]["config"]):
        png = learning_curves(results, sweep_id, factor, out / f"{name}-curves-{slug(factor)}.png")
        lines += [f"![learning curves by {factor}]({png.name})", ""]
    if is_path_study(results, sweep_id):
        lines += [f"![waterfall]({waterfall(results, sweep_id, out / f'{name}-waterfall.png').name})", ""]
    return lines


def _question(sweep_config: dict[str, Any]) -> str:
    return str(sweep_config.get("description") or sweep_config.get("question") or "")


def write_report(
    results: Results,
    out: Path,
    sources: list[str],
    command: str,
    equivalence: float = EQUIVALENCE,
    compare: bool = False,
    control: str | None = None,
    tune: str | None = None,
) -> Path:
    """report.md (+ CSV and PNG files) for every sweep in `results`; an unwritable `out` is one OutputError.
    `equivalence`: the band δ (accuracy points) inside which a difference is too small to matter; `compare`: the
    sweeps (one recipe each) are also compared as one table, each against the first (tables.sweep_comparison),
    `control` ("name=value") narrowing the first to one level of its factor; `tune`: a factor picked per level on
    val in an extra table of each sweep that varies it (tables.tuned_effects)."""
    fix = "pass --out a writable folder"
    check_tune(results, tune)
    comparison = sweep_comparison(results, list(results.sweeps), equivalence, control=control) if compare else None
    writable_dir(out, "report folder", fix)
    datasets = sorted({str(d) for d in results.runs.get("dataset", pd.Series(dtype=str)).dropna()})
    note = f"Dataset: {', '.join(datasets) or 'not recorded'}" + (
        f" — {JPEG_NOTE}: the official images re-encoded at "
        f"JPEG quality 75, so accuracies run a little below the official release."
        if "cifar10-jpg" in datasets
        else ""
    )
    lines = ["# lenet report", "", note, "", f"Sources: {', '.join(sources)}. Generated by `{command}`.", ""]
    if comparison is not None or any(factors(meta["config"]) for meta in results.sweeps.values()):
        lines += verdict_legend(equivalence)
    if comparison is not None:
        lines += comparison_section(results, comparison, control)
    if comparison is not None:
        write_csv(comparison, out / "comparison.csv", fix)
    for sweep_id in results.sweeps:
        lines += sweep_section(results, sweep_id, out, equivalence, tune)
    report = out / "report.md"
    write_text(report, "\n".join(lines) + "\n", "report", fix)
    return report


def comparison_baseline(results: Results, control: str | None = None) -> str:
    """The name of `--compare`'s baseline: the first sweep, or its `control` level."""
    return results.sweeps[next(iter(results.sweeps))]["name"] + (f", {control}" if control else "")


def comparison_section(results: Results, comparison: pd.DataFrame, control: str | None = None) -> list[str]:
    """Markdown for `--compare`: the sweeps against the first one, in one table (one family)."""
    return [
        f"## Comparison of the sweeps (baseline: {comparison_baseline(results, control)})",
        "",
        "Each sweep minus the first, fitted as one table over the runs each counted: accuracy ~ sweep + seed when "
        "they share seeds (the same seed, the same data order and initial weights), intervals simultaneous over "
        "the comparisons, verdicts as in the legend above.",
        "",
        markdown(comparison),
        "",
    ]


def looks_note(meta: dict[str, Any]) -> list[str]:
    """What `sweep extend` did to a sweep (its looks, its follow-up sweeps) and the alpha its tables use now."""
    taken = meta.get("looks") or []
    if not taken:
        return []
    looks = "; ".join(
        f"look {t['look']} at {t['seeds']} seeds per level (α {float(t['alpha']):.2%}): "
        + (f"{t['runs_added']} runs added" if t.get("target") else str(t.get("outcome") or "nothing added"))
        + (f" in follow-up sweep `{t['follow_up']}`" if t.get("follow_up") else "")
        for t in taken
    )
    number = current_look(meta)
    return [
        f"Extended by `lenet sweep extend`: {looks}. Its tables are judged at look {number}'s α = "
        f"{sweep_alpha(meta):.2%} (the looks' alphas add up to 5%), so their intervals are simultaneous "
        f"{1 - sweep_alpha(meta):.2%} intervals.",
        "",
    ]


def verdict_legend(equivalence: float = EQUIVALENCE) -> list[str]:
    """The Verdicts paragraph of report.md: the model, the family-wise adjustment, and what each verdict means."""
    return [
        "## Verdicts",
        "",
        "Each effects table (one factor within one setting of the other factors) is one family. Its runs are fitted "
        "by OLS as accuracy ~ level + seed when the levels share seeds (the same seed gives the same data order "
        "and initial weights, so the seed is a block), else accuracy ~ level; the residual variance is pooled over "
        f"the table. Intervals are simultaneous over the table's comparisons by {ADJUSTMENT} (max-t/Dunnett "
        "critical values were too slow to compute per table). Verdicts, on validation accuracy (test: the same "
        f"rule), at δ = {equivalence:g} accuracy points:",
        "",
        *(f"- **{name}**: {text.replace('±δ', f'±{equivalence:g}')}" for name, text in LEGEND.items()),
        "",
        "`seeds needed`: seeds per level at which the same adjusted rule would resolve an inconclusive "
        "comparison, from the table's pooled residual sd, if its true difference were the observed one (a "
        "difference at |Δ| or δ, whichever is larger; equivalence when |Δ| < δ).",
        "",
    ]


SYNC_NOTE = (
    "Runs of local-engine sweeps are W&B offline runs until uploaded: their panels fill after "
    "`wandb sync $LENET_HOME/wandb/offline-run-*` (into the project the sweep was created with)."
)


def swept(sweep_config: dict[str, Any]) -> list[str]:
    """The parameters a sweep varies, seed aside: a grid's factors, or a search's ranges and value lists."""
    return [
        name
        for name, spec in sweep_config["parameters"].items()
        if name != "seed" and ("distribution" in spec or "min" in spec or len(spec.get("values", [])) > 1)
    ]


def wandb_report(
    results: Results, entity: str | None, project: str, equivalence: float = EQUIVALENCE, tune: str | None = None
) -> Any:
    """A W&B Report (wandb-workspaces; built, not saved): per sweep, curves and best-val bars per factor level,
    parallel coordinates and importance over the swept parameters, a run comparer, and the tables (with `tune`, the
    tuned table too). `entity` None: W&B's default entity for the login (never "", which would address no one)."""
    import wandb_workspaces.reports.v2 as wr

    try:  # without an entity, wandb-workspaces asks wandb.Api() for the login's default one
        report = wr.Report(project=project, title="lenet: LeNet-5 ablations", **({"entity": entity} if entity else {}))
    except Exception as exc:  # not logged in: wandb-workspaces raises a bare Exception
        raise TrackingError(
            f"a W&B report needs the W&B entity that will own it ({one_line(exc)}); run `wandb login`, or pass --entity"
        ) from None
    legend = "\n".join(verdict_legend(equivalence)).replace("## Verdicts", "").strip()  # report.md's own words
    blocks: list[Any] = [
        wr.H1(text="LeNet-5 ablations on CIFAR-10"),
        wr.P(text=JPEG_NOTE),
        wr.MarkdownBlock(text=legend),
    ]
    if any(meta["backend"] != "wandb" for meta in results.sweeps.values()):
        blocks.append(wr.P(text=SYNC_NOTE))
    for sweep_id, meta in results.sweeps.items():
        blocks += _wandb_section(wr, results, sweep_id, meta, equivalence, tune)
    report.blocks = blocks
    return report


def _wandb_section(
    wr: Any, results: Results, sweep_id: str, meta: dict[str, Any], equivalence: float, tune: str | None
) -> list[Any]:
    config = meta["config"]
    keys = factors(config)
    # W&B sweeps filter on Sweep; local sweeps' runs carry group = the sweep id. Only runs the tables count
    # (finished, stopped early) enter the panels' means. The run set names no entity/project, like the default
    # Runset() of wandb-workspaces' own examples: it shows the report's project, and needs no server to build.
    key = "Sweep" if meta["backend"] == "wandb" else "Group"
    counted = f"SummaryMetric('state') in {list(COUNTED)!r}"
    runset = wr.Runset(name=meta["name"], filters=f"Metric('{key}') = '{sweep_id}' and {counted}")
    columns = [wr.Config(k) for k in swept(config)] + [BEST_VAL_ACC, TEST_ACC]
    panels = [*_curves(wr, keys), *_bars(wr, keys, config.get("method") == "grid")]
    panels += [
        wr.ParallelCoordinatesPlot(columns=[wr.ParallelCoordinatesPlotColumn(metric=c) for c in columns]),
        wr.ParameterImportancePlot(with_respect_to=BEST_VAL_ACC),  # only swept parameters vary in this run set
        wr.RunComparer(diff_only="split"),
    ]
    tables = [markdown(seed_table(results, sweep_id))]
    if keys:
        tables.append(markdown(format_effects(effects(results, sweep_id, equivalence))))
        if tunable(config, tune):
            tables.append(markdown(format_tuned(tuned_effects(results, sweep_id, tune, equivalence), tune)))
    elif config.get("method") != "grid":
        tables.append(markdown(search_table(results, sweep_id)))
    return [
        wr.H2(text=meta["name"]),
        wr.P(text=_question(config) or f"Sweep {sweep_id} ({meta['backend']}, {config.get('method')})."),
        wr.PanelGrid(runsets=[runset], panels=panels),
        *(wr.MarkdownBlock(text=t) for t in tables),
    ]


def _curves(wr: Any, keys: list[str]) -> list[Any]:
    """Validation curves: mean ± std per level of every factor, or one line per run (seeds, search draws)."""
    group = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}
    return [
        wr.LinePlot(title=f"{m} by {k}", x="epoch", y=[m], groupby=wr.Config(k), **group)
        for k in keys
        for m in (VAL_ACC, VAL_LOSS)
    ] or [wr.LinePlot(title=f"{m} per run", x="epoch", y=[m]) for m in (VAL_ACC, VAL_LOSS)]


def _bars(wr: Any, keys: list[str], grid: bool) -> list[Any]:
    """Best val (and test) accuracy per level, mean with a std error bar; a one-recipe grid: its mean ± std over
    seeds; a search: nothing (a mean over random draws answers no question)."""
    group = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}
    if keys:
        return [
            wr.BarPlot(
                title=f"best val / test acc by {k} (mean ± std)",
                metrics=[BEST_VAL_ACC, TEST_ACC],
                groupby=wr.Config(k),
                orientation="v",
                **group,
            )
            for k in keys
        ]
    if not grid:
        return []
    return [wr.ScalarChart(title=f"{m} (mean ± std)", metric=m, **group) for m in (BEST_VAL_ACC, TEST_ACC)]
