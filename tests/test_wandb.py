"""W&B fidelity, offline: real W&B offline runs (read back from their .wandb files), real wandb-workspaces
reports (built and serialised, not saved: there is no server here), W&B's own sweep command builder."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
import wandb
import yaml
from conftest import TINY, lenet
from test_sweep import ROOT, write_smoke
from wandb.proto import wandb_internal_pb2
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from ablation.config import RunConfig
from ablation.errors import TrackingError
from ablation.states import COUNTED
from ablation.sweep import load_sweep_file, suggest
from ablation.tracking import wandb_logged_in
from ablation.train import load_checkpoint
from analysis.report import swept, wandb_report
from analysis.results import flat_summary, read_bundle
from cli import app, build_config

BUNDLES = sorted((ROOT / "docs" / "results").glob("*/*.json"))
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
FAKE_KEY = "0123456789" * 4  # W&B checks a key's shape (40+ characters) locally; nothing here asks the server


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: a 7-byte file header,
    then 32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type 1 full / 2 first / 3 mid / 4 last)."""
    (path,) = run_dir.glob("run-*.wandb")
    data, records, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def spec(report) -> dict:
    """The report as W&B would store it (wandb-workspaces' own model, serialised as for `save`)."""
    return json.loads(report._to_model().model_dump_json(by_alias=True, exclude_none=True))


def grids(report) -> list[dict]:
    return [b["metadata"] for b in spec(report)["spec"]["blocks"] if b.get("type") == "panel-grid"]


def panels(grid: dict) -> list[tuple[str, dict]]:
    return [(p["viewType"], p["config"]) for p in grid["panelBankSectionConfig"]["panels"]]


# --- item 9: W&B reports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.stem)
def test_every_committed_bundle_builds_and_serialises_a_wandb_report(path: Path) -> None:
    import wandb_workspaces.reports.v2 as wr

    results = read_bundle(path)
    report = wandb_report(results, "lenet-tests", "lenet")
    stored = spec(report)
    assert stored["project"] == {"name": "lenet", "entityName": "lenet-tests"}
    assert len(grids(report)) == len(results.sweeps)
    for grid, (sweep_id, meta) in zip(grids(report), results.sweeps.items()):
        (runset,) = grid["runSets"]
        assert "project" not in runset  # run sets show the report's entity/project
        by_sweep, by_state = runset["filters"]["filters"]
        assert by_sweep["value"] == sweep_id and by_sweep["key"]["name"] in ("group", "sweep")
        assert by_state == {**by_state, "key": {"section": "summary", "name": "state"}, "op": "IN"}
        assert by_state["value"] == list(COUNTED)  # the runs the tables average, no more
        (parallel,) = [c for kind, c in panels(grid) if kind == "Parallel Coordinates Plot"]
        accessors = [c["accessor"] for c in parallel["columns"]]
        assert accessors == [f"config:{k}.value" for k in swept(meta["config"])] + [
            "summary:best/val_acc",
            "summary:test/acc",
        ]
    assert len(wr.Report._from_model(report._to_model()).blocks) == len(report.blocks)  # W&B can read it back


def test_search_panels_use_the_searched_parameters() -> None:
    report = wandb_report(read_bundle(ROOT / "docs/results/search/search.json"), "lenet-tests", "lenet")
    (grid,) = grids(report)
    kinds = [kind for kind, _ in panels(grid)]
    no_means = ["Parallel Coordinates Plot", "Parameter Importance", "Run Comparer"]  # a search has no levels
    assert kinds == ["Run History Line Plot"] * 2 + no_means
    (parallel,) = [c for kind, c in panels(grid) if kind == "Parallel Coordinates Plot"]
    searched = [c["accessor"].split(":")[1].removesuffix(".value") for c in parallel["columns"][:-2]]
    assert searched == ["activation", "lr", "weight_decay", "label_smoothing", "dropout", "batch_size"]
    assert dict(panels(grid))["Parameter Importance"]["targetKey"] == "best/val_acc"


def test_two_factor_study_groups_curves_and_bars_by_each_factor() -> None:
    report = wandb_report(read_bundle(ROOT / "docs/results/init/init.json"), "lenet-tests", "lenet")
    (grid,) = grids(report)
    curves = [c for kind, c in panels(grid) if kind == "Run History Line Plot"]
    assert [(c["groupBy"], c["metrics"]) for c in curves] == [
        ("init.value", ["val/acc"]),
        ("init.value", ["val/loss"]),
        ("activation.value", ["val/acc"]),
        ("activation.value", ["val/loss"]),
    ]
    assert all(c["xAxis"] == "epoch" and (c["groupAgg"], c["groupArea"]) == ("mean", "stddev") for c in curves)
    bars = [c for kind, c in panels(grid) if kind == "Bar Chart"]
    assert [c["groupBy"] for c in bars] == ["init.value", "activation.value"]
    assert all(c["metrics"] == ["best/val_acc", "test/acc"] and c["groupArea"] == "stddev" for c in bars)


def test_one_recipe_over_seeds_gets_a_line_per_seed_and_mean_std_scalars() -> None:
    report = wandb_report(read_bundle(ROOT / "docs/results/confirm/long.json"), "lenet-tests", "lenet")
    (grid,) = grids(report)
    kinds = [kind for kind, _ in panels(grid)]
    assert kinds[:4] == ["Run History Line Plot"] * 2 + ["Scalar Chart"] * 2
    assert all("groupBy" not in c for kind, c in panels(grid) if kind == "Run History Line Plot")
    assert [c["metrics"] for kind, c in panels(grid) if kind == "Scalar Chart"] == [["best/val_acc"], ["test/acc"]]
    assert "wandb sync" in json.dumps(spec(report))  # local sweeps: the report says how its panels fill


@pytest.mark.parametrize("entity", [None, ""])
def test_without_an_entity_the_report_asks_wandb_never_uses_empty(entity: str | None) -> None:
    results = read_bundle(ROOT / "docs/results/confirm/long.json")
    with pytest.raises(TrackingError, match="wandb login") as error:  # not logged in: W&B cannot name a default
        wandb_report(results, entity, "lenet")
    assert "\n" not in str(error.value)


def test_report_wandb_without_login_fails_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = lenet("report", ROOT / "docs/results/confirm/long.json", "--wandb", "--out", out)
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "wandb login" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


# --- item 10: define_metric and the console log ------------------------------------------------------------------


def test_offline_train_declares_epoch_steps_and_best_summaries(folder_dir: Path, tmp_path: Path) -> None:
    settings = [f"{k}={v}" for k, v in {**TINY, "epochs": 2, "data_dir": folder_dir}.items()]
    command = [sys.executable, ROOT / "cli.py", "train", *settings, "--wandb", "offline", "--out", tmp_path / "r"]
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # a real process: W&B captures the console it really has
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    metrics = {m.name or m.glob_name: m for m in of_type(records, "metric")}
    assert metrics["epoch"].options.defined and metrics["*"].step_metric == "epoch"
    assert metrics["val/acc"].step_metric == "epoch" and metrics["val/acc"].summary.max
    assert metrics["val/loss"].step_metric == "epoch" and metrics["val/loss"].summary.min
    updates = {tuple(u.nested_key) or (u.key,): u.value_json for s in of_type(records, "summary") for u in s.update}
    assert set(json.loads(updates[("val/acc",)])) == {"max"}  # the summary is the best epoch's, not the last one
    console = "".join(o.line for o in of_type(records, "output_raw"))
    assert "epoch   2/2" in console  # console kept (console="wrap"): a crash's traceback would be here too
    assert "epoch   2/2" in (run_dir / "files" / "output.log").read_text()


def test_local_agent_runs_log_to_the_sweeps_project(folder_dir: Path, tmp_path: Path) -> None:
    created = lenet(
        "sweep", "create", write_smoke(tmp_path, folder_dir, epochs=1), "--backend", "local", "--project", "ablations"
    )
    assert created.exit_code == 0, created.output
    sweep_id = created.output.split("created sweep ")[1].split()[0]
    result = lenet("agent", sweep_id, "--count", "1", "--wandb", "offline")
    assert result.exit_code == 0, result.output
    wandb.teardown()  # W&B's service writes the log behind run.finish(); stopping it, as process exit does, flushes
    offline = list((tmp_path / "home" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, result.output
    run_dir = offline[0]
    records = wandb_records(run_dir)
    runs = of_type(records, "run")
    assert len(runs) == 1, [r.WhichOneof("record_type") for r in records]
    assert (runs[0].project, runs[0].run_group) == ("ablations", sweep_id)
    assert {m.name for m in of_type(records, "metric")} >= {"epoch", "val/acc", "val/loss"}
    assert not of_type(records, "output_raw")  # a worker's console is not the run's (console="off")


# --- item 11: --key=value, as W&B's ${args} emits it --------------------------------------------------------------


def first_params(path: Path) -> dict:
    """The first parameter set W&B's own search logic draws from a sweep file."""
    return suggest(load_sweep_file(path), [], seed=0)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_wandb_command_forms_parse_to_the_sweeps_config(path: Path) -> None:
    params = first_params(path)
    forms = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    train = typer.main.get_command(app).commands["train"]
    for form in ("args", "args_no_hyphens"):  # --lr=0.1 and lr=0.1
        words = forms[form]
        overrides = train.make_context("train", list(words)).params["overrides"]  # Click's own parsing
        assert build_config(list(overrides), None) == RunConfig.from_dict(params), (form, words)


def test_train_runs_with_dashed_settings(folder_dir: Path, tmp_path: Path) -> None:
    command = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())["command"]
    assert command[:2] == ["lenet", "train"]
    params = {**first_params(ROOT / "sweeps" / "smoke.yaml"), **TINY, "lr": 0.05, "data_dir": str(folder_dir)}
    words = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]
    assert "--lr=0.05" in words
    result = lenet("train", *words, "--wandb", "disabled", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run_dir / "best.pt")["config"] == RunConfig.from_dict(params).to_dict()


def test_a_dashed_setting_without_value_is_one_usage_line() -> None:
    result = lenet("train", "--lr", "0.1", "--wandb", "disabled")
    assert result.exit_code == 2
    assert "cannot read '--lr'" in result.output and len(result.output.strip().splitlines()) == 1


# --- item 12: login detection, reading W&B, --version -------------------------------------------------------------


@pytest.mark.parametrize("source", ["env", "netrc", "none"])
def test_login_is_detected_as_wandb_does_it(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    if source == "env":
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    if source == "netrc":
        (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    start = time.perf_counter()
    assert wandb_logged_in() == (source != "none")
    assert time.perf_counter() - start < 5  # no prompt, no server round trip


def test_a_malformed_key_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "short")
    with pytest.raises(TrackingError, match="wandb login --relogin"):
        wandb_logged_in()


def test_reading_a_wandb_sweep_without_login_is_one_line(tmp_path: Path) -> None:
    result = lenet("report", "someone/lenet/abcd1234", "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert "needs a W&B login" in result.output and len(result.output.strip().splitlines()) == 1


def test_wandb_summaries_become_flat_columns() -> None:
    summary = {"val/acc": {"max": 61.5}, "best/val_acc": 61.5, "state": "finished"}
    assert flat_summary(summary) == {"val/acc.max": 61.5, "best/val_acc": 61.5, "state": "finished"}


def test_version() -> None:
    result = lenet("--version")
    assert result.exit_code == 0 and result.output.strip() == f"lenet {version('lenet')}"
