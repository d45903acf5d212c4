"""Convolutional networks of the bundled vision assets, as plain torch modules (see prunekit.data for the loaders).

EfficientNet-Lite0: the mobile variant of EfficientNet-B0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019), as released in TensorFlow's efficientnet-lite (2020): B0's sixteen
inverted-residual (MBConv) blocks without squeeze-and-excitation, ReLU6 in place of swish, and a stem and head whose
widths stay fixed when the network is scaled. Its weights were trained in TensorFlow, whose "SAME" padding of a
strided convolution puts the odd pixel on the bottom and right, where torch's Conv2d pads symmetrically; SamePad2d
reproduces it, so the released weights give TensorFlow's outputs.

The digit classifiers (mnist_cnn, svhn_cnn) rebuild the layouts of the `ccexam` package's MNIST and SVHN models as
nn.Sequential, with the module names of its checkpoints.

Every weight lives in a standard nn.Conv2d, nn.BatchNorm2d or nn.Linear, and the forward passes are plain
operations, so Torch-Pruning's dependency graph traces them and can remove channels.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrunekitError

# TensorFlow's batch norm: epsilon 1e-3 and moving averages that keep 99% of the old value per step.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# B0's stages, which Lite0 keeps: (blocks, kernel, stride of the first block, expand ratio, output channels).
LITE0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
LITE0_STEM = 32
LITE0_HEAD = 1280


class SamePad2d(nn.Module):
    """TensorFlow's "SAME" padding for a convolution of `kernel_size` and `stride`, computed from each input's size.

    The output keeps ceil(size / stride) positions; of the padding that needs, the smaller half goes on the top and
    left and the rest on the bottom and right (torch's own padding would split it evenly, shifting every output of
    a stride-2 convolution on an even-sized input by one pixel).
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be positive, got {kernel_size} and {stride}")
        self.kernel_size = kernel_size
        self.stride = stride

    def _amounts(self, size: int) -> tuple[int, int]:
        total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._amounts(x.shape[-2])
        left, right = self._amounts(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class ConvBNAct(nn.Sequential):
    """Convolution without bias, batch norm and (unless `act` is False) ReLU6, padded as TensorFlow's SAME.

    A stride-1 convolution of odd kernel is padded by the convolution itself (SAME is then symmetric); a strided
    one gets a SamePad2d in front, named `pad`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True):
        if kernel_size % 2 == 0:
            raise ValueError(f"only odd kernel sizes are supported, got {kernel_size}")
        layers = OrderedDict()
        if stride > 1:
            layers["pad"] = SamePad2d(kernel_size, stride)
            padding = 0
        else:
            padding = kernel_size // 2
        layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                   groups=groups, bias=False)
        layers["bn"] = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act:
            layers["act"] = nn.ReLU6()
        super().__init__(layers)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation: 1x1 expansion to `expand_ratio` times the input
    channels (absent when the ratio is 1), depthwise k x k convolution, linear 1x1 projection, and the input added
    back when the block keeps both resolution and width."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, hidden) if expand_ratio != 1 else None
        self.depthwise = ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBNAct(hidden, out_channels, act=False)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return out + x if self.use_residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.65M parameters), an ImageNet classifier of 224 x 224 RGB images.

    stem (3x3 stride-2 convolution to 32 channels), sixteen MBConv `blocks` in seven stages (LITE0_STAGES), `head`
    (1x1 convolution to 1280 channels), global average pooling, dropout and the `classifier` Linear. Inputs are
    normalised as (pixel - 127) / 128 per channel (prunekit.data.efficientnet_preprocess). Any input whose sides
    are at least 32 pixels runs; the released weights were trained at 224.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBNAct(3, LITE0_STEM, 3, stride=2)
        blocks, channels = [], LITE0_STEM
        for repeats, kernel, stride, expand, out in LITE0_STAGES:
            for i in range(repeats):
                # Only a stage's first block changes the resolution and the width.
                blocks.append(MBConv(channels, out, kernel, stride if i == 0 else 1, expand))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(channels, LITE0_HEAD)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(LITE0_HEAD, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-dimensional features before dropout and the classifier."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"EfficientNet-Lite0 takes [batch, 3, height, width] images, got {tuple(x.shape)}")
        return self.pool(self.head(self.blocks(self.stem(x)))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x)))


# efficientnet_pytorch's names (of the released checkpoint) -> EfficientNetLite0's. Inside a block, _bn0/_bn1/_bn2
# follow the expansion, depthwise and projection convolutions; outside, _bn0 follows the stem and _bn1 the head.
_BLOCK_PARTS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
                "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
_TOP_PARTS = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn",
              "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(\w+)\.(\w+)")


def lite0_key(name: str) -> str:
    """The EfficientNetLite0 state-dict key of an efficientnet_pytorch key, e.g. "_blocks.3._bn1.weight" ->
    "blocks.3.depthwise.bn.weight". Raises PrunekitError on a key that belongs to no Lite0 layer (such as the
    squeeze-and-excitation weights of a full EfficientNet)."""
    found = _BLOCK_KEY.fullmatch(name)
    if found and found.group(2) in _BLOCK_PARTS:
        return f"blocks.{found.group(1)}.{_BLOCK_PARTS[found.group(2)]}.{found.group(3)}"
    found = _TOP_KEY.fullmatch(name)
    if found and found.group(1) in _TOP_PARTS:
        return f"{_TOP_PARTS[found.group(1)]}.{found.group(2)}"
    raise PrunekitError(f"{name!r} is not an efficientnet_pytorch key of EfficientNet-Lite0")


def efficientnet_lite0_from_state_dict(state_dict: dict[str, torch.Tensor]) -> EfficientNetLite0:
    """EfficientNetLite0 in eval mode holding an efficientnet_pytorch-named checkpoint: every key is mapped and
    every parameter and buffer filled, or PrunekitError says which keys are left over or missing."""
    model = EfficientNetLite0(num_classes=state_dict["_fc.weight"].shape[0] if "_fc.weight" in state_dict else 1000)
    mapped = {lite0_key(name): value for name, value in state_dict.items()}
    expected = set(model.state_dict())
    if mapped.keys() != expected:
        raise PrunekitError(f"the checkpoint does not fit EfficientNet-Lite0: missing {sorted(expected - mapped.keys())},"
                            f" unexpected {sorted(mapped.keys() - expected)}")
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as error:  # shape mismatches
        raise PrunekitError(f"the checkpoint does not fit EfficientNet-Lite0: {error}") from None
    return model.eval()


def mnist_cnn() -> nn.Sequential:
    """ccexam's MNIST classifier (421,642 parameters) for [batch, 1, 28, 28] digits: two 3x3 convolutions (32, 64
    channels) each with ReLU and 2x2 max pooling, then Linear 3136 -> 128, ReLU, Linear 128 -> 10."""
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        flatten=nn.Flatten(),
        classifier=nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)),
    ))


def svhn_cnn() -> nn.Sequential:
    """ccexam's SVHN classifier (815,018 parameters) for [batch, 3, 32, 32] digits: three blocks of two 3x3
    convolution + batch norm + ReLU layers and a 2x2 max pooling (32, 64, 128 channels), then dropout, Linear
    2048 -> 256, ReLU, dropout, Linear 256 -> 10."""
    def block(cin: int, cout: int) -> nn.Sequential:
        # Not in-place ReLUs (unlike ccexam's): hooks that keep a batch norm's output must see it unclipped.
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(OrderedDict(
        features=nn.Sequential(block(3, 32), block(32, 64), block(64, 128)),
        flatten=nn.Flatten(),
        classifier=nn.Sequential(nn.Dropout(0.3), nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(256, 10)),
    ))
