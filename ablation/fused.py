"""Fused training: K compatible LeNet-5 runs (a pack) trained as one stacked model with one optimiser update.

Each member is the run `train(config)` would train: the same initial weights, data order, augmentation,
optimiser formulas and bookkeeping; only the arithmetic is batched (grouped convolutions, batched matmuls,
batch norm over K*C channels, which is exactly per-member). Members of one pack must agree on `pack_key`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablation.config import RunConfig
from ablation.data import Batches, Dataset, load_dataset
from ablation.errors import ConfigError
from ablation.metrics import epoch_metrics
from ablation.model import build_model, count_parameters, make_activation
from ablation.states import STOPPED
from ablation.tracking import Logger
from ablation.train import (
    Record,
    autocast_dtype,
    checkpoint,
    clean_stream,
    cpu_math,
    lr_factor,
    make_optimizer,
    prepare,
    resolve_device,
    resumable,
    write_checkpoints,
)

# Settings every member of a pack shares: they fix the stacked model's shape, the batches and the step count.
PACK_SETTINGS = (
    "activation",
    "pooling",
    "norm",
    "batch_size",
    "epochs",
    "augment",
    "pad",
    "data",
    "data_dir",
    "val_size",
    "split_seed",
    "precision",
    "device",
    "threads",
)
# Optimisers whose state has the same shape, so one stacked update serves them all.
FAMILIES = {"sgd": "sgd", "momentum": "sgd", "nesterov": "sgd", "adam": "adam", "adamw": "adam", "rmsprop": "rmsprop"}
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam/AdamW defaults, as make_optimizer uses them
RMSPROP_ALPHA, RMSPROP_EPS = 0.99, 1e-8  # torch.optim.RMSprop defaults
# Our per-parameter optimiser state and torch.optim's names for it, per family.
STATE_NAMES = {
    "sgd": (("buf", "momentum_buffer"),),
    "adam": (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")),
    "rmsprop": (("square_avg", "square_avg"),),
}
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # nn.BatchNorm defaults
# The standalone LeNet-5's stateful layers in order; a `bn*` entry exists only with norm=batch.
LAYERS = ("conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "fc2", "bn4", "fc3")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def pack_key(config: RunConfig) -> tuple[Any, ...]:
    """What members of one pack must agree on: shape, data, step count, precision and optimiser family."""
    return (*(getattr(config, name) for name in PACK_SETTINGS), FAMILIES[config.optimizer])


def fusable(config: RunConfig) -> bool:
    """Whether a run can train as a pack member: not with fp16 (its loss scaling is per run) or the second
    round's settings (TTA, EMA, mixing, cutout, distillation, other architectures): not in packs yet."""
    return config.precision != "fp16" and not config.second_round()


def check_pack(configs: Sequence[RunConfig]) -> None:
    """Raise ConfigError naming the first setting on which the members of a would-be pack disagree."""
    if not configs:
        raise ConfigError("a pack needs at least one run config")
    for config in configs:
        if config.second_round():
            raise ConfigError(
                f"fused training does not implement {', '.join(config.second_round())} yet; train such runs one "
                "at a time (lenet agent without --fuse)"
            )
    first = pack_key(configs[0])
    for config in configs[1:]:
        key = pack_key(config)
        for name, a, b in zip((*PACK_SETTINGS, "optimizer family"), first, key):
            if a != b:
                raise ConfigError(
                    f"runs with {name}={a!r} and {name}={b!r} cannot share a pack; train them in separate packs"
                )


def seeded_model(config: RunConfig, num_classes: int = 10) -> nn.Sequential:
    """The standalone model with the initial weights `train(config)` starts from (seeded, then built)."""
    torch.manual_seed(config.seed)
    return build_model(config, num_classes)


def stateful_layers(model: nn.Sequential) -> dict[str, nn.Module]:
    """The standalone model's conv, linear and batch-norm layers under the names in LAYERS."""
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
    layers = [m for m in model if isinstance(m, kinds)]
    names = [n for n in LAYERS if not n.startswith("bn")] if len(layers) == 5 else list(LAYERS)
    return dict(zip(names, layers))


class StackedLeNet(nn.Module):
    """K LeNet-5s as one module: every parameter and buffer has a leading member dimension K.

    Input: B x 3 x 32 x 32 shared by all members, or K x B x 3 x 32 x 32 (one batch per member).
    Output: K x B x classes."""

    def __init__(self, configs: Sequence[RunConfig], num_classes: int = 10) -> None:
        super().__init__()
        check_pack(configs)
        self.configs = list(configs)
        self.k = len(configs)
        first = configs[0]
        self.norm, self.pooling = first.norm == "batch", first.pooling
        self.activation = make_activation(first.activation)
        # Standalone twins, kept outside the module tree: sources of the initial weights, targets of extraction.
        self.members = [seeded_model(c, num_classes) for c in configs]
        self.names = list(stateful_layers(self.members[0]))
        for name in self.names:
            parts = [stateful_layers(m)[name] for m in self.members]
            for pname, _ in parts[0].named_parameters():
                self.register_parameter(
                    f"{name}_{pname}", nn.Parameter(torch.stack([getattr(p, pname) for p in parts]))
                )
            for bname, _ in parts[0].named_buffers():
                self.register_buffer(f"{name}_{bname}", torch.stack([getattr(p, bname) for p in parts]).clone())
        self.register_buffer("dropout", torch.tensor([c.dropout for c in configs]))
        self.any_dropout = any(c.dropout > 0 for c in configs)  # a Python flag: no device sync per step

    def _get(self, layer: str, name: str) -> torch.Tensor | None:
        return getattr(self, f"{layer}_{name}", None)

    def _conv(self, layer: str, x: torch.Tensor, groups: int) -> torch.Tensor:
        w, b = self._get(layer, "weight"), self._get(layer, "bias")
        return F.conv2d(x, w.flatten(0, 1), None if b is None else b.flatten(), groups=groups)

    def _bn(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """Batch norm over B x (K*C) [x H x W]: per channel, hence per member."""
        if self.training:
            self._get(layer, "num_batches_tracked").add_(1)
        return F.batch_norm(
            x,
            self._get(layer, "running_mean").view(-1),  # views: the running stats update in place
            self._get(layer, "running_var").view(-1),
            self._get(layer, "weight").flatten(),
            self._get(layer, "bias").flatten(),
            self.training,
            BN_MOMENTUM,
            BN_EPS,
        )

    def _conv_block(self, layer: str, bn: str, x: torch.Tensor, groups: int) -> torch.Tensor:
        h = self._conv(layer, x, groups)
        h = self.activation(self._bn(bn, h) if self.norm else h)
        return F.max_pool2d(h, 2) if self.pooling == "max" else F.avg_pool2d(h, 2)

    def _linear(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        w, b = self._get(layer, "weight"), self._get(layer, "bias")
        wt = w.transpose(1, 2)
        return torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)

    def _fc_block(self, layer: str, bn: str, x: torch.Tensor) -> torch.Tensor:
        h = self._linear(layer, x)
        if self.norm:
            k, batch, width = h.shape
            h = self._bn(bn, h.transpose(0, 1).reshape(batch, k * width)).view(batch, k, width).transpose(0, 1)
        h = self.activation(h)
        if self.training and self.any_dropout:
            p = self.dropout.to(h.dtype).view(-1, 1, 1)
            h = h * (torch.rand_like(h) >= p) / (1 - p)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # one batch for all: conv1 is one ordinary conv with K*6 output channels
            h = self._conv_block("conv1", "bn1", x, 1)
        else:  # one batch per member: K*3 input channels, one group per member
            h = self._conv_block("conv1", "bn1", x.transpose(0, 1).flatten(1, 2), self.k)
        h = self._conv_block("conv2", "bn2", h, self.k)
        h = h.reshape(h.shape[0], self.k, -1).transpose(0, 1)  # K x B x 400, in Flatten's order
        h = self._fc_block("fc1", "bn3", h)
        h = self._fc_block("fc2", "bn4", h)
        return self._linear("fc3", h)

    @torch.no_grad()
    def member(self, i: int) -> nn.Sequential:
        """Member i as a standalone LeNet-5 (its twin, refreshed): state_dict() is a standalone checkpoint's."""
        ref = self.conv1_weight
        model = self.members[i].to(ref.device, ref.dtype)
        for name, layer in stateful_layers(model).items():
            for pname, p in [*layer.named_parameters(), *layer.named_buffers()]:
                p.copy_(self._get(name, pname)[i])
        return model

    @torch.no_grad()
    def load_member(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Set member i from a standalone LeNet-5 state_dict (a checkpoint's "model")."""
        twin = self.member(i)
        twin.load_state_dict(state)
        for name, layer in stateful_layers(twin).items():
            for pname, p in [*layer.named_parameters(), *layer.named_buffers()]:
                self._get(name, pname)[i].copy_(p)

    def stacked_weights(self) -> list[nn.Parameter]:
        """The conv/fc weights (ndim > 1 in a standalone model): weight decay and l1 apply to these only."""
        return [p for p in self.parameters() if p.ndim > 2]

    def bn_buffers(self) -> list[torch.Tensor]:
        """Every running statistic (to freeze the stats of members that stopped)."""
        return [b for name, b in self.named_buffers() if name.endswith(BN_BUFFERS)]


class StackedOptimizer:
    """One update for all members, with torch.optim's formulas and make_optimizer's conventions: weight decay
    on conv/fc weights only, coupled L2 (added to the gradient) except adamw (weights shrink by lr * wd)."""

    def __init__(self, model: StackedLeNet, configs: Sequence[RunConfig]) -> None:
        self.params = list(model.parameters())
        self.family = FAMILIES[configs[0].optimizer]
        p0 = self.params[0]

        def vec(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=p0.dtype, device=p0.device)

        self.lr = vec([c.lr for c in configs])
        self.weight_decay = vec([c.weight_decay for c in configs])
        self.momentum = vec([0.0 if c.optimizer == "sgd" else c.momentum for c in configs])
        self.nesterov = torch.tensor([c.optimizer == "nesterov" and c.momentum > 0 for c in configs], device=p0.device)
        self.decoupled = torch.tensor([c.optimizer == "adamw" for c in configs], device=p0.device)
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        self.steps = 0

    @torch.no_grad()
    def load_member(self, i: int, config: RunConfig, twin: nn.Module, saved: dict[str, Any]) -> None:
        """Set member i's state from a torch optimiser state_dict of `twin` (make_optimizer's, in a checkpoint)."""
        optimizer = make_optimizer(twin, config)
        optimizer.load_state_dict(saved)
        for p, stacked, state in zip(twin.parameters(), self.params, self.state):  # the twin's order is the stack's
            entry = optimizer.state.get(p, {})
            for name, torch_name in STATE_NAMES[self.family]:
                if torch_name in entry:
                    state.setdefault(name, torch.zeros_like(stacked))[i].copy_(entry[torch_name])

    @torch.no_grad()
    def step(self, factor: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Update every parameter with lr = peak lr x `factor` (K,); members not `active` keep their weights."""
        self.steps += 1
        lr = self.lr * factor.to(self.lr)
        update = {"sgd": self._sgd, "adam": self._adam, "rmsprop": self._rmsprop}[self.family]
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.ndim - 1)
            wd = self.weight_decay.view(shape) if p.ndim > 2 else None
            new = update(p, p.grad, state, lr.view(shape), wd, shape)
            p.copy_(new if active is None else torch.where(active.view(shape), new, p))

    def _sgd(
        self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, wd: Tensor | None, shape: tuple[int, ...]
    ) -> Tensor:
        d = g if wd is None else g + wd * p
        m = self.momentum.view(shape)
        buf = d.clone() if "buf" not in state else state["buf"] * m + d  # torch: the first buffer is the gradient
        state["buf"] = buf
        d = torch.where(self.nesterov.view(shape), d + m * buf, buf)  # momentum 0: buf == d
        return p - lr * d

    def _adam(
        self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, wd: Tensor | None, shape: tuple[int, ...]
    ) -> Tensor:
        base = p
        if wd is not None:
            decoupled = self.decoupled.view(shape)
            g = torch.where(decoupled, g, g + wd * p)
            base = torch.where(decoupled, p * (1 - lr * wd), p)
        b1, b2 = ADAM_BETAS
        m = state.get("exp_avg", torch.zeros_like(p)).lerp(g, 1 - b1)
        v = state.get("exp_avg_sq", torch.zeros_like(p)) * b2 + (1 - b2) * g * g
        state["exp_avg"], state["exp_avg_sq"] = m, v
        step_size = lr / (1 - b1**self.steps)
        denom = v.sqrt() / math.sqrt(1 - b2**self.steps) + ADAM_EPS
        return base - step_size * (m / denom)

    def _rmsprop(
        self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, wd: Tensor | None, shape: tuple[int, ...]
    ) -> Tensor:
        if wd is not None:
            g = g + wd * p
        avg = state.get("square_avg", torch.zeros_like(p)) * RMSPROP_ALPHA + (1 - RMSPROP_ALPHA) * g * g
        state["square_avg"] = avg
        return p - lr * (g / (avg.sqrt() + RMSPROP_EPS))


def lr_table(configs: Sequence[RunConfig], steps_per_epoch: int) -> torch.Tensor:
    """Each member's lr multiplier at every optimiser step (K x total+1), as train()'s LambdaLR computes it."""
    total = steps_per_epoch * configs[0].epochs
    rows = []
    for c in configs:
        warmup = round(c.warmup_epochs * steps_per_epoch)
        rows.append([lr_factor(s, total, warmup, c.schedule, c.step_drops()) for s in range(total + 1)])
    return torch.tensor(rows, dtype=torch.float64)


def member_losses(out: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy with its own label smoothing (torch's formula): K."""
    logp = F.log_softmax(out, dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(-1)
    eps = smoothing.to(out.dtype).view(-1, 1)
    return ((1 - eps) * nll + eps * smooth).mean(1)


class PackTrainer:
    """The state of one pack's optimisation; `step` trains every member on its batch."""

    def __init__(
        self, configs: Sequence[RunConfig], model: StackedLeNet, steps_per_epoch: int, dtype: torch.dtype | None
    ) -> None:
        self.configs, self.model, self.dtype = list(configs), model, dtype
        device = next(model.parameters()).device
        self.optimizer = StackedOptimizer(model, configs)
        self.factors = lr_table(configs, steps_per_epoch).to(device)
        self.smoothing = torch.tensor([c.label_smoothing for c in configs], dtype=torch.float64, device=device)
        self.l1 = torch.tensor([c.l1 for c in configs], dtype=torch.float64, device=device)
        self.clip = torch.tensor([c.grad_clip for c in configs], dtype=torch.float64, device=device)
        self.active = torch.ones(len(configs), dtype=torch.bool, device=device)
        self.frozen: set[int] = set()
        # Python flags, so a step never waits on the device to decide what to compute.
        self.any_l1 = any(c.l1 > 0 for c in configs)
        self.any_clip = any(c.grad_clip > 0 for c in configs)
        self.weights = model.stacked_weights()

    def lr(self, i: int) -> float:
        """Member i's current lr, as train() logs it (scheduler.get_last_lr()[0])."""
        return self.configs[i].lr * lr_factor(*self.schedule(i))

    def schedule(self, i: int) -> tuple[int, int, int, str, tuple[float, ...]]:
        """lr_factor's arguments for member i now: (steps done, total steps, warm-up steps, schedule, drops)."""
        total = self.factors.shape[1] - 1
        steps_per_epoch = total // self.configs[i].epochs
        warmup = round(self.configs[i].warmup_epochs * steps_per_epoch)
        return self.optimizer.steps, total, warmup, self.configs[i].schedule, self.configs[i].step_drops()

    def freeze(self, i: int) -> None:
        """Member i stops updating: its weights and batch-norm statistics stay as they are."""
        self.active[i] = False
        self.frozen.add(i)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; x is shared (B x 3 x 32 x 32) or per member, y is K x B; returns each
        member's summed loss and correct count (K, on device, no sync)."""
        model = self.model
        frozen = [b.clone() for b in model.bn_buffers()] if self.frozen else None
        with torch.autocast(y.device.type, dtype=self.dtype) if self.dtype else nullcontext():
            out = model(x)
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        losses = member_losses(out, y, self.smoothing)
        objective = losses.sum()
        if self.any_l1:
            l1 = sum(w.abs().flatten(1).sum(1) for w in self.weights)
            objective = objective + (self.l1.to(l1.dtype) * l1).sum()
        for p in model.parameters():
            p.grad = None
        objective.backward()
        if self.any_clip:
            self._clip()
        self.optimizer.step(self.factors[:, self.optimizer.steps], None if frozen is None else self.active)
        if frozen is not None:
            with torch.no_grad():
                for b, old in zip(model.bn_buffers(), frozen):
                    b.copy_(torch.where(self.active.view((-1,) + (1,) * (b.ndim - 1)), b, old))
        return losses.detach() * y.shape[1], (out.argmax(-1) == y).sum(1)

    @torch.no_grad()
    def _clip(self) -> None:
        """clip_grad_norm_ per member: each member's gradients scaled to at most its grad_clip in global L2."""
        grads = [p.grad for p in self.model.parameters()]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
        coef = (self.clip.to(norms.dtype) / (norms + 1e-6)).clamp(max=1.0)
        coef = torch.where(self.clip > 0, coef, torch.ones_like(coef))
        for g in grads:
            g.mul_(coef.view((-1,) + (1,) * (g.ndim - 1)))


def torch_state(family: str, config: RunConfig, state: dict[str, torch.Tensor], i: int, steps: int) -> dict:
    """Member i's slice of one stacked parameter's optimiser state, as torch.optim keeps it for that parameter."""
    if family == "sgd":
        momentum = 0.0 if config.optimizer == "sgd" else config.momentum
        return {"momentum_buffer": state["buf"][i].clone()} if momentum != 0 and "buf" in state else {}
    step = torch.tensor(float(steps))
    if family == "adam":
        return {"step": step, "exp_avg": state["exp_avg"][i].clone(), "exp_avg_sq": state["exp_avg_sq"][i].clone()}
    return {"step": step, "square_avg": state["square_avg"][i].clone()}


def member_resume_state(trainer: PackTrainer, i: int, stream: Batches, record: Record) -> dict[str, Any]:
    """What train()'s Trainer.resume_state holds for member i, so `train(config, resume=True)` continues it."""
    config, twin, opt = trainer.configs[i], trainer.model.member(i), trainer.optimizer
    optimizer = make_optimizer(twin, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0).state_dict()  # before it sets the lr
    for p, state in zip(twin.parameters(), opt.state):  # the twin's parameters are in the stacked order
        entry = torch_state(opt.family, config, state, i, opt.steps) if state else {}
        if entry:
            optimizer.state[p] = entry
    lr = config.lr * lr_factor(*trainer.schedule(i))
    for group in optimizer.param_groups:
        group["lr"] = lr
    scheduler.update(last_epoch=opt.steps, _step_count=opt.steps + 1, _last_lr=[lr] * len(optimizer.param_groups))
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler,
        "data_rng": stream.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "record": record.dump(),
    }


def seed_groups(configs: Sequence[RunConfig]) -> tuple[list[int], torch.Tensor]:
    """The distinct seeds (first-seen order) and each member's index into them."""
    seeds: list[int] = []
    for c in configs:
        if c.seed not in seeds:
            seeds.append(c.seed)
    return seeds, torch.tensor([seeds.index(c.seed) for c in configs])


def pack_streams(
    configs: Sequence[RunConfig], dataset: Dataset, device: torch.device
) -> tuple[list[Batches], Batches, Batches]:
    """One training stream per distinct seed (its generator seeded as train's), plus shared val and test streams."""
    train_b, val_b, test_b = prepare(configs[0], dataset, device)
    seeds, _ = seed_groups(configs)
    streams = [dataclasses.replace(train_b, gen=torch.Generator(device=device).manual_seed(s)) for s in seeds]
    return streams, val_b, test_b


@torch.no_grad()
def evaluate_pack(model: StackedLeNet, batches: Batches, dtype: torch.dtype | None) -> tuple[list[float], list[float]]:
    """Each member's mean cross-entropy and accuracy (%) over `batches`, in eval mode."""
    model.eval()
    device = batches.images.device
    loss = torch.zeros(model.k, dtype=torch.float64, device=device)
    correct = torch.zeros(model.k, dtype=torch.int64, device=device)
    for x, y in batches:
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            out = model(x)
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        yy = y.expand(model.k, -1)
        loss += -F.log_softmax(out, -1).gather(-1, yy.unsqueeze(-1)).sum((1, 2)).double()
        correct += (out.argmax(-1) == yy).sum(1)
    n = len(batches.labels)
    return (loss / n).tolist(), (100.0 * correct.double() / n).tolist()


def train_pack(
    configs: Sequence[RunConfig],
    loggers: Sequence[Logger],
    checkpoint_dirs: Sequence[Path] | None = None,
    dataset: Dataset | None = None,
    should_stop: Callable[[int], bool] | None = None,
    stop_now: Callable[[], bool] | None = None,
    resume: bool = False,
    on_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train a pack; each member logs, checkpoints and summarises as `train(config, logger)` would.

    `should_stop(i)` is asked after every epoch for each running member (a stopped member stops updating, the
    others go on); `stop_now` before every batch stops the whole pack. A diverged member ends `diverged` alone.
    A member that ends before the others is summarised then, and `on_end(i, summary)` told at once. Each
    member's best.pt and last.pt are standalone checkpoints (`train(config, resume=True)` continues last.pt);
    `resume` continues every member from its last.pt as one pack (they must have ended the same epoch)."""
    return Pack(configs, loggers, checkpoint_dirs, dataset, on_end).run(should_stop, stop_now, resume)


class Pack:
    """One pack's run: the stacked model and optimiser, each member's record, and its checkpoints."""

    def __init__(
        self,
        configs: Sequence[RunConfig],
        loggers: Sequence[Logger],
        checkpoint_dirs: Sequence[Path] | None,
        dataset: Dataset | None,
        on_end: Callable[[int, dict[str, Any]], None] | None,
    ) -> None:
        self.start = time.perf_counter()
        check_pack(configs)
        self.configs, self.loggers, self.dirs, self.on_end = list(configs), list(loggers), checkpoint_dirs, on_end
        k = len(configs)
        if len(loggers) != k or (checkpoint_dirs is not None and len(checkpoint_dirs) != k):
            raise ConfigError(
                f"a pack of {k} runs needs {k} loggers and {k} checkpoint folders (or none); pass one per run"
            )
        first = configs[0]
        self.device = resolve_device(first.device)
        cpu_math(first.threads)
        self.dtype = autocast_dtype(first.precision, self.device)
        if self.dtype == torch.float16:
            raise ConfigError("precision=fp16 is not supported by fused training yet; use precision=bf16")
        self.dataset = dataset or load_dataset(first)
        self.streams, self.val_b, self.test_b = pack_streams(configs, self.dataset, self.device)
        self.clean_b = clean_stream(self.streams[0], first.split_seed)
        self.group = seed_groups(configs)[1].to(self.device)
        self.model = StackedLeNet(configs, len(self.dataset.classes)).to(self.device)
        self.trainer = PackTrainer(configs, self.model, len(self.streams[0]), self.dtype)
        self.records = [Record(c) for c in configs]
        self.running = list(range(k))
        self.resume_states: dict[int, dict[str, Any]] = {}  # each member's last whole-epoch state, for last.pt
        self.summaries: dict[int, dict[str, Any]] = {}

    def run(
        self, should_stop: Callable[[int], bool] | None, stop_now: Callable[[], bool] | None, resume: bool
    ) -> list[dict[str, Any]]:
        """Train until every member has ended (or `stop_now` cuts the pack short); each member's summary."""
        first = self.restore() + 1 if resume else 1
        asked = functools.partial(_asked, should_stop=should_stop, stop_now=stop_now)
        cut_short = False
        for epoch in range(first, self.configs[0].epochs + 1):
            if not self.running:
                break
            tick = time.perf_counter()
            result = _epoch(self.trainer, self.streams, self.group, [self.loggers[i] for i in self.running], stop_now)
            if result is None:
                for i in self.running:
                    self.records[i].state = STOPPED
                cut_short = True
                break
            self.end_epoch(epoch, result, tick, asked)
        for i in list(self.running):
            self.finish(i, resumable=not cut_short)  # a cut-short epoch's weights are not resumable
        return [self.summaries[i] for i in range(len(self.configs))]

    def end_epoch(
        self, epoch: int, result: tuple[list[float], list[float], int], tick: float, asked: Callable[[int], bool]
    ) -> None:
        """Evaluate, log and checkpoint every running member (all checkpoints written as one, so the members'
        last.pt stay at one epoch); members that stop now are finished."""
        losses, accs, seen = result
        val_loss, val_acc = evaluate_pack(self.model, self.val_b, self.dtype)
        _, clean_acc = evaluate_pack(self.model, self.clean_b, self.dtype)
        seconds = time.perf_counter() - tick
        files: dict[Path, dict[str, Any]] = {}
        stopping = []
        images = seen + len(self.val_b.labels) + len(self.clean_b.labels)
        for i in self.running:
            lr = self.trainer.lr(i)
            metrics = epoch_metrics(losses[i], accs[i], clean_acc[i], val_loss[i], val_acc[i], lr, seconds, images)
            self.loggers[i].log(metrics, epoch)
            record = self.records[i]
            if record.add(epoch, metrics, self.model.member(i)) and self.dirs:
                files[self.dirs[i] / "best.pt"] = self.checkpoint(i, record.summary(), epoch)
            if record.should_stop(functools.partial(asked, i)):
                stopping.append(i)
            if self.dirs:
                self.resume_states[i] = member_resume_state(self.trainer, i, self.streams[int(self.group[i])], record)
                files[self.dirs[i] / "last.pt"] = self.checkpoint(i, record.summary(), epoch, self.resume_states[i])
        write_checkpoints(files)
        for i in stopping:
            self.trainer.freeze(i)
            self.finish(i, resumable=True)

    def finish(self, i: int, resumable: bool) -> None:
        """Member i has ended: its test metrics (of its best-val weights), final last.pt, summary and `on_end`."""
        self.running.remove(i)
        twin, record = self.model.member(i), self.records[i]
        summary = record.finish(twin, self.test_b, self.dtype, self.start)
        summary.update(
            dataset=self.dataset.name,
            params=count_parameters(twin),
            device=str(self.device),
            threads=torch.get_num_threads(),
            torch=str(torch.__version__),
            python=platform.python_version(),
            pack_size=len(self.configs),
        )
        if self.dirs and resumable and i in self.resume_states:
            self.resume_states[i]["record"] = record.dump()
            last = self.checkpoint(i, summary, record.last_epoch, self.resume_states[i])
            write_checkpoints({self.dirs[i] / "last.pt": last})
        self.loggers[i].summary(summary)
        self.summaries[i] = summary
        if self.on_end is not None:
            self.on_end(i, summary)

    def checkpoint(self, i: int, metrics: dict[str, Any], epoch: int, resume: dict | None = None) -> dict[str, Any]:
        """Member i's checkpoint contents, in the standalone format."""
        return checkpoint(self.model.member(i), self.configs[i], self.dataset, metrics, epoch, self.val_b, resume)

    def restore(self) -> int:
        """Continue every member from its last.pt; returns the epoch they ended (0: none had one, start afresh)."""
        if not self.dirs:
            return 0
        payloads = [resumable(d / "last.pt", c) for d, c in zip(self.dirs, self.configs)]
        epochs = {p["epoch"] if p else 0 for p in payloads}
        if len(epochs) > 1:
            raise ConfigError(
                f"the runs of this pack ended different epochs ({', '.join(map(str, sorted(epochs)))}) and cannot "
                "resume as one pack; resume them in packs of runs that ended the same epoch"
            )
        if epochs == {0}:
            return 0
        epoch = epochs.pop()
        skipped: set[int] = set()
        for i, payload in enumerate(payloads):
            state = payload["resume"]
            self.model.load_member(i, payload["model"])
            self.trainer.optimizer.load_member(i, self.configs[i], self.model.member(i), state["optimizer"])
            self.trainer.optimizer.steps = state["scheduler"]["last_epoch"]
            g = int(self.group[i])
            if state["data_rng"].numel() == self.streams[g].gen.get_state().numel():
                self.streams[g].gen.set_state(state["data_rng"])
            elif g not in skipped:  # saved on another device type: draw the epochs run, once per seed's stream
                skip_epochs(self.streams[g], epoch)
                skipped.add(g)
            self.records[i].load(state["record"])
            self.resume_states[i] = state
        torch.set_rng_state(payloads[0]["resume"]["torch_rng"])  # dropout draws from the pack's one stream
        if payloads[0]["resume"].get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payloads[0]["resume"]["cuda_rng"])
        return epoch


def skip_epochs(stream: Batches, epochs: int) -> None:
    """Draw `epochs` epochs' data order and crops from a pack's stream without training (packs do no mixing)."""
    for _ in range(epochs):
        for _ in stream.views():
            pass


def _asked(
    i: int, should_stop: Callable[[int], bool] | None = None, stop_now: Callable[[], bool] | None = None
) -> bool:
    """Whether member i is told to stop from outside (a signal for the whole pack, or its own sweep stop)."""
    return bool(stop_now and stop_now()) or bool(should_stop and should_stop(i))


def _epoch(
    trainer: PackTrainer,
    streams: list[Batches],
    group: torch.Tensor,
    loggers: list[Logger],
    stop_now: Callable[[], bool] | None,
) -> tuple[list[float], list[float], int] | None:
    """One pass over the training batches: each member's (mean loss, accuracy %), images seen; None if cut short."""
    trainer.model.train()
    k = trainer.model.k
    device = streams[0].images.device
    total_loss = torch.zeros(k, dtype=torch.float64, device=device)
    total_correct = torch.zeros(k, dtype=torch.int64, device=device)
    seen, n = 0, len(streams[0])
    for step, batches in enumerate(zip(*streams)):
        if stop_now is not None and stop_now():
            return None
        if len(batches) == 1:  # one seed: every member sees the same batch
            x, y = batches[0][0], batches[0][1].expand(k, -1)
        else:
            x = torch.stack([b[0] for b in batches])[group]
            y = torch.stack([b[1] for b in batches])[group]
        loss, correct = trainer.step(x, y)
        total_loss += loss.double()
        total_correct += correct
        seen += y.shape[1]
        for logger in loggers:
            logger.progress(step + 1, n)
    return (total_loss / seen).tolist(), (100.0 * total_correct.double() / seen).tolist(), seen
