"""Image classification networks of the benchmark workloads (Zhang et al. 2019 App. F.2; Smith et al. 2020).

- :class:`SimpleCNN`: Shallue et al.'s "base" Simple CNN without dropout (MNIST, Fashion-MNIST).
- :class:`CifarResNet`: He et al. (2016) §4.2 CIFAR ResNets, depth 6n + 2 with 16/32/64 channels and parameter-free
  ("option A") shortcuts; ``depth=8, batch_norm=False`` is ResNet8 (7 convolutions, no BN), ``depth=32`` ResNet32
  (31 convolutions, 0.46M parameters).
- :class:`VGG11`: configuration "A" of Simonyan & Zisserman with BN, for 32×32 inputs, one linear output layer.
- :class:`WideResNet`: Zagoruyko & Komodakis' WRN-d-k (16-4: 2.7M parameters), with BN, or without BN using
  SkipInit (De & Smith 2020: a scalar gain, initialized to zero, at the end of every residual branch).
- :class:`ResNet50`: He et al.'s ImageNet ResNet-50 (bottleneck v1, 25.6M parameters).

BatchNorm layers are plain ``nn.BatchNorm2d``; ghost batch norm is switched on from YAML with
``lightning_sgd.plugins.GhostBatchNormCallback``, and channel-wise weight normalization with
``lightning_sgd.recipes.ChannelWeightNorm``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------- Simple CNN
class SimpleCNN(nn.Module):
    """Two 5×5 "same" convolutions (32, 64 filters) with ReLU and 2×2/2 max-pooling, FC ``hidden`` + ReLU, output.

    On 28×28×1 inputs: 3,274,634 parameters (832 + 51,264 + 3,212,288 + 10,250).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, channels: tuple[int, int] = (32, 64),
                 hidden: int = 1024, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        side = image_size // 2 // 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------------- CIFAR ResNets
class _ShortcutA(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU (post-activation, He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        self.bn1 = _norm(out_channels, batch_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = _norm(out_channels, batch_norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _ShortcutA(out_channels - in_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) §4.2 ResNet for 32×32 images: conv3×3(16), 3 stages of n basic blocks (16, 32, 64
    channels, stride 2 between stages), global average pooling, linear output. depth = 6n + 2.

    Args:
        depth: 8 (ResNet8), 20, 32 (ResNet32), 44, 56, 110, ...
        batch_norm: ``False`` removes every BN layer (ResNet8 of Shallue et al.); convolutions then have biases.
        width: channels of the first stage (16 in He et al.).
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, batch_norm: bool = True, width: int = 16,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CifarResNet depth must be 6n + 2 with n >= 1, got {depth}.")
        n = (depth - 2) // 6
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=not batch_norm),
                                  _norm(width, batch_norm), nn.ReLU())
        blocks: list[nn.Module] = []
        channels = width
        for stage, out_channels in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out_channels, stride, batch_norm))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, 32, 32) -> (B, num_classes)
        h = self.blocks(self.stem(x))  # (B, 64, 8, 8)
        return self.fc(h.mean(dim=(2, 3)))


def resnet8(num_classes: int = 10) -> CifarResNet:
    """ResNet8 without batch norm (Shallue et al. 2018; Zhang et al. 2019)."""
    return CifarResNet(depth=8, num_classes=num_classes, batch_norm=False)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet32 with batch norm (0.46M parameters)."""
    return CifarResNet(depth=32, num_classes=num_classes, batch_norm=True)


# --------------------------------------------------------------------------------------------------------- VGG11
class VGG11(nn.Module):
    """VGG configuration "A" (8 convolutions: 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M) with BN after
    each convolution, for 32×32 inputs (1×1×512 features), and a single linear output layer (9.2M parameters)."""

    CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 10, batch_norm: bool = True, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=not batch_norm),
                           _norm(int(item), batch_norm), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, 32, 32) -> (B, 512, 1, 1) -> (B, num_classes)
        h = self.features(x)
        return self.fc(h.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------------------- Wide-ResNet
class WideBlock(nn.Module):
    """Pre-activation wide basic block (BN-ReLU-conv3×3-BN-ReLU-conv3×3) with a 1×1 projection when the shape changes.

    Without BN (SkipInit): ReLU-conv-ReLU-conv with biases, the branch scaled by a scalar ``skip_gain``
    initialized to 0, so every block starts as the identity (De & Smith 2020).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        self.bn1 = _norm(in_channels, batch_norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        self.bn2 = _norm(out_channels, batch_norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batch_norm)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=not batch_norm)
        # shape (1,), not (): 0-d parameters trip per-example engines that flatten(1) each gradient
        self.skip_gain = None if batch_norm else nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        if self.skip_gain is not None:
            out = out * self.skip_gain
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) for 32×32 images: conv3×3(16), 3 stages of (depth−4)/6 wide blocks
    with 16k, 32k, 64k channels, BN-ReLU, global average pooling, linear output.

    Args:
        depth: 16 for WRN-16-4 (2.75M parameters with BN).
        widen_factor: k.
        batch_norm: ``False`` gives the SkipInit variant (no normalization; residual branches scaled by a learnable
            scalar initialized to zero).
    """

    def __init__(self, depth: int = 16, widen_factor: int = 4, num_classes: int = 10, batch_norm: bool = True,
                 in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}.")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=not batch_norm)
        blocks: list[nn.Module] = []
        channels = 16
        for stage, out_channels in enumerate(widths):
            for i in range(n):
                blocks.append(WideBlock(channels, out_channels, 2 if stage > 0 and i == 0 else 1, batch_norm))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.bn = _norm(channels, batch_norm)
        self.fc = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, 32, 32) -> (B, 64k, 8, 8) -> (B, num_classes)
        h = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------------------ ResNet-50
class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (stride here, as in torchvision's "v1.5"), 1×1 expand ×4, each with BN; projection shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        nn.init.zeros_(self.bn3.weight)  # zero-init the last BN gamma of each block (Goyal et al. 2017)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    """ResNet-50 for ImageNet (He et al. 2016): 25,557,032 parameters with 1000 classes."""

    def __init__(self, num_classes: int = 1000, layers: tuple[int, int, int, int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        channels = 64
        for stage, count in enumerate(layers):
            width = 64 * 2**stage
            for i in range(count):
                blocks.append(Bottleneck(channels, width, 2 if stage > 0 and i == 0 else 1))
                channels = width * Bottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, 2048, S/32, S/32) -> (B, num_classes)
        h = self.blocks(self.stem(x))
        return self.fc(h.mean(dim=(2, 3)))
