"""Pre-activation ResNet (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016) in the CIFAR form
used by Wong et al., "Fast is better than free" (github.com/locuslab/fast_adversarial, CIFAR10/preact_resnet.py) and
Rice et al., "Overfitting in adversarially robust deep learning" (github.com/locuslab/robust_overfitting).

3x3 stem, no max-pool, PreActBlocks, a final BN+ReLU, then global average pooling: adaptive, so inputs other than
32x32 work (on 32x32 it equals the reference's avg_pool2d(4)). Submodule names follow the reference, so its
checkpoints load after renaming `linear.*` to `head.*` and prefixing the rest with `body.`.
"""

from torch import nn

from advtrain.errors import ConfigError

# Basic-block counts per stage.
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        # A projection shortcut reads the pre-activated input; the identity shortcut carries x untouched (He et al.).
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return out + shortcut


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    first = PreActBlock(in_planes, planes, stride)
    return nn.Sequential(first, *(PreActBlock(planes, planes, 1) for _ in range(blocks - 1)))


class PreActResNet(nn.Module):
    """Normalized image -> (N, 512) features."""

    feature_dim = 512

    def __init__(self, in_channels: int, num_blocks: tuple[int, int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.layer1 = _stage(64, 64, num_blocks[0], stride=1)
        self.layer2 = _stage(64, 128, num_blocks[1], stride=2)
        self.layer3 = _stage(128, 256, num_blocks[2], stride=2)
        self.layer4 = _stage(256, 512, num_blocks[3], stride=2)
        self.bn = nn.BatchNorm2d(512)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.pool(self.relu(self.bn(out))).flatten(1)


def check_preact_resnet(*, depth: int = 18) -> None:
    if depth not in DEPTHS:
        raise ConfigError(f"arch.depth={depth} is not a preact_resnet depth; valid: {', '.join(map(str, DEPTHS))}")


def preact_resnet(in_shape: tuple[int, int, int], num_classes: int, *, depth: int = 18) -> tuple[nn.Module, nn.Linear]:
    check_preact_resnet(depth=depth)
    body = PreActResNet(in_shape[0], DEPTHS[depth])
    return body, nn.Linear(body.feature_dim, num_classes)
