"""The bad-input catalogue: every way a user can get a command wrong, and the one line each gets back.

Each case runs a real `lenet` command (in-process, Typer's CliRunner) on files written for it and checks
that it fails with its exit code (1 runtime, 2 usage), exactly one line naming the problem and the fix,
no traceback and no warning, no store written (unchanged or not created) and nothing else created.
Placeholders in a case's command: {tmp} (the case's folder), {data} (tiny official CIFAR-10 batches),
{ro} (a read-only tmpfs), {bundle} (a committed results bundle)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shlex
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import lenet, output_lines, tmpfs, write_batches

from ablation.config import RunConfig
from ablation.data import CIFAR10_CLASSES
from ablation.errors import OutputError
from ablation.model import build_model
from ablation.paths import writable_dir, write_text
from ablation.store import Store
from ablation.sweep import load_sweep_file

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "docs" / "results" / "confirm" / "long.json"

Content = str | bytes | Callable[[Path, dict[str, str]], None] | None  # None: a folder


@dataclass(frozen=True)
class Case:
    """One bad input: the command, the files it needs, the message fragment and exit code it must give."""

    id: str
    command: str  # shell words after `lenet`, with placeholders
    fragment: str
    code: int
    files: dict[str, Content] = field(default_factory=dict)  # relative to {tmp}
    env: dict[str, str] = field(default_factory=dict)


# --- files the cases read ---------------------------------------------------------------------------------


def checkpoint(**changes: object) -> Callable[[Path, dict[str, str]], None]:
    """A lenet checkpoint of an untrained model (config pointing at {data}), with `changes` applied."""

    def write(path: Path, places: dict[str, str]) -> None:
        config = RunConfig(data_dir=places["data"], device="cpu", val_size=20)
        payload = {
            "model": build_model(config, 10).state_dict(),
            "config": config.to_dict(),
            "classes": list(CIFAR10_CLASSES),
            "mean": torch.full((1, 3, 1, 1), 120.0),
            "std": torch.full((1, 3, 1, 1), 60.0),
            "epoch": 1,
            "dataset": "cifar10",
            "format": 1,
        }
        for key, value in changes.items():
            if value is None:
                del payload[key]
            else:
                payload[key] = value
        torch.save(payload, path)

    return write


def misshapen_weights() -> dict[str, torch.Tensor]:
    """LeNet-5's weights with the first conv's kernels 3x3 instead of 5x5."""
    weights = build_model(RunConfig(), 10).state_dict()
    weights["0.weight"] = torch.zeros(6, 3, 3, 3)
    return weights


def store_with_a_sweep(path: Path, places: dict[str, str]) -> None:
    """A local store holding the smoke sweep (so unknown-id cases can check it stays unchanged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Store(path) as store:
        store.create_sweep(load_sweep_file(ROOT / "sweeps" / "smoke.yaml"), "local", None, 0)


SWEEPS = {"s1": {"name": "s1", "backend": "local", "config": {"method": "grid", "parameters": {"lr": {"value": 0.1}}}}}


def run_record(**changes: object) -> dict[str, object]:
    """A minimal run record of sweep s1; a change to None drops that key."""
    record = {"id": "r1", "sweep_id": "s1", "state": "finished", "config": {"lr": 0.1}, "summary": {}, "history": []}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


def bundle(runs: object = None, sweeps: object = None, drop: tuple[str, ...] = ()) -> str:
    """A minimal valid results bundle (sweep s1, one run), with `runs` or `sweeps` replaced or keys dropped."""
    data = {
        "format": "lenet-results/1",
        "sweeps": SWEEPS if sweeps is None else sweeps,
        "runs": [run_record()] if runs is None else runs,
    }
    return json.dumps({k: v for k, v in data.items() if k not in drop})


GRID = "method: grid\nmetric: {name: val/acc, goal: maximize}\n"
DATA = "data_dir={data} device=cpu"  # tiny data: for cases that fail once the data is loaded
STORE = {"home/lenet.db": store_with_a_sweep}
CONFIG, SWEEP = "train --config {tmp}/run.yaml", "sweep create {tmp}/s.yaml"
BUNDLE_REPORT = "report {tmp}/b.json --out {tmp}/r"


def config_file(content: Content) -> dict[str, Content]:
    return {"run.yaml": content}


def sweep_file(content: Content) -> dict[str, Content]:
    return {"s.yaml": content}


def grid(parameters: str) -> dict[str, Content]:
    """A grid sweep file with these `parameters:` lines."""
    return sweep_file(GRID + "parameters:" + parameters)


# fmt: off
CASES = [
    # --- run settings on the command line (usage errors, exit 2) ---
    Case("unknown-setting", "train bogus=1", "unknown run setting 'bogus'", 2),
    Case("misspelt-setting", "train activaton=relu", "did you mean 'activation'?", 2),
    Case("bad-choice", "train activation=swish", "activation='swish' is not valid; choose one of", 2),
    Case("unknown-optimizer", "train optimizer=lion", "optimizer='lion' is not valid", 2),
    Case("unknown-preset", "train preset=vintage", "preset='vintage' is not valid", 2),
    Case("lr-negative", "train lr=-1", "lr=-1.0 is out of range", 2),
    Case("lr-not-a-number", "train lr=abc", "lr='abc' is not a valid float; give a number", 2),
    Case("lr-inf", "train lr=inf", "lr=inf is out of range; it must be >= 1e-12 and < 1e+38", 2),
    Case("lr-nan", "train lr=nan", "lr=nan is out of range", 2),
    Case("lr-beyond-float32", "train lr=1e300", "lr=1e+300 is out of range", 2),
    Case("weight-decay-beyond-float32", "train weight_decay=1e39", "weight_decay=1e+39 is out of range", 2),
    Case("warmup-inf", "train schedule=cosine warmup_epochs=inf", "warmup_epochs=inf is out of range; it must be "
         ">= 0.0 and finite", 2),
    Case("epochs-zero", "train epochs=0", "epochs=0 is out of range", 2),
    Case("epochs-fraction", "train epochs=1.5", "epochs='1.5' is not a valid int; give a whole number", 2),
    Case("epochs-word", "train epochs=ten", "epochs='ten' is not a valid int", 2),
    Case("dropout-one", "train dropout=1", "dropout=1.0 is out of range; it must be >= 0.0 and < 1.0", 2),
    Case("label-smoothing-one", "train label_smoothing=1", "label_smoothing=1.0 is out of range", 2),
    Case("batch-size-zero", "train batch_size=0", "batch_size=0 is out of range", 2),
    Case("batch-size-1-batch-norm", "train batch_size=1", "batch norm needs at least 2 images per batch", 2),
    Case("val-size-zero", "train val_size=0", "val_size=0 is out of range", 2),
    Case("seed-huge", "train seed=1e20", "seed=100000000000000000000 is out of range", 2),
    Case("seed-negative", "train seed=-1", "seed=-1 is out of range; it must be >= 0 and < 4294967296", 2),
    Case("split-seed-negative", "train split_seed=-1", "split_seed=-1 is out of range", 2),
    Case("split-seed-huge", "train split_seed=4294967296", "split_seed=4294967296 is out of range", 2),
    Case("threads-huge", "train threads=100000", "threads=100000 is out of range", 2),
    Case("onecycle-with-warmup", "train warmup_epochs=1", "schedule=onecycle has its own warm-up", 2),
    Case("fp16-on-cpu", "train precision=fp16 device=cpu", "precision=fp16 needs a CUDA GPU", 2),
    Case("tta-unknown", "train tta=mirror", "tta='mirror' is not valid; choose one of: none, flip, flip_crop", 2),
    Case("ema-one", "train ema=1", "ema=1.0 is out of range; it must be >= 0.0 and < 1.0", 2),
    Case("cutout-too-big", "train cutout=33", "cutout=33 is out of range", 2),
    Case("mixup-negative", "train mixup=-1", "mixup=-1.0 is out of range", 2),
    Case("distill-temperature-zero", "train distill_temperature=0", "distill_temperature=0.0 is out of range", 2),
    Case("arch-unknown", "train arch=vgg11", "arch='vgg11' is not valid", 2),
    Case("resnet-with-dropout", "train arch=resnet8 dropout=0.2", "arch=resnet8 has none, set dropout=0", 2),
    Case("teacher-missing", f"train {DATA} val_size=20 teacher={{tmp}}/nope.pt",
         "teacher={tmp}/nope.pt: checkpoint {tmp}/nope.pt does not exist", 1),
    Case("teacher-other-split", f"train {DATA} val_size=30 teacher={{tmp}}/best.pt",
         "could be in the teacher's training set", 1, {"best.pt": checkpoint()}),
    Case("key-without-value", "train lr", "cannot read 'lr': write settings as key=value", 2),
    Case("value-without-key", "train =0.1", "write settings as key=value", 2),
    # --- config files (usage errors, exit 2) ---
    Case("config-missing", CONFIG, "config file {tmp}/run.yaml does not exist", 2),
    Case("config-a-folder", CONFIG, "is a folder; give the path of a YAML file", 2, config_file(None)),
    Case("config-binary", CONFIG, "is not a text file (not UTF-8)", 2, config_file(b"\xff\xfe\x00\x81lr: 1")),
    Case("config-bad-yaml", CONFIG, "is not valid YAML", 2, config_file("lr: [0.1\n")),
    Case("config-a-list", CONFIG, "must be a mapping of setting: value", 2, config_file("- lr\n")),
    Case("config-int-key", CONFIG, "key 1 is not a setting name", 2, config_file("1: 2\n")),
    Case("config-unknown-key", CONFIG, "unknown run setting 'lrr'", 2, config_file("lrr: 0.1\n")),
    Case("config-bool-value", CONFIG, "lr=True is not a valid float", 2, config_file("lr: yes\n")),
    Case("config-list-value", CONFIG, "epochs=[1, 2] is not a valid int", 2, config_file("epochs: [1, 2]\n")),
    Case("config-null-value", CONFIG, "activation=None is not a valid str", 2, config_file("activation: ~\n")),
    # --- settings only the data can check (checked before training and W&B start) ---
    Case("val-size-whole-train-set", f"train {DATA} val_size=160", "val_size=160 leaves 0 of the 160 training", 2),
    Case("val-size-leaves-1-for-batch-norm", f"train {DATA} val_size=159",
         "leaves 1 of the 160 training images of cifar10 for training (batch norm needs at least 2)", 2),
    Case("data-dir-missing-folder", "train data=folder data_dir={tmp}/nope/cifar", "no image folder", 1),
    Case("data-dir-missing-download", "train data=cifar10 data_dir={tmp}/nope/cifar",
         "(the folder does not exist) and the download", 1),  # and no folder created (nothing is)
    Case("data-dir-a-file", "train data_dir={tmp}/notes.txt", "is a file; give a folder or an image-folder archive",
         1, {"notes.txt": "x"}),
    Case("corrupt-batch", "train data_dir={tmp}/cifar", "corrupt CIFAR-10 batch", 1,
         {"cifar": lambda path, places: write_batches(path),
          "cifar/cifar-10-batches-py/data_batch_2": b"\x80\x02garbage"}),
    # --- output paths (runtime errors, exit 1; `train --out` is checked before training and W&B start) ---
    Case("train-out-a-file", f"train {DATA} val_size=20 --out {{tmp}}/runs", "runs: it is a file, not a folder", 1,
         {"runs": "x"}),
    Case("train-out-under-a-file", f"train {DATA} val_size=20 --out {{tmp}}/runs/x",
         "a part of the path is a file, not a folder", 1, {"runs": "x"}),
    Case("train-out-in-proc", f"train {DATA} val_size=20 --out /proc/lenet-runs",
         "cannot write checkpoint folder /proc/lenet-runs", 1),
    Case("train-out-read-only", f"train {DATA} val_size=20 --out {{ro}}/runs --wandb offline",
         "the file system is read-only; pass --out a writable folder", 1),
    Case("lenet-home-a-file", f"train {DATA} val_size=20", "cannot write checkpoint folder {tmp}/home/runs", 1,
         {"home": "x"}, env={"LENET_HOME": "{tmp}/home"}),
    Case("export-to-a-folder", "sweep export {bundle} {tmp}", "it is a folder, not a file", 1),
    Case("export-read-only", "sweep export {bundle} {ro}/b.json", "the file system is read-only", 1),
    Case("export-under-a-file", "sweep export {bundle} {tmp}/x/b.json", "{tmp}/x: it is a file, not a folder", 1,
         {"x": "x"}),
    Case("confirm-read-only", "sweep confirm {bundle} {ro}/c.yaml --epochs 2", "the file system is read-only", 1),
    Case("confirm-to-a-folder", "sweep confirm {bundle} {tmp} --epochs 2", "it is a folder, not a file", 1),
    Case("report-out-a-file", "report {bundle} --out {tmp}/r", "report folder {tmp}/r: it is a file", 1, {"r": "x"}),
    Case("report-out-read-only", "report {bundle} --out {ro}/r", "the file system is read-only", 1),
    # --- checkpoints (`lenet test`; runtime errors, exit 1) ---
    Case("checkpoint-missing", "test {tmp}/best.pt", "checkpoint {tmp}/best.pt does not exist", 1),
    Case("checkpoint-a-folder", "test {tmp}", "is a folder; pass the path of a best.pt or last.pt", 1),
    Case("checkpoint-empty", "test {tmp}/best.pt", "cannot read checkpoint", 1, {"best.pt": b""}),
    Case("checkpoint-random-bytes", "test {tmp}/best.pt", "cannot read checkpoint", 1,
         {"best.pt": bytes(range(256)) * 8}),
    Case("checkpoint-plain-pickle", "test {tmp}/best.pt", "cannot read checkpoint", 1,  # torch.load warns on these
         {"best.pt": pickle.dumps({"model": {}}, protocol=4)}),
    Case("checkpoint-a-list", "test {tmp}/best.pt", "it holds a list, not a mapping", 1,
         {"best.pt": lambda path, places: torch.save([1, 2], path)}),
    Case("checkpoint-without-classes", "test {tmp}/best.pt", "no 'classes' entry", 1,
         {"best.pt": checkpoint(classes=None)}),
    Case("checkpoint-wrong-shapes", "test {tmp}/best.pt", "weights do not fit LeNet-5", 1,
         {"best.pt": checkpoint(model=misshapen_weights())}),
    Case("checkpoint-bad-stats", "test {tmp}/best.pt", "'mean' and 'std' must hold one value per colour channel", 1,
         {"best.pt": checkpoint(mean=torch.zeros(5))}),
    Case("checkpoint-bad-config", "test {tmp}/best.pt", "holds a config this version rejects", 1,
         {"best.pt": checkpoint(config={"lr": -1.0})}),
    Case("checkpoint-other-classes", "test {tmp}/best.pt", "was trained on the classes cat, dog", 1,
         {"best.pt": checkpoint(classes=["cat", "dog"])}),
    Case("test-unknown-device", "test {tmp}/best.pt --device tpu", "device='tpu' is not valid", 2,
         {"best.pt": checkpoint()}),
    # --- sweep files (`lenet sweep create`; runtime errors, exit 1) ---
    Case("sweep-missing", SWEEP, "sweep file {tmp}/s.yaml does not exist", 1),
    Case("sweep-a-folder", SWEEP, "is a folder; give the path of a YAML file", 1, sweep_file(None)),
    Case("sweep-binary", SWEEP, "is not a text file", 1, sweep_file(b"\x89PNG\r\n\x1a\n\xff")),
    Case("sweep-bad-yaml", SWEEP, "is not valid YAML", 1, sweep_file("method: [grid\n")),
    Case("sweep-a-list", SWEEP, "must be a mapping with method, metric and parameters", 1, sweep_file("- grid\n")),
    Case("sweep-metric-a-string", SWEEP, "metric must be a mapping such as", 1,
         sweep_file("method: grid\nmetric: val/acc\nparameters:\n  lr: {values: [0.1]}\n")),
    Case("sweep-metric-never-logged", SWEEP, "metric 'val/accuracy' is never logged", 1,
         sweep_file("method: grid\nmetric: {name: val/accuracy}\nparameters:\n  lr: {values: [0.1]}\n")),
    Case("sweep-unknown-method", SWEEP, "method 'hyperopt' is not supported; use grid, random or bayes", 1,
         sweep_file("method: hyperopt\nparameters:\n  lr: {values: [0.1]}\n")),
    Case("sweep-parameters-missing", SWEEP, "parameters is missing", 1, sweep_file(GRID)),
    Case("sweep-parameters-a-list", SWEEP, "parameters must be a non-empty mapping", 1, grid(" []\n")),
    Case("sweep-parameters-empty", SWEEP, "parameters must be a non-empty mapping", 1, grid(" {}\n")),
    Case("sweep-values-not-a-list", SWEEP, "values must be a list, e.g. values: [3]", 1,
         grid("\n  batch_size: {values: 3}\n")),
    Case("sweep-int-parameter-name", SWEEP, "parameter name 1 is not a setting", 1, grid("\n  1: {values: [1]}\n")),
    Case("sweep-spec-not-a-mapping", SWEEP, "parameter 'lr' must be a mapping", 1, grid("\n  lr: 0.1\n")),
    Case("sweep-nested-parameters", SWEEP, "is nested; W&B's grid search drops nested values", 1,
         grid("\n  opt:\n    parameters:\n      lr: {values: [0.1]}\n")),
    Case("sweep-range-in-grid", SWEEP, "continuous range, which grid search cannot enumerate", 1,
         grid("\n  lr: {min: 0.01, max: 0.1}\n")),
    Case("sweep-unknown-parameter", SWEEP, "unknown parameter 'lrr'", 1, grid("\n  lrr: {values: [0.1]}\n")),
    Case("sweep-bad-value", SWEEP, "parameter 'lr': lr=-1.0 is out of range", 1, grid("\n  lr: {values: [0.1, -1]}\n")),
    Case("sweep-empty-values", SWEEP, "has an empty values list", 1, grid("\n  lr: {values: []}\n")),
    Case("sweep-batch-1-with-batch-norm", SWEEP, "batch norm needs at least 2 images", 1,
         grid("\n  batch_size: {values: [1, 32]}\n")),
    Case("sweep-run-cap-a-word", SWEEP, "run_cap: 'abc' is not of type 'integer'", 1,
         sweep_file(GRID + "run_cap: abc\nparameters:\n  lr: {values: [0.1]}\n")),
    # --- sweep ids the store does not hold (runtime errors, exit 1; the store stays unchanged) ---
    Case("status-unknown-sweep", "sweep status nope", "unknown sweep id 'nope'", 1, STORE),
    Case("stop-unknown-sweep", "sweep stop nope", "unknown sweep id 'nope'", 1, STORE),
    Case("agent-unknown-sweep", "agent nope", "unknown sweep id 'nope'", 1, STORE),
    Case("export-unknown-sweep", "sweep export nope {tmp}/b.json", "unknown sweep id 'nope'", 1, STORE),
    Case("confirm-unknown-sweep", "sweep confirm nope {tmp}/c.yaml --epochs 2", "unknown sweep id 'nope'", 1, STORE),
    Case("report-unknown-sweep", "report nope --out {tmp}/r", "unknown sweep id 'nope'", 1, STORE),
    # --- results bundles (`lenet report`, `sweep export`, `sweep confirm`; runtime errors, exit 1) ---
    Case("bundle-missing", BUNDLE_REPORT, "bundle {tmp}/b.json does not exist", 1),
    Case("bundle-a-folder", BUNDLE_REPORT, "bundle {tmp}/b.json is a folder", 1, {"b.json": None}),
    Case("bundle-not-json", BUNDLE_REPORT, "is not valid JSON", 1, {"b.json": "{runs: "}),
    Case("bundle-binary", BUNDLE_REPORT, "is not valid JSON", 1, {"b.json": b"\xff\xd8\xff"}),
    Case("bundle-foreign-json", BUNDLE_REPORT, "is not a lenet results bundle", 1, {"b.json": '{"runs": []}'}),
    Case("bundle-without-runs", BUNDLE_REPORT, "'runs' is missing", 1, {"b.json": bundle(drop=("runs",))}),
    Case("bundle-run-without-config", BUNDLE_REPORT, "run 'r1': no 'config' entry", 1,
         {"b.json": bundle(runs=[run_record(config=None)])}),
    Case("bundle-run-not-a-mapping", "sweep export {tmp}/b.json {tmp}/c.json", "run 0 is not a mapping (it is int 5)",
         1, {"b.json": bundle(runs=[5])}),
    Case("bundle-run-of-unknown-sweep", BUNDLE_REPORT, "belongs to sweep 'zz'", 1,
         {"b.json": bundle(runs=[run_record(sweep_id="zz")])}),
    Case("bundle-history-not-a-list", BUNDLE_REPORT, "'history' is not a list", 1,
         {"b.json": bundle(runs=[run_record(history={"epoch": 1})])}),
    Case("bundle-sweep-without-config", "sweep confirm {tmp}/b.json {tmp}/c.yaml --epochs 2",
         "sweep 's1' lacks its name, backend or config", 1,
         {"b.json": bundle(sweeps={"s1": {"name": "s1", "backend": "local"}})}),
    Case("bundle-with-no-runs", BUNDLE_REPORT, "no runs in", 1, {"b.json": bundle(runs=[])}),
    # --- Click's own usage errors (exit 2; one line too, with where the help is) ---
    Case("unknown-option", "sweep ls --bogus", "No such option: --bogus; see `lenet sweep ls --help`", 2),
    Case("unknown-top-level-option", "--bogus", "No such option: --bogus; see `lenet --help`", 2),
    Case("unknown-command", "sweep nosuch", "No such command 'nosuch'; see `lenet sweep --help`", 2),
    Case("confirm-without-epochs", "sweep confirm {bundle} {tmp}/c.yaml", "Missing option '--epochs'", 2),
    Case("agent-zero-workers", "agent abc --workers 0", "Invalid value for '--workers'", 2),
    Case("report-without-sources", "report", "Missing argument", 2),
]
# fmt: on


# --- the test -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny official CIFAR-10 python batches (160 training images), shared by the cases that load data."""
    root = tmp_path_factory.mktemp("tiny")
    write_batches(root)
    return root


@pytest.fixture(autouse=True)
def no_internet_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CIFAR-10 download is refused at once (port 9 discards), so no case waits on the network."""
    monkeypatch.setenv("LENET_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")


def write_files(tmp: Path, files: dict[str, Content], places: dict[str, str]) -> None:
    for name, content in files.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            content(path, places)


def store_state(home: Path) -> str | None:
    """sha256 of the store file and its write-ahead log, or None when there is no store."""
    db = home / "lenet.db"
    if not db.exists():
        return None
    wal = db.with_name("lenet.db-wal")
    return hashlib.sha256(db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")).hexdigest()


def snapshot(tmp: Path) -> set[str]:
    """Every path under `tmp` but the decoded-data cache (a loaded data set may be cached) and SQLite's
    side files (the store's content is checked by `store_state`)."""
    return {
        str(p.relative_to(tmp))
        for p in tmp.rglob("*")
        if p.relative_to(tmp).parts[0] != "cache" and not p.name.startswith("lenet.db-")
    }


LOUD = (UserWarning, FutureWarning, RuntimeWarning)  # what Python shows a user by default


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tiny_data: Path) -> None:
    places = {"tmp": str(tmp_path), "data": str(tiny_data), "ro": str(tmp_path / "ro"), "bundle": str(BUNDLE)}
    with ExitStack() as stack:
        if "{ro}" in case.command:
            stack.enter_context(tmpfs(tmp_path / "ro", "ro"))
        write_files(tmp_path, case.files, places)
        home = Path(case.env.get("LENET_HOME", "{tmp}/home").format(**places))
        before, store_before = snapshot(tmp_path), store_state(home)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = lenet(
                *shlex.split(case.command.format(**places)), env={k: v.format(**places) for k, v in case.env.items()}
            )
        lines = output_lines(result)
        assert result.exit_code == case.code, result.output
        assert case.fragment.format(**places) in result.output
        assert "Traceback" not in result.output
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert [str(w.message) for w in caught if issubclass(w.category, LOUD)] == []
        assert store_state(home) == store_before, "the store was written"
        assert snapshot(tmp_path) == before, "a failed command created files"


def test_the_catalogue_covers_enough_cases() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {c.command.split()[0] for c in CASES} >= {"train", "test", "sweep", "agent", "report"}


def test_a_valid_checkpoint_from_the_builder_evaluates(tmp_path: Path, tiny_data: Path) -> None:
    """The checkpoint cases differ from a good checkpoint only in what they break."""
    checkpoint()(tmp_path / "best.pt", {"data": str(tiny_data)})
    result = lenet("test", tmp_path / "best.pt", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "on 40 images of cifar10" in result.output


# --- the output-path helpers every writer uses (ablation/paths.py), on real read-only and full disks ---


def test_a_read_only_folder_is_named_as_such(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro") as ro:
        with pytest.raises(OSError, match="Read-only file system"):
            (ro / "x").write_text("x")  # the mount really is read-only, for root too
        with pytest.raises(OutputError, match=f"cannot write report folder {ro}: the file system is read-only; fix"):
            writable_dir(ro, "report folder", "fix")
        with pytest.raises(OutputError, match="cannot write bundle .*b.json: the file system is read-only"):
            write_text(ro / "b.json", "{}", "bundle")


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        write_text(disk / "b.json", "old")
        with pytest.raises(OutputError, match="b.json: the disk is full; free some space, or choose another path"):
            write_text(disk / "b.json", "x" * 1_000_000)
        assert (disk / "b.json").read_text() == "old" and [p.name for p in disk.iterdir()] == ["b.json"]


def test_write_text_replaces_a_file_atomically(tmp_path: Path) -> None:
    write_text(tmp_path / "a" / "b.json", "one")
    write_text(tmp_path / "a" / "b.json", "two")
    assert (tmp_path / "a" / "b.json").read_text() == "two" and len(list((tmp_path / "a").iterdir())) == 1


def test_a_cache_dir_under_a_file_only_costs_the_cache(tmp_path: Path, tiny_data: Path) -> None:
    """The decoded-data cache is best effort: LENET_CACHE_DIR under a file still trains (decoding each time)."""
    (tmp_path / "a-file").write_text("x")
    result = lenet(
        "train", f"data_dir={tiny_data}", "epochs=1", "val_size=20", "batch_size=32", "device=cpu",
        "--out", tmp_path / "run", env={"LENET_CACHE_DIR": str(tmp_path / "a-file" / "cache")},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a-file").read_text() == "x" and (tmp_path / "run").is_dir()
