"""`lenet`: the command line. Parses, calls the library, prints with Rich, maps errors to exit codes."""

from __future__ import annotations

import os
import secrets
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ablation.config import RunConfig, describe, load_config_file, parse_overrides
from ablation.errors import LenetError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="LeNet-5 on CIFAR-10: train variants, run ablation sweeps, report what matters.")
console = Console()
err_console = Console(stderr=True)


class WandbMode(str, Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


class TerminalLogger:
    """A Rich progress bar per run, with the last epoch's metrics beside it."""

    def __init__(self, progress: Progress, epochs: int) -> None:
        self.bar = progress
        self.epochs = epochs
        self.task = progress.add_task("epoch 1", total=None, metrics="")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        text = (f"loss {metrics['train/loss']:.3f} acc {metrics['train/acc']:.1f}% | val loss "
                f"{metrics['val/loss']:.3f} acc {metrics['val/acc']:.1f}% | {metrics['throughput/img_s']:,.0f} img/s")
        self.bar.update(self.task, description=f"epoch {min(step + 1, self.epochs)}/{self.epochs}", metrics=text)
        self.bar.console.print(f"epoch {step:>3}/{self.epochs}  {text}", highlight=False)

    def progress(self, done: int, total: int) -> None:
        self.bar.update(self.task, completed=done, total=total)

    def summary(self, metrics: dict[str, Any]) -> None:
        pass


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"), console=console, transient=True)


def fail(message: str) -> None:
    """Print one error line to stderr and exit 2."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def run_guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call library code, turning `LenetError` into a one-line message (tracebacks with LENET_DEBUG=1)."""
    try:
        return fn(*args, **kwargs)
    except LenetError as exc:
        if os.environ.get("LENET_DEBUG"):
            raise
        fail(str(exc))


def build_config(overrides: list[str], config_file: Optional[Path]) -> RunConfig:
    """Config file values, then key=value overrides (either may name a preset)."""
    values = load_config_file(config_file) if config_file else {}
    return RunConfig.from_dict({**values, **parse_overrides(overrides)})


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="run summary", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


@app.command()
def train(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Settings as key=value, e.g. preset=classic lr=0.01 (see `lenet params`).")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="YAML file of settings; key=value arguments override it.")] = None,
    out: Annotated[Path, typer.Option(help="Where checkpoints go (a folder per run).")] = Path(os.environ.get("LENET_HOME", "lenet-runs")) / "runs",
    wandb: Annotated[WandbMode, typer.Option(help="W&B logging: auto = online when logged in, else offline.")] = WandbMode.auto,
    project: Annotated[str, typer.Option(help="W&B project.")] = "lenet",
    entity: Annotated[Optional[str], typer.Option(help="W&B entity (user or team).")] = None,
) -> None:
    """Train one LeNet-5 variant and report its metrics."""
    from ablation.data import load_dataset
    from ablation.tracking import FanOut, WandbLogger, start_wandb, wandb_mode
    from ablation.train import train as train_run

    config = run_guarded(build_config, overrides or [], config_file)
    dataset = run_guarded(load_dataset, config)  # before W&B starts: bad data leaves no dead run
    mode = wandb_mode(wandb.value)
    run = run_guarded(start_wandb, config.to_dict(), mode, project, entity=entity) if mode != "disabled" else None
    name = run.id if run is not None else f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    console.print(f"run [bold]{name}[/] (W&B {mode}) preset={config.preset} data={dataset.name} "
                  f"device={config.device}", highlight=False)
    with _progress() as progress:
        terminal = TerminalLogger(progress, config.epochs)
        logger = FanOut(terminal, WandbLogger(run)) if run is not None else terminal
        summary = run_guarded(train_run, config, logger, checkpoint_dir=out / name, dataset=dataset)
    if run is not None:
        run.finish(exit_code=0 if summary["state"] != "diverged" else 1)
    console.print(_summary_table(summary))
    console.print(f"checkpoints: {out / name}/best.pt, last.pt", highlight=False)
    if run is not None and mode == "offline":
        console.print(f"W&B offline run in {Path(run.dir).parent}; upload it with `wandb sync {Path(run.dir).parent}`", highlight=False)
    if summary["state"] == "diverged":
        fail(f"the run diverged (loss became NaN/inf at epoch {summary['epochs_run']}); lower lr or set grad_clip=")


@app.command()
def test(
    checkpoint: Annotated[Path, typer.Argument(help="A best.pt or last.pt written by `lenet train`.")],
    data_dir: Annotated[Optional[str], typer.Option(help="Evaluate on the test set found in this folder instead.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Data source for --data-dir: auto, cifar10, folder, synthetic.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Evaluate a checkpoint on the test set."""
    from ablation.train import evaluate_checkpoint

    overrides: dict[str, Any] = {"device": device}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if data is not None:
        overrides["data"] = data
    result = run_guarded(evaluate_checkpoint, checkpoint, overrides)
    console.print(f"test accuracy {result['test/acc']:.2f}%  loss {result['test/loss']:.4f}  on "
                  f"{result['images']} images of {result['dataset']} (trained on {result['trained_on']}, "
                  f"epoch {result['checkpoint_epoch']})", highlight=False)


@app.command()
def params() -> None:
    """List every run setting with its type, default (the modern preset) and allowed values."""
    table = Table("setting", "type", "default", "allowed")
    for row in describe():
        table.add_row(*row)
    console.print(table)


def main() -> None:
    """Entry point for `python cli.py`."""
    app()


if __name__ == "__main__":
    sys.exit(main())
