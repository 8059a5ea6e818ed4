"""Runs from any source (local store, W&B API, exported bundle) in one shape: a runs table and a history table."""

from __future__ import annotations

import json
import math
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ablation.config import FIELD_TYPES, RunConfig
from ablation.errors import ConfigError, LenetError, missing_or_wrong
from ablation.metrics import (
    BEST_TRAIN_ACC,
    BEST_TRAIN_LOSS,
    BEST_VAL_ACC,
    BEST_VAL_LOSS,
    GAP_TRAIN_VAL,
    TEST_ACC,
    TEST_LOSS,
    THRESHOLDS,
    epochs_to,
)
from ablation.paths import write_text
from ablation.sweep import grid_size

BUNDLE_FORMAT = "lenet-results/1"
# Summary metrics the tables read; a sweep whose runs have none yet still gets these columns (as NaN).
METRICS = (
    BEST_VAL_ACC,
    BEST_VAL_LOSS,
    BEST_TRAIN_ACC,
    BEST_TRAIN_LOSS,
    TEST_ACC,
    TEST_LOSS,
    GAP_TRAIN_VAL,
    *(epochs_to(t) for t in THRESHOLDS),
    "dataset",
)


class ResultsError(LenetError):
    """A results bundle or source that cannot be read."""


@dataclass
class Results:
    """One row per run (ids, state, every RunConfig field, summary metrics) plus per-epoch histories."""

    runs: pd.DataFrame
    history: pd.DataFrame  # run_id, epoch, metric columns
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> name, backend, config (the YAML)

    def for_sweep(self, sweep_id: str) -> Results:
        """Only one sweep's runs."""
        runs = self.runs[self.runs["sweep_id"] == sweep_id]
        return Results(
            runs, self.history[self.history["run_id"].isin(runs["run_id"])], {sweep_id: self.sweeps[sweep_id]}
        )


def full_config(params: dict[str, Any]) -> dict[str, Any]:
    """Every RunConfig field for a run's sweep parameters (its preset filled in, as the presets are today)."""
    try:
        return RunConfig.from_dict({k: v for k, v in params.items() if k in FIELD_TYPES}).to_dict()
    except ConfigError:
        return dict(params)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# What every run record holds, with the type each entry must have (summary and history are optional).
RECORD_KEYS: dict[str, type] = {"id": str, "sweep_id": str, "state": str, "config": dict}


def records_problem(records: Any, sweeps: Any) -> str | None:
    """What is missing or malformed in run records and sweep descriptions, or None."""
    if not isinstance(sweeps, dict):
        return "'sweeps' is not a mapping of sweep id to name, backend and config"
    for sweep_id, meta in sweeps.items():
        if not isinstance(meta, dict) or not all(k in meta for k in ("name", "backend", "config")):
            return f"sweep {sweep_id!r} lacks its name, backend or config"
        params = meta["config"].get("parameters") if isinstance(meta["config"], dict) else None
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            return f"sweep {sweep_id!r} has no sweep config with parameters"
    if not isinstance(records, list):
        return "'runs' is missing or not a list of run records"
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            return f"run {i} is not a mapping (it is {type(record).__name__} {record!r:.40})"
        name = record.get("id", i)
        problem = missing_or_wrong(record, RECORD_KEYS)
        if problem:
            return f"run {name!r}: {problem}"
        if not isinstance(record.get("summary") or {}, dict):
            return f"run {name!r}: 'summary' is not a mapping"
        history = record.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            return f"run {name!r}: 'history' is not a list of per-epoch mappings"
        if record["sweep_id"] not in sweeps:
            return f"run {name!r} belongs to sweep {record['sweep_id']!r}, which 'sweeps' does not describe"
    return None


def from_records(records: list[dict[str, Any]], sweeps: dict[str, dict[str, Any]]) -> Results:
    """Results from bundle-shaped run records (id, sweep_id, state, error, attempts, config, summary, history)."""
    problem = records_problem(records, sweeps)
    if problem:
        raise ResultsError(f"malformed results: {problem}")
    return _from_checked_records(records, sweeps)


def _from_checked_records(records: list[dict[str, Any]], sweeps: dict[str, dict[str, Any]]) -> Results:
    rows, history = [], []
    for r in records:
        # The summary's own state/params/seed-like keys would shadow the run's columns.
        summary = {k: v for k, v in (r.get("summary") or {}).items() if k != "state" and k not in r["config"]}
        rows.append(
            {
                "run_id": r["id"],
                "sweep_id": r["sweep_id"],
                "state": r["state"],
                "error": r.get("error"),
                "attempts": r.get("attempts", 1),
                **r["config"],
                **summary,
            }
        )
        history += [{"run_id": r["id"], **h} for h in r.get("history", [])]
    runs = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run_id", "sweep_id", "state", *FIELD_TYPES])
    runs = runs.reindex(columns=[*runs.columns, *(m for m in METRICS if m not in runs.columns)])
    hist = pd.DataFrame(history) if history else pd.DataFrame(columns=["run_id", "epoch"])
    return Results(runs, hist, sweeps)


def from_store(store: Any, sweep_id: str) -> Results:
    """A local sweep's runs from the SQLite store, each with the full config stored when it was claimed (rebuilt
    from today's presets only for runs claimed before the store kept configs, or not claimed yet)."""
    sweep = store.sweep(sweep_id)
    records = [
        {
            "id": r["id"],
            "sweep_id": sweep_id,
            "state": r["state"],
            "error": r["error"],
            "attempts": r["attempts"],
            "params": r["params"],
            "config": r.get("config") or full_config(r["params"]),
            "summary": r["summary"],
            "history": store.history(r["id"]),
        }
        for r in store.runs(sweep_id)
    ]
    looks = store.looks(sweep_id)  # `sweep extend`'s looks: the alpha the tables are judged at
    return from_records(records, {sweep_id: {**_sweep_meta(sweep), **({"looks": looks} if looks else {})}})


def _sweep_meta(sweep: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": sweep.get("name") or sweep["config"].get("name") or sweep["id"],
        "backend": sweep["backend"],
        "config": sweep["config"],
    }


# `sweep extend` cannot add runs to a W&B sweep (immutable), so it writes a follow-up grid sweep whose description
# says which sweep and look it extends (W&B's schema admits no other key for it); `merge` then analyses the
# follow-up's runs as that sweep's, in the same tables.
FOLLOW_UP = re.compile(
    r"extends sweep (?P<sweep>[\w-]+): look (?P<look>\d+) at (?P<seeds>\d+) seeds per level, "
    r"alpha (?P<alpha>[0-9.e-]+), open comparisons to (?P<target>\d+) seeds"
)


def follow_up_note(sweep_id: str, look: int, seeds: int, alpha: float, target: int) -> str:
    """The description marker of a follow-up sweep (FOLLOW_UP reads it back)."""
    return (
        f"extends sweep {sweep_id}: look {look} at {seeds} seeds per level, alpha {alpha:.6f}, "
        f"open comparisons to {target} seeds"
    )


def follow_up_of(sweep_config: dict[str, Any]) -> dict[str, Any] | None:
    """What a follow-up sweep extends (sweep id, and the look that wrote it), or None for any other sweep."""
    found = FOLLOW_UP.search(str(sweep_config.get("description") or ""))
    if found is None:
        return None
    number = {k: int(found[k]) for k in ("look", "seeds", "target")}
    return {"sweep": found["sweep"], **number, "alpha": float(found["alpha"])}


WANDB_PAGE = 200  # runs per API page; histories are read one page per run (a run logs one row per epoch)


def from_wandb(path: str) -> Results:
    """A W&B sweep's runs through the public API (`entity/project/sweep_id`, or `project/sweep_id` for the
    default entity): the runs in bulk (one query per page), then each run's full history."""
    import wandb

    from ablation.tracking import one_line, wandb_logged_in

    if not wandb_logged_in():  # else wandb.Api() may stop to prompt for a key
        raise ResultsError(f"reading W&B sweep {path} needs a W&B login; run `wandb login` (or set WANDB_API_KEY)")
    try:
        api = wandb.Api()
        sweep = api.sweep(path)
        runs = list(
            api.runs(f"{sweep.entity}/{sweep.project}", filters={"sweep": sweep.id}, per_page=WANDB_PAGE, lazy=False)
        )
        records = [_wandb_record(run, sweep.id) for run in runs]
    except LenetError:
        raise
    except Exception as exc:  # wandb raises many types (CommError, UsageError, ValueError, timeouts)
        raise ResultsError(
            f"cannot read W&B sweep {path} ({type(exc).__name__}: {one_line(exc)}); "
            "check the path (entity/project/sweep_id) and `wandb login`"
        ) from None
    config = dict(sweep.config)
    meta = {"name": config.get("name") or sweep.id, "backend": "wandb", "config": config}
    return from_records(records, {sweep.id: meta})


def _wandb_record(run: Any, sweep_id: str) -> dict[str, Any]:
    """One W&B run as a bundle-shaped record (W&B's own `_` keys dropped; `{max: x}` summaries flattened)."""
    config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
    summary = flat_summary({k: v for k, v in dict(run.summary_metrics).items() if not k.startswith("_")})
    history = [{k: v for k, v in row.items() if not k.startswith("_")} for row in run.scan_history(page_size=1000)]
    return {
        "id": run.id,
        "sweep_id": sweep_id,
        "state": summary.get("state") or run.state,  # ours (finished, stopped, diverged...) else W&B's (crashed...)
        "params": config,
        "config": full_config(config),
        "summary": summary,
        "history": history,
    }


def flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A W&B summary as flat columns: `{"val/acc": {"max": 61.2}}` (a define_metric summary) -> `val/acc.max`."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        else:
            out[key] = value
    return out


def to_bundle(results: Results) -> dict[str, Any]:
    """A self-contained, JSON-ready results bundle (configs, summaries, histories, dataset names, versions)."""
    from importlib.metadata import version

    import torch

    records = []
    for run in results.runs.to_dict("records"):
        config = {k: run[k] for k in FIELD_TYPES if k in run}
        summary = {
            k: _clean(v)
            for k, v in run.items()
            if k not in config and k not in ("run_id", "sweep_id", "state", "error", "attempts")
        }
        hist = results.history[results.history["run_id"] == run["run_id"]].drop(columns=["run_id"])
        records.append(
            {
                "id": run["run_id"],
                "sweep_id": run["sweep_id"],
                "state": run["state"],
                "error": _clean(run.get("error")),
                "attempts": _clean(run.get("attempts")),
                "config": config,
                "summary": summary,
                "history": [{k: _clean(v) for k, v in h.items() if not _missing(v)} for h in hist.to_dict("records")],
            }
        )
    datasets = sorted({str(d) for d in results.runs.get("dataset", pd.Series(dtype=str)).dropna()})
    return {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "datasets": datasets,
        "versions": {"lenet": version("lenet"), "torch": str(torch.__version__), "python": platform.python_version()},
        "sweeps": results.sweeps,
        "runs": records,
    }


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_bundle(results: Results, path: Path) -> None:
    """Write `to_bundle` as JSON (NaN/inf stored as null), atomically."""
    text = json.dumps(to_bundle(results), indent=1, default=_json_default)
    write_text(path, text, "results bundle", "give a writable file path, e.g. results/sweep.json")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return _clean(value.item())
    raise TypeError(f"cannot store {type(value).__name__} in a bundle")


def read_bundle(path: Path) -> Results:
    """Read a bundle written by `lenet sweep export`; a missing, malformed or foreign file is one ResultsError."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ResultsError(
            f"bundle {path} does not exist; give a sweep id or a file from `lenet sweep export`"
        ) from None
    except IsADirectoryError:
        raise ResultsError(f"bundle {path} is a folder; give a .json file from `lenet sweep export`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"bundle {path} is not valid JSON ({exc}); export it again") from None
    except OSError as exc:
        raise ResultsError(
            f"cannot read bundle {path} ({exc.strerror or type(exc).__name__}); check the path"
        ) from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ResultsError(
            f"{path} is not a lenet results bundle (format {BUNDLE_FORMAT}); export it with `lenet sweep export`"
        )
    problem = records_problem(data.get("runs"), data.get("sweeps"))
    if problem:
        raise ResultsError(f"bundle {path} is malformed ({problem}); export it again with `lenet sweep export`")
    return _from_checked_records(data["runs"], data["sweeps"])  # checked just above: once per bundle


def merge(parts: list[Results]) -> Results:
    """Several sources as one (studies run on different machines or sessions); a run id seen twice is kept once.
    A follow-up sweep from `sweep extend` joins the sweep it extends, when that one is among the sources."""
    runs = pd.concat([p.runs for p in parts], ignore_index=True).drop_duplicates("run_id", keep="last")
    history = pd.concat([p.history for p in parts], ignore_index=True).drop_duplicates(["run_id", "epoch"], keep="last")
    sweeps = {k: v for p in parts for k, v in p.sweeps.items()}
    for follow_up, meta in list(sweeps.items()):
        of = follow_up_of(meta["config"])
        if of is None or of["sweep"] == follow_up or of["sweep"] not in sweeps:
            continue
        runs.loc[runs["sweep_id"] == follow_up, "sweep_id"] = of["sweep"]  # the same tables as the original's
        base = dict(sweeps[of["sweep"]])
        look = {**of, "runs_added": grid_size(meta["config"]), "follow_up": follow_up, "outcome": "extended"}
        taken = {int(t["look"]): t for t in [*base.get("looks", []), look]}
        base["looks"] = [taken[k] for k in sorted(taken)]
        base["follow_ups"] = [*base.get("follow_ups", []), follow_up]
        sweeps[of["sweep"]] = base
        del sweeps[follow_up]
    return Results(runs.reset_index(drop=True), history.reset_index(drop=True), sweeps)
