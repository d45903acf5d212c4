"""Turn what users pass as `calibration` into a list of model-input dicts, validated before anything changes."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import CalibrationError

WINDOW_BATCH = 8  # rows per forward when calibration is a [N, L] tensor of token windows


def as_batches(calibration, model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Accepts a LongTensor of token windows [N, L], one input dict, or an iterable (DataLoader included) of
    input dicts, tensors or (tensor, ...) tuples. Returns validated input dicts on the CPU. Labels are kept for
    measurements that need the model's loss; the block-by-block runner leaves them out."""
    main = getattr(model, "main_input_name", "input")  # plain modules are called as model(x)
    if isinstance(calibration, torch.Tensor):
        _check_windows(calibration, main)
        items = [{main: chunk} for chunk in calibration.split(WINDOW_BATCH)]
    elif isinstance(calibration, Mapping):
        items = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = list(calibration)
    else:
        raise CalibrationError(
            f"calibration must be a LongTensor of token windows [N, L], an iterable of model-input dicts or a "
            f"DataLoader; got {type(calibration).__name__}")
    batches = [_as_dict(item, main, i) for i, item in enumerate(items)]
    if not batches:
        raise CalibrationError("calibration data is empty; give at least one batch")
    vocab = _vocab_size(model)
    positions, learned = _positions(model)
    for i, batch in enumerate(batches):
        if hasattr(model, "main_input_name") and main not in batch and "inputs_embeds" not in batch:
            raise CalibrationError(f"calibration batch {i} has no {main!r} (it holds {sorted(batch)}); "
                                   f"{type(model).__name__} takes its input as {main!r}")
        _check_batch(batch, i, vocab)
        _check_length(batch, i, positions, learned)
    return batches


def _positions(model: nn.Module) -> tuple[int | None, bool]:
    """(the model's longest sequence, whether that is a hard limit): learned position embeddings (GPT-2, BERT, OPT)
    have a row per position and fail past the last one; rotary ones only degrade."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    learned = any(isinstance(m, nn.Embedding) and ("wpe" in name or "position" in name)
                  for name, m in model.named_modules())
    return (limit if isinstance(limit, int) else None), learned


def _check_length(batch: dict[str, torch.Tensor], index: int, limit: int | None, learned: bool) -> None:
    ids = batch.get("input_ids")
    if limit is None or ids is None or ids.dim() != 2 or ids.shape[1] <= limit:
        return
    message = (f"calibration batch {index} has windows of {ids.shape[1]} tokens but the model takes at most {limit} "
               f"positions")
    if learned:
        raise CalibrationError(message + f"; cut the windows to {limit} tokens or fewer")
    warnings.warn(message + "; past them its rotary positions extrapolate and the statistics may not be the "
                  "model's", stacklevel=4)


def _check_windows(windows: torch.Tensor, main: str) -> None:
    if main == "input_ids":
        if windows.dtype not in (torch.int64, torch.int32):
            raise CalibrationError(
                f"calibration tensor must hold token ids (torch.long), got dtype {windows.dtype}; for embeddings "
                f"or images pass dicts such as {{'pixel_values': x}}")
        if windows.dim() != 2:
            raise CalibrationError(
                f"calibration tensor must be token windows of shape [N, L], got shape {tuple(windows.shape)}; "
                f"cut a token stream into windows, e.g. tokens[: n * L].view(n, L)")
    if windows.shape[0] == 0 or windows.numel() == 0:
        raise CalibrationError("calibration tensor is empty")


def _as_dict(item, main: str, index: int) -> dict[str, torch.Tensor]:
    if isinstance(item, Mapping):
        batch = dict(item)
    elif isinstance(item, torch.Tensor):
        batch = {main: item}
    elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        batch = {main: item[0]}  # TensorDataset-style (inputs, labels) batches
        if len(item) > 1 and isinstance(item[1], torch.Tensor):
            batch["labels"] = item[1]  # for estimators that need the loss; the runner leaves labels out
    else:
        raise CalibrationError(f"calibration batch {index} is a {type(item).__name__}; expected a dict of tensors, "
                               f"a tensor or a (tensor, ...) tuple")
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise CalibrationError(f"calibration batch {index}: {key!r} is a {type(value).__name__}, not a tensor; "
                                   f"tokenize with return_tensors='pt'")
    lead = batch.get(main, batch.get("input_ids"))
    if isinstance(lead, torch.Tensor) and lead.dim() == 1:  # a single unbatched sequence (its labels too)
        batch = {key: value.unsqueeze(0) if value.dim() == 1 else value for key, value in batch.items()}
    return {key: value.cpu() for key, value in batch.items()}


def _check_batch(batch: dict[str, torch.Tensor], index: int, vocab: int | None) -> None:
    for key, value in batch.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CalibrationError(f"calibration batch {index}: {key!r} holds NaN or Inf; clean the data first")
        if key.endswith("input_ids"):
            if value.is_floating_point() or value.dtype == torch.bool:
                raise CalibrationError(f"calibration batch {index}: {key!r} must be integer token ids, got {value.dtype}")
            if value.numel() and (value.min() < 0 or (vocab is not None and value.max() >= vocab)):
                raise CalibrationError(
                    f"calibration batch {index}: token ids span [{int(value.min())}, {int(value.max())}] but the "
                    f"model's vocabulary has {vocab} entries; was it tokenized for another model?")
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    labels = batch.get("labels")
    if labels is not None and ids is not None and labels.dim() == 2:  # token labels (a language model's)
        if labels.shape != ids.shape:
            raise CalibrationError(f"calibration batch {index}: labels {tuple(labels.shape)} do not match input_ids "
                                   f"{tuple(ids.shape)}; a language model's labels are its token ids (-100 ignored)")
        kept = labels[labels != -100]
        if kept.numel() and (kept.min() < 0 or (vocab is not None and kept.max() >= vocab)):
            raise CalibrationError(f"calibration batch {index}: labels span [{int(kept.min())}, {int(kept.max())}] "
                                   f"but the vocabulary has {vocab} entries (and -100 marks ignored tokens)")
    if mask is not None and ids is not None and mask.shape != ids.shape:
        raise CalibrationError(f"calibration batch {index}: attention_mask {tuple(mask.shape)} does not match "
                               f"input_ids {tuple(ids.shape)}")


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if get is not None else None
    except NotImplementedError:
        return None
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """[B, L] bool of real (non-padding) tokens, if the batch says which they are."""
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None and mask.dim() == 2 else None


def split_first(batches: list[dict[str, torch.Tensor]], rows: int) -> list[dict[str, torch.Tensor]]:
    """The same samples with the first batch cut to `rows` rows (the rest of it becomes the second batch), so that
    a measurement can run on a small first batch without a pass of its own."""
    first = batches[0]
    size = len(next(iter(first.values())))
    if rows >= size:
        return batches
    head = {k: v[:rows] for k, v in first.items()}
    tail = {k: v[rows:] for k, v in first.items()}
    return [head, tail] + batches[1:]


def summary(batches: list[dict[str, torch.Tensor]]) -> dict[str, int]:
    """What a report says of the calibration data: batches, samples, and tokens (real ones, under an attention
    mask); empty when there was none."""
    if not batches:
        return {}
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in batches if "input_ids" in b)
    samples = sum(len(next(iter(b.values()))) for b in batches)
    return {"batches": len(batches), "samples": samples, "tokens": tokens}
