"""Runs from any source (local store, W&B API, exported bundle) in one shape: a runs table and a history table."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ablation.config import FIELD_TYPES, RunConfig
from ablation.errors import ConfigError, LenetError

BUNDLE_FORMAT = "lenet-results/1"
COUNTED = ("finished", "stopped_early")
# Summary metrics the tables read; a sweep whose runs have none yet still gets these columns (as NaN).
METRICS = (
    "best/val_acc",
    "best/val_loss",
    "best/train_acc",
    "best/train_loss",
    "test/acc",
    "test/loss",
    "gap/train_val_acc",
    "epochs_to/val_acc_50",
    "epochs_to/val_acc_60",
    "epochs_to/val_acc_70",
    "dataset",
)  # states whose metrics enter means; the rest are counted and shown


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
    """Every RunConfig field for a run's sweep parameters (its preset filled in)."""
    try:
        return RunConfig.from_dict({k: v for k, v in params.items() if k in FIELD_TYPES}).to_dict()
    except ConfigError:
        return dict(params)


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def from_records(records: list[dict[str, Any]], sweeps: dict[str, dict[str, Any]]) -> Results:
    """Results from bundle-shaped run records (id, sweep_id, state, error, attempts, config, summary, history)."""
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
    """A local sweep's runs from the SQLite store."""
    sweep = store.sweep(sweep_id)
    records = [
        {
            "id": r["id"],
            "sweep_id": sweep_id,
            "state": r["state"],
            "error": r["error"],
            "attempts": r["attempts"],
            "params": r["params"],
            "config": full_config(r["params"]),
            "summary": r["summary"],
            "history": store.history(r["id"]),
        }
        for r in store.runs(sweep_id)
    ]
    return from_records(records, {sweep_id: _sweep_meta(sweep)})


def _sweep_meta(sweep: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": sweep.get("name") or sweep["config"].get("name") or sweep["id"],
        "backend": sweep["backend"],
        "config": sweep["config"],
    }


def from_wandb(path: str) -> Results:
    """A W&B sweep's runs through the public API (`entity/project/sweep_id`)."""
    import wandb

    try:
        sweep = wandb.Api().sweep(path)
    except Exception as exc:
        raise ResultsError(
            f"cannot read W&B sweep {path} ({type(exc).__name__}); check the path and `wandb login`"
        ) from None
    records = []
    for run in sweep.runs:
        config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        records.append(
            {
                "id": run.id,
                "sweep_id": sweep.id,
                "state": run.summary.get("state", run.state),
                "params": config,
                "config": full_config(config),
                "summary": dict(run.summary._json_dict),
                "history": [dict(h) for h in run.scan_history()],
            }
        )
    meta = {"name": sweep.config.get("name") or sweep.id, "backend": "wandb", "config": dict(sweep.config)}
    return from_records(records, {sweep.id: meta})


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
    """Write `to_bundle` as JSON (NaN/inf stored as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_bundle(results), indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return _clean(value.item())
    raise TypeError(f"cannot store {type(value).__name__} in a bundle")


def read_bundle(path: Path) -> Results:
    """Read a bundle written by `lenet sweep export`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ResultsError(
            f"bundle {path} does not exist; give a sweep id or a file from `lenet sweep export`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"bundle {path} is not valid JSON ({exc}); export it again") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise ResultsError(
            f"{path} is not a lenet results bundle (format {BUNDLE_FORMAT}); export it with `lenet sweep export`"
        )
    return from_records(data["runs"], data["sweeps"])


def merge(parts: list[Results]) -> Results:
    """Several sources as one (studies run on different machines or sessions); a run id seen twice is kept once."""
    runs = pd.concat([p.runs for p in parts], ignore_index=True).drop_duplicates("run_id", keep="last")
    history = pd.concat([p.history for p in parts], ignore_index=True).drop_duplicates(["run_id", "epoch"], keep="last")
    sweeps = {k: v for p in parts for k, v in p.sweeps.items()}
    return Results(runs.reset_index(drop=True), history.reset_index(drop=True), sweeps)
