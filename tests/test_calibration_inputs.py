"""Every accepted form of calibration data gives the same result."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import prunekit
from conftest import calibration_for, tiny


def masks_from(calibration):
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="wanda", calibration=calibration, progress=False)
    return prunekit.masks(model)


@pytest.mark.parametrize("form", ["dicts", "dataloader of dicts", "tensordataset", "one dict", "unbatched dicts"])
def test_forms_agree_with_token_windows(form):
    windows = calibration_for("llama", n=8, length=16)
    reference = masks_from(windows)
    calibration = {
        "dicts": [{"input_ids": w} for w in windows.split(2)],
        "dataloader of dicts": DataLoader([{"input_ids": w} for w in windows], batch_size=4),
        "tensordataset": DataLoader(TensorDataset(windows, windows), batch_size=3),  # (inputs, labels) batches
        "one dict": {"input_ids": windows, "labels": windows},
        "unbatched dicts": [{"input_ids": w} for w in windows],
    }[form]
    got = masks_from(calibration)
    assert got.keys() == reference.keys()
    for name in got:
        assert torch.equal(got[name], reference[name]), name


def test_labels_are_kept_and_not_mistaken_for_an_unbatched_sequence():
    from prunekit.calibration import as_batches

    model = tiny("vit")
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    (from_tuple,) = as_batches(DataLoader(TensorDataset(images, labels), batch_size=4), model)
    assert from_tuple["labels"].shape == (4,) and torch.equal(from_tuple["labels"], labels)
    (from_dict,) = as_batches({"pixel_values": images, "labels": labels}, model)
    assert from_dict["labels"].shape == (4,)
    (unbatched,) = as_batches({"input_ids": torch.arange(5), "labels": torch.arange(5)}, tiny("llama"))
    assert unbatched["input_ids"].shape == unbatched["labels"].shape == (1, 5)
