"""Analysis on run records with known, planted effects, and the real pipeline: store -> bundle -> report."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_sweep import write_smoke
from typer.testing import CliRunner

from ablation.errors import ConfigError
from analysis.report import wandb_report, write_report
from analysis.results import from_records, full_config, merge, read_bundle, write_bundle
from analysis.tables import effects, seed_table
from cli import app

EFFECT = {"relu": 0.0, "gelu": 3.0, "tanh": -4.0}  # planted val/test accuracy differences vs relu (baseline)
SWEEP = {
    "method": "grid",
    "metric": {"name": "val/acc", "goal": "maximize"},
    "parameters": {
        "activation": {"values": list(EFFECT)},
        "pooling": {"values": ["max", "avg"]},
        "seed": {"values": list(range(6))},
    },
}


def planted(noise: float = 0.5, seed: int = 0) -> list[dict]:
    """Runs whose accuracy is 60 + the activation's effect + noise; pooling has no effect at all."""
    rng = np.random.default_rng(seed)
    records = []
    for act in EFFECT:
        for pool in ("max", "avg"):
            for s in range(6):
                val = 60 + EFFECT[act] + rng.normal(0, noise)
                history = [{"epoch": e, "val/acc": val * e / 5, "val/loss": 2.0 - e / 5} for e in range(1, 6)]
                summary = {
                    "best/val_acc": val,
                    "test/acc": val - 1 + rng.normal(0, noise),
                    "best/val_loss": 1.0,
                    "best/train_acc": val + 2,
                    "best/train_loss": 0.9,
                    "gap/train_val_acc": 2.0,
                    "epochs_to/val_acc_60": 5 if val >= 60 else None,
                    "dataset": "cifar10-jpg",
                    "state": "finished",
                }
                records.append(
                    {
                        "id": f"r-{act}-{pool}-{s}",
                        "sweep_id": "syn",
                        "state": "finished",
                        "config": full_config({"activation": act, "pooling": pool, "seed": s}),
                        "summary": summary,
                        "history": history,
                    }
                )
    records.append(
        {
            "id": "r-diverged",
            "sweep_id": "syn",
            "state": "diverged",
            "config": full_config({"activation": "tanh", "pooling": "max", "seed": 9}),
            "summary": {"best/val_acc": None, "test/acc": None},
            "history": [],
        }
    )
    return records


@pytest.fixture
def results():
    return from_records(planted(), {"syn": {"name": "synthetic", "backend": "local", "config": SWEEP}})


def test_effects_recover_planted_differences(results) -> None:
    table = effects(results, "syn")
    act = table[(table["factor"] == "activation") & (table["context"] == "pooling=max")].set_index("level")
    for level, effect in EFFECT.items():
        diff, half = act.loc[level, "diff_val_acc"], act.loc[level, "diff_val_acc_ci"]
        if level == "relu":
            assert act.loc[level, "verdict"] == "baseline" and diff == 0
            continue
        assert abs(diff - effect) <= half, (level, diff, half)  # the CI covers the planted effect
        assert act.loc[level, "verdict"] == ("better" if effect > 0 else "worse")
    assert act.loc["relu", "val_acc"] == pytest.approx(60, abs=0.6)


def test_a_factor_without_effect_is_never_better_or_worse(results) -> None:
    table = effects(results, "syn")
    pool = table[(table["factor"] == "pooling") & (table["level"] == "avg")]
    # 6 seeds at noise 0.5 cannot show |Δ| < 0.5 points: inconclusive, with the seeds per level that would
    assert len(pool) == 3 and set(pool["verdict"]) == {"inconclusive"} and (pool["seeds_needed"] > 6).all()
    assert (pool["diff_val_acc"].abs() <= pool["diff_val_acc_ci"]).all()
    wide = effects(results, "syn", equivalence=2.0)  # but well inside +/-2 points: equivalent
    assert set(wide[(wide["factor"] == "pooling") & (wide["level"] == "avg")]["verdict"]) == {"equivalent"}


def test_failed_runs_are_counted_not_averaged(results) -> None:
    table = seed_table(results, "syn")
    row = table[table["Model/variant"] == "activation=tanh, pooling=max"].iloc[0]
    assert row["Not counted"] == "1 diverged" and "(n=6)" in row["Val Accuracy"]
    assert list(table.columns[:7]) == [
        "Model/variant",
        "Activation",
        "Pooling",
        "Regularisation",
        "Initialisation",
        "Optimisation",
        "# Epochs",
    ]
    assert row["Regularisation"] == "BN, aug crop_flip, wd 0.0005, LS 0.1"


def test_bundle_round_trip_and_merge(results, tmp_path: Path) -> None:
    write_bundle(results, tmp_path / "a.json")
    back = read_bundle(tmp_path / "a.json")
    pd.testing.assert_frame_equal(seed_table(back, "syn"), seed_table(results, "syn"))
    assert len(merge([back, back]).runs) == len(results.runs)


def test_report_files_and_wandb_report_blocks(results, tmp_path: Path) -> None:
    path = write_report(results, tmp_path / "out", ["synthetic"], "lenet report synthetic")
    text = path.read_text()
    assert "cifar10-jpg" in text and "JPEG" in text and "inconclusive" in text and "| Model/variant |" in text
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["synthetic-curves-activation.png", "synthetic-curves-pooling.png", "synthetic-effects.png"]
    assert all(f"]({name})" in text for name in pngs)
    report = wandb_report(results, "me", "lenet")
    kinds = [type(block).__name__ for block in report.blocks]
    assert kinds[:3] == ["H1", "P", "MarkdownBlock"] and "PanelGrid" in kinds and kinds.count("MarkdownBlock") == 3
    assert "**inconclusive**" in report.blocks[2].text and "±0.5" in report.blocks[2].text  # report.md's legend
    wider = wandb_report(results, "me", "lenet", equivalence=2.0)  # --equivalence reaches the W&B tables too
    assert "±2" in wider.blocks[2].text
    grid = next(b for b in report.blocks if type(b).__name__ == "PanelGrid")
    assert [type(p).__name__ for p in grid.panels] == [
        *["LinePlot"] * 4,  # val/acc and val/loss by activation, then by pooling
        *["BarPlot"] * 2,  # best val/test acc per level of each factor
        "ParallelCoordinatesPlot",
        "ParameterImportancePlot",
        "RunComparer",
    ]
    assert [p.groupby.name for p in grid.panels[:6]] == ["activation"] * 2 + ["pooling"] * 2 + ["activation", "pooling"]
    assert grid.runsets[0].filters.startswith("Metric('Group') = 'syn' and SummaryMetric('state') in")


def test_report_equivalence_band_is_an_option(results, tmp_path: Path) -> None:
    write_bundle(results, tmp_path / "syn.json")
    runner = CliRunner()
    args = ["report", str(tmp_path / "syn.json"), "--out", str(tmp_path / "r")]
    wide = runner.invoke(app, [*args, "--equivalence", "2"])
    assert wide.exit_code == 0, wide.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "--equivalence 2`" in text and "δ = 2 accuracy points" in text and "| equivalent |" in text
    bad = runner.invoke(app, [*args, "--equivalence", "-1"])
    assert bad.exit_code == 2 and "--equivalence must be >= 0" in bad.output


def test_report_from_a_real_local_sweep(folder_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(
        app, ["sweep", "create", str(write_smoke(tmp_path, folder_dir, epochs=2)), "--backend", "local"]
    )
    sweep_id = created.output.split("created sweep ")[1].split()[0]
    assert runner.invoke(app, ["agent", sweep_id, "--wandb", "disabled"]).exit_code == 0
    exported = runner.invoke(app, ["sweep", "export", sweep_id, str(tmp_path / "smoke.json")])
    assert exported.exit_code == 0 and "4 runs" in exported.output
    result = runner.invoke(app, ["report", str(tmp_path / "smoke.json"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Question: does the whole pipeline" in text and "Dataset: tiny-png" in text and "| activation=tanh |" in text
    assert (tmp_path / "report" / "smoke-curves-activation.png").stat().st_size > 10_000
    missing = runner.invoke(app, ["report", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_step_gains_of_an_ordered_study() -> None:
    from analysis.tables import step_gains

    sweep = {
        "method": "grid",
        "parameters": {"preset": {"values": ["classic", "path1_relu", "modern"]}, "seed": {"values": [0, 1, 2]}},
    }
    gain = {"classic": 50.0, "path1_relu": 55.0, "modern": 55.0}
    records = [
        {
            "id": f"{p}-{s}",
            "sweep_id": "p",
            "state": "finished",
            "config": full_config({"preset": p, "seed": s}),
            "summary": {"best/val_acc": gain[p] + 0.1 * s, "test/acc": gain[p] + 0.1 * s},
            "history": [],
        }
        for p in gain
        for s in range(3)
    ]
    table = step_gains(from_records(records, {"p": {"name": "p", "backend": "local", "config": sweep}}), "p")
    assert list(table["step"]) == ["classic → path1_relu", "path1_relu → modern"]
    assert list(table["verdict (val)"]) == ["better", "equivalent"]  # seeds shift all levels alike: no residual
    assert table["Δ val acc (95% simult.)"].iloc[0].startswith("+5.00")


def test_search_report_ranks_every_run_including_stopped_ones(tmp_path: Path) -> None:
    search = {
        "method": "bayes",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {
            "lr": {"distribution": "log_uniform_values", "min": 0.01, "max": 0.4},
            "preset": {"value": "modern"},
        },
    }
    records = []
    for i, (lr, val, state) in enumerate([(0.02, 61.0, "stopped"), (0.1, 70.5, "finished"), (0.3, 68.0, "finished")]):
        records.append(
            {
                "id": f"s-{i}",
                "sweep_id": "srch",
                "state": state,
                "config": full_config({"lr": lr}),
                "summary": {"best/val_acc": val, "test/acc": val - 1, "epochs_run": 3 if state == "stopped" else 9},
                "history": [{"epoch": e, "val/acc": val * e / 9} for e in range(1, 4 if state == "stopped" else 10)],
            }
        )
    results = from_records(records, {"srch": {"name": "search", "backend": "local", "config": search}})
    from analysis.tables import best_run, search_table

    table = search_table(results, "srch")
    assert list(table["run"]) == ["s-1", "s-2", "s-0"] and list(table["lr"]) == ["0.1", "0.3", "0.02"]
    assert list(table["state"]) == ["finished", "finished", "stopped"]
    assert best_run(results, "srch")["run_id"] == "s-1"  # a stopped run never wins
    report = write_report(results, tmp_path, ["x.json"], "lenet report x.json").read_text()
    assert "Search runs, best first" in report and (tmp_path / "search-search.png").stat().st_size > 10_000


def test_a_one_recipe_sweep_gets_curves_per_seed(tmp_path: Path) -> None:
    sweep = {
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"preset": {"value": "modern"}, "seed": {"values": [0, 1]}},
    }
    records = [
        {
            "id": f"l-{s}",
            "sweep_id": "long",
            "state": "finished",
            "config": full_config({"seed": s}),
            "summary": {"best/val_acc": 70.0 + s, "test/acc": 69.0 + s, "dataset": "cifar10-jpg"},
            "history": [{"epoch": e, "val/acc": 60.0 + e + s, "val/loss": 1.0 / e} for e in range(1, 4)],
        }
        for s in (0, 1)
    ]
    results = from_records(records, {"long": {"name": "long", "backend": "local", "config": sweep}})
    report = write_report(results, tmp_path, ["long.json"], "lenet report long.json").read_text()
    assert "![learning curves by seed](long-curves-seed.png)" in report
    assert (tmp_path / "long-curves-seed.png").stat().st_size > 10_000


def test_two_sweeps_sharing_a_name_keep_their_own_files(tmp_path: Path) -> None:
    """One sweep file created twice with other settings: each sweep's CSV and PNG files are its own."""
    sweep = {
        "name": "best_teacher",
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"preset": {"value": "modern"}, "seed": {"values": [0, 1]}},
    }
    records = [
        {
            "id": f"{sweep_id}-{s}",
            "sweep_id": sweep_id,
            "state": "finished",
            "config": full_config({"seed": s}),
            "summary": {"best/val_acc": base + s, "test/acc": base - 1 + s, "dataset": "cifar10-jpg"},
            "history": [{"epoch": e, "val/acc": base - 3 + e, "val/loss": 1.0 / e} for e in range(1, 4)],
        }
        for sweep_id, base in (("aaaa", 70.0), ("bbbb", 72.0))
        for s in (0, 1)
    ]
    meta = {i: {"name": "best_teacher", "backend": "local", "config": sweep} for i in ("aaaa", "bbbb")}
    results = from_records(records, meta)
    write_report(results, tmp_path, ["a.json", "b.json"], "lenet report a.json b.json --compare", compare=True)
    compared = pd.read_csv(tmp_path / "comparison.csv")
    assert list(compared["sweep"]) == ["best_teacher (aaaa)", "best_teacher (bbbb)"]
    assert compared["Δ val vs baseline"][1].startswith("+2.00")
    tables = {i: pd.read_csv(tmp_path / f"best_teacher-{i}-table.csv") for i in ("aaaa", "bbbb")}
    assert tables["aaaa"].to_csv() != tables["bbbb"].to_csv()  # before: the second overwrote the first
    assert (tmp_path / "best_teacher-bbbb-curves-seed.png").stat().st_size > 10_000
    assert not (tmp_path / "best_teacher-table.csv").exists()
    for record in records[2:]:  # the same name no longer hides sweeps of other lengths from --compare
        record["config"] = full_config({"seed": record["config"]["seed"], "epochs": 5})
    with pytest.raises(ConfigError, match=r"best_teacher \(aaaa\): 30, best_teacher \(bbbb\): 5"):
        write_report(from_records(records, meta), tmp_path, ["a.json", "b.json"], "lenet report", compare=True)


# Planted val accuracy of each optimiser x lr cell: each optimiser has its own best lr; rmsprop's best-looking cell
# has a diverged seed, so it is not eligible and rmsprop is compared at its other lr.
TUNED = {
    ("sgd", 0.01): 55.0,
    ("sgd", 0.1): 60.0,
    ("adam", 0.01): 63.0,
    ("adam", 0.1): 50.0,
    ("rmsprop", 0.01): 57.0,
    ("rmsprop", 0.1): 66.0,
}
OPTIM = {
    "method": "grid",
    "metric": {"name": "val/acc", "goal": "maximize"},
    "parameters": {
        "optimizer": {"values": ["sgd", "adam", "rmsprop"]},
        "lr": {"values": [0.01, 0.1]},
        "seed": {"values": list(range(6))},
    },
}


@pytest.fixture
def optim(tmp_path: Path) -> Path:
    """A bundle of the planted optimiser x lr grid (noise sd 0.3 points per run)."""
    rng = np.random.default_rng(1)
    records = []
    for (opt, lr), acc in TUNED.items():
        for s in range(6):
            val = acc + rng.normal(0, 0.3)
            diverged = (opt, lr, s) == ("rmsprop", 0.1, 5)
            records.append(
                {
                    "id": f"o-{opt}-{lr}-{s}",
                    "sweep_id": "opt",
                    "state": "diverged" if diverged else "finished",
                    "config": full_config({"optimizer": opt, "lr": lr, "seed": s}),
                    "summary": {"best/val_acc": None if diverged else val, "test/acc": None if diverged else val - 1},
                    "history": [] if diverged else [{"epoch": 1, "val/acc": val, "val/loss": 1.0}],
                }
            )
    write_bundle(
        from_records(records, {"opt": {"name": "optim", "backend": "local", "config": OPTIM}}), tmp_path / "o.json"
    )
    return tmp_path / "o.json"


def test_tune_compares_each_level_at_its_own_best_value(optim: Path) -> None:
    from analysis.tables import tuned_effects

    results = read_bundle(optim)
    tuned = tuned_effects(results, "opt", "lr").set_index("level")
    assert list(tuned["factor"].unique()) == ["optimizer"]  # lr is picked, not compared
    assert tuned["lr"].to_dict() == {"sgd": 0.1, "adam": 0.01, "rmsprop": 0.01}  # the diverged cell is passed over
    assert tuned["at_edge"].all()  # a two-value grid: every pick is at its edge, the best lr may lie beyond
    for level, want in (("adam", 3.0), ("rmsprop", -3.0)):
        diff, half = tuned.loc[level, "diff_test_acc"], tuned.loc[level, "diff_test_acc_ci"]
        assert abs(diff - want) < 0.6 and 0 < half < 1  # the planted difference, within noise
        assert tuned.loc[level, "verdict_test"] == ("better" if want > 0 else "worse")
    fixed = effects(results, "opt").query("factor == 'optimizer' and context == 'lr=0.01'").set_index("level")
    assert fixed.loc["adam", "diff_val_acc"] == pytest.approx(8.0, abs=0.6)  # at one lr for all: another question


def test_report_tune_option(optim: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["report", str(optim), "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--tune", "lr"])
    assert result.exit_code == 0, result.output
    assert "optim: each at its own best lr (test decides)" in result.output
    text = (tmp_path / "r" / "report.md").read_text()
    assert "--tune lr`" in text and "### Each level at its own best lr" in text and "| best lr (val) |" in text
    assert "| adam | 0.01 (grid edge) |" in text
    assert (tmp_path / "r" / "optim-tuned-lr.csv").exists()
    blocks = wandb_report(read_bundle(optim), "me", "lenet", tune="lr").blocks  # --wandb carries the table too
    assert any("| best lr (val) |" in getattr(b, "text", "") for b in blocks)
    bad = runner.invoke(app, [*args, "--tune", "momentum"])
    assert bad.exit_code == 2 and "--tune momentum: no sweep here varies it (they vary lr, optimizer)" in bad.output


def test_tune_needs_a_second_factor_to_compare() -> None:
    from analysis.tables import check_tune

    one = {"method": "grid", "parameters": {"lr": {"values": [0.01, 0.1]}, "seed": {"values": [0, 1]}}}
    records = [
        {
            "id": f"l-{lr}-{s}",
            "sweep_id": "lr",
            "state": "finished",
            "config": full_config({"lr": lr, "seed": s}),
            "summary": {"best/val_acc": 60.0 + s, "test/acc": 59.0},
            "history": [],
        }
        for lr in (0.01, 0.1)
        for s in (0, 1)
    ]
    results = from_records(records, {"lr": {"name": "lr only", "backend": "local", "config": one}})
    with pytest.raises(ConfigError, match="no sweep here varies another factor to compare at its best lr; drop --tune"):
        check_tune(results, "lr")
