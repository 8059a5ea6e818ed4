"""The run config: presets, coercion of command-line strings and sweep values, loud failures."""

from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from ablation.config import CHOICES, PRESETS, RunConfig, load_config_file, parse_overrides
from ablation.errors import ConfigError


def test_defaults_are_the_modern_preset() -> None:
    assert RunConfig() == RunConfig.from_dict({}) == RunConfig.from_dict({"preset": "modern"})


def test_classic_preset_then_overrides() -> None:
    config = RunConfig.from_dict({"preset": "classic", "lr": "0.5"})
    assert (config.activation, config.pooling, config.optimizer, config.augment) == (
        "scaled_tanh",
        "avg",
        "sgd",
        "none",
    )
    assert config.lr == 0.5 and config.preset == "classic"


def test_presets_name_every_technique() -> None:
    assert set(PRESETS["modern"]) == set(PRESETS["classic"])


def test_round_trip_through_dict() -> None:
    config = RunConfig.from_dict({"preset": "classic", "dropout": 0.3})
    assert RunConfig.from_dict(config.to_dict()) == config


def test_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        RunConfig().lr = 1.0  # type: ignore[misc]


def test_unknown_key_lists_valid_names_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"learning_rat": 0.1, "activaton": "relu"})
    text = str(err.value)
    assert "'activaton' (did you mean 'activation'?)" in text
    assert "valid settings:" in text and "weight_decay" in text


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_choice_lists_choices(key: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({key: "nonsense"})
    assert "choose one of" in str(err.value) and CHOICES[key][0] in str(err.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("dropout", 1.0),
        ("lr", 0),
        ("momentum", -0.1),
        ("batch_size", 0),
        ("epochs", 0),
        ("label_smoothing", 1.5),
        ("val_size", 0),
    ],
)
def test_out_of_range(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        RunConfig.from_dict({key: value})


def test_onecycle_takes_no_extra_warmup() -> None:
    with pytest.raises(ConfigError, match="onecycle has its own warm-up"):
        RunConfig.from_dict({"schedule": "onecycle", "warmup_epochs": 1})
    assert RunConfig.from_dict({"schedule": "cosine", "warmup_epochs": 1}).warmup_epochs == 1.0


def test_type_errors() -> None:
    with pytest.raises(ConfigError, match="not a valid float"):
        RunConfig.from_dict({"lr": "fast"})
    with pytest.raises(ConfigError, match="whole number"):
        RunConfig.from_dict({"epochs": 2.5})


def test_numpy_scalars_become_python_values() -> None:
    config = RunConfig.from_dict(
        {"lr": np.float64(0.01), "epochs": np.int64(3), "batch_size": "64", "dropout": np.float32(0.5)}
    )
    assert type(config.lr) is float and type(config.epochs) is int and config.batch_size == 64
    assert config.to_dict()["dropout"] == 0.5


def test_parse_overrides() -> None:
    assert parse_overrides(["lr=0.1", "--optimizer=adam", "data_dir="]) == {
        "lr": "0.1",
        "optimizer": "adam",
        "data_dir": "",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_config_file(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("preset: classic\nlr: {value: 0.003}\n_wandb: {x: 1}\n")
    assert RunConfig.from_dict(load_config_file(good)).lr == 0.003
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad)
    (tmp_path / "list.yaml").write_text("- lr\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")


def test_path_presets_add_one_technique_at_a_time() -> None:
    from ablation.config import TECHNIQUES

    chain = ["classic"] + [f"path{k}_{name}" for k, (name, _) in enumerate(TECHNIQUES[:-1], 1)] + ["modern"]
    for (before, after), (_, keys) in zip(zip(chain, chain[1:]), TECHNIQUES):
        changed = {k for k in PRESETS[after] if PRESETS[after][k] != PRESETS[before][k]}
        assert changed and changed <= set(keys), (before, after, changed)


def test_leave_one_out_presets_restore_classic_settings() -> None:
    from ablation.config import TECHNIQUES

    for name, keys in TECHNIQUES:
        variant = PRESETS[f"modern_no_{name}"]
        assert {k for k in variant if variant[k] != PRESETS["modern"][k]} == {
            k for k in keys if PRESETS["classic"][k] != PRESETS["modern"][k]
        }
        assert all(variant[k] == PRESETS["classic"][k] for k in keys)
    assert RunConfig.from_dict({"preset": "modern_plus_dropout"}).dropout > 0


def test_the_published_anchor_is_a_preset() -> None:
    config = RunConfig.from_dict({"preset": "bigballon"})
    recipe = (config.norm, config.optimizer, config.lr, config.weight_decay, config.epochs)
    assert recipe == ("none", "nesterov", 0.05, 2e-4, 200)
    assert (config.schedule, config.pad, config.label_smoothing) == ("step", "mean", 0.0)
    assert config.step_drops() == (81 / 200, 122 / 200)
    assert RunConfig(schedule="step").step_drops() == (0.5, 0.75)  # no milestones: 50% and 75% of the epochs


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"milestones": "81,122"}, "apply to schedule=step only"),
        ({"schedule": "step", "milestones": "122,81"}, "increasing whole epochs"),
        ({"schedule": "step", "milestones": "10,10"}, "increasing whole epochs"),
        ({"schedule": "step", "milestones": "0,5"}, "between 1 and"),
        ({"schedule": "step", "milestones": "30", "epochs": 30}, "between 1 and 29"),
        ({"schedule": "step", "milestones": "1.5"}, "e.g. milestones=15,22"),
        ({"schedule": "step", "milestones": "ten"}, "or milestones='' for drops after 50% and 75%"),
        ({"preset": "bigballon", "epochs": 50}, r"'81,122' is not valid with epochs=50; .*\(e\.g\. milestones=25,37\)"),
        ({"schedule": "step", "milestones": [81, 122]}, "give a single value, e.g. milestones=81,122"),
    ],
)
def test_bad_milestones_say_what_is_wrong(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(settings)


def test_best_is_modern_plus_what_helped_on_validation() -> None:
    best, modern = RunConfig.from_dict({"preset": "best"}), RunConfig()
    changed = {k: v for k, v in best.to_dict().items() if v != modern.to_dict()[k]}
    assert changed == {"tta": "flip_crop", "ema": 0.999, "epochs": 50, "preset": "best"}


def test_best_teacher_is_best_distilled_at_the_grids_pick() -> None:
    teacher = RunConfig.from_dict({"preset": "best_teacher", "teacher": "/t/best.pt"})
    best = RunConfig.from_dict({"preset": "best"}).to_dict()
    changed = {k: v for k, v in teacher.to_dict().items() if v != best[k]}
    assert changed == {"distill_temperature": 2.0, "teacher": "/t/best.pt", "preset": "best_teacher"}
    assert teacher.distilling and (teacher.distill_weight, teacher.distill_temperature) == (0.5, 2.0)
    assert teacher.label_smoothing == best["label_smoothing"] == 0.1


@pytest.mark.parametrize("settings", [{}, {"teacher": "/t/best.pt", "distill_weight": 0.0}])
def test_best_teacher_without_a_teacher_is_refused(settings: dict) -> None:
    with pytest.raises(ConfigError, match="preset=best_teacher distils from a teacher: set teacher=PATH"):
        RunConfig.from_dict({"preset": "best_teacher", **settings})
