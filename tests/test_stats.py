"""Verdicts (analysis.stats) on simulated tables with known truth: error rates, power over looks, equivalence."""

import math

import numpy as np
import pytest
from test_analysis import SWEEP

from ablation.errors import ConfigError
from analysis.results import from_records, full_config
from analysis.stats import (
    ALPHA,
    BETTER,
    EQUIVALENT,
    INCONCLUSIVE,
    LOOKS,
    MAX_SEEDS,
    WORSE,
    check,
    compare,
    look_alpha,
    next_look,
    seeds_needed,
)
from analysis.tables import effects, format_effects, model_summary

SIGMA = 0.5  # run-to-run noise (accuracy points) within a seed block
TABLES = 200


def grid(rng, effects, seeds, seed_sd=0.5, block=None):
    """A table of len(effects) levels x `seeds` seeds: 60 + the level's effect + the seed's block + noise."""
    block = rng.normal(0, seed_sd, seeds) if block is None else block
    level, seed = np.repeat(np.arange(len(effects)), seeds), np.tile(np.arange(seeds), len(effects))
    values = 60 + np.asarray(effects, float)[level] + block[seed] + rng.normal(0, SIGMA, len(level))
    return values, level, seed


def extend(rng, effects, seed_sd=0.5):
    """What `sweep extend` does (analysis/extend.py): at each planned look, judge every comparison of the table
    anew on all its runs at that look's alpha, then add seeds up to the next look to the baseline and the levels
    whose comparison is inconclusive now (seed values continuing each level's own). Returns each look's verdicts
    by level; the last look's are the ones a report shows."""
    block = rng.normal(0, seed_sd, LOOKS[-1])  # seed s has the same block effect in every level
    values, level, seed = grid(rng, effects, LOOKS[0], block=block[: LOOKS[0]])
    seeds = np.full(len(effects), LOOKS[0])  # seeds each level has
    looks = []
    for look in LOOKS:
        looks.append({c.pair[0]: c.verdict for c in compare(values, level, seed, alpha=look_alpha(look)).comparisons})
        pending = [j for j, verdict in looks[-1].items() if verdict == INCONCLUSIVE]
        if not pending or next_look(look) is None:
            break
        new_seed = np.concatenate([np.arange(seeds[j], next_look(look)) for j in [0, *pending]])
        new_level = np.concatenate([np.full(next_look(look) - seeds[j], j) for j in [0, *pending]])
        seeds[[0, *pending]] = next_look(look)
        noise = rng.normal(0, SIGMA, len(new_level))
        values = np.concatenate([values, 60 + np.asarray(effects)[new_level] + block[new_seed] + noise])
        level, seed = np.concatenate([level, new_level]), np.concatenate([seed, new_seed])
    return looks


def test_pure_noise_tables_rarely_call_a_difference() -> None:
    rng = np.random.default_rng(10)
    calls = [
        any(c.verdict in (BETTER, WORSE) for c in compare(*grid(rng, [0.0] * 10, 3)).comparisons) for _ in range(TABLES)
    ]
    assert np.mean(calls) <= 0.07  # one table is one family at 5% (measured: 2.5%, Bonferroni is conservative)


def test_the_looks_keep_the_family_wise_error() -> None:
    rng = np.random.default_rng(11)
    calls = [any(v in (BETTER, WORSE) for look in extend(rng, [0.0] * 10) for v in look.values()) for _ in range(300)]
    # a call at any look counts: the looks' alphas add up to 5% (measured over 1500 tables: 4.0% at any look,
    # 2.1% in the last look's verdicts)
    assert np.mean(calls) <= 0.07


def test_a_planted_effect_is_found_once_the_looks_are_taken() -> None:
    rng = np.random.default_rng(12)
    planted = [0.0] * 10
    planted[3] = 1.0  # +1 point at sigma 0.5: rarely resolved at 3 seeds, nearly always by 10
    found = [extend(rng, planted)[-1][3] == BETTER for _ in range(TABLES)]
    assert np.mean(found) >= 0.8


def test_no_effect_with_20_seeds_is_equivalent() -> None:
    rng = np.random.default_rng(13)
    calls = [compare(*grid(rng, [0.0, 0.0], 20)).comparisons[0].verdict for _ in range(1000)]
    # TOST: the 90% interval inside +/-0.5. Its power here is about 83% (3000 tables: 83.3%), so 1000 tables
    # keep the check 2.5 standard errors clear of 80%.
    assert np.mean([c == EQUIVALENT for c in calls]) >= 0.8
    assert (calls.count(BETTER) + calls.count(WORSE)) / len(calls) <= 0.07


def test_a_planted_effect_is_better_and_its_sign_flipped_worse() -> None:
    rng = np.random.default_rng(0)
    values, level, seed = grid(rng, [0.0, 3.0, 0.0], 3)
    up = compare(values, level, seed).comparisons
    assert [c.verdict for c in up] == [BETTER, INCONCLUSIVE]
    assert abs(up[0].diff - 3.0) <= up[0].half_width  # the interval covers the planted effect
    flipped = compare(-values, level, seed).comparisons
    assert flipped[0].verdict == WORSE and flipped[0].diff == pytest.approx(-up[0].diff)


def test_blocking_by_seed_narrows_the_interval_when_seeds_share_an_effect() -> None:
    rng = np.random.default_rng(1)
    values, level, seed = grid(rng, [0.0, 1.0, 0.5, 0.0], 5, seed_sd=2.0)  # seeds move all levels by ~2 points
    blocked, plain = compare(values, level, seed), compare(values, level)
    assert blocked.blocked and not plain.blocked
    assert blocked.comparisons[0].half_width < 0.5 * plain.comparisons[0].half_width
    assert blocked.seed_icc > 0.5 and blocked.df == (4 - 1) * (5 - 1) and plain.df == 4 * (5 - 1)
    assert blocked.comparisons[0].verdict == BETTER and plain.comparisons[0].verdict == INCONCLUSIVE


def test_seeds_needed_shrink_as_the_effect_grows() -> None:
    needed = [seeds_needed(d, SIGMA, 10, 9, True, start=4) for d in (0.6, 0.8, 1.0, 2.0)]
    assert needed == sorted(needed, reverse=True) and needed[0] > needed[-1] >= 4
    assert seeds_needed(0.0, SIGMA, 10, 9, True) < seeds_needed(0.3, SIGMA, 10, 9, True)  # equivalence
    assert seeds_needed(0.49, 5.0, 10, 9, True) == MAX_SEEDS + 1  # beyond the cap
    assert seeds_needed(1.0, math.nan, 10, 9, True) is None  # no residual sd, no answer


def test_an_inconclusive_comparison_gets_the_seeds_that_resolve_it() -> None:
    rng = np.random.default_rng(4)
    values, level, seed = grid(rng, [0.0, 1.0], 3)
    first = compare(values, level, seed).comparisons[0]
    assert first.verdict == INCONCLUSIVE and first.seeds_needed > 3
    values, level, seed = grid(rng, [0.0, 1.0], first.seeds_needed + 10)
    assert compare(values, level, seed).comparisons[0].verdict == BETTER


def test_edge_cases_do_not_crash() -> None:
    nan = math.nan
    # a level without values, a level with one run: the pooled variance still judges the latter
    fit = compare([60, 61, 60.5, 61.5, 70], [0, 0, 1, 1, 2], [0, 1, 0, 1, 0], n_levels=4)
    assert fit.comparisons[2].verdict == INCONCLUSIVE and math.isnan(fit.comparisons[2].diff)
    assert math.isfinite(fit.comparisons[1].half_width) and fit.comparisons[1].verdict == BETTER
    assert compare([60, 61], [0, 0], [0, 1]).comparisons == ()  # a single level: nothing to compare
    empty = compare([nan, nan, nan], [0, 1, 1], [0, 0, 1])  # no test accuracy at all: 2 levels, no values
    assert math.isnan(empty.sigma) and empty.comparisons[0].verdict == INCONCLUSIVE
    assert empty.comparisons[0].seeds_needed is None
    tie = compare([60.0] * 6, [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])  # zero variance
    assert tie.sigma == 0 and tie.comparisons[0].verdict == EQUIVALENT
    exact = compare([60, 61, 65, 66], [0, 0, 1, 1], [0, 1, 0, 1])  # no residual, a clear step
    assert exact.comparisons[0].verdict == BETTER and exact.comparisons[0].half_width == 0
    uneven = compare([60, 61, 62, 63, 61.2, 65, nan], [0, 0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 2, 1, 2])
    assert uneven.blocked and all(math.isfinite(c.diff) for c in uneven.comparisons)
    apart = compare([60, 61, 63, 64], [0, 0, 1, 1], [0, 1, 2, 3])  # no seed shared: no blocks
    assert not apart.blocked and apart.comparisons[0].verdict in (BETTER, INCONCLUSIVE)
    assert not compare([60, 61, 63, 64], [0, 0, 1, 1], [0, nan, 0, 1]).blocked  # a seed not recorded


def test_look_alphas_spend_five_percent_over_the_planned_looks() -> None:
    alphas = [look_alpha(n) for n in LOOKS]
    assert sum(alphas) == pytest.approx(ALPHA) and all(a > 0 for a in alphas)
    assert [next_look(n) for n in (3, 4, 5, 10, 20)] == [5, 5, 10, 20, None]
    with pytest.raises(ConfigError, match="not a planned look"):
        look_alpha(7)
    with pytest.raises(ConfigError, match="--equivalence"):
        check(0.05, -1)
    with pytest.raises(ConfigError, match="alpha"):
        check(1.5, 0.5)


def test_effects_tables_survive_missing_runs_and_metrics() -> None:
    """Through the DataFrame layer: a level with one run, a level whose runs all diverged, no test accuracy."""
    rng = np.random.default_rng(5)
    records = []
    for act, seeds in (("relu", range(3)), ("gelu", range(1)), ("tanh", range(2))):
        for s in seeds:
            state = "diverged" if act == "tanh" else "finished"
            val = None if state == "diverged" else 60 + rng.normal(0, SIGMA)
            records.append(
                {
                    "id": f"{act}-{s}",
                    "sweep_id": "e",
                    "state": state,
                    "config": full_config({"activation": act, "pooling": "max", "seed": s}),
                    "summary": {"best/val_acc": val},
                    "history": [],
                }
            )
    results = from_records(records, {"e": {"name": "e", "backend": "local", "config": SWEEP}})
    table = effects(results, "e").set_index("level")
    assert table.loc["relu", "verdict"] == "baseline" and table.loc["gelu", "n"] == 1
    assert table.loc["gelu", "verdict"] in (INCONCLUSIVE, EQUIVALENT, BETTER, WORSE)
    assert table.loc["tanh", "verdict"] == INCONCLUSIVE and table.loc["tanh", "n"] == 0
    assert set(table["verdict_test"]) == {"baseline", INCONCLUSIVE}
    shown = format_effects(effects(results, "e"))
    assert list(shown["verdict (val)"])[0] == "baseline" and "seeds needed (val)" in shown
    models = model_summary(effects(results, "e")).set_index("factor")["model"]
    assert models["activation"] == "level"  # relu and gelu share seed 0, but a block would leave no residual df
