"""Verdicts for one effects table: OLS with the seed as a block, simultaneous intervals, equivalence, power, looks.

A table is one factor's levels within one context of the other factors; it is one family. The model is
`acc ~ level + seed` when the levels share seeds (same data order and init draw: the seed is a block), else
`acc ~ level`, fitted by statsmodels OLS; the residual variance is pooled over the whole table. Every planned
comparison (by default each level minus the first, the baseline) gets a (1 - alpha) interval simultaneous over
the table by Bonferroni, and a verdict:

- better / worse: the interval excludes 0;
- equivalent: two one-sided tests, each at alpha / m (m comparisons in the table), pass: the simultaneous
  (1 - 2 alpha) interval lies inside (-equivalence, +equivalence);
- inconclusive: neither; `seeds_needed` says how many seeds per level would resolve it.

Max-t (Dunnett) critical values from scipy.stats.multivariate_t were measured at 130-450 ms per table of 5-15
comparisons (Bonferroni: microseconds, and 3-7% wider intervals), so Bonferroni it is: it also holds for any
correlation between comparisons, and for the union over planned looks (see `look_alpha`).

Pure functions on numpy arrays (values, level index, seed), so simulations can call them directly.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ablation.errors import ConfigError

ALPHA = 0.05  # family-wise error per table (per look, in a sequential design: see look_alpha)
EQUIVALENCE = 0.5  # accuracy points: differences inside +/- this are too small to matter
LOOKS = (3, 5, 10, 20)  # planned seeds per level at each look of `sweep extend`
MAX_SEEDS = 200  # the power search stops here; seeds_needed = MAX_SEEDS + 1 means "more than MAX_SEEDS"
ADJUSTMENT = "Bonferroni"

BASELINE, BETTER, WORSE, EQUIVALENT, INCONCLUSIVE = "baseline", "better", "worse", "equivalent", "inconclusive"
VERDICTS = (BETTER, WORSE, EQUIVALENT, INCONCLUSIVE)
LEGEND = {
    BETTER: "the simultaneous 95% interval of Δ lies above 0",
    WORSE: "the simultaneous 95% interval of Δ lies below 0",
    EQUIVALENT: "no difference that matters: the simultaneous 90% interval of Δ lies inside ±δ "
    "(two one-sided tests, each at 5% / m for the table's m comparisons)",
    INCONCLUSIVE: "neither: too few seeds to tell; `seeds needed` says how many per level would resolve it",
}


@dataclass(frozen=True)
class Comparison:
    """One planned comparison: level `pair[0]` minus level `pair[1]`, with its simultaneous intervals."""

    pair: tuple[int, int]
    diff: float  # NaN when either level has no values
    half_width: float  # of the simultaneous (1 - alpha) interval; NaN without residual degrees of freedom
    equivalence_half_width: float  # of the simultaneous (1 - 2 alpha) interval (the TOST interval)
    verdict: str
    seeds_needed: int | None  # inconclusive only: seeds per level to resolve it; None when resolved or unknown


@dataclass(frozen=True)
class TableFit:
    """The fit of one table: its comparisons, the pooled residual sd and how it was estimated."""

    comparisons: tuple[Comparison, ...]
    sigma: float  # pooled residual standard deviation (NaN without residual degrees of freedom)
    df: int  # residual degrees of freedom
    blocked: bool  # the seed entered the model as a block
    seed_icc: float  # var(seed block) / (var(seed block) + residual var); NaN when not blocked
    n_levels: int  # levels with at least one value
    alpha: float
    equivalence: float


def check(alpha: float, equivalence: float) -> None:
    """Raise ConfigError for an alpha outside (0, 1) or a negative equivalence margin."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, not {alpha}; pass e.g. 0.05")
    if not equivalence >= 0:  # also rejects NaN
        raise ConfigError(f"--equivalence must be >= 0 accuracy points, not {equivalence}; pass e.g. 0.5")


def critical(m: int, df: float | np.ndarray, alpha: float = ALPHA) -> float | np.ndarray:
    """The two-sided critical t value for m simultaneous (1 - alpha) intervals (Bonferroni)."""
    return stats.t.ppf(1 - alpha / (2 * max(m, 1)), df)


@functools.lru_cache(maxsize=1024)
def _critical(m: int, df: int, alpha: float) -> float:
    return float(critical(m, df, alpha))  # cached: tables of one shape share it


def verdict(diff: float, half_width: float, equivalence_half_width: float, equivalence: float) -> str:
    """better / worse when the interval excludes 0 (first), equivalent when the TOST interval fits in the band."""
    if not (math.isfinite(diff) and math.isfinite(half_width)):
        return INCONCLUSIVE
    if diff - half_width > 0:
        return BETTER
    if diff + half_width < 0:
        return WORSE
    if math.isfinite(equivalence_half_width) and abs(diff) + equivalence_half_width < equivalence:
        return EQUIVALENT
    return INCONCLUSIVE


def compare(
    values: Sequence[float] | np.ndarray,
    level: Sequence[int] | np.ndarray,
    seed: Sequence[float] | np.ndarray | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    n_levels: int | None = None,
    alpha: float = ALPHA,
    equivalence: float = EQUIVALENCE,
) -> TableFit:
    """Fit one table and judge its comparisons. `level` holds indices 0..n_levels-1 (0: the baseline); `pairs`
    default to every level minus level 0. NaN values are dropped; the seed is a block when it links the levels."""
    check(alpha, equivalence)
    y, lev = np.asarray(values, dtype=float), np.asarray(level, dtype=int)
    sd = None if seed is None else np.asarray(seed, dtype=float)
    keep = np.isfinite(y)
    if sd is not None and not np.isfinite(sd[keep]).all():  # a run without a recorded seed: no blocks
        sd = None
    k = n_levels if n_levels is not None else int(lev.max()) + 1 if len(lev) else 1
    y, lev, sd = y[keep], lev[keep], None if sd is None else sd[keep]
    pairs = list(pairs) if pairs is not None else [(j, 0) for j in range(1, k)]
    present = sorted(set(lev.tolist()))
    fit = _fit(y, lev, sd, present)
    m = len(pairs)
    crit, crit_tost = (_critical(m, fit.df, alpha), _critical(m, fit.df, 2 * alpha)) if fit.df >= 1 else (math.nan,) * 2
    comparisons = []
    for a, b in pairs:
        diff, se = fit.contrast(a, b)
        hw, hw_tost = float(crit * se), float(crit_tost * se)
        call = verdict(diff, hw, hw_tost, equivalence)
        n_now = min(int((lev == a).sum()), int((lev == b).sum()))
        need = (
            seeds_needed(
                diff,
                fit.sigma,
                max(len(present), 2),
                m,
                fit.blocked,
                start=n_now + 1,
                alpha=alpha,
                equivalence=equivalence,
            )
            if call == INCONCLUSIVE
            else None
        )
        comparisons.append(Comparison((a, b), diff, hw, hw_tost, call, need))
    icc = float(fit.icc)
    return TableFit(tuple(comparisons), fit.sigma, fit.df, fit.blocked, icc, len(present), alpha, equivalence)


def seeds_needed(
    diff: float,
    sigma: float,
    n_levels: int,
    m: int,
    blocked: bool,
    *,
    start: int = 2,
    alpha: float = ALPHA,
    equivalence: float = EQUIVALENCE,
) -> int | None:
    """Seeds per level (balanced, from `start`) at which the adjusted rule would resolve a comparison whose true
    difference is `diff`: a difference at max(|diff|, equivalence), or equivalence when |diff| < equivalence;
    MAX_SEEDS + 1 when more than MAX_SEEDS are needed, None when sigma is unknown."""
    if not math.isfinite(sigma):
        return None
    n, crit, crit_tost = _critical_by_seeds(m, n_levels, blocked, alpha)
    se = sigma * np.sqrt(2 / n)  # a difference of two level means, balanced (the seed block cancels)
    size = abs(diff) if math.isfinite(diff) else 0.0
    resolved = (crit * se < max(size, equivalence)) & (n >= start)
    if math.isfinite(diff) and size < equivalence:
        resolved |= (crit_tost * se < equivalence - size) & (n >= start)
    hits = np.flatnonzero(resolved)
    return int(n[hits[0]]) if len(hits) else MAX_SEEDS + 1


@functools.lru_cache(maxsize=256)
def _critical_by_seeds(m: int, n_levels: int, blocked: bool, alpha: float) -> tuple[np.ndarray, ...]:
    """Seeds per level 2..MAX_SEEDS and, for a balanced table with that many, the difference and TOST critical
    values (cached: the power search asks for the same curve for every comparison of a table)."""
    n = np.arange(2, MAX_SEEDS + 1)
    df = (n_levels - 1) * (n - 1) if blocked else n_levels * (n - 1)
    return n, critical(m, df, alpha), critical(m, df, 2 * alpha)


def spent(fraction: float, alpha: float = ALPHA) -> float:
    """The Pocock-type spending function of Lan and DeMets: the error allowed by information fraction t."""
    return alpha * math.log(1 + (math.e - 1) * min(max(fraction, 0.0), 1.0))


def look_alpha(seeds: int, alpha: float = ALPHA, looks: Sequence[int] = LOOKS) -> float:
    """The alpha of the look at `seeds` seeds per level: what the spending function adds since the last look.
    The looks' alphas sum to `alpha`, so a union (Bonferroni) bound keeps the family-wise error over all looks
    at `alpha` whatever the looks' correlation."""
    if seeds not in looks:
        raise ConfigError(f"{seeds} seeds is not a planned look; looks are at {', '.join(map(str, looks))} seeds")
    i = list(looks).index(seeds)
    before = spent(looks[i - 1] / looks[-1], alpha) if i else 0.0
    return spent(seeds / looks[-1], alpha) - before


def alpha_of_look(number: int, alpha: float = ALPHA, looks: Sequence[int] = LOOKS) -> float:
    """The alpha of the `number`-th look (1-based) of `sweep extend`: look_alpha(looks[number - 1]), whatever the
    seeds it is taken at (the same when a grid starts at looks[0] seeds), so k looks spend at most `alpha`."""
    if not 1 <= number <= len(looks):
        raise ConfigError(f"look {number} is not planned; `sweep extend` takes at most {len(looks)} looks")
    return look_alpha(looks[number - 1], alpha, looks)


def next_look(seeds: int, looks: Sequence[int] = LOOKS) -> int | None:
    """The next planned look after `seeds` seeds per level, or None after the last one."""
    return next((n for n in looks if n > seeds), None)


@dataclass(frozen=True)
class _Fit:
    params: np.ndarray
    cov: np.ndarray  # unscaled: (X'X)^-1; times sigma^2 it is the covariance of params
    columns: dict[int, int]  # level -> its dummy column (the first present level has none)
    sigma: float
    df: int
    blocked: bool
    icc: float
    tol: float

    def contrast(self, a: int, b: int) -> tuple[float, float]:
        """(estimate, standard error) of level a minus level b; NaN when either has no values."""
        if a not in self.columns or b not in self.columns:
            return math.nan, math.nan
        c = np.zeros(len(self.params))
        for level, sign in ((a, 1.0), (b, -1.0)):
            if self.columns[level] >= 0:
                c[self.columns[level]] += sign
        diff, var = float(c @ self.params), float(c @ self.cov @ c)
        diff = 0.0 if abs(diff) <= self.tol else diff  # round-off of an exact tie
        se = self.sigma * math.sqrt(max(var, 0.0))
        return diff, 0.0 if se <= self.tol else se


def _design(lev: np.ndarray, present: list[int], sd: np.ndarray | None) -> np.ndarray:
    """Intercept, one dummy per present level but the first, one per seed but the first."""
    cols = [np.ones(len(lev))] + [(lev == j).astype(float) for j in present[1:]]
    if sd is not None:
        cols += [(sd == s).astype(float) for s in np.unique(sd)[1:]]
    return np.column_stack(cols)


def _fit(y: np.ndarray, lev: np.ndarray, sd: np.ndarray | None, present: list[int]) -> _Fit:
    """OLS (statsmodels) with the seed as a block when it links every level and leaves residual df; else level
    only."""
    from statsmodels.regression.linear_model import OLS

    columns = {j: (i if i else -1) for i, j in enumerate(present)}
    tol = 1e-9 * max(1.0, float(np.abs(y).max()) if len(y) else 1.0)
    if not len(y):
        return _Fit(np.zeros(1), np.zeros((1, 1)), {}, math.nan, 0, False, math.nan, tol)
    result, blocked = OLS(y, _design(lev, present, None)).fit(), False
    plain_ssr = result.ssr
    if sd is not None and len(np.unique(sd)) > 1:
        with warnings.catch_warnings():  # a rank-deficient design is expected here, and handled just below
            warnings.simplefilter("ignore")
            full = OLS(y, _design(lev, present, sd)).fit()
        # a block only when the seeds link all levels (a connected design: full rank) and leave residual df
        if full.model.rank == full.model.exog.shape[1] and full.df_resid >= 1:
            result, blocked = full, True
    df = int(round(result.df_resid))
    sigma = math.sqrt(max(result.ssr, 0.0) / df) if df >= 1 else math.nan
    sigma = 0.0 if sigma <= tol else sigma
    icc = math.nan
    if blocked:
        seeds = len(np.unique(sd))
        ms_seed = (plain_ssr - result.ssr) / (seeds - 1)  # the seeds' mean square, adjusted for the levels
        var_seed = max(0.0, (ms_seed - sigma**2) / (len(y) / seeds))  # E[MS_seed] = s^2 + (runs per seed) s_b^2
        total = var_seed + sigma**2
        icc = var_seed / total if total > 0 else math.nan
    return _Fit(
        np.asarray(result.params), np.asarray(result.normalized_cov_params), columns, sigma, df, bool(blocked), icc, tol
    )
