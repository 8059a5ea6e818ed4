"""LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84, fc 10) with every modern switch, and the
CIFAR ResNets (He et al. 2016, section 4.2) that serve as distillation teachers."""

from __future__ import annotations

import math

import torch
from torch import nn

from ablation.config import RunConfig


class ScaledTanh(nn.Module):
    """LeCun's 1.7159 * tanh(2x/3): unit variance in, roughly unit variance out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


def make_activation(name: str) -> nn.Module:
    """The activation module for a config's `activation` value."""
    if name == "scaled_tanh":
        return ScaledTanh()
    return {
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "elu": nn.ELU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
    }[name]()


def _block(layer: nn.Module, width: int, config: RunConfig, conv: bool) -> list[nn.Module]:
    """layer -> [batch norm] -> activation -> [pool | dropout]."""
    parts = [layer]
    if config.norm == "batch":
        parts.append(nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width))
    parts.append(make_activation(config.activation))
    if conv:
        parts.append(nn.MaxPool2d(2) if config.pooling == "max" else nn.AvgPool2d(2))
    elif config.dropout > 0:
        parts.append(nn.Dropout(config.dropout))
    return parts


# Basic blocks per stage of the CIFAR ResNets: 6n + 2 layers (resnet8: n = 1, resnet20: n = 3).
RESNET_BLOCKS = {"resnet8": 1, "resnet20": 3}
ARCH_NAMES = {"lenet5": "LeNet-5", "resnet8": "ResNet-8", "resnet20": "ResNet-20"}


def build_model(config: RunConfig, num_classes: int = 10) -> nn.Sequential:
    """The network `config.arch` names, for 3x32x32 inputs, with the switches of `config`."""
    if config.arch in RESNET_BLOCKS:
        return build_resnet(config, RESNET_BLOCKS[config.arch], num_classes)
    return build_lenet(config, num_classes)


def build_lenet(config: RunConfig, num_classes: int = 10) -> nn.Sequential:
    """LeNet-5 for 3x32x32 inputs, shaped exactly as in LeCun et al. 1998, switches from `config`."""
    bias = config.norm == "none"  # a bias before batch norm is cancelled by its mean subtraction
    model = nn.Sequential(
        *_block(nn.Conv2d(3, 6, 5, bias=bias), 6, config, conv=True),  # 32 -> 28 -> 14
        *_block(nn.Conv2d(6, 16, 5, bias=bias), 16, config, conv=True),  # 14 -> 10 -> 5
        nn.Flatten(),
        *_block(nn.Linear(16 * 5 * 5, 120, bias=bias), 120, config, conv=False),
        *_block(nn.Linear(120, 84, bias=bias), 84, config, conv=False),
        nn.Linear(84, num_classes),
    )
    init_weights(model, config.init, config.activation)
    return model


def _norm2d(width: int, config: RunConfig) -> nn.Module:
    return nn.BatchNorm2d(width) if config.norm == "batch" else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 projection (option B) where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, config: RunConfig) -> None:
        super().__init__()
        bias = config.norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.bn1 = _norm2d(cout, config)
        self.act1 = make_activation(config.activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.bn2 = _norm2d(cout, config)
        self.shortcut = (
            nn.Sequential()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=bias), _norm2d(cout, config))
        )
        self.act2 = make_activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


def build_resnet(config: RunConfig, blocks: int, num_classes: int = 10) -> nn.Sequential:
    """A CIFAR ResNet of 6 * blocks + 2 layers: 3x3 conv 16, three stages (16, 32, 64 channels; the last two
    halve the resolution), global average pool, fc; `activation`, `norm` and `init` come from `config`."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=config.norm == "none"), _norm2d(16, config)]
    layers.append(make_activation(config.activation))
    cin = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(blocks):
            layers.append(BasicBlock(cin, width, stride if i == 0 else 1, config))
            cin = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    init_weights(model, config.init, config.activation)
    return model


def _gain(activation: str) -> float:
    """The variance-preserving gain for an activation (as torch.nn.init.calculate_gain)."""
    if activation in ("relu", "elu", "gelu", "silu"):
        return math.sqrt(2.0)  # the ReLU family halves the variance
    if activation == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", 0.01)
    if activation in ("tanh", "scaled_tanh"):
        return 5.0 / 3.0
    return 1.0


def init_weights(model: nn.Module, scheme: str, activation: str) -> None:
    """Re-initialise conv and fc weights with `scheme`; biases start at zero (except `default`)."""
    if scheme == "default":
        return
    nonlinearity = "leaky_relu" if activation == "leaky_relu" else "relu"
    for layer in model.modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        w = layer.weight
        if scheme == "lecun_normal":
            nn.init.normal_(w, 0.0, 1.0 / math.sqrt(nn.init._calculate_correct_fan(w, "fan_in")))
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(w)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(w)
        elif scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity)
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
        elif scheme == "orthogonal":
            nn.init.orthogonal_(w, gain=_gain(activation))
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
