"""LeNet-5's shape and switches."""

import math

import pytest
import torch
from torch import nn

from ablation.config import CHOICES, RunConfig
from ablation.model import build_model, count_parameters, make_activation


def test_classic_shape_and_parameter_count() -> None:
    model = build_model(RunConfig.from_dict({"preset": "classic"}))
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 6, (5, 5)), (6, 16, (5, 5))]
    assert [(f.in_features, f.out_features) for f in fcs] == [(400, 120), (120, 84), (84, 10)]
    # 456 + 2416 + 48120 + 10164 + 850: LeNet-5 with 3 input channels.
    assert count_parameters(model) == 62006
    assert any(isinstance(m, nn.AvgPool2d) for m in model)


@pytest.mark.parametrize("key", ["activation", "pooling", "norm", "init"])
def test_every_choice_builds_and_runs(key: str) -> None:
    for value in CHOICES[key]:
        model = build_model(RunConfig.from_dict({key: value, "dropout": 0.5}))
        out = model(torch.randn(4, 3, 32, 32))
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_scaled_tanh_is_lecuns() -> None:
    x = torch.tensor([1.0, -2.0])
    assert torch.allclose(make_activation("scaled_tanh")(x), 1.7159 * torch.tanh(2 * x / 3))


def test_batch_norm_and_dropout_present_when_asked() -> None:
    model = build_model(RunConfig.from_dict({"norm": "batch", "dropout": 0.25}))
    assert sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model) == 4
    assert [m.p for m in model if isinstance(m, nn.Dropout)] == [0.25, 0.25]


@pytest.mark.parametrize(
    "scheme,expected",
    [
        ("lecun_normal", 1 / math.sqrt(400)),
        ("kaiming_normal", math.sqrt(2 / 400)),
        ("xavier_normal", math.sqrt(2 / (400 + 120))),
    ],
)
def test_init_scales(scheme: str, expected: float) -> None:
    torch.manual_seed(0)
    model = build_model(RunConfig.from_dict({"init": scheme, "activation": "relu", "norm": "none"}))
    fc1 = next(m for m in model if isinstance(m, nn.Linear))
    assert fc1.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.count_nonzero(fc1.bias) == 0
