"""Layer statistics against plain tensor algebra."""
import pytest
import torch

from prunekit.calibration import LayerStats, Needs


@pytest.mark.parametrize("d", [24, 600])  # one sub-panel; two panels of three and two sub-panels, ragged ends
def test_gram_and_norms_match_plain_products(d):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 7, d, generator=g), torch.randn(5, d, generator=g),
              torch.randn(d, 9, generator=g).t()]  # a non-contiguous chunk too
    x = torch.cat([c.reshape(-1, d) for c in chunks]).double()
    full = LayerStats(Needs.HESSIAN, d)
    norms = LayerStats(Needs.INPUT_NORMS, d)
    for c in chunks:
        full.update(c)
        norms.update(c)
    assert full.count == norms.count == x.shape[0]
    torch.testing.assert_close(full.gram().double(), x.t() @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(full.hessian().double(), 2 * x.t() @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.input_sq_norms.double(), x.pow(2).sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(full.input_sq_norms, norms.input_sq_norms, rtol=1e-5, atol=1e-4)
    assert norms._xtx is None and full.sq is None  # each gathers only what it was asked for
