"""The small MNIST networks of the adversarial-training literature.

- madry_cnn: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018
  (github.com/MadryLab/mnist_challenge, model.py). The original TensorFlow init (truncated normal, std 0.1) is not
  copied; PyTorch defaults train it fine.
- mnist_net: Wong et al., "Fast is better than free", ICLR 2020 (github.com/locuslab/fast_adversarial, MNIST/).
- bn_cnn: mnist_net's shape with BatchNorm after each convolution, so that the methods that work on BatchNorm
  (OAT's dual BN and FiLM) run on MNIST-sized data on a laptop CPU. advtrain's own, not from a paper.
- trades_smallcnn: Zhang et al., "TRADES", ICML 2019 (github.com/yaodongyu/TRADES, models/small_cnn.py), with its
  init: Kaiming-normal convs and an all-zero final layer. With a zero head the logits, and so the input gradient of
  any attack, are exactly zero until the first optimizer step, as in the reference.

Each builder takes in_shape = (C, H, W) and sizes its first Linear layer by a dummy forward, so the same network
runs on 1- or 3-channel inputs of any size the convolutions and pools leave non-empty.
"""

from collections import OrderedDict

import torch
from torch import nn


def _flat_size(convs: nn.Module, in_shape: tuple[int, int, int], arch: str) -> int:
    try:
        with torch.no_grad():
            return convs(torch.zeros(1, *in_shape)).numel()
    except RuntimeError as error:
        raise ValueError(f"{arch} cannot take inputs of shape {in_shape}: {error}") from error


def madry_cnn(in_shape: tuple[int, int, int], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    convs = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_shape[0], 32, 5, padding=2)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]))
    body = nn.Sequential(OrderedDict([
        *convs.named_children(),
        ("fc1", nn.Linear(_flat_size(convs, in_shape, "madry_cnn"), 1024)),
        ("relu3", nn.ReLU()),
    ]))
    return body, nn.Linear(1024, num_classes)


def mnist_net(in_shape: tuple[int, int, int], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    convs = nn.Sequential(
        nn.Conv2d(in_shape[0], 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    body = nn.Sequential(*convs, nn.Linear(_flat_size(convs, in_shape, "mnist_net"), 100), nn.ReLU())
    return body, nn.Linear(100, num_classes)


def bn_cnn(in_shape: tuple[int, int, int], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    convs = nn.Sequential(
        nn.Conv2d(in_shape[0], 16, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
    )
    convs.eval()  # the dummy forward that sizes the Linear layer must not touch the BN statistics
    flat = _flat_size(convs, in_shape, "bn_cnn")
    convs.train()
    body = nn.Sequential(*convs, nn.Linear(flat, 100), nn.ReLU())
    return body, nn.Linear(100, num_classes)


def trades_smallcnn(in_shape: tuple[int, int, int], num_classes: int) -> tuple[nn.Module, nn.Linear]:
    convs = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_shape[0], 32, 3)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 32, 3)),
        ("relu2", nn.ReLU()),
        ("maxpool1", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(32, 64, 3)),
        ("relu3", nn.ReLU()),
        ("conv4", nn.Conv2d(64, 64, 3)),
        ("relu4", nn.ReLU()),
        ("maxpool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]))
    body = nn.Sequential(OrderedDict([
        *convs.named_children(),
        ("fc1", nn.Linear(_flat_size(convs, in_shape, "trades_smallcnn"), 200)),
        ("relu5", nn.ReLU()),
        ("drop", nn.Dropout(0.5)),
        ("fc2", nn.Linear(200, 200)),
        ("relu6", nn.ReLU()),
    ]))
    head = nn.Linear(200, num_classes)
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return body, head
