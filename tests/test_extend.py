"""`lenet sweep extend --until-resolved`: seeds added only where a comparison is inconclusive, at the planned looks,
on a real store (summaries written through the Store API, so the verdicts are known), once with real training;
the follow-up sweep file of an immutable (W&B) sweep; and the comparison of a confirmation with its control."""

from pathlib import Path

import pytest
import yaml
from conftest import TINY, lenet, output_lines
from test_sweep import ROOT, grid

from ablation.errors import SweepError
from ablation.store import Store, schema_tables
from ablation.sweep import load_sweep_file
from analysis.results import follow_up_of, from_records, full_config, merge, read_bundle, write_bundle
from analysis.stats import LOOKS, alpha_of_look
from analysis.tables import effects

# Per seed, accuracy = 60 + the level's effect + this seed's noise: tanh is far worse than relu at 3 seeds already;
# gelu's +0.6 is not resolved by 3 seeds (nor 5): the one open comparison.
EFFECT = {"relu": 0.0, "tanh": -8.0, "gelu": 0.6}
NOISE = [0.4, -0.5, 0.2, -0.3, 0.5, -0.1, 0.3, -0.4, 0.1, -0.2]


def accuracy(params: dict, noise_scale: float = 1.0) -> float:
    """The accuracy a run of these parameters 'reaches' (its level's effect plus its seed's and level's noise)."""
    level = list(EFFECT).index(params["activation"])
    return 60 + EFFECT[params["activation"]] + noise_scale * NOISE[(params["seed"] + 3 * level) % len(NOISE)]


def finish_all(store: Store, sweep_id: str, score=accuracy) -> int:
    """Claim every pending run and finish it with the summary `score` gives it (no training); returns how many."""
    done = 0
    while (claim := store.claim(sweep_id, "test")) is not None:
        value = score(claim.params)
        store.finish(claim.run_id, "finished", {"best/val_acc": value, "test/acc": value - 1, "epochs_run": 1})
        done += 1
    return done


def three_level_sweep(store: Store, **extra) -> str:
    """relu (baseline), tanh, gelu x seeds 0-2, all finished."""
    sweep_id = store.create_sweep(grid(activation=list(EFFECT), seed=[0, 1, 2], epochs=1, **extra), seed=0)
    assert finish_all(store, sweep_id) == 9
    return sweep_id


def added(store: Store, sweep_id: str, since: int) -> list[tuple[str, int]]:
    """(activation, seed) of the runs after the first `since`."""
    return [(r["params"]["activation"], r["params"]["seed"]) for r in store.runs(sweep_id)[since:]]


def test_extend_adds_seeds_only_where_a_comparison_is_inconclusive_look_by_look() -> None:
    with Store() as store:
        sweep_id = three_level_sweep(store)
    result = lenet("sweep", "extend", sweep_id, "--until-resolved")
    assert result.exit_code == 0, result.output
    assert f"look 1 of sweep {sweep_id}: 3 seeds per level, α 1.15%" in result.output
    assert "1 of 2 comparisons inconclusive" in result.output and "activation=gelu vs relu" in result.output
    assert "added 4 runs" in result.output and f"lenet agent {sweep_id}" in result.output
    with Store() as store:
        # both sides of the open comparison (gelu and the baseline relu), seeds continuing 0-2; tanh untouched
        assert sorted(added(store, sweep_id, 9)) == [("gelu", 3), ("gelu", 4), ("relu", 3), ("relu", 4)]
        assert all(r["state"] == "pending" for r in store.runs(sweep_id)[9:])
        assert store.sweep(sweep_id)["state"] == "running"
        (look,) = store.looks(sweep_id)
        assert look["look"] == 1 and look["seeds"] == 3 and look["target"] == 5 and look["runs_added"] == 4
        assert look["alpha"] == pytest.approx(alpha_of_look(1)) and look["outcome"] == "extended"
        assert (look["comparisons"], look["inconclusive"]) == (2, 1)
        assert look["open_comparisons"][0]["level"] == "gelu" and look["open_comparisons"][0]["seeds_needed"] > 5

    # Again before the added runs are trained: says so in one line, adds nothing
    again = lenet("sweep", "extend", sweep_id, "--until-resolved")
    assert again.exit_code == 1 and len(output_lines(again)) == 1
    assert "4 of its 13 runs are still pending or running; nothing was added" in again.output
    status = lenet("sweep", "status", sweep_id)
    assert status.exit_code == 0 and "13 runs created of 13" in status.output, status.output
    assert "look 1: 3 seeds per level, α 1.15%, 1 of 2 comparisons inconclusive, 4 runs added" in status.output
    assert "open comparisons at look 2 (α 0.64%" in status.output and "activation=gelu vs relu" in status.output

    with Store() as store:
        assert finish_all(store, sweep_id) == 4  # the added runs are claimable: the grid's size blocks nothing
        assert store.sweep(sweep_id)["state"] == "finished"
    second = lenet("sweep", "extend", sweep_id, "--until-resolved")
    assert second.exit_code == 0 and "look 2 of sweep" in second.output and "5 seeds per level" in second.output
    with Store() as store:
        assert sorted(added(store, sweep_id, 13)) == [("gelu", s) for s in range(5, 10)] + [
            ("relu", s) for s in range(5, 10)
        ]
        assert [look["seeds"] for look in store.looks(sweep_id)] == [3, 5]
        # gelu's runs from now on are 4 points better: the comparison resolves at look 3
        assert finish_all(store, sweep_id, lambda p: accuracy(p) + 4 * (p["activation"] == "gelu")) == 10
    third = lenet("sweep", "extend", sweep_id, "--until-resolved")
    assert third.exit_code == 0 and "nothing added: every comparison (2) is resolved" in third.output
    with Store() as store:
        assert len(store.runs(sweep_id)) == 23
        looks = store.looks(sweep_id)
        assert [(t["look"], t["seeds"], t["outcome"], t["runs_added"]) for t in looks][-1] == (3, 10, "resolved", 0)
    over = lenet("sweep", "extend", sweep_id, "--until-resolved")  # the looks are over: nothing recorded
    assert over.exit_code == 0 and "the looks are over: every comparison was resolved at look 3" in over.output
    with Store() as store:
        assert len(store.looks(sweep_id)) == 3 and len(store.runs(sweep_id)) == 23


def test_the_cap_stops_the_looks_and_says_so() -> None:
    with Store() as store:
        sweep_id = three_level_sweep(store)
    result = lenet("sweep", "extend", sweep_id, "--until-resolved", "--max-seeds", "4")
    assert result.exit_code == 0 and "added 2 runs" in result.output  # 3 -> 4 seeds, not 5
    with Store() as store:
        assert sorted(added(store, sweep_id, 9)) == [("gelu", 3), ("relu", 3)]
        finish_all(store, sweep_id)
    capped = lenet("sweep", "extend", sweep_id, "--until-resolved", "--max-seeds", "4")
    assert capped.exit_code == 0
    assert "nothing added: the cap is reached: 4 seeds per level and --max-seeds 4" in capped.output
    assert "1 comparison(s) stay inconclusive" in capped.output
    with Store() as store:
        assert [(t["look"], t["target"], t["outcome"]) for t in store.looks(sweep_id)] == [
            (1, 4, "extended"),
            (2, None, "cap"),
        ]
    over = lenet("sweep", "extend", sweep_id, "--until-resolved")
    assert over.exit_code == 0 and "the looks are over: look 2 reached the cap" in over.output


def test_reports_of_an_extended_sweep_use_the_alpha_of_its_look() -> None:
    from analysis.results import from_store

    with Store() as store:
        sweep_id = three_level_sweep(store)
        before = effects(from_store(store, sweep_id), sweep_id)
    assert set(before["alpha"]) == {0.05}  # a fixed design: 5%
    assert lenet("sweep", "extend", sweep_id, "--until-resolved").exit_code == 0
    with Store() as store:
        finish_all(store, sweep_id)
        results = from_store(store, sweep_id)
    assert results.sweeps[sweep_id]["looks"][0]["look"] == 1
    assert list(effects(results, sweep_id)["alpha"]) == [alpha_of_look(2)] * 3  # the data is at look 2


def test_extend_refuses_what_it_cannot_extend(tmp_path: Path) -> None:
    with Store() as store:
        unfinished = store.create_sweep(grid(activation=["relu", "tanh"], seed=[0, 1, 2]), seed=0)
        one_recipe = store.create_sweep(grid(activation="relu", seed=[0, 1, 2]), seed=0)
        finish_all(store, one_recipe)
    for args, code, message in [
        ((unfinished, "--until-resolved"), 1, "it has 0 of its 6 runs so far; nothing was added"),
        ((one_recipe, "--until-resolved"), 1, "varies no factor (one recipe over seeds)"),
        ((unfinished,), 2, "--until-resolved"),
        ((unfinished, "--until-resolved", "--out", tmp_path / "f.yaml"), 2, "is local: its new runs join it"),
        (("nope", "--until-resolved"), 1, "unknown sweep id 'nope'"),
        ((unfinished, "--until-resolved", "--equivalence", "-1"), 2, "--equivalence must be >= 0"),
    ]:
        result = lenet("sweep", "extend", *args)
        assert result.exit_code == code and message in result.output, (args, result.output)
        assert len(output_lines(result)) == 1 and "Traceback" not in result.output


def test_extend_then_agent_trains_the_added_runs(folder_dir: Path, tmp_path: Path) -> None:
    """End to end: a real 2-level x 3-seed sweep on tiny data; its first runs' summaries are set (so the look's
    verdict is known), the added runs are trained by `lenet agent`, and the next look is then taken."""
    config = grid(activation=["relu", "gelu"], seed=[0, 1, 2], data="folder", data_dir=str(folder_dir), threads=1)
    config["parameters"].update({k: {"value": v} for k, v in TINY.items()})
    path = tmp_path / "two.yaml"
    path.write_text("# Question: relu or gelu on tiny data?\n" + yaml.safe_dump(config))
    created = lenet("sweep", "create", path, "--backend", "local", "--seed", "0")
    sweep_id = created.output.split("created sweep ")[1].split()[0]
    with Store() as store:
        assert finish_all(store, sweep_id) == 6
    assert lenet("sweep", "extend", sweep_id, "--until-resolved").exit_code == 0
    trained = lenet("agent", sweep_id, "--wandb", "disabled")
    assert trained.exit_code == 0, trained.output
    with Store() as store:
        new = store.runs(sweep_id)[6:]
        assert sorted((r["params"]["activation"], r["params"]["seed"]) for r in new) == [
            ("gelu", 3),
            ("gelu", 4),
            ("relu", 3),
            ("relu", 4),
        ]
        assert all(r["state"] == "finished" and r["summary"]["epochs_run"] == 1 for r in new)
        assert all(r["summary"]["time/total_s"] > 0 and len(store.history(r["id"])) == 1 for r in new)  # trained
        assert all(r["config"]["data_dir"] == str(folder_dir) and r["config"]["seed"] in (3, 4) for r in new)
    nxt = lenet("sweep", "extend", sweep_id, "--until-resolved")
    assert nxt.exit_code == 0 and "look 2 of sweep" in nxt.output and "5 seeds per level" in nxt.output
    with Store() as store:
        assert [t["look"] for t in store.looks(sweep_id)] == [1, 2]


# ---- Immutable (W&B) sweeps: a follow-up grid sweep file, merged back by `lenet report` ----

TWO_FACTORS = {"relu": 0.0, "tanh": 0.6}
POOLING = {"max": 0.0, "avg": 0.6}


def two_factor_records(sweep_id: str, cells: list[tuple[str, str]], seeds: list[int]) -> list[dict]:
    """activation x pooling runs: tanh (in max pooling) and avg (with relu) are +0.6, inconclusive at 3 seeds;
    (tanh, avg) is +8 over (relu, avg) and +8 over (tanh, max): resolved."""
    records = []
    for act, pool in cells:
        for seed in seeds:
            big = 8.0 if (act, pool) == ("tanh", "avg") else 0.0
            value = 60 + TWO_FACTORS[act] + POOLING[pool] + big + NOISE[(seed + 3 * len(records)) % len(NOISE)]
            records.append(
                {
                    "id": f"{sweep_id}-{act}-{pool}-{seed}",
                    "sweep_id": sweep_id,
                    "state": "finished",
                    "config": full_config({"activation": act, "pooling": pool, "seed": seed}),
                    "summary": {"best/val_acc": value, "test/acc": value - 1},
                    "history": [{"epoch": 1, "val/acc": value, "val/loss": 1.0}],
                }
            )
    return records


def wandb_bundle(path: Path) -> Path:
    config = grid(activation=list(TWO_FACTORS), pooling=list(POOLING), seed=[0, 1, 2])
    cells = [(a, p) for a in TWO_FACTORS for p in POOLING]
    meta = {"wb000001": {"name": "twofactor", "backend": "wandb", "config": config}}
    write_bundle(from_records(two_factor_records("wb000001", cells, [0, 1, 2]), meta), path)
    return path


def test_a_wandb_sweep_gets_a_follow_up_sweep_file_that_report_merges(tmp_path: Path) -> None:
    bundle = wandb_bundle(tmp_path / "original.json")
    refused = lenet("sweep", "extend", bundle, "--until-resolved")
    assert refused.exit_code == 2 and "pass --out FILE to write a follow-up sweep file" in refused.output
    result = lenet("sweep", "extend", bundle, "--until-resolved", "--out", tmp_path / "look2.yaml")
    assert result.exit_code == 0, result.output
    assert "2 of 4 comparisons inconclusive" in result.output
    # needed: (relu, max), (tanh, max), (relu, avg) x seeds 3-4; W&B's cartesian grid adds (tanh, avg) x 2
    assert (
        "wrote" in result.output and "8 runs (W&B grids are cartesian: 2 more runs than the 6 needed)" in result.output
    )
    follow_up = load_sweep_file(tmp_path / "look2.yaml")  # a valid sweep file (W&B's schema, run config)
    assert follow_up["method"] == "grid" and follow_up["name"] == "twofactor_look2"
    assert follow_up["parameters"]["activation"] == {"values": ["relu", "tanh"]}
    assert follow_up["parameters"]["pooling"] == {"values": ["max", "avg"]}
    assert follow_up["parameters"]["seed"] == {"values": [3, 4]}
    assert follow_up_of(follow_up) == {
        "sweep": "wb000001",
        "look": 1,
        "seeds": 3,
        "target": 5,
        "alpha": pytest.approx(alpha_of_look(1), abs=1e-6),
    }
    assert (tmp_path / "look2.yaml").read_text().startswith("# Question: extends sweep wb000001: look 1")

    # The follow-up, run on W&B and exported: its runs join the original's tables
    cells = [(a, p) for a in TWO_FACTORS for p in POOLING]
    meta = {"wb000002": {"name": follow_up["name"], "backend": "wandb", "config": follow_up}}
    write_bundle(from_records(two_factor_records("wb000002", cells, [3, 4]), meta), tmp_path / "follow_up.json")
    merged = merge([read_bundle(bundle), read_bundle(tmp_path / "follow_up.json")])
    assert list(merged.sweeps) == ["wb000001"] and set(merged.runs["sweep_id"]) == {"wb000001"}
    assert merged.sweeps["wb000001"]["follow_ups"] == ["wb000002"]
    assert set(effects(merged, "wb000001")["n"]) == {5}  # 3 + 2 seeds per level in every table
    report = lenet("report", bundle, tmp_path / "follow_up.json", "--out", tmp_path / "report")
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count("## twofactor (sweep `wb000001`") == 1 and "twofactor_look2" not in text.split("## Verdicts")[1]
    assert "Runs: 20 (20 finished)" in text and "in follow-up sweep `wb000002`" in text
    assert "judged at look 2's α = 0.64%" in text

    # The next look reads both
    nxt = lenet(
        "sweep", "extend", bundle, tmp_path / "follow_up.json", "--until-resolved", "--out", tmp_path / "l3.yaml"
    )
    assert nxt.exit_code == 0 and "look 2 of sweep wb000001: 5 seeds per level, α 0.64%" in nxt.output
    look3 = load_sweep_file(tmp_path / "l3.yaml")
    assert follow_up_of(look3)["look"] == 2 and look3["parameters"]["seed"] == {"values": [5, 6, 7, 8, 9]}


# ---- A search's winner, confirmed, against the control recipe: the same verdicts ----


def test_report_compares_a_confirmation_with_its_control(tmp_path: Path) -> None:
    confirm = ROOT / "docs" / "results" / "confirm"
    result = lenet("report", confirm / "long.json", confirm / "search_confirm.json", "--compare", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "--compare`" in text.split("\n")[4]  # the command that re-creates the report
    section = text.split("## Comparison of the sweeps (baseline: long)")[1].split("\n## ")[0]
    # the numbers docs/results/README.md quotes: a 2-level table, the seed as block, 2 df
    row = next(line for line in section.splitlines() if line.startswith("| search_confirm"))
    assert "-0.72 ± 1.48 | inconclusive | 6 | -0.94 ± 2.32 | inconclusive | 7 |" in row
    assert (tmp_path / "comparison.csv").exists() and "## Verdicts" in text


def test_compare_refuses_sweeps_that_are_not_like_for_like(tmp_path: Path) -> None:
    confirm = ROOT / "docs" / "results" / "confirm"
    factor = wandb_bundle(tmp_path / "factor.json")
    short = read_bundle(confirm / "long.json")
    short.runs["epochs"] = 20
    write_bundle(short, tmp_path / "short.json")
    for sources, message in [
        ((confirm / "long.json", factor), "--compare compares one-recipe sweeps"),
        (
            (confirm / "search_confirm.json", tmp_path / "short.json"),
            "same epochs (search_confirm (2115946f): 100, long (c3fff9cd): 20)",  # named by id: names may repeat
        ),
        ((confirm / "long.json",), "--compare needs two or more sweeps"),
    ]:
        result = lenet("report", *sources, "--compare", "--out", tmp_path / "r")
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(output_lines(result)) == 1


def test_compare_takes_one_level_of_a_grid_as_the_control(tmp_path: Path) -> None:
    results = ROOT / "docs" / "results"
    sources = (results / "techniques" / "techniques.json", results / "best" / "best.json")
    result = lenet("report", *sources, "--compare", "--control", "preset=modern", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    assert "--compare --control preset=modern`" in text.split("\n")[4]
    section = text.split("## Comparison of the sweeps (baseline: techniques, preset=modern)")[1].split("\n## ")[0]
    # the numbers docs/results/README.md quotes for the best preset: paired by seed against modern's 3 runs
    assert "| techniques (dbe128d2) preset=modern | 50 | 3 | 73.42 ± 1.63 | 73.90 ± 1.40 |" in section
    row = next(line for line in section.splitlines() if line.startswith("| best"))
    assert "| +2.39 ± 0.50 | better |  | +1.91 ± 0.10 | better |" in row
    for args, message in [
        (("--control", "preset=modern"), "--control picks the baseline of --compare"),
        (("--compare", "--control", "modern"), "--control takes NAME=VALUE"),
        (("--compare", "--control", "seed=1"), "varies preset; --control picks a level of a sweep with one factor"),
        (("--compare", "--control", "preset=nope"), "no counted runs at that level of techniques; its levels: modern,"),
    ]:
        result = lenet("report", *sources, *args, "--out", tmp_path / "r")
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(output_lines(result)) == 1


def test_the_store_adds_runs_and_records_each_look_once() -> None:
    assert "looks" in schema_tables(3) and "looks" not in schema_tables(2)
    look = {"look": 1, "seeds": 1, "target": 3, "alpha": alpha_of_look(1), "equivalence": 0.5}
    look |= {"comparisons": 1, "inconclusive": 1, "outcome": "extended"}
    with Store() as store:
        sweep_id = store.create_sweep(grid(activation=["relu", "tanh"], seed=[0]), seed=0)
        assert store.looks(sweep_id) == [] and LOOKS[0] == 3
        first = store.claim(sweep_id, "w")
        with pytest.raises(SweepError, match="2 run\\(s\\) pending or running; let `lenet agent"):
            store.add_runs(sweep_id, [{"activation": "relu", "seed": 1}], look)
        store.finish(first.run_id, "finished", {})
        finish_all(store, sweep_id)
        ids = store.add_runs(sweep_id, [{"activation": a, "seed": s} for a in ("relu", "tanh") for s in (1, 2)], look)
        assert ids == [f"{sweep_id}-{i:03d}" for i in range(2, 6)] and store.sweep(sweep_id)["state"] == "running"
        finish_all(store, sweep_id)
        with pytest.raises(SweepError, match="has 1 look\\(s\\) recorded, so this is not look 1"):
            store.add_runs(sweep_id, [], look)  # a second `extend` that planned the same look: refused
        assert len(store.looks(sweep_id)) == 1 and len(store.runs(sweep_id)) == 6
