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
