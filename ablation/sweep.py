"""Sweep files (W&B's YAML, unchanged): loading, validation against W&B's schema and RunConfig, and a
small adapter over W&B's open-source `sweeps` engine (next run, hyperband stops) that hides its defects."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation.config import FIELD_TYPES, RunConfig, coerce, read_yaml
from ablation.errors import ConfigError, SweepError
from ablation.metrics import EPOCH_METRICS, OBJECTIVE, SUMMARY_METRICS
from ablation.states import DIVERGED, STOPPED, STOPPED_EARLY

GRID_TYPES = ("categorical", "constant", "int_uniform", "q_uniform")
# Larger listed grids are checked value by value only: each point builds one RunConfig (~60 us on a busy 2-core CPU).
MAX_CHECKED_POINTS = 10_000


def load_sweep_file(path: Path, settings: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a sweep YAML file, fix `settings` (name -> value from the command line) for every run, and validate it;
    every problem is reported, nothing is created."""
    config = read_yaml(path, "sweep file", SweepError)
    if not isinstance(config, dict):
        raise SweepError(f"sweep file {path} must be a mapping with method, metric and parameters")
    if settings:
        config = with_settings(config, settings)
    validate_sweep(config)
    question = config.get("description", leading_comment(Path(path).read_text()))
    if settings:  # the file's question may name a value the command line replaced (its teacher, say): reports say so
        fixed = " ".join(f"{name}={config['parameters'][name]['value']}" for name in settings)
        note = f"(Created with {fixed}, replacing the file's values.)"
        question = question if question.endswith(note) else f"{question} {note}".strip()
    return {**config, "description": question} if question else config


def with_settings(config: dict[str, Any], settings: dict[str, str]) -> dict[str, Any]:
    """The sweep with each setting fixed to one value for every run (e.g. a teacher's path, which differs per
    machine, so the committed file cannot name it): `parameters.NAME = {value: VALUE}`."""
    for name in settings:
        if name not in FIELD_TYPES:
            raise ConfigError(_unknown(name))
    fixed = {name: {"value": coerce(name, value)} for name, value in settings.items()}
    params = config.get("parameters")
    if not isinstance(params, dict):
        return config  # a misshapen file: validate_sweep names its problem, which a fixed setting must not hide
    merged = {**params, **fixed}
    # A bad value typed on the command line is a usage error (ConfigError), not a problem of the file (SweepError).
    beside = fixed_values(merged)
    for name, spec in fixed.items():
        problems = _value_problems(name, spec, None, beside)
        if problems:
            raise ConfigError(problems[0])
    return {**config, "parameters": merged}


def fixed_values(params: dict[str, Any]) -> dict[str, Any]:
    """The settings a sweep fixes to one value for every run (`{value: x}` specs): a value valid only beside them
    (preset=best_teacher needs a teacher) is valid."""
    return {
        n: spec["value"]
        for n, spec in params.items()
        if n in FIELD_TYPES and isinstance(spec, dict) and "value" in spec
    }


def missing_teachers(config: dict[str, Any]) -> list[str]:
    """The sweep's teacher checkpoints that are not files here (every run naming one would fail at its start)."""
    spec = config["parameters"].get("teacher", {})
    names = spec.get("values", [spec["value"]] if "value" in spec else [])
    return [str(name) for name in names if name and not Path(str(name)).is_file()]


def leading_comment(text: str) -> str:
    """The comment block a sweep file starts with (the question it answers), as one line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def validate_sweep(config: dict[str, Any]) -> None:
    """Check a sweep config with W&B's own schema and against RunConfig; raise one SweepError listing all problems."""
    # Our checks first: their messages name the fix; W&B's schema then checks the rest.
    problems = shape_problems(config) or parameter_problems(config) or schema_problems(config)
    if problems:
        raise SweepError("invalid sweep: " + "; ".join(problems))


def shape_problems(config: dict[str, Any]) -> list[str]:
    """Parameters, specs, `values` and `metric` of the wrong kind (a list where a mapping belongs, ...)."""
    params = config.get("parameters")
    if params is None:
        return ["parameters is missing; give a mapping of setting name to a spec, e.g. lr: {values: [0.01, 0.1]}"]
    if not isinstance(params, dict) or not params:
        return [
            f"parameters must be a non-empty mapping of setting name to a spec, e.g. lr: {{values: [0.01, 0.1]}} "
            f"(got {type(params).__name__} {params!r:.40})"
        ]
    problems = []
    for name, spec in params.items():
        if not isinstance(name, str):
            problems.append(f"parameter name {name!r} is not a setting name; use names like lr (see `lenet params`)")
        elif not isinstance(spec, dict):
            problems.append(f"parameter {name!r} must be a mapping such as {{values: [...]}} or {{value: x}}")
        elif "values" in spec and not isinstance(spec["values"], list):
            problems.append(f"parameter {name!r}: values must be a list, e.g. values: [{spec['values']!r}]")
    metric = config.get("metric")
    if metric is not None and not isinstance(metric, dict):
        problems.append(f"metric must be a mapping such as {{name: val/acc, goal: maximize}}, not {metric!r}")
    return problems


def schema_problems(config: dict[str, Any]) -> list[str]:
    """W&B's JSON-schema violations (from the `sweeps` package), plus the methods we run."""
    sweeps = engine()
    where = {e.message: ".".join(map(str, e.absolute_path)) for e in sweeps.config.schema.validator.iter_errors(config)}
    try:
        problems = [
            f"{where[m]}: {m}" if where.get(m) else m for m in sweeps.schema_violations_from_proposed_config(config)
        ]
    except ValueError as exc:
        problems = [str(exc)]
    if config.get("method") not in ("grid", "random", "bayes"):
        problems.append(f"method {config.get('method')!r} is not supported; use grid, random or bayes")
    return [" ".join(p.split()) for p in problems]


def parameter_problems(config: dict[str, Any]) -> list[str]:
    """Unknown or nested parameters, invalid values, empty grids, and a metric we never log."""
    problems = []
    params = config["parameters"]
    fixed = fixed_values(params)
    for name, spec in params.items():
        if "parameters" in spec:
            problems.append(f"parameter {name!r} is nested; W&B's grid search drops nested values, use flat names")
        elif name not in FIELD_TYPES:
            problems.append(_unknown(name))
        else:
            problems += _value_problems(name, spec, config.get("method"), fixed)
    if not problems:
        problems += combination_problems(params)
    metric = (config.get("metric") or {}).get("name")
    if metric is not None and metric not in EPOCH_METRICS + SUMMARY_METRICS:
        problems.append(f"metric {metric!r} is never logged; use one of {', '.join(EPOCH_METRICS + SUMMARY_METRICS)}")
    if config.get("early_terminate") and metric not in EPOCH_METRICS:
        problems.append(f"early_terminate needs a per-epoch metric ({', '.join(EPOCH_METRICS)})")
    return problems


def combination_problems(params: dict[str, Any]) -> list[str]:
    """Values valid one by one that break a rule together (schedule=onecycle beside warmup_epochs=1): every run at
    such a point would fail at its start, so the sweep is refused before any run is made."""
    if not all("values" in spec or "value" in spec for spec in params.values()):
        return []  # a continuous range has no list of points
    names = list(params)
    lists = [grid_values(params[name]) for name in names]
    total = math.prod(len(values) for values in lists)
    if total > MAX_CHECKED_POINTS:
        return []
    broken: dict[str, list[str]] = {}
    for point in itertools.product(*lists):
        try:
            RunConfig.from_dict(dict(zip(names, point)))
        except ConfigError as exc:
            swept = " ".join(f"{n}={v}" for n, v, values in zip(names, point, lists) if len(values) > 1)
            broken.setdefault(str(exc), []).append(swept)
    return [
        f"{len(points)} of {total} parameter combinations fail ({', '.join(points[:2])}{', ...' * (len(points) > 2)}): "
        f"{rule}; drop these values or give the combinations as separate sweeps"
        for rule, points in broken.items()
    ]


def _unknown(name: str) -> str:
    try:
        RunConfig.from_dict({name: None})
    except ConfigError as exc:
        return f"unknown parameter {str(exc).removeprefix('unknown run setting ')}"
    return f"unknown parameter {name!r}"


def _value_problems(name: str, spec: dict[str, Any], method: str | None, fixed: dict[str, Any]) -> list[str]:
    # W&B's log_uniform, q_log_uniform and inv_log_uniform take min/max as natural-log exponents, not values.
    exponents = spec.get("distribution") in ("log_uniform", "q_log_uniform", "inv_log_uniform")
    bounds = () if exponents else ("min", "max")
    values = spec["values"] if "values" in spec else [spec[k] for k in ("value", *bounds) if k in spec]
    if "values" in spec and not spec["values"]:
        return [f"parameter {name!r} has an empty values list; give at least one value"]
    if method == "grid" and not ("values" in spec or "value" in spec or spec.get("distribution") in GRID_TYPES):
        return [f"parameter {name!r} is a continuous range, which grid search cannot enumerate; give values"]
    problems = []
    for value in values:
        try:
            RunConfig.from_dict({name: value})
        except ConfigError as exc:
            try:
                RunConfig.from_dict({**fixed, name: value})
            except ConfigError:
                problems.append(f"parameter {name!r}: {exc}")
    return problems


def grid_size(config: dict[str, Any]) -> int | None:
    """Number of runs a grid sweep makes (None for random/bayes, which run until stopped or capped)."""
    if config["method"] != "grid":
        return None
    size = 1
    for spec in config["parameters"].values():
        size *= len(grid_values(spec))
    return size if not config.get("run_cap") else min(size, int(config["run_cap"]))


def grid_values(spec: dict[str, Any]) -> list[Any]:
    """The values a grid visits for one parameter spec (as W&B's grid search enumerates them)."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    if spec.get("distribution") == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    count = math.ceil((spec["max"] - spec["min"]) / spec["q"])  # q_uniform: arange(min, max, q)
    return [spec["min"] + i * spec["q"] for i in range(count)]


def plain(value: Any) -> Any:
    """numpy scalars (which the `sweeps` package leaks into configs) -> Python values."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def sweep_run(
    name: str, state: str, params: dict[str, Any], history: Iterable[dict[str, Any]], summary: dict[str, Any] | None
) -> Any:
    """A `sweeps.SweepRun` from our records, with its fields set by their Python names (not aliases)."""
    # The engine knows W&B's run states (sweeps.RunState): ours map onto its `failed` and `finished`.
    engine_state = {DIVERGED: "failed", STOPPED: "finished", STOPPED_EARLY: "finished"}.get(state, state)
    with quiet():
        run = engine().SweepRun(name=name, state=engine_state, config={k: {"value": v} for k, v in params.items()})
    run.history = [dict(h) for h in history]
    run.summary_metrics = dict(summary or {})
    return run


def confirm_sweep(config: dict[str, Any], run: dict[str, Any], epochs: int, seeds: int) -> dict[str, Any]:
    """A grid sweep retraining one run (its values of `config`'s parameters) over `seeds` seeds for `epochs` epochs."""
    fixed = {k: plain(run.get(k)) for k in config["parameters"] if k not in ("seed", "epochs")}
    unknown = [k for k, v in fixed.items() if v is None or isinstance(v, (dict, list)) or v != v]  # v != v: NaN
    if unknown:
        raise SweepError(
            f"cannot confirm: the best run has no single value for {', '.join(unknown)} "
            f"(not a lenet setting?); write the confirmation sweep by hand"
        )
    return {
        "name": f"{config.get('name') or 'sweep'}_confirm",
        "method": "grid",
        "metric": config.get("metric") or dict(OBJECTIVE),
        "parameters": {
            **{k: {"value": v} for k, v in fixed.items()},
            "epochs": {"value": epochs},
            "seed": {"values": list(range(seeds))},
        },
        "command": config.get("command") or ["lenet", "train", "${args_no_hyphens}"],
    }


def follow_up_sweep(
    config: dict[str, Any], points: list[dict[str, Any]], name: str, description: str
) -> tuple[dict[str, Any], int]:
    """A grid sweep holding `points` (parameter sets of `config`'s grid), and how many runs it makes beyond them.
    W&B grids are cartesian, so each parameter gets the union of the points' values (in `config`'s order): the
    exact points when they form a full grid, else a superset, whose extra runs are points of the original grid."""
    parameters: dict[str, Any] = {}
    for key, spec in config["parameters"].items():
        if key != "seed":
            values = [v for v in grid_values(spec) if repr(v) in {repr(p.get(key)) for p in points}]
            parameters[key] = {"values": values} if len(values) > 1 else {"value": values[0]} if values else spec
    parameters["seed"] = {"values": sorted({p["seed"] for p in points})}
    follow_up = {
        "name": name,
        "description": description,
        "method": "grid",
        "metric": config.get("metric") or dict(OBJECTIVE),
        "parameters": parameters,
        "command": config.get("command") or ["lenet", "train", "${args_no_hyphens}"],
    }
    return follow_up, (grid_size(follow_up) or 0) - len(points)


def suggest(config: dict[str, Any], runs: list[Any], seed: int, count: int | None = None) -> dict[str, Any] | None:
    """The next run's parameters from W&B's search logic, or None when a grid is exhausted.

    Random and bayes draws are seeded from (sweep seed, runs so far: `count`, default len(runs)), so a sweep is
    reproducible; the process-wide RNG states are restored afterwards."""
    states = random.getstate(), _np_random().get_state()
    digest = hashlib.sha256(f"{seed}:{len(runs) if count is None else count}".encode()).digest()
    random.seed(digest)
    _np_random().seed(int.from_bytes(digest[:4], "little"))
    try:
        with quiet():
            suggestion = engine().next_run(config, runs)
    finally:
        random.setstate(states[0])
        _np_random().set_state(states[1])
    if suggestion is None:
        return None
    return {k: plain(v["value"]) for k, v in suggestion.config.items()}


def suggest_grid(config: dict[str, Any], runs: list[Any], n: int) -> list[dict[str, Any]]:
    """A grid's next `n` points (fewer when it ends), in the order W&B's grid search hands them out one by one."""
    with quiet():
        suggestions = engine().next_runs(config, runs, n=n)
    return [{k: plain(v["value"]) for k, v in s.config.items()} for s in suggestions if s is not None]


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: a metric value the `sweeps` engine counts (its run.is_number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def to_stop(config: dict[str, Any], runs: list[Any]) -> set[str]:
    """Names of running runs that hyperband early termination stops now (empty without early_terminate)."""
    if not config.get("early_terminate"):
        return set()
    with quiet():
        return {run.name for run in engine().stop_runs(config, runs)}


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the `sweeps` package's pydantic-v1 config warning (raised on import and on first use)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Valid config keys have changed in V2")
        yield


def engine() -> Any:
    """The `sweeps` package, imported quietly."""
    with quiet():
        import sweeps
    return sweeps


def _np_random() -> Any:
    import numpy as np

    return np.random


@dataclass(frozen=True)
class Hyperband:
    """Hyperband's rule for one sweep, with the defaults `sweeps` fills in: the bands (valid metric values at
    which runs are compared), the fraction kept (1/eta), strictness and the metric's direction."""

    bands: tuple[int, ...]
    keep: float
    strict: bool
    maximize: bool


def hyperband(config: dict[str, Any]) -> Hyperband:
    """The sweep's hyperband rule, computed as sweeps.hyperband_stopping computes it."""
    with quiet():
        from sweeps.hyperband_stopping import hyperband_baseline_validate_and_fill

        filled = hyperband_baseline_validate_and_fill(config)
    et, eta = filled["early_terminate"], filled["early_terminate"]["eta"]
    bands: list[int] = []
    if "max_iter" in et:
        band = et["max_iter"]
        for _ in range(et["s"]):
            band /= eta
            if band < 1:
                break
            bands.append(int(band))
        bands.sort()
    else:
        band = et["min_iter"]
        for _ in range(100):
            bands.append(int(band))
            band *= eta
    return Hyperband(tuple(bands), 1.0 / eta, et.get("strict") is True, filled["metric"]["goal"] == "maximize")


def closest_band(bands: tuple[int, ...], length: int) -> int | None:
    """The last band a run with `length` valid metric values has reached (None: none yet)."""
    closest = None
    for band in bands:  # ascending: the first band past `length` ends the search, as in sweeps
        if band > length:
            break
        closest = band
    return closest


def hyperband_stops(rule: Hyperband, values: list[float], band: int, threshold: float) -> bool:
    """Whether hyperband stops a running run (sweeps.stop_runs' rule): `values` are its valid metric values in
    order, `band` the last band it reached, `threshold` the band's cut-off in the metric's own scale (the value
    at rank int(keep * n), best first, among the n runs that reached the band)."""
    sign = -1.0 if rule.maximize else 1.0
    history = [sign * v for v in values]
    condition = history[band - 1] if rule.strict else min(history)
    return condition > sign * threshold
