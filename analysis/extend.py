"""`sweep extend --until-resolved`: take the next planned look at a grid sweep's effects tables and plan the runs
that bring its inconclusive comparisons to the next look's seeds.

Look k judges every comparison of every table on all the runs so far at alpha_of_look(k) (stats.LOOKS: 3, 5, 10,
20 seeds per level), on validation accuracy at each run's best epoch (`best/val_acc`; test accuracy never decides).
A comparison inconclusive at look k gets seeds up to the next look, on both of its sides (the level and its table's
baseline, in that table's context), with seed values continuing the cells' own (0, 1, 2 -> 3, 4) so the seed stays
a block. The looks' alphas sum to 5%, so a union bound keeps the family-wise error at 5% over all looks; the
report of an extended sweep judges its tables at the alpha of the look its data is at (tables.sweep_alpha).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ablation.errors import SweepError
from ablation.metrics import BEST_VAL_ACC
from ablation.states import IN_FLIGHT
from ablation.sweep import grid_size, grid_values, plain
from analysis.results import Results
from analysis.stats import EQUIVALENCE, INCONCLUSIVE, LOOKS, alpha_of_look, check, next_look
from analysis.tables import counted, current_look, effect_tables, factors, fit_table, levels, variant_name

DECIDES = BEST_VAL_ACC  # the metric whose verdicts decide where seeds go (the sweep's metric: val accuracy)
EXTENDED, RESOLVED, CAP = "extended", "resolved", "cap"


@dataclass(frozen=True)
class OpenComparison:
    """An inconclusive comparison at a look: `level` minus `baseline` of `factor`, within `context`."""

    factor: str
    context: str  # the other factors' values, e.g. "pooling=max" ("" for a one-factor sweep)
    level: Any
    baseline: Any
    diff: float
    half_width: float  # of the look's simultaneous (1 - alpha) interval
    seeds: int  # runs counted on the smaller side
    seeds_needed: int | None  # seeds per level that would resolve it at this look's alpha (stats.seeds_needed)
    cells: tuple[tuple[Any, ...], ...] = field(default=(), repr=False)  # both sides' factor values

    def describe(self) -> str:
        """`lr=0.01 vs 0.1 (pooling=max): Δ -0.50 ± 1.20, 3 seeds, needs 7`."""
        where = f" ({self.context})" if self.context else ""
        need = "?" if self.seeds_needed is None else str(self.seeds_needed)
        spread = f" ± {self.half_width:.2f}" if math.isfinite(self.half_width) else ""
        diff = f"{self.diff:+.2f}" if math.isfinite(self.diff) else "–"
        return (
            f"{self.factor}={self.level} vs {self.baseline}{where}: Δ val {diff}{spread}, {self.seeds} seeds, "
            f"needs {need}"
        )


@dataclass(frozen=True)
class Plan:
    """One look of `sweep extend` and what it adds (or why it adds nothing)."""

    sweep_id: str
    look: int
    seeds: int  # seeds per level at this look
    alpha: float
    equivalence: float
    comparisons: int
    open: tuple[OpenComparison, ...]
    target: int | None  # seeds per level the new runs bring the open comparisons to; None: nothing added
    points: tuple[dict[str, Any], ...]  # the new runs' parameters
    outcome: str  # EXTENDED, RESOLVED (every comparison resolved) or CAP (--max-seeds or the last planned look)
    reason: str  # the outcome in words
    taken: bool = True  # False: the looks were already over; this only repeats the last one (record nothing)

    def record(self) -> dict[str, Any]:
        """The look as the store records it (Store.add_runs)."""
        return {
            "look": self.look,
            "seeds": self.seeds,
            "target": self.target,
            "alpha": self.alpha,
            "equivalence": self.equivalence,
            "comparisons": self.comparisons,
            "inconclusive": len(self.open),
            "outcome": self.outcome,
            "open_comparisons": [
                {
                    "factor": c.factor,
                    "context": c.context,
                    "level": plain(c.level),
                    "baseline": plain(c.baseline),
                    "diff": c.diff,
                    "half_width": c.half_width,
                    "seeds_needed": c.seeds_needed,
                }
                for c in self.open
            ],
        }


def check_extendable(results: Results, sweep_id: str) -> None:
    """A SweepError unless the sweep is a grid with factors (tables whose comparisons seeds can resolve)."""
    config = results.sweeps[sweep_id]["config"]
    if config.get("method") != "grid":
        raise SweepError(
            f"sweep {sweep_id} is a {config.get('method')} search, not a grid: it has no comparisons to extend; "
            "confirm its winner over seeds with `lenet sweep confirm` and compare it with `lenet report --compare`"
        )
    if not factors(config):
        raise SweepError(
            f"sweep {sweep_id} varies no factor (one recipe over seeds): it has no comparisons to extend; "
            "compare it with another sweep with `lenet report A B --compare`"
        )


def in_flight(results: Results, sweep_id: str) -> str | None:
    """Why a look cannot be taken yet (runs pending or running, grid points not created), or None."""
    meta = results.sweeps[sweep_id]
    runs = results.runs[results.runs["sweep_id"] == sweep_id]
    busy = int(runs["state"].isin(IN_FLIGHT).sum())
    expected = (grid_size(meta["config"]) or 0) + sum(int(t.get("runs_added") or 0) for t in meta.get("looks", []))
    if busy:
        return f"{busy} of its {len(runs)} runs are still pending or running"
    if len(runs) < expected:
        return f"it has {len(runs)} of its {expected} runs so far"
    return None


def open_comparisons(
    results: Results, sweep_id: str, alpha: float, equivalence: float = EQUIVALENCE
) -> tuple[list[OpenComparison], int]:
    """The comparisons inconclusive at `alpha` on DECIDES (every table of the sweep), and how many there are."""
    check(alpha, equivalence)
    config = results.sweeps[sweep_id]["config"]
    runs = results.runs[results.runs["sweep_id"] == sweep_id]
    names, found, total = factors(config), [], 0
    for t in effect_tables(config, runs):
        ok = counted(t.block)
        fit = fit_table(ok, t.factor, t.order, DECIDES, t.pairs, equivalence, alpha)
        total += len(fit.comparisons)
        where = dict(zip(t.others, t.context))
        for c in fit.comparisons:
            if c.verdict != INCONCLUSIVE:
                continue
            level, baseline = t.order[c.pair[0]], t.order[c.pair[1]]
            sides = [{**where, t.factor: v} for v in (level, baseline)]
            n = min(int((ok[t.factor] == v).sum()) for v in (level, baseline))
            found.append(
                OpenComparison(
                    t.factor,
                    variant_name(t.others, t.context) if t.others else "",
                    level,
                    baseline,
                    c.diff,
                    c.half_width,
                    n,
                    c.seeds_needed,
                    tuple(tuple(side[f] for f in names) for side in sides),
                )
            )
    return found, total


def initial_seeds(sweep_config: dict[str, Any]) -> int:
    """Seeds per level the grid itself gives (its `seed` values; 1 without a seed parameter)."""
    spec = sweep_config["parameters"].get("seed")
    return len(set(grid_values(spec))) if spec else 1


def plan_extension(
    results: Results, sweep_id: str, max_seeds: int = LOOKS[-1], equivalence: float = EQUIVALENCE
) -> Plan:
    """The next look at a finished grid sweep: its open comparisons at that look's alpha, and the runs that bring
    them to the next look's seeds (capped by `max_seeds`). A SweepError when runs are still in flight."""
    check_extendable(results, sweep_id)
    meta = results.sweeps[sweep_id]
    busy = in_flight(results, sweep_id)
    if busy:
        raise SweepError(
            f"sweep {sweep_id} is not done: {busy}; nothing was added (train them first, e.g. `lenet agent "
            f"{sweep_id}`, then extend again)"
        )
    taken = meta.get("looks") or []
    if taken and not taken[-1].get("target"):  # the last look added nothing: the looks are over
        last = taken[-1]
        return Plan(
            sweep_id,
            int(last["look"]),
            int(last["seeds"]),
            float(last["alpha"]),
            float(last["equivalence"]) if last.get("equivalence") is not None else equivalence,
            int(last.get("comparisons") or 0),
            (),
            None,
            (),
            str(last.get("outcome") or RESOLVED),
            "the looks are over: " + _over(str(last.get("outcome")), int(last["look"])),
            taken=False,
        )
    number = current_look(meta)
    seeds = int(taken[-1]["target"]) if taken else initial_seeds(meta["config"])
    alpha = alpha_of_look(number)
    found, total = open_comparisons(results, sweep_id, alpha, equivalence)
    target = min(next_look(seeds) or seeds, max_seeds)

    def plan(outcome: str, reason: str, points: tuple[dict[str, Any], ...] = (), to: int | None = None) -> Plan:
        return Plan(sweep_id, number, seeds, alpha, equivalence, total, tuple(found), to, points, outcome, reason)

    if not found:
        return plan(RESOLVED, f"every comparison ({total}) is resolved")
    if number >= len(LOOKS) or target <= seeds:
        why = (
            f"the last planned look ({len(LOOKS)} looks, up to {LOOKS[-1]} seeds per level) is taken"
            if number >= len(LOOKS) or seeds >= LOOKS[-1]
            else f"the cap is reached: {seeds} seeds per level and --max-seeds {max_seeds}"
        )
        return plan(CAP, f"{why}; {len(found)} comparison(s) stay inconclusive")
    points = tuple(new_points(results, sweep_id, found, target))
    return plan(
        EXTENDED, f"{len(found)} of {total} comparisons inconclusive: seeds to {target} per level", points, target
    )


def _over(outcome: str, look: int) -> str:
    if outcome == CAP:
        return f"look {look} reached the cap (--max-seeds or the last planned look)"
    return f"every comparison was resolved at look {look}"


def new_points(results: Results, sweep_id: str, found: list[OpenComparison], target: int) -> list[dict[str, Any]]:
    """Parameters of the runs that bring both sides of every open comparison to `target` seeds, seed values
    continuing each cell's own (shared across cells, so the seed stays a block); a cell is extended once."""
    config = results.sweeps[sweep_id]["config"]
    runs = results.runs[results.runs["sweep_id"] == sweep_id]
    names = factors(config)
    seeds = pd.to_numeric(runs["seed"], errors="coerce") if "seed" in runs else pd.Series(0, index=runs.index)
    start = int(seeds.min()) if seeds.notna().any() else 0
    cells = list(dict.fromkeys(cell for c in found for cell in c.cells))  # each cell once, in table order
    points = []
    for cell in cells:
        mine = (runs[names] == pd.Series(cell, index=names)).all(axis=1)
        have = {int(s) for s in seeds[mine].dropna()}
        fresh = (s for s in range(start, start + target + len(have) + 1) if s not in have)
        for seed in [next(fresh) for _ in range(max(0, target - len(have)))]:
            points.append(cell_params(config, dict(zip(names, cell)), seed))
    return points


def cell_params(sweep_config: dict[str, Any], cell: dict[str, Any], seed: int) -> dict[str, Any]:
    """A run's parameters as the grid would give them: the cell's factor values (as the sweep file spells them),
    every fixed parameter, and `seed`."""
    params = {}
    for name, spec in sweep_config["parameters"].items():
        if name == "seed":
            params[name] = seed
        elif name in cell:
            listed = levels(sweep_config, name, pd.DataFrame({name: []}))  # the file's values, typed
            raw = spec.get("values", [])
            params[name] = raw[listed.index(cell[name])] if cell[name] in listed[: len(raw)] else plain(cell[name])
        else:
            params[name] = grid_values(spec)[0]
    return params
