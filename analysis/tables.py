"""Tables from runs: the seed-style comparison table, per-factor effects with verdicts, best configurations."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats as scipy_stats

from ablation import metrics
from ablation.config import coerce
from ablation.errors import ConfigError
from ablation.metrics import (
    BEST_TRAIN_ACC,
    BEST_TRAIN_LOSS,
    BEST_VAL_ACC,
    BEST_VAL_LOSS,
    GAP_TRAIN_VAL,
    OBJECTIVE,
    TEST_ACC,
    epochs_to,
    summary_name,
)
from ablation.states import COUNTED
from analysis.results import Results, ResultsError
from analysis.stats import (
    ALPHA,
    BASELINE,
    EQUIVALENCE,
    INCONCLUSIVE,
    MAX_SEEDS,
    TableFit,
    alpha_of_look,
    check,
    compare,
)

CONFIDENCE = 0.95
ACCURACIES = (BEST_VAL_ACC, TEST_ACC)  # every comparison is fitted on both: val decides, test is reported
CONVERGENCE = 60  # report epochs to reach this val accuracy (%)


def mean_ci(values: pd.Series) -> tuple[float, float, int, float]:
    """(mean, std, n, half-width of the 95% t-interval); std and CI are NaN for n < 2."""
    v = pd.Series(values, dtype=float).dropna()
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0, math.nan
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, n, math.nan
    std = float(v.std(ddof=1))
    if std == 0:
        return mean, 0.0, n, 0.0
    low, _ = scipy_stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=scipy_stats.sem(v))
    return mean, std, n, mean - float(low)


def factors(sweep_config: dict[str, Any]) -> list[str]:
    """The swept parameters a study compares: every parameter with several listed values, except the seed
    (continuous search ranges are not levels; a search is summarised by its best configurations)."""
    if sweep_config.get("method") != "grid":
        return []  # random/bayes draws confound every factor with the others; see best_configs instead
    return [
        name for name, spec in sweep_config["parameters"].items() if name != "seed" and len(spec.get("values", [])) > 1
    ]


def _group_keys(sweep_config: dict[str, Any]) -> list[str]:
    """What a table's rows are: the grid's factors, or one row per run for a random/bayes search."""
    return factors(sweep_config) or (["run_id"] if sweep_config.get("method") != "grid" else [])


def levels(sweep_config: dict[str, Any], factor: str, runs: pd.DataFrame) -> list[Any]:
    """A factor's levels in the order the sweep file lists them (the first is the baseline)."""
    spec = sweep_config["parameters"][factor]
    listed = [coerce(factor, v) for v in spec.get("values", [])]  # YAML may read 1e-3 as a string
    seen = [v for v in pd.unique(runs[factor]) if v not in listed]
    return listed + sorted(seen, key=str)


def counted(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs whose metrics enter means (finished or stopped early); the others are reported separately."""
    return runs[runs["state"].isin(COUNTED)]


def fmt(mean: float, std: float, n: int, digits: int = 2) -> str:
    """`mean ± std (n)`; a dash when there is nothing to show."""
    if n == 0 or math.isnan(mean):
        return "–"
    spread = f" ± {std:.{digits}f}" if not math.isnan(std) else ""
    return f"{mean:.{digits}f}{spread} (n={n})"


def describe_regularisation(row: pd.Series) -> str:
    """The regularisers a config uses, in words."""
    parts = [
        ("BN" if row.get("norm") == "batch" else ""),
        (f"aug {row['augment']}" if row.get("augment") not in (None, "none") else ""),
        (f"wd {row['weight_decay']:g}" if row.get("weight_decay") else ""),
        (f"L1 {row['l1']:g}" if row.get("l1") else ""),
        (f"dropout {row['dropout']:g}" if row.get("dropout") else ""),
        (f"LS {row['label_smoothing']:g}" if row.get("label_smoothing") else ""),
        (f"early stop {int(row['early_stopping'])}" if row.get("early_stopping") else ""),
    ]
    return ", ".join(p for p in parts if p) or "none"


def describe_optimisation(row: pd.Series) -> str:
    """Optimiser, peak lr, schedule and batch size, in words."""
    momentum = f" {row['momentum']:g}" if row.get("optimizer") in ("momentum", "nesterov") else ""
    batch = int(row.get("batch_size"))
    return f"{row.get('optimizer')}{momentum}, lr {row.get('lr'):g}, {row.get('schedule')}, batch {batch}"


def variant_name(keys: list[str], values: tuple[Any, ...]) -> str:
    """`factor=level, ...` (or just the preset's name)."""
    if keys == ["preset"]:
        return str(values[0])
    return ", ".join(f"{k}={v}" for k, v in zip(keys, values)) or "all runs"


def seed_table(results: Results, sweep_id: str) -> pd.DataFrame:
    """The seed project's table, generated: one row per variant, each cell mean ± std over seeds with n."""
    config = results.sweeps[sweep_id]["config"]
    runs = results.runs[results.runs["sweep_id"] == sweep_id]
    keys = _group_keys(config)
    rows = []
    for values, group in runs.groupby(keys, sort=False, dropna=False) if keys else [((), runs)]:
        values = values if isinstance(values, tuple) else (values,)
        ok, first = counted(group), group.iloc[0]

        def cell(col: str, ok: pd.DataFrame = ok) -> str:
            return fmt(*mean_ci(ok[col])[:3]) if col in ok else "–"

        rows.append(
            {
                "Model/variant": variant_name(keys, values),
                "Activation": first["activation"],
                "Pooling": first["pooling"],
                "Regularisation": describe_regularisation(first),
                "Initialisation": first["init"],
                "Optimisation": describe_optimisation(first),
                "# Epochs": int(first["epochs"]),
                "Loss": cell(BEST_TRAIN_LOSS),
                "Accuracy": cell(BEST_TRAIN_ACC),
                "Val Loss": cell(BEST_VAL_LOSS),
                "Val Accuracy": cell(BEST_VAL_ACC),
                "Test Accuracy": cell(TEST_ACC),
                "Not counted": _not_counted(group),
            }
        )
    return pd.DataFrame(rows)


def _not_counted(group: pd.DataFrame) -> str:
    """e.g. `1 diverged, 2 failed`: runs that are shown but kept out of the means."""
    other = group[~group["state"].isin(COUNTED)]["state"].value_counts()
    return ", ".join(f"{n} {state}" for state, n in other.items())


@dataclass(frozen=True)
class EffectTable:
    """One effects table (one family): a factor's levels within one combination of the other factors."""

    factor: str
    others: list[str]  # the other factors
    context: tuple  # their values in this table
    block: pd.DataFrame  # this table's runs (every state)
    order: list[Any]  # the factor's levels, the baseline first
    shown: list[Any]  # the levels that have runs
    pairs: list[tuple[int, int]]  # the family: (level index, baseline index 0) for each shown level but the baseline


def effect_tables(sweep_config: dict[str, Any], runs: pd.DataFrame, skip: str | None = None) -> Iterator[EffectTable]:
    """Every effects table of a grid sweep's runs: each factor within each combination of the other factors
    (`skip`: a factor that is neither compared nor held fixed, its runs all kept in each table's block)."""
    swept = [f for f in factors(sweep_config) if f != skip]
    for factor in swept:
        others = [f for f in swept if f != factor]
        contexts = runs.groupby(others, sort=False) if others else [((), runs)]
        for context, block in contexts:
            order = levels(sweep_config, factor, block)
            shown = [v for v in order if (block[factor] == v).any()]  # levels with no runs yet are skipped
            pairs = [(order.index(v), 0) for v in shown if v != order[0]]
            context = context if isinstance(context, tuple) else (context,)
            yield EffectTable(factor, others, context, block, order, shown, pairs)


def current_look(meta: dict[str, Any]) -> int:
    """The look of `sweep extend` a sweep's data is at: 1 before any; after look k, k + 1 when it added runs, else
    k (the last one: everything resolved or the cap reached)."""
    taken = meta.get("looks") or []
    if not taken:
        return 1
    return int(taken[-1]["look"]) + (1 if taken[-1].get("target") else 0)


def sweep_alpha(meta: dict[str, Any]) -> float:
    """The family-wise alpha a sweep's tables are judged at: ALPHA for a fixed design; once `sweep extend` has taken
    a look, the alpha of the look its data is at (stats.alpha_of_look), so the error over all looks stays ALPHA."""
    return alpha_of_look(current_look(meta)) if meta.get("looks") else ALPHA


def effects(
    results: Results, sweep_id: str, equivalence: float = EQUIVALENCE, alpha: float | None = None
) -> pd.DataFrame:
    """Per factor and level (within each combination of the other factors, one table and one family each): val/test
    accuracy with 95% CIs, the difference from the baseline level with its simultaneous interval and verdict
    (analysis.stats), the seeds an inconclusive one needs, the table's model, convergence and gap. `alpha`
    None: the sweep's own (sweep_alpha: 5%, or the current look's once `sweep extend` has taken one)."""
    alpha = sweep_alpha(results.sweeps[sweep_id]) if alpha is None else alpha
    check(alpha, equivalence)
    config = results.sweeps[sweep_id]["config"]
    runs = results.runs[results.runs["sweep_id"] == sweep_id]
    rows = []
    for t in effect_tables(config, runs):
        fits = {m: fit_table(counted(t.block), t.factor, t.order, m, t.pairs, equivalence, alpha) for m in ACCURACIES}
        for level in t.shown:
            rows.append(_effect_row(t.factor, t.order.index(level), t.order, t.others, t.context, t.block, fits))
    return pd.DataFrame(rows)


def tunable(sweep_config: dict[str, Any], tune: str | None) -> bool:
    """Whether `--tune tune` applies to a sweep: it varies `tune` and at least one other factor to compare."""
    swept = factors(sweep_config)
    return tune in swept and len(swept) > 1


def check_tune(results: Results, tune: str | None) -> None:
    """A ConfigError unless `tune` is None or tunable() in at least one of the sweeps."""
    if tune is None or any(tunable(meta["config"], tune) for meta in results.sweeps.values()):
        return
    varies = sorted({f for meta in results.sweeps.values() for f in factors(meta["config"])})
    if tune in varies:
        raise ConfigError(
            f"--tune {tune}: no sweep here varies another factor to compare at its best {tune}; drop --tune"
        )
    if not varies:
        raise ConfigError(f"--tune {tune}: these sweeps vary nothing but the seed; drop --tune")
    raise ConfigError(
        f"--tune {tune}: no sweep here varies it (they vary {', '.join(varies)}); pass one, or drop --tune"
    )


def tuned_effects(
    results: Results, sweep_id: str, tune: str, equivalence: float = EQUIVALENCE, alpha: float | None = None
) -> pd.DataFrame:
    """effects() with `tune` picked per level (e.g. each optimiser at its own best lr): within each combination of
    the factors other than `tune` and the one compared, each level at the `tune` value with the highest mean val
    accuracy (best_level: only cells whose runs all finished are eligible). The pick used these runs' val, so the
    val Δ is optimistic and the test verdict decides. Columns as effects(), plus `tune` (the pick) and `at_edge` (a
    numeric pick at the grid's smallest or largest value: the best may lie beyond it)."""
    config = results.sweeps[sweep_id]["config"]
    if not tunable(config, tune):
        raise ConfigError(f"--tune {tune}: sweep {sweep_id} does not vary it and another factor; drop --tune")
    alpha = sweep_alpha(results.sweeps[sweep_id]) if alpha is None else alpha
    check(alpha, equivalence)
    runs = results.runs[results.runs["sweep_id"] == sweep_id]
    rows = []
    grid = levels(config, tune, runs)
    numeric = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in grid)  # numpy scalars too
    edges = (min(grid), max(grid)) if numeric else ()  # a pick there may have its best value beyond the grid
    for t in effect_tables(config, runs, skip=tune):
        picks = {level: best_level(t.block[t.block[t.factor] == level], tune) for level in t.shown}
        block = pd.concat([t.block[(t.block[t.factor] == lv) & (t.block[tune] == p)] for lv, p in picks.items()])
        fits = {m: fit_table(counted(block), t.factor, t.order, m, t.pairs, equivalence, alpha) for m in ACCURACIES}
        for level in t.shown:
            row = _effect_row(t.factor, t.order.index(level), t.order, t.others, t.context, block, fits)
            rows.append({**row, tune: picks[level], "at_edge": picks[level] in edges})
    return pd.DataFrame(rows)


def best_level(runs: pd.DataFrame, factor: str) -> Any:
    """The level of `factor` with the highest mean val accuracy in `runs`, among levels whose runs all counted (a
    failed, diverged, stopped or unfinished seed would leave a survivor's mean); all levels when none qualifies."""
    ok = counted(runs)
    whole = [v for v, cell in runs.groupby(factor, sort=False) if cell["state"].isin(COUNTED).all()]
    eligible = ok[ok[factor].isin(whole)] if whole else ok
    means = eligible.groupby(factor, sort=False)[BEST_VAL_ACC].mean()
    return means.idxmax() if means.notna().any() else runs[factor].iloc[0]


def fit_table(
    runs: pd.DataFrame,
    factor: str,
    order: list[Any],
    column: str,
    pairs: list[tuple[int, int]] | None = None,
    equivalence: float = EQUIVALENCE,
    alpha: float = ALPHA,
) -> TableFit:
    """analysis.stats.compare on one table's runs: `column` by the index of `factor`'s level in `order`, the seed
    as a block; `pairs` of level indices (default: each level minus order[0])."""
    index = [next((i for i, v in enumerate(order) if v == value), -1) for value in runs[factor]]
    keep = [i >= 0 for i in index]
    values = runs[column] if column in runs else pd.Series(math.nan, index=runs.index)
    seeds = runs["seed"][keep] if "seed" in runs else None
    return compare(
        values[keep].to_numpy(dtype=float),
        [i for i in index if i >= 0],
        None if seeds is None else pd.to_numeric(seeds, errors="coerce").to_numpy(dtype=float),
        pairs,
        n_levels=len(order),
        alpha=alpha,
        equivalence=equivalence,
    )


def _effect_row(
    factor: str, i: int, order: list[Any], others: list[str], context: tuple, block: pd.DataFrame, fits: dict
) -> dict[str, Any]:
    group = block[block[factor] == order[i]]
    ok = counted(group)
    val, test = mean_ci(ok[BEST_VAL_ACC]), mean_ci(ok[TEST_ACC] if TEST_ACC in ok else pd.Series(dtype=float))
    reached = ok[epochs_to(CONVERGENCE)].dropna() if epochs_to(CONVERGENCE) in ok else pd.Series(dtype=float)
    row = {
        "factor": factor,
        "context": variant_name(others, context) if others else "",
        "level": order[i],
        "n": val[2],
        "not counted": _not_counted(group),
        "val_acc": val[0],
        "val_acc_ci": val[3],
        "test_acc": test[0],
        "test_acc_ci": test[3],
    }
    for name, fit, n in (("val", fits[BEST_VAL_ACC], val[2]), ("test", fits[TEST_ACC], test[2])):
        row.update(_comparison_cells(name, fit, i, n))
    return {
        **row,
        f"epochs_to_{CONVERGENCE}": reached.mean() if len(reached) else math.nan,
        f"reached_{CONVERGENCE}": f"{len(reached)}/{len(ok)}",
        "gap": mean_ci(ok[GAP_TRAIN_VAL])[0] if GAP_TRAIN_VAL in ok else math.nan,
        "model": "level + seed" if fits[BEST_VAL_ACC].blocked else "level",
        "comparisons": len(fits[BEST_VAL_ACC].comparisons),
        "equivalence": fits[BEST_VAL_ACC].equivalence,
        "alpha": fits[BEST_VAL_ACC].alpha,
    }


def _comparison_cells(name: str, fit: TableFit, i: int, n: int) -> dict[str, Any]:
    """The difference-from-baseline columns of one metric (`verdict`/`seeds_needed` unsuffixed for val)."""
    suffix = "" if name == "val" else "_test"
    found = next((c for c in fit.comparisons if c.pair[0] == i), None)
    if found is None:  # the baseline itself
        diff, half, tost, call, need = (0.0 if n else math.nan), math.nan, math.nan, BASELINE, None
    else:
        diff, half, tost, call, need = (
            found.diff,
            found.half_width,
            found.equivalence_half_width,
            found.verdict,
            found.seeds_needed,
        )
    return {
        f"diff_{name}_acc": diff,
        f"diff_{name}_acc_ci": half,
        f"diff_{name}_acc_tost": tost,
        f"verdict{suffix}": call,
        f"seeds_needed{suffix}": math.nan if need is None else need,
        f"sigma_{name}": fit.sigma,
        f"df_{name}": fit.df,
        f"seed_icc_{name}": fit.seed_icc,
    }


def step_gains(
    results: Results, sweep_id: str, equivalence: float = EQUIVALENCE, alpha: float | None = None
) -> pd.DataFrame:
    """For an ordered study (a path adding one technique per level): each level minus the level before it, with
    intervals simultaneous over the steps and a verdict; the contribution of each technique in context."""
    alpha = sweep_alpha(results.sweeps[sweep_id]) if alpha is None else alpha
    config = results.sweeps[sweep_id]["config"]
    factor = factors(config)[0]
    runs = counted(results.runs[results.runs["sweep_id"] == sweep_id])
    order = [v for v in levels(config, factor, runs) if (runs[factor] == v).any()]
    pairs = [(i + 1, i) for i in range(len(order) - 1)]
    val, test = (fit_table(runs, factor, order, m, pairs, equivalence, alpha) for m in ACCURACIES)
    return pd.DataFrame(
        [
            {
                "step": f"{order[b]} → {order[a]}",
                "Δ val acc (95% simult.)": signed(v.diff, v.half_width),
                "Δ test acc (95% simult.)": signed(t.diff, t.half_width),
                "verdict (val)": v.verdict,
                "verdict (test)": t.verdict,
                "seeds needed (val)": seeds_cell(v.verdict, v.seeds_needed),
            }
            for v, t, (a, b) in zip(val.comparisons, test.comparisons, pairs)
        ]
    )


def control_arm(results: Results, runs: pd.DataFrame, sweep_id: str, control: str) -> pd.DataFrame:
    """`runs` with the sweep `sweep_id` narrowed to one level of its factor, `control` = "name=value" (e.g. the
    modern level of the techniques study as the control of a recipe trained on the same seeds)."""
    config, title = results.sweeps[sweep_id]["config"], results.sweeps[sweep_id]["name"]
    name, sep, raw = control.partition("=")
    if not sep or not name or not raw:
        raise ConfigError(f"--control takes NAME=VALUE (a level of the first sweep's factor), not {control!r}")
    if factors(config) != [name]:
        varies = ", ".join(factors(config)) or "nothing but the seed"
        raise ConfigError(
            f"--control {control}: {title} ({sweep_id}) varies {varies}; --control picks a level of a sweep with "
            f"one factor (drop --control for a one-recipe sweep)"
        )
    value, own = coerce(name, raw), runs["sweep_id"] == sweep_id
    if not (own & (runs[name] == value)).any():
        shown = ", ".join(str(v) for v in levels(config, name, runs[own]))
        raise ConfigError(f"--control {control}: no counted runs at that level of {title}; its levels: {shown}")
    return runs[~own | (runs[name] == value)]


def sweep_comparison(
    results: Results,
    sweep_ids: list[str],
    equivalence: float = EQUIVALENCE,
    alpha: float = ALPHA,
    control: str | None = None,
) -> pd.DataFrame:
    """One-recipe sweeps as one table (one family): each sweep minus the first, the baseline (e.g. a search winner's
    confirmation against the control recipe at the same schedule), fitted with the seed as a block, with verdicts.
    `control` ("name=value"): the baseline is that level of the first sweep, a grid over one factor."""
    check(alpha, equivalence)
    if len(sweep_ids) < 2:
        raise ConfigError(f"--compare needs two or more sweeps, not {len(sweep_ids)}; give e.g. the control first")
    runs = counted(results.runs[results.runs["sweep_id"].isin(sweep_ids)])
    if control is not None:
        runs = control_arm(results, runs, sweep_ids[0], control)
    for sweep_id in sweep_ids[1:] if control is not None else sweep_ids:
        config = results.sweeps[sweep_id]["config"]
        if config.get("method") != "grid" or factors(config):
            raise ConfigError(
                f"--compare compares one-recipe sweeps (a grid over seeds only, e.g. from `sweep confirm`); "
                f"{results.sweeps[sweep_id]['name']} ({sweep_id}) "
                + ("is a search" if config.get("method") != "grid" else f"varies {', '.join(factors(config))}")
            )
    # Keyed by id: two sweeps may share a name (one file created twice with other settings).
    epochs = {i: sorted(set(runs.loc[runs["sweep_id"] == i, "epochs"])) for i in sweep_ids}
    if len({tuple(e) for e in epochs.values()}) > 1:
        shown = ", ".join(
            f"{results.sweeps[i]['name']} ({i}): {'/'.join(str(int(e)) for e in v) or '–'}" for i, v in epochs.items()
        )
        raise ConfigError(f"--compare needs sweeps trained for the same epochs ({shown}); compare like with like")
    fits = {m: fit_table(runs, "sweep_id", list(sweep_ids), m, None, equivalence, alpha) for m in ACCURACIES}
    rows = []
    for i, sweep_id in enumerate(sweep_ids):
        ok = runs[runs["sweep_id"] == sweep_id]
        val, test = mean_ci(ok[BEST_VAL_ACC]), mean_ci(ok[TEST_ACC])
        arm = f" {control}" if control is not None and i == 0 else ""
        row = {
            "sweep": f"{results.sweeps[sweep_id]['name']} ({sweep_id}){arm}",
            "# Epochs": "/".join(str(int(e)) for e in epochs[sweep_id]),
            "n": val[2],
            "val acc % (95% CI)": signed(val[0], val[3]).lstrip("+"),
            "test acc % (95% CI)": signed(test[0], test[3]).lstrip("+"),
        }
        for name, fit in (("val", fits[BEST_VAL_ACC]), ("test", fits[TEST_ACC])):
            found = next((c for c in fit.comparisons if c.pair[0] == i), None)
            row[f"Δ {name} vs baseline"] = "–" if found is None else signed(found.diff, found.half_width)
            row[f"verdict ({name})"] = BASELINE if found is None else found.verdict
            row[f"seeds needed ({name})"] = "" if found is None else seeds_cell(found.verdict, found.seeds_needed)
        rows.append(row)
    return pd.DataFrame(rows)


def teacher_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per teacher a sweep's runs distilled from: its size, epochs, accuracy and training time, the time its
    view table took (once, shared by the students), and the set-up time each student paid for it (loading it, or
    computing/reading its view table); empty without one."""
    if metrics.TEACHER_ARCH not in runs:
        return pd.DataFrame()
    rows = []
    for path, group in runs[runs[metrics.TEACHER_ARCH].notna()].groupby("teacher", sort=False):
        first = group.iloc[0]
        rows.append(
            {
                "teacher": f"{first[metrics.TEACHER_ARCH]} (run {Path(str(path)).parent.name})",
                "parameters": f"{int(first[metrics.TEACHER_PARAMS]):,}",
                "epochs": int(first[metrics.TEACHER_EPOCHS]),
                "val acc %": _number(first.get(metrics.TEACHER_VAL_ACC)),
                "test acc %": _number(first.get(metrics.TEACHER_TEST_ACC)),
                "training time (min)": _number(_minutes(first.get(metrics.TEACHER_TRAIN_S)), 1),
                "view table (min)": _number(_minutes(_largest(group, metrics.TEACHER_TABLE_S)), 1),
                "students": len(group),
                "set-up per student (s, mean)": _number(group[metrics.TEACHER_S].mean(), 0),
            }
        )
    return pd.DataFrame(rows)


def _largest(runs: pd.DataFrame, column: str) -> float | None:
    """The largest number in a column (the one run that computed a shared table records its cost); None if absent."""
    return pd.to_numeric(runs[column], errors="coerce").max() if column in runs else None


def _minutes(seconds: Any) -> float:
    """Seconds (a number, a numeric string or missing) as minutes; NaN when missing."""
    return float(pd.to_numeric(seconds, errors="coerce")) / 60


def _number(value: Any, digits: int = 2) -> str:
    """A float with `digits` decimals; a dash when missing."""
    return "–" if value is None or pd.isna(value) else f"{float(value):.{digits}f}"


def signed(m: float, h: float) -> str:
    """`+diff ± half-width`; a dash for a missing difference."""
    return "–" if math.isnan(m) else (f"{m:+.2f}" + (f" ± {h:.2f}" if not math.isnan(h) else ""))


def seeds_cell(verdict: str, need: float | None) -> str:
    """Seeds per level an inconclusive comparison needs: a number, `>200`, `?` (no residual sd), else blank."""
    if verdict != INCONCLUSIVE:
        return ""
    if need is None or math.isnan(need):
        return "?"
    return f">{MAX_SEEDS}" if need > MAX_SEEDS else str(int(need))


def model_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per effects table: its model, number of comparisons, pooled residual sd, residual df and the
    measured seed correlation (intra-class correlation of the seed block), for val and test accuracy."""
    if table.empty:
        return pd.DataFrame()
    first = table.groupby(["factor", "context"], sort=False).first().reset_index()
    num = _number
    return pd.DataFrame(
        {
            "factor": first["factor"],
            "context": first["context"],
            "model": first["model"],
            "comparisons": first["comparisons"],
            "residual sd val (df)": [f"{num(s)} ({d})" for s, d in zip(first["sigma_val"], first["df_val"])],
            "seed correlation val": [num(v) for v in first["seed_icc_val"]],
            "residual sd test (df)": [f"{num(s)} ({d})" for s, d in zip(first["sigma_test"], first["df_test"])],
            "seed correlation test": [num(v) for v in first["seed_icc_test"]],
        }
    )


def best_configs(results: Results, sweep_id: str, k: int = 5) -> pd.DataFrame:
    """The k variants with the highest mean validation accuracy (test accuracy shown, never used to choose)."""
    table = seed_table(results, sweep_id)
    config = results.sweeps[sweep_id]["config"]
    runs = counted(results.runs[results.runs["sweep_id"] == sweep_id])
    keys = _group_keys(config)
    if not keys or runs.empty:
        return table.head(k)
    means = runs.groupby(keys, sort=False)[BEST_VAL_ACC].mean().sort_values(ascending=False)
    names = [variant_name(keys, v if isinstance(v, tuple) else (v,)) for v in means.index]
    return table.set_index("Model/variant").loc[names[:k]].reset_index()


def search_table(results: Results, sweep_id: str) -> pd.DataFrame:
    """A random/bayes search's runs ranked by best val accuracy, runs stopped early (hyperband) included
    with what they reached before they were stopped, and the values of every searched parameter."""
    config = results.sweeps[sweep_id]["config"]
    searched = [k for k, spec in config["parameters"].items() if "value" not in spec and k != "seed"]
    runs = results.runs[results.runs["sweep_id"] == sweep_id].sort_values(BEST_VAL_ACC, ascending=False)
    table = pd.DataFrame(
        {
            "run": runs["run_id"],
            "state": runs["state"],
            "epochs run": runs["epochs_run"],
            "best val acc %": runs[BEST_VAL_ACC],
            "test acc %": runs[TEST_ACC],
            **{k: runs[k] for k in searched},
        }
    )
    return table.map(_show)


def _show(value: Any) -> str:
    """A table cell: floats to 4 significant digits, missing values as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_run(results: Results, sweep_id: str) -> dict[str, Any]:
    """The best finished run on the sweep's metric; for a grid, a run of the variant with the best mean.

    The result also holds `metric_column` and `chosen` (how it was chosen, in words)."""
    config = results.sweeps[sweep_id]["config"]
    metric = config.get("metric") or OBJECTIVE
    column = summary_name(metric["name"])
    runs = counted(results.runs[results.runs["sweep_id"] == sweep_id])
    runs = runs.dropna(subset=[column]) if column in runs else runs.iloc[0:0]
    if runs.empty:
        raise ResultsError(f"sweep {sweep_id} has no finished run with {column}; let its agent finish some runs first")
    keys = factors(config) or ["run_id"]
    score = runs.groupby(keys, sort=False)[column].transform("mean")  # each run's variant mean
    best = score.idxmax() if metric.get("goal", "maximize") == "maximize" else score.idxmin()
    group = runs[(runs[keys] == runs.loc[best, keys]).all(axis=1)]
    row = runs.loc[best].to_dict()
    chosen = (
        f"run {row['run_id']}: {column} {row[column]:.2f} after {row['epochs_run']:.0f} epochs"
        if keys == ["run_id"]
        else f"{variant_name(keys, tuple(row[k] for k in keys))}: mean {column} {score[best]:.2f} "
        f"over {len(group)} runs"
    )
    return {**row, "metric_column": column, "chosen": chosen}


def format_effects(table: pd.DataFrame) -> pd.DataFrame:
    """Effects as display strings: `mean ± CI`, `+diff ± simultaneous half-width`, verdicts, seeds needed."""
    if table.empty:
        return pd.DataFrame()
    out = pd.DataFrame(
        {"factor": table["factor"], "context": table["context"], "level": table["level"], "n": table["n"]}
    )

    def pm(m: float, h: float) -> str:
        return "–" if math.isnan(m) else (f"{m:.2f}" + (f" ± {h:.2f}" if not math.isnan(h) else ""))

    out["val acc % (95% CI)"] = [pm(m, h) for m, h in zip(table["val_acc"], table["val_acc_ci"])]
    out["test acc % (95% CI)"] = [pm(m, h) for m, h in zip(table["test_acc"], table["test_acc_ci"])]
    out["Δ val vs baseline"] = [signed(m, h) for m, h in zip(table["diff_val_acc"], table["diff_val_acc_ci"])]
    out["Δ test vs baseline"] = [signed(m, h) for m, h in zip(table["diff_test_acc"], table["diff_test_acc_ci"])]
    out["verdict (val)"] = table["verdict"]
    out["verdict (test)"] = table["verdict_test"]
    out["seeds needed (val)"] = [seeds_cell(v, n) for v, n in zip(table["verdict"], table["seeds_needed"])]
    out[f"epochs to {CONVERGENCE}% val"] = [
        f"{e:.1f}" if not math.isnan(e) else "–" for e in table[f"epochs_to_{CONVERGENCE}"]
    ]
    out[f"reached {CONVERGENCE}%"] = table[f"reached_{CONVERGENCE}"]
    out["gap (train−val)"] = [f"{g:.2f}" if not math.isnan(g) else "–" for g in table["gap"]]
    out["not counted"] = table["not counted"]
    return out


def format_tuned(table: pd.DataFrame, tune: str) -> pd.DataFrame:
    """tuned_effects() as display strings: format_effects() with the picked `tune` value after each level and the
    seeds an inconclusive test comparison needs (test decides there)."""
    if table.empty:
        return pd.DataFrame()
    out = format_effects(table)
    picks = [_show(v) + (" (grid edge)" if edge else "") for v, edge in zip(table[tune], table["at_edge"])]
    out.insert(3, f"best {tune} (val)", picks)
    out.insert(
        out.columns.get_loc("seeds needed (val)") + 1,
        "seeds needed (test)",
        [seeds_cell(v, n) for v, n in zip(table["verdict_test"], table["seeds_needed_test"])],
    )
    return out
