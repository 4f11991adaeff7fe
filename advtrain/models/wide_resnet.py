"""Wide residual network (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016) as used for adversarial
training by TRADES (github.com/yaodongyu/TRADES, models/wideresnet.py) and MadryLab's CIFAR models: pre-activation
BasicBlocks (BN-ReLU-conv), optional dropout between a block's two convs, final BN+ReLU and global average pooling.

One implementation behind wrn34_10, wrn28_10 and wrn16_8: depth = 6n + 4 (n blocks per stage), widths 16k, 32k, 64k.
Init follows the reference: Kaiming-normal convs (fan_out), BN weight 1 and bias 0, Linear bias 0. The reference's
unused `sub_block1` is left out; the published WRN-34-10 size (46.2M parameters) does not count it either. Pooling is
adaptive, so inputs other than 32x32 work (on 32x32 it equals the reference's avg_pool2d(8)). Submodule names follow
the reference (block1.layer.0.convShortcut, ...), so TRADES-style checkpoints load after renaming `fc.*` to `head.*`
and prefixing the rest with `body.`.
"""

from torch import nn

from advtrain.errors import ConfigError


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        # camelCase kept from the reference for checkpoint compatibility.
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = self.relu1(self.bn1(x))
        # A projection shortcut reads the pre-activated input; the identity shortcut carries x untouched.
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(out)))))
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage of n BasicBlocks; exists so state_dict keys match the reference (`blockK.layer.i`)."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        first = BasicBlock(in_planes, out_planes, stride, dropout)
        self.layer = nn.Sequential(first, *(BasicBlock(out_planes, out_planes, 1, dropout) for _ in range(blocks - 1)))

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """Normalized image -> (N, 64 * widen_factor) features."""

    def __init__(self, in_channels: int, depth: int, widen_factor: int, dropout: float):
        super().__init__()
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(blocks, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(blocks, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(blocks, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.pool(self.relu(self.bn1(out))).flatten(1)


def check_wide_resnet(*, depth: int = 34, widen_factor: int = 10, dropout: float = 0.0) -> None:
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"arch.depth={depth} is not a wide ResNet depth (6n+4, n >= 1); valid: 10, 16, 22, 28, 34, 40, ...")
    if widen_factor < 1:
        raise ConfigError(f"arch.widen_factor={widen_factor} must be a positive integer")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"arch.dropout={dropout} must lie in [0, 1)")


def wide_resnet(
    in_shape: tuple[int, int, int], num_classes: int, *, depth: int = 34, widen_factor: int = 10, dropout: float = 0.0
) -> tuple[nn.Module, nn.Linear]:
    check_wide_resnet(depth=depth, widen_factor=widen_factor, dropout=dropout)
    body = WideResNet(in_shape[0], depth, widen_factor, dropout)
    head = nn.Linear(body.feature_dim, num_classes)
    nn.init.zeros_(head.bias)
    return body, head
