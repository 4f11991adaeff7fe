"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016) in the CIFAR form of
github.com/kuangliu/pytorch-cifar (models/resnet.py), the ResNet-18/34/50 of most adversarial-training papers.

Stem choice: inputs with both sides under 64 pixels (MNIST, CIFAR, SVHN) get the reference's 3x3 stride-1 stem with
no max-pool; inputs of 64 pixels or more per side (Tiny-ImageNet, ImageFolder data) get the ImageNet stem, a 7x7
stride-2 conv and a 3x3 stride-2 max-pool, so that layer4 works on a few pixels per side instead of, at 224x224, 28.
Global average pooling is adaptive, so any input size works (on 32x32 it equals the reference's avg_pool2d(4)).
Submodule names follow the reference (conv1, bn1, layerN, shortcut), so its checkpoints load after renaming
`linear.*` to `head.*` and prefixing the rest with `body.`.
"""

from torch import nn

from advtrain.errors import ConfigError

IMAGENET_STEM_MIN_SIDE = 64  # pixels


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU()
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()  # identity
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


def _stage(block: type[nn.Module], in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    first = block(in_planes, planes, stride)
    return nn.Sequential(first, *(block(planes * block.expansion, planes, 1) for _ in range(blocks - 1)))


# Block type and block counts per stage.
DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """Normalized image -> (N, 512 * expansion) features."""

    def __init__(self, in_shape: tuple[int, int, int], block: type[nn.Module], num_blocks: tuple[int, ...]):
        super().__init__()
        channels, height, width = in_shape
        if min(height, width) >= IMAGENET_STEM_MIN_SIDE:
            self.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(channels, 64, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        e = block.expansion
        self.layer1 = _stage(block, 64, 64, num_blocks[0], stride=1)
        self.layer2 = _stage(block, 64 * e, 128, num_blocks[1], stride=2)
        self.layer3 = _stage(block, 128 * e, 256, num_blocks[2], stride=2)
        self.layer4 = _stage(block, 256 * e, 512, num_blocks[3], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512 * e

    def forward(self, x):
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.pool(out).flatten(1)


def check_resnet(*, depth: int = 18) -> None:
    if depth not in DEPTHS:
        raise ConfigError(f"arch.depth={depth} is not a resnet depth; valid: {', '.join(map(str, DEPTHS))}")


def resnet(in_shape: tuple[int, int, int], num_classes: int, *, depth: int = 18) -> tuple[nn.Module, nn.Linear]:
    check_resnet(depth=depth)
    body = ResNet(in_shape, *DEPTHS[depth])
    return body, nn.Linear(body.feature_dim, num_classes)
