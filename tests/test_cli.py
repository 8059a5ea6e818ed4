"""The `lenet` command line, through Typer's CliRunner: real training, real errors."""

from pathlib import Path

import pytest
from conftest import TINY, lenet

TINY_ARGS = [f"{k}={v}" for k, v in TINY.items()]


def test_no_args_shows_help() -> None:
    result = lenet()
    assert "train" in result.output and "test" in result.output and "params" in result.output


def test_train_then_test(folder_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = lenet("train", *TINY_ARGS, "epochs=2", f"data_dir={folder_dir}", "--wandb", "disabled", "--out", out)
    assert result.exit_code == 0, result.output
    assert "epoch   2/2" in result.output and "test/acc" in result.output and "tiny-png" in result.output
    (run_dir,) = out.iterdir()
    assert {p.name for p in run_dir.iterdir()} == {"best.pt", "last.pt"}
    tested = lenet("test", run_dir / "best.pt", "--device", "cpu")
    assert tested.exit_code == 0, tested.output
    assert "test accuracy" in tested.output and "tiny-png" in tested.output


def test_test_on_another_data_dir(folder_dir: Path, batches_dir: Path, tmp_path: Path) -> None:
    lenet("train", *TINY_ARGS, f"data_dir={folder_dir}", "--wandb", "disabled", "--out", tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").iterdir()
    result = lenet("test", run_dir / "last.pt", "--data-dir", batches_dir, "--data", "auto")
    assert result.exit_code == 0, result.output
    assert "of cifar10 (trained on tiny-png" in result.output


def test_config_file_and_preset(folder_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: classic\ndata_dir: {folder_dir}\nval_size: 20\nepochs: 1\nlr: 0.5\n")
    result = lenet(
        "train", "--config", config, "lr=0.01", "batch_size=32", "--wandb", "disabled", "--out", tmp_path / "r"
    )
    assert result.exit_code == 0, result.output
    assert "preset=classic" in result.output


def test_offline_wandb_run_can_be_synced(folder_dir: Path, tmp_path: Path) -> None:
    result = lenet("train", *TINY_ARGS, f"data_dir={folder_dir}", "--wandb", "offline", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "W&B offline" in result.output and "wandb sync" in result.output
    (offline,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb")), "the offline run holds its log for `wandb sync`"


def test_auto_wandb_without_login_goes_offline(
    folder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    result = lenet("train", *TINY_ARGS, f"data_dir={folder_dir}", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    assert "(W&B offline)" in result.output


def test_params_lists_every_setting() -> None:
    result = lenet("params")
    assert result.exit_code == 0
    for name in ("activation", "scaled_tanh", "weight_decay", "early_stopping", "augment", "crop_flip"):
        assert name in result.output


# Bad settings, files and paths: tests/test_bad_inputs.py (the catalogue, one line and an exit code each).


def test_diverged_run_exits_non_zero_with_metrics(batches_dir: Path, tmp_path: Path) -> None:
    result = lenet(
        "train",
        *TINY_ARGS,
        f"data_dir={batches_dir}",
        "preset=classic",
        "activation=relu",
        "lr=1e8",
        "batch_size=8",
        "epochs=3",
        "--wandb",
        "disabled",
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 1
    assert "diverged" in result.output and "lower lr" in result.output
    assert list((tmp_path / "r").glob("*/last.pt")), "a diverged run still leaves its last checkpoint"


def test_online_wandb_without_login_is_a_clear_error(
    folder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    result = lenet("train", *TINY_ARGS, f"data_dir={folder_dir}", "--wandb", "online")
    assert result.exit_code == 1
    assert "could not start a W&B online run" in result.output and "wandb login" in result.output


def test_sweep_create_fixes_settings_from_the_command_line(tmp_path: Path) -> None:
    from ablation.store import Store

    teacher = tmp_path / "teachers" / "best.pt"
    teacher.parent.mkdir()
    teacher.write_bytes(b"a checkpoint")  # only its existence is checked here; a run loads it
    sweep = Path(__file__).parents[1] / "sweeps" / "distill.yaml"  # its teacher is a placeholder path
    result = lenet(
        "sweep", "create", sweep, f"teacher={teacher}", "epochs=5", "--backend", "local", "--name", "distill_5"
    )
    assert result.exit_code == 0, result.output
    assert "36 runs" in result.output  # a fixed setting replaces the file's spec, the grid's axes stay
    sweep_id = result.output.split("created sweep ")[1].split()[0]
    stored = Store().sweep(sweep_id)
    assert stored["name"] == "distill_5"  # another recipe than the file's, so another name in reports
    params = stored["config"]["parameters"]
    assert params["teacher"] == {"value": str(teacher)} and params["epochs"] == {"value": 5}
    assert params["distill_weight"] == {"values": [0.5, 0.9]}
    # The file's question names its own values; the reports' copy says which ones the command line replaced.
    created = f"(Created with teacher={teacher} epochs=5, replacing the file's values.)"
    assert stored["config"]["description"].endswith(created)


@pytest.mark.parametrize(
    "settings,message",
    [
        ([], "teacher /path/to/teachers/resnet20/RUN_ID/best.pt is not a file: every run would fail; give"),
        (["techer=/t/best.pt"], "unknown parameter 'techer' (did you mean 'teacher'?)"),
        (["epochs=abc"], "epochs='abc' is not a valid int"),
        (["epochs=0"], "parameter 'epochs': epochs=0 is out of range; it must be >= 1"),
        (["preset=best_teacher", "distill_weight=0"], "preset=best_teacher distils from a teacher"),
        (["teacher"], "cannot read 'teacher': write settings as key=value"),
    ],
)
def test_sweep_create_refuses_what_every_run_would_fail_on(settings: list[str], message: str) -> None:
    from ablation.store import Store

    result = lenet("sweep", "create", Path(__file__).parents[1] / "sweeps" / "distill.yaml", *settings)
    assert result.exit_code == 2 and message in result.output, result.output
    assert Store().sweeps() == []  # nothing created
