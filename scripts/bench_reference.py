"""The papers' way of training, as scripts/bench.py's yardstick.

Written after the training scripts published with the methods advtrain implements (Madry et al.'s and Rice et al.'s
PGD-AT, Wong et al.'s FGSM-RS, Shafahi et al.'s FREE, Zhang et al.'s TRADES): a torchvision DataLoader whose
dataset turns each image into a PIL image and runs per-image transforms on CPU workers; fp32 NCHW; the model in
train mode throughout; attack steps that call loss.backward(), so every attack step also computes (and discards)
the weight gradients; `.item()` calls in the loop for the running loss and accuracy. Nothing here is used by
advtrain itself.

The data are the fast path's own training images (uint8, moved to the CPU), and the architecture is the same,
built from the same seed.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from advtrain.engine.network import build_network
from bench_measure import Runner

REFERENCE = "reference (papers' loop)"
METHODS = ("natural", "pgd", "fgsm_rs", "free", "trades")  # the methods this loop has a reference step for


class PILImages(Dataset):
    """Like torchvision.datasets.CIFAR10/MNIST: uint8 arrays in memory, a PIL image per __getitem__."""

    def __init__(self, images: Tensor, labels: Tensor, transform):
        array = images.cpu().permute(0, 2, 3, 1).numpy()  # (N,H,W,C) uint8
        self.images = array[..., 0] if array.shape[-1] == 1 else array  # grayscale as 'L' images
        self.labels = labels.cpu().numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(np.ascontiguousarray(self.images[i]))), int(self.labels[i])


def reference_loader(images: Tensor, labels: Tensor, *, batch_size: int, crop_padding: int, flip: bool,
                     workers: int, pin_memory: bool) -> DataLoader:
    steps = []
    if crop_padding:
        steps.append(transforms.RandomCrop(images.shape[-1], padding=crop_padding))
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    return DataLoader(PILImages(images, labels, transforms.Compose(steps)), batch_size=batch_size, shuffle=True,
                      num_workers=workers, pin_memory=pin_memory, drop_last=True)


def run_loader(cfg, data, device: torch.device, workers: int) -> DataLoader:
    """reference_loader over a run's training split, with its batch size and augmentation."""
    return reference_loader(data.train.images, data.train.labels, batch_size=cfg.trainer.batch_size,
                            crop_padding=cfg.dataset.crop_padding, flip=cfg.dataset.flip, workers=workers,
                            pin_memory=device.type == "cuda")


def _attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, start: str) -> Tensor:
    """PGD as the papers' code writes it: delta.grad from loss.backward() (weight gradients computed too)."""
    delta = torch.zeros_like(x)
    if start != "none":
        delta.uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    delta.requires_grad = True
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        grad = delta.grad.detach()
        d = (delta + alpha * torch.sign(grad)).clamp(-eps, eps)
        delta.data = (x + d).clamp(0, 1) - x
        delta.grad.zero_()
    return delta.detach()


def _trades_attack(model: nn.Module, x: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """TRADES' published inner loop: autograd.grad of the KL (the one place their code asks for input grads only)."""
    model.eval()
    p_clean = F.softmax(model(x), dim=1).detach()
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * torch.sign(grad.detach()), x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return x_adv.detach()


class NoReference(ValueError):
    """The method has no reference step here."""


class ReferenceStep:
    """One minibatch of `method` (a checked advtrain method config) the papers' way; returns (loss, logits)."""

    def __init__(self, method, model: nn.Module, optimizer: torch.optim.Optimizer):
        if method.name not in METHODS:
            raise NoReference(f"no reference loop for method={method.name}; it has one for: {', '.join(METHODS)}")
        self.m, self.model, self.opt = method, model, optimizer
        self.delta: Tensor | None = None  # FREE's perturbation, kept across minibatches

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        m, model, opt = self.m, self.model, self.opt
        if m.name == "free":
            return self._free(x, y)
        if m.name == "trades":
            x_adv = _trades_attack(model, x, m.eps, m.alpha, m.steps)
            logits = model(x)
            loss = F.cross_entropy(logits, y) + m.beta * F.kl_div(
                F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        else:
            if m.name == "pgd":
                x = x + _attack(model, x, y, m.eps, m.alpha, m.steps, m.start)
            elif m.name == "fgsm_rs":
                x = x + _attack(model, x, y, m.eps, m.alpha_factor * m.eps, 1, "uniform")
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss, logits

    def _free(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        eps = self.m.eps
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        for _ in range(self.m.replays):
            delta = self.delta.clone().requires_grad_(True)
            logits = self.model((x + delta).clamp(0, 1))
            loss = F.cross_entropy(logits, y)
            self.opt.zero_grad()
            loss.backward()
            self.delta = (delta + eps * torch.sign(delta.grad)).clamp(-eps, eps).detach()
            self.opt.step()
        return loss, logits


class Reference(Runner):
    """scripts/bench_reference.py's loop, on the same data and architecture (its own initial weights)."""

    def __init__(self, ours, workers: int):
        cfg, parts = ours.cfg, ours.parts
        super().__init__(REFERENCE, ours.device, cfg.trainer.batch_size)
        torch.manual_seed(cfg.seed)
        model = build_network(parts.spec, parts.method).to(self.device)  # fp32, NCHW
        o = cfg.optim
        optimizer = (torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
                     if o.name == "sgd" else
                     torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay))
        self.train_step = ReferenceStep(cfg.method, model, optimizer)
        self.loader = run_loader(cfg, parts.data, self.device, workers)
        self.batches = iter(self.loader)
        model.train()
        self.running = {"loss": 0.0, "correct": 0, "n": 0}

    @contextmanager
    def settings(self):
        torch.backends.cudnn.benchmark = False  # torch's default, which the papers' scripts keep
        yield

    def step(self) -> None:
        try:
            x, y = next(self.batches)
        except StopIteration:  # a new epoch: the loader restarts its workers, as in training
            self.batches = iter(self.loader)
            x, y = next(self.batches)
        x, y = x.to(self.device), y.to(self.device)
        loss, logits = self.train_step(x, y)
        self.running["loss"] += loss.item() * y.size(0)
        self.running["correct"] += (logits.max(1)[1] == y).sum().item()
        self.running["n"] += y.size(0)
