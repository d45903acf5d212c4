"""device=: blocks run on the GPU while the model stays on the CPU. Skips without a CUDA GPU."""
import pytest
import torch

import prunekit
from conftest import calibration_for, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("order", ["layer", "block"])
def test_blocks_run_on_the_gpu_and_return_to_the_cpu(order):
    x = calibration_for("llama")
    on_cpu, on_gpu = tiny("llama"), tiny("llama")
    prunekit.prune(on_cpu, 0.5, importance="sparsegpt", calibration=x, order=order, progress=False)
    report = prunekit.prune(on_gpu, 0.5, importance="sparsegpt", calibration=x, order=order, device="cuda",
                            progress=False)
    assert report.exact
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    cpu_masks, gpu_masks = prunekit.masks(on_cpu), prunekit.masks(on_gpu)
    for name, keep in gpu_masks.items():
        assert keep.device.type == "cpu"
        assert (keep != cpu_masks[name]).float().mean() < 0.02, name  # float differences flip near-ties only
