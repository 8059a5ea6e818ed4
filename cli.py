"""`lenet`: the command line. Parses, calls the library, prints with Rich, maps errors to exit codes."""

from __future__ import annotations

import os
import secrets
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # Typer 0.29 bundles its own Click
from typer.core import TyperGroup

from ablation.config import RunConfig, describe, load_config_file, parse_overrides
from ablation.errors import Interrupted, LenetError
from ablation.metrics import (
    BEST_VAL_ACC,
    EPOCH_S,
    TEST_ACC,
    TEST_LOSS,
    THROUGHPUT,
    TOTAL_S,
    TRAIN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_LOSS,
)
from ablation.signals import exit_by_signal
from ablation.states import BROKEN, DIVERGED, FINISHED, IN_FLIGHT, PENDING, RUNNING, STOPPED
from ablation.tracking import one_line

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
        self.epoch = f"epoch 1/{epochs}"  # the bar's label between stages
        self.task = progress.add_task(self.epoch, total=None, metrics="")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        text = (
            f"loss {metrics[TRAIN_LOSS]:.3f} acc {metrics[TRAIN_ACC]:.1f}% | val loss "
            f"{metrics[VAL_LOSS]:.3f} acc {metrics[VAL_ACC]:.1f}% | {metrics[THROUGHPUT]:,.0f} img/s"
        )
        self.epoch = f"epoch {min(step + 1, self.epochs)}/{self.epochs}"
        self.bar.update(self.task, description=self.epoch, metrics=text)
        self.bar.console.print(f"epoch {step:>3}/{self.epochs}  {text}", highlight=False)

    def progress(self, done: int, total: int, stage: str = "") -> None:
        self.bar.update(self.task, completed=done, total=total, description=stage or self.epoch)

    def summary(self, metrics: dict[str, Any]) -> None:
        pass


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=console,
        transient=True,
    )


def fail(message: str) -> None:
    """Stop a command with a usage error: one line on stderr, exit 2 (Click's convention)."""
    raise UsageProblem(message)


class UsageProblem(LenetError):
    """A command-line mistake the CLI itself finds (not the library): exit 2."""

    exit_code = 2


class LenetGroup(TyperGroup):
    """The one place library errors become messages: `LenetError` -> one line on stderr and its exit code
    (1 runtime, 2 usage); the traceback only with LENET_DEBUG=1."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:  # the top-level options (`lenet --bogus`) are parsed here, before `invoke`
            return super().parse_args(ctx, args)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:  # `lenet sweep` alone: its help, as Click shows it
            raise
        except UsageError as exc:  # a sub-command's options or arguments, or an unknown command
            _usage_error(exc)
        except LenetError as exc:
            if os.environ.get("LENET_DEBUG"):
                raise
            err_console.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
            if isinstance(exc, Interrupted):  # cleaned up; now end by the signal, as an uncaught Ctrl-C does
                exit_by_signal(exc.signum)
            raise typer.Exit(exc.exit_code) from None


def _usage_error(exc: UsageError) -> NoReturn:
    """Click's usage error as one line (not Click's usage text and box): the problem, then where the help is."""
    if os.environ.get("LENET_DEBUG"):
        raise exc
    words = exc.ctx.command_path.split()[1:] if exc.ctx is not None else []
    where = " ".join(["lenet", *words, "--help"])
    message = f"{exc.format_message().rstrip('.')}; see `{where}`"
    err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


app = typer.Typer(
    cls=LenetGroup,
    no_args_is_help=True,
    add_completion=False,
    help="LeNet-5 on CIFAR-10: train variants, run ablation sweeps, report what matters.",
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            say(f"lenet {version('lenet')}")
        except PackageNotFoundError:
            say("lenet (version unknown: not installed; run `pip install -e .`)")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print lenet's version and exit."),
    ] = False,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="The sweep store: a path, sqlite:///abs/path.db or postgresql://user@host/db (libpq URL); "
            "default $LENET_STORE, else $LENET_HOME/lenet.db.",
        ),
    ] = None,
) -> None:
    """Options of `lenet` itself (before the command)."""
    if store:
        os.environ["LENET_STORE"] = store  # every Store() of the command opens it, worker processes included


def build_config(overrides: list[str], config_file: Path | None) -> RunConfig:
    """Config file values, then key=value overrides (either may name a preset)."""
    values = load_config_file(config_file) if config_file else {}
    return RunConfig.from_dict({**values, **parse_overrides(overrides)})


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="run summary", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


# --lr=0.1 (W&B's ${args} macro) arrives among the overrides instead of failing as an unknown option.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Settings as key=value or --key=value, e.g. preset=classic lr=0.01 (see `lenet params`)."),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML file of settings; key=value arguments override it.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where checkpoints go (a folder per run; default $LENET_HOME/runs).")
    ] = None,
    wandb: Annotated[
        WandbMode, typer.Option(help="W&B logging: auto = online when logged in, else offline.")
    ] = WandbMode.auto,
    project: Annotated[str, typer.Option(help="W&B project.")] = "lenet",
    entity: Annotated[str | None, typer.Option(help="W&B entity (user or team).")] = None,
) -> None:
    """Train one LeNet-5 variant and report its metrics."""
    from ablation.data import check_split, load_dataset
    from ablation.paths import writable_dir
    from ablation.signals import StopRequest, signal_name
    from ablation.store import home
    from ablation.tracking import FanOut, WandbLogger, start_wandb, wandb_mode
    from ablation.train import autocast_dtype, resolve_device, teacher_checkpoint
    from ablation.train import train as train_run

    out = out or home() / "runs"
    config = build_config(overrides or [], config_file)
    autocast_dtype(config.precision, resolve_device(config.device))  # device=cuda, precision=fp16 without a GPU
    dataset = load_dataset(config)  # before W&B starts: bad data leaves no dead run
    check_split(config, dataset)
    teacher_checkpoint(config, dataset)  # a missing or leaking distillation teacher, before W&B starts
    writable_dir(out, "checkpoint folder", "pass --out a writable folder (default: $LENET_HOME/runs)")
    mode = wandb_mode(wandb.value)
    run = start_wandb(config.to_dict(), mode, project, entity=entity) if mode != "disabled" else None
    name = run.id if run is not None else f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    console.print(
        f"run [bold]{name}[/] (W&B {mode}) preset={config.preset} data={dataset.name} device={config.device}",
        highlight=False,
    )
    try:  # SIGTERM (W&B's agent stopping a run) or Ctrl-C: the run ends at the next batch as `stopped`
        with StopRequest() as stop, _progress() as progress:
            terminal = TerminalLogger(progress, config.epochs)
            logger = FanOut(terminal, WandbLogger(run)) if run is not None else terminal
            summary = train_run(config, logger, checkpoint_dir=out / name, dataset=dataset, stop_now=stop)
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    if run is not None:
        run.finish(exit_code=0 if summary["state"] != DIVERGED else 1)  # a stopped run is a (shorter) result
    console.print(_summary_table(summary))
    saved = [p.name for p in (out / name / "best.pt", out / name / "last.pt") if p.exists()]  # diverged: no best
    checkpoints = f"{out / name}/{', '.join(saved)}" if saved else "none (no epoch finished)"
    console.print(f"checkpoints: {checkpoints}", highlight=False)
    if run is not None and mode == "offline":
        console.print(
            f"W&B offline run in {Path(run.dir).parent}; upload it with `wandb sync {Path(run.dir).parent}`",
            highlight=False,
        )
    if stop.signum is not None:
        raise Interrupted(
            f"stopped by {signal_name(stop.signum)} after {summary['epochs_run']} of {config.epochs} epochs "
            f"(summary saved); checkpoints: {checkpoints}",
            stop.signum,
        )
    if summary["state"] == DIVERGED:
        raise LenetError(
            f"the run diverged (loss became NaN/inf at epoch {summary['epochs_run']}); lower lr or set grad_clip="
        )


@app.command()
def test(
    checkpoint: Annotated[
        str,
        typer.Argument(
            help="A best.pt or last.pt written by `lenet train`, or a run id (its best.pt; fetched from a "
            "PostgreSQL store when it trained on another host)."
        ),
    ],
    data_dir: Annotated[str | None, typer.Option(help="Evaluate on the test set found in this folder instead.")] = None,
    data: Annotated[
        str | None, typer.Option(help="Data source for --data-dir: auto, cifar10, folder, synthetic.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Evaluate a checkpoint on the test set."""
    from ablation.train import evaluate_checkpoint

    overrides: dict[str, Any] = {"device": device}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if data is not None:
        overrides["data"] = data
    path = Path(checkpoint)
    if not path.exists() and path.suffix != ".pt" and len(path.parts) == 1:  # a run id
        from ablation.agent import run_checkpoint

        path = run_checkpoint(checkpoint)
    result = evaluate_checkpoint(path, overrides)
    console.print(
        f"test accuracy {result[TEST_ACC]:.2f}%  loss {result[TEST_LOSS]:.4f}  on "
        f"{result['images']} images of {result['dataset']} (trained on {result['trained_on']}, "
        f"epoch {result['checkpoint_epoch']})",
        highlight=False,
    )


@app.command()
def params() -> None:
    """List every run setting with its type, default (the modern preset) and allowed values."""
    table = Table("setting", "type", "default", "allowed")
    for row in describe():
        table.add_row(*row)
    console.print(table)


sweep_app = typer.Typer(
    no_args_is_help=True, help="Declare ablation grids as W&B sweeps (online or in the local engine)."
)
app.add_typer(sweep_app, name="sweep")


class Backend(str, Enum):
    auto = "auto"
    local = "local"
    wandb = "wandb"


@sweep_app.command("create")
def sweep_create(
    file: Annotated[Path, typer.Argument(help="A W&B sweep YAML file, e.g. sweeps/smoke.yaml.")],
    settings: Annotated[
        list[str] | None,
        typer.Argument(
            help="Settings fixed for every run, overriding the file, e.g. teacher=/abs/teachers/resnet8/ID/best.pt.",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        Backend, typer.Option(help="wandb (W&B server) or local (embedded engine); auto = wandb when logged in.")
    ] = Backend.auto,
    project: Annotated[str, typer.Option(help="W&B project.")] = "lenet",
    entity: Annotated[str | None, typer.Option(help="W&B entity (user or team).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of random/bayes search (local engine); random if omitted.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="The sweep's name in reports (default: the file's `name:`), e.g. when settings change it."),
    ] = None,
) -> None:
    """Validate a sweep file and create the sweep; prints its id."""
    from ablation.store import Store, store_location
    from ablation.sweep import grid_size, load_sweep_file, missing_teachers
    from ablation.tracking import wandb_logged_in

    config = load_sweep_file(file, parse_overrides(settings or []))
    if name:
        config = {**config, "name": name}
    chosen = backend.value if backend != Backend.auto else ("wandb" if wandb_logged_in() else "local")
    missing = missing_teachers(config)
    # Agents on a SQLite store run here, so a missing teacher fails every run; a W&B or PostgreSQL sweep's agents may
    # run on machines that hold the file where this one does not.
    if missing and chosen == "local" and isinstance(store_location(), Path):
        fail(
            f"teacher {missing[0]} is not a file: every run would fail; give a teacher's best.pt, e.g. "
            f"`lenet sweep create {file} teacher=/abs/path/best.pt`"
        )
    if missing:
        err_console.print(f"note: teacher {missing[0]} is not a file here; every agent's machine needs it at that path")
    store = Store()
    if chosen == "wandb":
        sweep_id = _create_wandb_sweep(config, project, entity)
        store.create_sweep(config, "wandb", sweep_id, 0, project, entity)
    else:
        sweep_id = store.create_sweep(config, "local", None, seed, project, entity)
    size = grid_size(config)
    runs = (
        f"{size} runs"
        if size is not None
        else f"{config['method']} search, "
        + (f"run_cap {config['run_cap']}" if config.get("run_cap") else "until stopped (no run_cap)")
    )
    console.print(f"created sweep [bold]{sweep_id}[/] ({chosen} backend, {runs})", highlight=False)
    console.print(f"start workers with: lenet agent {sweep_id} --workers N", highlight=False)


def _create_wandb_sweep(config: dict[str, Any], project: str, entity: str | None) -> str:
    import wandb

    from ablation.errors import TrackingError

    try:
        return wandb.sweep(sweep=config, project=project, entity=entity)
    except Exception as exc:
        raise TrackingError(
            f"W&B could not create the sweep ({type(exc).__name__}: {one_line(exc)}); "
            f"run `wandb login`, or use --backend local"
        ) from None


@sweep_app.command("ls")
def sweep_ls() -> None:
    """List the sweeps in the local store (W&B sweeps created here included)."""
    from ablation.store import Store, store_location

    location = store_location()
    if isinstance(location, Path) and not location.exists():  # a new home: nothing to list, nothing to create
        say(f"no sweeps yet: no store at {location}; create one with `lenet sweep create FILE`")
        return
    store = Store(location)
    table = Table("id", "name", "backend", "method", "state", "runs (done/all)", "created")
    for sweep in store.sweeps():
        runs = store.runs(sweep["id"])
        done = sum(r["state"] not in IN_FLIGHT for r in runs)
        table.add_row(
            sweep["id"],
            sweep["name"] or "",
            sweep["backend"],
            sweep["config"]["method"],
            sweep["state"],
            f"{done}/{_planned_runs(store, sweep) or len(runs)}",  # a grid's runs are created as they are claimed
            time.strftime("%Y-%m-%d %H:%M", time.localtime(sweep["created_at"])),
        )
    console.print(table)
    _note_read_only(store)


def _planned_runs(store: Any, sweep: dict[str, Any]) -> int | None:
    """The runs a sweep will make: a grid's size plus the seeds `sweep extend` added, a search's run_cap (None:
    a search without a cap runs until stopped)."""
    from ablation.sweep import grid_size

    config = sweep["config"]
    if config["method"] != "grid":
        return config.get("run_cap")
    return grid_size(config) + sum(look["runs_added"] for look in store.looks(sweep["id"]))


def _note_read_only(store: Any) -> None:
    """Say why a store that could only be opened for reading (a full or read-only disk) will refuse writes."""
    if store.read_only:
        err_console.print(f"note: listing only; {store.read_only}", markup=False, highlight=False, soft_wrap=True)


@sweep_app.command("status")
def sweep_status(
    sweep_id: Annotated[str, typer.Argument(help="The sweep id printed by `lenet sweep create`.")],
) -> None:
    """Runs per state, the best run so far, elapsed and estimated remaining time."""
    from ablation.store import Store, heartbeat_timeout, home

    store = Store(create=False)
    sweep = store.sweep(sweep_id)
    runs = store.runs(sweep_id)
    config = sweep["config"]
    states: dict[str, int] = {}
    for run in runs:
        stale = run["state"] == RUNNING and (run["heartbeat_at"] or 0) < time.time() - heartbeat_timeout()
        key = "running (no heartbeat: will be requeued)" if stale else run["state"]
        states[key] = states.get(key, 0) + 1
    total = _planned_runs(store, sweep)
    console.print(
        f"sweep [bold]{sweep_id}[/] {sweep['name'] or ''} ({sweep['backend']}, {config['method']}, {sweep['state']}): "
        f"{len(runs)} runs created" + (f" of {total}" if total else ""),
        highlight=False,
    )
    console.print(
        "  " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) if states else "  no runs yet", highlight=False
    )
    _print_best(runs)
    _print_timing(store, runs, total)
    metric = config.get("metric", {}).get("name")
    varying = [k for k, spec in config["parameters"].items() if "value" not in spec]
    for run in runs:
        value = _metric_value(store, run, metric)
        error = (run["error"] or "").split("\n")[0][:80]
        say(
            f"  {run['id']}  {run['state']:<13} attempt {run['attempts']}  {metric or 'metric'} "
            f"{f'{value:.2f}' if value is not None else '-':>6}  "
            + " ".join(f"{k}={run['params'].get(k)}" for k in varying)
            + (f"  ({error})" if error else "")
        )
    _print_looks(store, sweep_id)
    say(
        f"store: {store.path}; W&B offline runs: {home() / 'wandb'} "
        f"(upload with `wandb sync {home() / 'wandb'}/offline-run-*`)"
    )
    _note_read_only(store)


def _print_looks(store: Any, sweep_id: str) -> None:
    """A grid sweep's comparisons still open (as `sweep extend` would judge them now) and the looks taken so far."""
    from analysis.extend import DECIDES, open_comparisons
    from analysis.results import from_store
    from analysis.stats import EQUIVALENCE, alpha_of_look
    from analysis.tables import counted, current_look, factors

    results = from_store(store, sweep_id)
    meta = results.sweeps[sweep_id]
    if meta["config"]["method"] != "grid" or not factors(meta["config"]) or counted(results.runs).empty:
        return
    taken = meta.get("looks", [])
    for look in taken:
        say(
            f"  look {look['look']}: {look['seeds']} seeds per level, α {look['alpha']:.2%}, {look['inconclusive']} "
            f"of {look['comparisons']} comparisons inconclusive, {look['runs_added']} runs added ({look['outcome']})"
        )
    equivalence = taken[-1]["equivalence"] if taken else EQUIVALENCE
    alpha = alpha_of_look(current_look(meta))  # as `sweep extend` judges them (the report: 5% before any look)
    found, total = open_comparisons(results, sweep_id, alpha, equivalence)
    say(
        f"  open comparisons at look {current_look(meta)} (α {alpha:.2%}, δ {equivalence:g}, on "
        f"{DECIDES} of the {len(counted(results.runs))} finished runs): {len(found)} of {total}"
        + ("" if taken else "; `lenet sweep extend ID --until-resolved` adds seeds to them")
    )
    for comparison in found:
        say(f"    {comparison.describe()}")


def _metric_value(store: Any, run: dict[str, Any], metric: str | None) -> float | None:
    """The run's best value of the sweep metric (history for per-epoch metrics, else summary)."""
    if not metric:
        return None
    values = [h[metric] for h in store.history(run["id"]) if h.get(metric) is not None]
    if run["summary"] and run["summary"].get(metric) is not None:
        values.append(run["summary"][metric])
    if not values:
        return None
    return min(values) if "loss" in metric else max(values)


def _print_best(runs: list[dict[str, Any]]) -> None:
    scored = [
        (r["summary"].get(BEST_VAL_ACC), r) for r in runs if r["summary"] and r["summary"].get(BEST_VAL_ACC) is not None
    ]
    if scored:
        value, best = max(scored, key=lambda item: item[0])
        console.print(
            f"  best so far: {best['id']} best/val_acc {value:.2f}% "
            f"test/acc {best['summary'].get(TEST_ACC) or float('nan'):.2f}% "
            f"({' '.join(f'{k}={v}' for k, v in best['params'].items())})",
            highlight=False,
        )


def _print_timing(store: Any, runs: list[dict[str, Any]], total: int | None) -> None:
    started = [r["started_at"] for r in runs if r["started_at"]]
    if not started:
        return
    ended = [r["ended_at"] for r in runs if r["ended_at"]]
    active = any(r["state"] == RUNNING for r in runs) or any(r["state"] == PENDING for r in runs)
    elapsed = (time.time() if active or not ended else max(ended)) - min(started)
    durations = [_run_seconds(store, r) for r in runs if r["ended_at"] and r["started_at"]]
    line = f"  elapsed {elapsed / 60:.1f} min"
    workers = max(1, len({r["worker"] for r in runs if r["state"] == RUNNING}))
    if durations and total:
        remaining = max(0, total - len(durations))
        minutes = remaining * sum(durations) / len(durations) / workers / 60
        line += f", about {minutes:.1f} min remaining ({remaining} runs, {workers} worker(s))"
    console.print(line, highlight=False)


def _run_seconds(store: Any, run: dict[str, Any]) -> float:
    """A finished run's training time: its epochs' seconds (a run resumed in another session or on another machine
    also spent the hours in between pending, which its start-to-end time would count), else start to end."""
    epochs = [h[EPOCH_S] for h in store.history(run["id"]) if h.get(EPOCH_S) is not None]
    return sum(epochs) if epochs else run["ended_at"] - run["started_at"]


@sweep_app.command("stop")
def sweep_stop(sweep_id: Annotated[str, typer.Argument(help="The sweep to stop.")]) -> None:
    """Stop a sweep: workers claim no new runs; runs in progress finish."""
    from ablation.store import Store

    store = Store(create=False)
    store.set_sweep_state(sweep_id, STOPPED)
    console.print(f"sweep {sweep_id} stopped: no new runs will start", highlight=False)


def say(text: str) -> None:
    """Print plain text: no Rich markup (run ids in brackets), no wrapping."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def agent_event(kind: str, info: dict[str, Any]) -> None:
    """Print what workers report (module-level so spawned worker processes can use it)."""
    if kind == "start":
        params = " ".join(f"{k}={v}" for k, v in info["params"].items())
        again = f" (attempt {info['attempt']}, resuming)" if info["attempt"] > 1 else ""
        say(f"[{info['worker']}] start {info['run']}{again}: {params}")
    elif kind == "end" and "summary" in info:
        s = info["summary"]
        say(
            f"[{info['run']}] {info['state']}: best/val_acc {s.get(BEST_VAL_ACC) or float('nan'):.2f}% "
            f"test/acc {s[TEST_ACC]:.2f}% in {s[TOTAL_S]:.0f}s"
        )
    elif kind == "end":
        say(f"[{info['run']}] failed: {info['error']}")
    elif kind == "worker_died":
        requeued = f"requeued {', '.join(info['requeued'])}" if info["requeued"] else "it held no run"
        again = f"started replacement {info['replacement']}" if info["replacement"] else "no replacements left"
        say(f"worker {info['worker']} died (exit code {info['exitcode']}); {requeued}; {again}")


@app.command()
def agent(
    sweep_ids: Annotated[
        list[str],
        typer.Argument(help="Sweep ids from `lenet sweep create`; several local sweeps are served in priority order."),
    ],
    count: Annotated[
        int | None,
        typer.Option(
            help="Runs each worker trains before exiting, over all its sweeps (default: until they are done)."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Parallel worker processes on this machine.")] = 1,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="GPU ids for the workers, e.g. 0,1 (round-robin via CUDA_VISIBLE_DEVICES; repeat an id to share one)."
        ),
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Requeue the sweeps' failed and diverged runs first.")
    ] = False,
    wandb: Annotated[
        WandbMode, typer.Option(help="Local sweeps: log each run as a W&B run too (auto = offline unless logged in).")
    ] = WandbMode.auto,
    backend: Annotated[
        Backend, typer.Option(help="auto: the backend the sweep was created with here; wandb: any W&B sweep id.")
    ] = Backend.auto,
    project: Annotated[str | None, typer.Option(help="W&B project (W&B sweeps not created here).")] = None,
    entity: Annotated[str | None, typer.Option(help="W&B entity (W&B sweeps not created here).")] = None,
    fuse: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Local sweeps: runs each worker trains at once as one fused pack (compatible runs only; each stays "
            "its own run). Default: 64 on a GPU, 1 on CPU (where packs are slower).",
        ),
    ] = None,
) -> None:
    """Train the sweeps' runs until they are done (local engine or W&B)."""
    from ablation.agent import PACK_WORKERS_PER_GPU, crowded_gpus, plan_workers, run_agent
    from ablation.store import Store
    from ablation.tracking import wandb_mode

    store = Store(create=backend == Backend.wandb)  # a W&B sweep made elsewhere gets its runs recorded here
    sweep_ids = list(dict.fromkeys(sweep_ids))  # each sweep once, first mention sets its priority
    sweeps = [store.sweep(i) if backend != Backend.wandb else None for i in sweep_ids]
    if any(s is None or s["backend"] == "wandb" for s in sweeps):
        if fuse is not None and fuse > 1:
            fail("--fuse needs a local sweep: W&B's agent hands out one run at a time (drop --fuse)")
        if len(sweep_ids) > 1 or workers > 1:
            fail(
                "W&B sweeps run one sweep per agent process: start `lenet agent SWEEP_ID` once per worker (or machine)"
            )
        _wandb_agent(sweep_ids[0], sweeps[0], count, project, entity)
        return
    if retry_failed:
        console.print(f"requeued {sum(store.retry_failed(i) for i in sweep_ids)} failed run(s)", highlight=False)
    gpu_list = [g.strip() for g in gpus.split(",")] if gpus else []
    specs = plan_workers(sweep_ids, store.location, workers, gpu_list, count, wandb_mode(wandb.value), fuse)
    say(
        f"agent on sweep(s) {', '.join(sweep_ids)}: {workers} worker(s), "
        + (f"GPUs {','.join(gpu_list)}, " if gpu_list else "")
        + f"{specs[0].threads} CPU thread(s) each"
        + (f", packs of up to {specs[0].fuse} runs" if specs[0].fuse > 1 else "")
    )
    for gpu, n in crowded_gpus(specs).items():
        err_console.print(
            f"warning: {n} pack workers share GPU {gpu or 0}, which runs them in turns (14 made each pack ~10x "
            f"slower); use at most {PACK_WORKERS_PER_GPU} per GPU, with larger packs (--fuse)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    run_agent(specs, agent_event)  # SIGTERM/Ctrl-C: workers stop, their runs are requeued, Interrupted says so
    for sweep_id in sweep_ids:
        runs = store.runs(sweep_id)
        failed = [r["id"] for r in runs if r["state"] in BROKEN]
        console.print(
            f"sweep {sweep_id}: {sum(r['state'] == FINISHED for r in runs)} finished, {len(failed)} failed/diverged"
            + (f" ({', '.join(failed)}; rerun with --retry-failed)" if failed else ""),
            highlight=False,
        )


def _wandb_agent(
    sweep_id: str, sweep: dict[str, Any] | None, count: int | None, project: str | None, entity: str | None
) -> None:
    """Serve a W&B sweep with our training function (W&B's own agent picks the runs)."""
    import wandb as wb

    from ablation.agent import wandb_sweep_function
    from ablation.signals import StopRequest, StopSignal, signal_name

    # SIGTERM raises StopSignal (a KeyboardInterrupt) here, so W&B's agent treats it as Ctrl-C: it stops the
    # run in progress, which ends as `stopped` with its summary (wandb_sweep_function), and returns.
    with StopRequest(raise_in_main=True) as stop:
        try:
            wb.agent(
                sweep_id,
                function=wandb_sweep_function,
                count=count,
                project=project or (sweep or {}).get("project"),
                entity=entity or (sweep or {}).get("entity"),
            )
        except StopSignal:
            pass
    if stop.signum is not None:
        raise Interrupted(
            f"interrupted ({signal_name(stop.signum)}); a run in progress ended as stopped, with its summary logged",
            stop.signum,
        )


def load_results(sources: list[str]) -> Any:
    """Sweep ids (local store), W&B paths (entity/project/id) or bundle files, merged into one Results."""
    from ablation.store import Store
    from analysis.results import from_store, from_wandb, merge, read_bundle

    parts = []
    for source in sources:
        if Path(source).exists() or source.endswith(".json"):
            parts.append(read_bundle(Path(source)))
        elif source.count("/") == 2:
            parts.append(from_wandb(source))
        else:
            store = Store(create=False)
            sweep = store.sweep(source)
            path = "/".join(p for p in (sweep["entity"], sweep["project"], source) if p)
            parts.append(from_wandb(path) if sweep["backend"] == "wandb" else from_store(store, source))
    return merge(parts)


@sweep_app.command("export")
def sweep_export(
    sweep_id: Annotated[str, typer.Argument(help="A sweep id (local or W&B) or entity/project/id.")],
    file: Annotated[Path, typer.Argument(help="Where to write the JSON results bundle.")],
) -> None:
    """Write a self-contained results bundle (configs, summaries, histories, dataset, versions)."""
    from analysis.results import write_bundle

    results = load_results([sweep_id])
    write_bundle(results, file)
    say(f"wrote {file}: {len(results.runs)} runs of sweep {sweep_id} ({file.stat().st_size / 1024:.0f} KiB)")


@sweep_app.command("confirm")
def sweep_confirm(
    source: Annotated[str, typer.Argument(help="A finished sweep: id, entity/project/id or results bundle.")],
    file: Annotated[Path, typer.Argument(help="Where to write the new sweep file (then `lenet sweep create` it).")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs for the retrained runs (e.g. a longer schedule).")],
    seeds: Annotated[
        int, typer.Option(min=1, help="Seeds 0..N-1 to retrain the best with (seed 0 at a new schedule is a new run).")
    ] = 3,
) -> None:
    """Write a sweep that retrains a sweep's best run over several seeds (its winner, confirmed)."""
    import yaml

    from ablation.paths import write_text
    from ablation.sweep import confirm_sweep
    from analysis.tables import best_run

    results = load_results([source])
    if len(results.sweeps) != 1:
        fail(
            f"{source} holds {len(results.sweeps)} sweeps ({', '.join(results.sweeps) or 'none'}); "
            "confirm one sweep's results"
        )
    sweep_id = next(iter(results.sweeps))
    meta = results.sweeps[sweep_id]
    run = best_run(results, sweep_id)
    config = confirm_sweep(meta["config"], run, epochs, seeds)
    question = (
        f"# Question: does the best of sweep {meta['name']} ({run['chosen']}) "
        f"hold up over {seeds} seeds and {epochs} epochs?"
    )
    write_text(file, question + "\n" + yaml.safe_dump(config, sort_keys=False), "sweep file", "choose another path")
    fixed = " ".join(f"{k}={v['value']}" for k, v in config["parameters"].items() if "value" in v)
    say(f"wrote {file}: {run['chosen']} ({fixed}) x {seeds} seeds; start it with `lenet sweep create {file}`")


@sweep_app.command("extend")
def sweep_extend(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="A finished grid sweep: a local sweep id (runs are added to it), or a W&B sweep (entity/project/id "
            "or its id here) or results bundle followed by the follow-up sweeps of its earlier looks."
        ),
    ],
    until_resolved: Annotated[
        bool,
        typer.Option(
            "--until-resolved",
            help="Add seeds to the levels of inconclusive comparisons, at the planned looks 3 -> 5 -> 10 -> 20 seeds "
            "per level (the alpha split over the looks).",
        ),
    ] = False,
    max_seeds: Annotated[int, typer.Option(min=2, help="Seeds per level no look goes beyond.")] = 20,
    equivalence: Annotated[
        float, typer.Option(help="Equivalence band δ (accuracy points): |Δ| surely below it is resolved.")
    ] = 0.5,
    out: Annotated[
        Path | None, typer.Option(help="W&B sweeps and bundles: where to write the follow-up grid sweep file.")
    ] = None,
) -> None:
    """Take the next look at a grid sweep's comparisons and add seeds where they are inconclusive."""
    from ablation.store import Store
    from analysis.extend import plan_extension
    from analysis.results import from_store
    from analysis.stats import check as check_verdict_args

    if not until_resolved:
        fail("say how far to extend: --until-resolved (add seeds until the comparisons resolve; the one mode)")
    check_verdict_args(0.05, equivalence)
    first = sources[0]
    local = not (Path(first).exists() or first.endswith(".json") or first.count("/") == 2)
    store = Store(create=not local)
    if local and store.sweep(first)["backend"] == "local":
        if len(sources) > 1:
            fail(f"sweep {first} is local: give it alone (follow-up sweeps are for W&B sweeps and bundles)")
        if out is not None:
            fail(f"sweep {first} is local: its new runs join it (then `lenet agent {first}`); drop --out")
        plan = plan_extension(from_store(store, first), first, max_seeds, equivalence)
        _print_plan(plan)
        if plan.taken:
            added = store.add_runs(first, list(plan.points), plan.record())  # refused if a run started meanwhile
            if added:
                say(
                    f"added {len(added)} runs to sweep {first} ({added[0]} .. {added[-1]}); train them with "
                    f"`lenet agent {first}`, then run `lenet sweep extend {first} --until-resolved` again"
                )
        return
    if out is None:
        fail(
            f"{first} is a W&B sweep or a bundle, which cannot take new runs: pass --out FILE to write a follow-up "
            "sweep file (create it, train it, then give it after the sweep to `lenet report` and the next extend)"
        )
    _write_follow_up(sources, out, max_seeds, equivalence)


def _print_plan(plan: Any) -> None:
    """One look of `sweep extend`: its alpha and seeds, the open comparisons, and what it does about them."""
    from analysis.extend import DECIDES, EXTENDED

    say(
        f"look {plan.look} of sweep {plan.sweep_id}: {plan.seeds} seeds per level, α {plan.alpha:.2%}, δ "
        f"{plan.equivalence:g}, verdicts on {DECIDES}: {len(plan.open)} of {plan.comparisons} comparisons inconclusive"
    )
    for comparison in plan.open:
        say(f"  {comparison.describe()}")
    if plan.outcome != EXTENDED or not plan.taken:
        say(f"nothing added: {plan.reason}")


def _write_follow_up(sources: list[str], out: Path, max_seeds: int, equivalence: float) -> None:
    """W&B sweeps cannot take new runs: write the next look's runs as a follow-up grid sweep file."""
    import yaml

    from ablation.paths import write_text
    from ablation.sweep import follow_up_sweep
    from analysis.extend import plan_extension
    from analysis.results import follow_up_note

    results = load_results(sources)
    if len(results.sweeps) != 1:
        fail(
            f"{', '.join(sources)} hold {len(results.sweeps)} sweeps ({', '.join(results.sweeps)}); give one sweep "
            "and the follow-up sweeps of its earlier looks"
        )
    sweep_id, meta = next(iter(results.sweeps.items()))
    plan = plan_extension(results, sweep_id, max_seeds, equivalence)
    _print_plan(plan)
    if not plan.points:
        return
    note = follow_up_note(sweep_id, plan.look, plan.seeds, plan.alpha, plan.target)
    question = f"{note}. {meta['config'].get('description') or ''}".strip()
    name = f"{meta['name']}_look{plan.look + 1}"
    config, extra = follow_up_sweep(meta["config"], list(plan.points), name, question)
    text = f"# Question: {question}\n" + yaml.safe_dump(config, sort_keys=False, width=1000)
    write_text(out, text, "sweep file", "choose another path")
    union = f" (W&B grids are cartesian: {extra} more runs than the {len(plan.points)} needed)" if extra else ""
    say(
        f"wrote {out}: {len(plan.points) + extra} runs{union}; create it (`lenet sweep create {out}`), train it, "
        f"then `lenet report {' '.join(sources)} FOLLOW_UP` analyses both as one sweep"
    )


@app.command()
def report(
    sources: Annotated[
        list[str], typer.Argument(help="Sweep ids, entity/project/id W&B paths, or bundle files (merged).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for report.md, CSV and PNG files.")] = Path("report"),
    wandb: Annotated[
        bool,
        typer.Option(
            "--wandb",
            help="Also save a W&B Report (needs a W&B login) and print its URL; "
            "local sweeps' panels fill once their offline runs are uploaded with `wandb sync`.",
        ),
    ] = False,
    project: Annotated[str, typer.Option(help="W&B project for --wandb (where the sweeps' runs are).")] = "lenet",
    entity: Annotated[
        str | None, typer.Option(help="W&B entity for --wandb (default: your login's default entity).")
    ] = None,
    equivalence: Annotated[
        float, typer.Option(help="Equivalence band δ (accuracy points): |Δ| surely below it is `equivalent`.")
    ] = 0.5,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Also compare the sweeps (one recipe each, same epochs) as one table, each against the first, "
            "e.g. a search winner's confirmation against the control recipe.",
        ),
    ] = False,
    control: Annotated[
        str | None,
        typer.Option(
            "--control",
            metavar="NAME=VALUE",
            help="With --compare: the baseline is this level of the first sweep's factor, e.g. preset=modern "
            "of the techniques study against a recipe trained on the same seeds.",
        ),
    ] = None,
    tune: Annotated[
        str | None,
        typer.Option(
            "--tune",
            metavar="FACTOR",
            help="Also compare every other factor's levels each at its own best value of FACTOR (picked on mean "
            "val accuracy; test decides), e.g. --tune lr for each optimiser at its own best learning rate.",
        ),
    ] = None,
) -> None:
    """Tables (terminal, Markdown, CSV), plots and report.md from sweeps or bundles."""
    from ablation.errors import SweepError, TrackingError
    from ablation.paths import writable_dir
    from ablation.tracking import wandb_logged_in
    from analysis.report import comparison_baseline, wandb_report, write_report
    from analysis.stats import check as check_verdict_args
    from analysis.tables import (
        check_tune,
        effects,
        factors,
        format_effects,
        format_tuned,
        seed_table,
        sweep_comparison,
        tunable,
        tuned_effects,
    )

    check_verdict_args(0.05, equivalence)  # a bad --equivalence is a usage error before any work
    if control is not None and not compare:
        fail("--control picks the baseline of --compare; add --compare or drop --control")
    if wandb and not wandb_logged_in():  # before any work: saving the report is what --wandb asks for
        raise TrackingError("--wandb saves a W&B report and needs a W&B login: run `wandb login`, or drop --wandb")
    results = load_results(sources)
    if results.runs.empty:
        raise SweepError(f"no runs in {', '.join(sources)}; run `lenet agent` first")
    check_tune(results, tune)
    comparison = sweep_comparison(results, list(results.sweeps), equivalence, control=control) if compare else None
    writable_dir(out, "report folder", "pass --out a writable folder")  # before the tables: the error is all
    if comparison is not None:
        _print_table(f"comparison of the sweeps (Δ vs {comparison_baseline(results, control)})", comparison)
    for sweep_id, meta in results.sweeps.items():  # the terminal gets the key columns; report.md has them all
        table = seed_table(results, sweep_id)
        _print_table(
            f"{meta['name']}: comparison (mean ± std over seeds)",
            table[["Model/variant", "# Epochs", "Val Accuracy", "Test Accuracy", "Not counted"]],
        )
        if factors(meta["config"]):
            effect = format_effects(effects(results, sweep_id, equivalence))
            _print_table(
                f"{meta['name']}: effects (95% CI)",
                effect[
                    [
                        "factor",
                        "context",
                        "level",
                        "n",
                        "val acc % (95% CI)",
                        "Δ val vs baseline",
                        "verdict (val)",
                        "test acc % (95% CI)",
                    ]
                ],
            )
        if tunable(meta["config"], tune):
            tuned = format_tuned(tuned_effects(results, sweep_id, tune, equivalence), tune)
            keep = ["factor", "context", "level", f"best {tune} (val)", "n", "Δ test vs baseline", "verdict (test)"]
            _print_table(f"{meta['name']}: each at its own best {tune} (test decides)", tuned[keep])
    band = f" --equivalence {equivalence:g}" if equivalence != 0.5 else ""  # report.md's command re-creates it
    command = "lenet report " + " ".join(sources) + f" --out {out}{band}" + (" --compare" if compare else "")
    command += f" --control {control}" if control is not None else ""
    command += f" --tune {tune}" if tune is not None else ""
    path = write_report(results, out, sources, command, equivalence, compare, control, tune)
    say(f"wrote {path} (+ CSV and PNG files in {out})")
    if wandb:
        built = _save_wandb_report(wandb_report(results, entity or None, project, equivalence, tune))
        say(f"W&B report: {built}")


def _save_wandb_report(report: Any) -> str:
    from ablation.errors import TrackingError

    try:
        return report.save().url
    except Exception as exc:
        raise TrackingError(
            f"could not save the W&B report ({type(exc).__name__}: {one_line(exc)}); "
            "check your W&B login and --entity/--project"
        ) from None


def _print_table(title: str, frame: Any) -> None:
    table = Table(*[str(c) for c in frame.columns], title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    console.print(table)


def main() -> None:
    """Entry point for `python cli.py`."""
    app()


if __name__ == "__main__":
    sys.exit(main())
