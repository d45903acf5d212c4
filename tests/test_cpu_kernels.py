"""prunekit's CPU sparse kernels (prunekit/kernels/csrc/sparse_cpu.cpp) against the masked dense product computed
here in float64: both layouts (bitmask, blocks), fp32 and bf16 weights, every instruction-set path this CPU has
(AVX-512, AVX2 forced, portable), sizes that are not multiples of 16 or 64, 1, 3 and 64 rows, sparsity 0%, 50% and
90% with a fully pruned and a fully kept row, contiguous, row-strided and element-strided inputs; then the build:
the module is built from the source that is here, compiles on first use, and without it everything runs dense."""
import platform
import shutil
import warnings

import pytest
import torch

from conftest import torch_threads
from prunekit.bits import pack_rows
from prunekit.errors import MaskMismatchError
from prunekit.kernels import bitmask, cpu, cpu_build
from prunekit.kernels.layout import BlockLayout

DTYPES = (torch.float32, torch.bfloat16)
SHAPES = [(37, 50), (70, 129), (65, 300), (64, 128)]  # [out, in]
ROWS = (1, 3, 64)
SPARSITIES = (0.0, 0.5, 0.9)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    reason = cpu.unavailable()
    if reason is not None:
        if platform.machine() in ("x86_64", "AMD64") and (shutil.which("c++") or shutil.which("g++")):
            pytest.fail(f"a C++ compiler is here, so the kernels must build: {reason}")
        pytest.skip(reason)


@pytest.fixture(params=cpu.ISAS)
def isa(request):
    cpu.force_isa(request.param)
    if cpu.isa() != request.param:
        cpu.force_isa(None)
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    cpu.force_isa(None)


def keep_mask(out_features, in_features, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out_features, in_features, generator=g) >= sparsity
    keep[0] = False  # a fully pruned row
    keep[-1] = True  # a fully kept row
    return keep


def block_mask(out_features, in_features, block, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(-(-out_features // block), -(-in_features // block), generator=g) >= sparsity
    tiles[0] = False  # a fully pruned block row
    tiles[-1] = True  # a fully kept one
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_features, :in_features].contiguous()


def inputs(rows, in_features, dtype, seed):
    """The same values contiguous, with a row stride (a slice of wider rows) and with an element stride."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, in_features * 2 + 3, generator=g).to(dtype)
    x = wide[:, :in_features].contiguous()
    return {"contiguous": x, "row-strided": wide[:, :in_features], "element-strided": wide[:, : 2 * in_features:2]}


def reference(x, weight, keep, bias):
    return x.double() @ (weight.double() * keep).t() + bias.double()


def assert_matches(y, expected, dtype, what):
    assert y.dtype == dtype and y.shape == expected.shape, what
    if dtype == torch.bfloat16:  # bf16 output: within rounding of the float64 product (plus fp32 accumulation)
        torch.testing.assert_close(y.double(), expected, rtol=2 ** -7, atol=1e-2, msg=what)
    else:
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4, msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vbmi2", ("1", "0"))
def test_bitmask_layout_matches_the_masked_dense_product(isa, dtype, vbmi2, monkeypatch):
    """vbmi2: on AVX-512, bf16 products run on the AVX512-BF16 dot-product kernel where the CPU has it and on the
    widening kernel with PRUNEKIT_CPU_VBMI2=0."""
    monkeypatch.setenv("PRUNEKIT_CPU_VBMI2", vbmi2)
    for seed, (out_features, in_features) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(out_features, in_features, generator=g).to(dtype)
        bias = torch.randn(out_features, generator=g).to(dtype)
        for sparsity in SPARSITIES:
            keep = keep_mask(out_features, in_features, sparsity, seed)
            values, bits, offsets = bitmask.compress(weight, keep)
            assert values.numel() == int(keep.sum())
            assert torch.equal(bitmask.decompress(values, bits, offsets, keep.shape), weight * keep)  # bit for bit
            for rows in ROWS:
                for kind, x in inputs(rows, in_features, dtype, seed).items():
                    expected = reference(x, weight, keep, bias)
                    for b in (bias, None):
                        y = cpu.bitmask_linear(x, values, bits, offsets, b, keep.shape)
                        what = f"{isa} {out_features}x{in_features} {sparsity:.0%} rows={rows} {kind} bias={b is not None}"
                        assert_matches(y, expected if b is not None else expected - bias.double(), dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", (16, 32, 64))
def test_block_layout_matches_the_masked_dense_product(isa, dtype, block):
    for seed, (out_features, in_features) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(out_features, in_features, generator=g).to(dtype)
        bias = torch.randn(out_features, generator=g).to(dtype)
        for sparsity in SPARSITIES:
            keep = block_mask(out_features, in_features, block, sparsity, seed)
            layout = BlockLayout.from_mask(keep, block)
            values = layout.gather(weight * keep)
            for rows in ROWS:
                for kind, x in inputs(rows, in_features, dtype, seed).items():
                    y = cpu.block_linear(x, values, layout, bias)
                    what = f"{isa} {out_features}x{in_features} B={block} {sparsity:.0%} rows={rows} {kind}"
                    assert_matches(y, reference(x, weight, keep, bias), dtype, what)


def test_leading_dimensions_and_no_rows(isa):
    weight, keep = torch.randn(9, 20), keep_mask(9, 20, 0.5, 0)
    values, bits, offsets = bitmask.compress(weight, keep)
    x = torch.randn(2, 3, 20)
    y = cpu.bitmask_linear(x, values, bits, offsets, None, (9, 20))
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y, x @ (weight * keep).t(), rtol=1e-5, atol=1e-5)
    assert cpu.bitmask_linear(torch.randn(0, 20), values, bits, offsets, None, (9, 20)).shape == (0, 9)


def test_two_threads_split_the_rows_and_agree_with_one(isa):
    # large enough for two threads (each gets at least 2**18 of rows x kept weights)
    weight, keep = torch.randn(600, 1000), keep_mask(600, 1000, 0.5, 3)
    values, bits, offsets = bitmask.compress(weight, keep)
    x = torch.randn(5, 1000)
    layout = BlockLayout.from_mask(block_mask(600, 1000, 32, 0.5, 3), 32)
    blocks = layout.gather(weight)
    with torch_threads(1):
        one = cpu.bitmask_linear(x, values, bits, offsets, None, (600, 1000)), cpu.block_linear(x, blocks, layout, None)
    with torch_threads(2):
        two = cpu.bitmask_linear(x, values, bits, offsets, None, (600, 1000)), cpu.block_linear(x, blocks, layout, None)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # rows are split, not the sums within one


def test_the_detected_instruction_set_is_what_the_cpu_reports():
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "bmi2"} <= flags:
        expected = "avx512"
    elif {"avx2", "fma", "bmi2"} <= flags:
        expected = "avx2"
    else:
        expected = "portable"
    cpu.force_isa(None)
    assert cpu.isa() == expected


@pytest.mark.parametrize("vbmi2", ("1", "0"))
def test_decompression_is_bit_exact_on_every_path(isa, vbmi2, monkeypatch):
    """The dense weight a compressed layer multiplies where dense wins (prefill): every ISA, and on AVX-512 with and
    without the 16-bit expand of AVX512-VBMI2 (PRUNEKIT_CPU_VBMI2=0); rows whose ends fall inside a 16-, 32- and
    64-weight step."""
    monkeypatch.setenv("PRUNEKIT_CPU_VBMI2", vbmi2)
    for seed, (out_features, in_features) in enumerate(SHAPES + [(9, 33), (5, 16), (3, 7)]):
        for dtype in DTYPES:
            weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
            for sparsity in SPARSITIES:
                keep = keep_mask(out_features, in_features, sparsity, seed)
                values, bits, offsets = bitmask.compress(weight, keep)
                dense = cpu.bitmask_dense(values, bits, offsets, keep.shape)
                assert torch.equal(dense, weight * keep), f"{isa} {dtype} {keep.shape} {sparsity:.0%}"


def test_bad_layouts_are_refused():
    weight, keep = torch.randn(6, 20), keep_mask(6, 20, 0.5, 0)
    values, bits, offsets = bitmask.compress(weight, keep)
    with pytest.raises(MaskMismatchError, match="keeps .* weights but there are"):
        bitmask.check(values[:-1], bits, offsets, (6, 20))
    with pytest.raises(MaskMismatchError, match="row_offsets do not match"):
        bitmask.check(values, bits, offsets.flip(0), (6, 20))
    padded = bits.clone()
    padded[1, -1] |= 0x80  # column 23 of a 20-column row
    with pytest.raises(MaskMismatchError, match="bits set past column 20"):
        bitmask.check(values, padded, offsets, (6, 20))
    with pytest.raises(MaskMismatchError, match="must be uint8 of shape"):
        bitmask.check(values, pack_rows(keep[:, :16]), offsets, (6, 20))
    with pytest.raises(MaskMismatchError, match="mask of its shape"):
        bitmask.compress(weight, keep[:, :10])


def test_evict_flushes_each_storage_once_whole_and_keeps_the_data(monkeypatch):
    weight = torch.randn(300, 70)
    index = torch.arange(1000, dtype=torch.int32)
    before = weight.clone(), index.clone()
    assert cpu.evict([weight, weight[5:], index]) == (platform.machine() in ("x86_64", "AMD64"))
    assert torch.equal(weight, before[0]) and torch.equal(index, before[1])
    calls = []

    class Recorder:
        def evict(self, pointer, nbytes):
            calls.append((pointer, nbytes))
            return True

    monkeypatch.setitem(cpu._state, "module", Recorder())
    assert cpu.evict([weight, weight[5:], index, weight.to_sparse()])  # the view and the sparse tensor: skipped
    assert calls == [(weight.data_ptr(), 300 * 70 * 4), (index.data_ptr(), 4000)]


def test_the_installed_module_is_built_from_this_source():
    module = cpu._module()
    assert module.source_sha() == cpu_build.source_sha()


def test_first_use_compiles_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    module = cpu_build._import(cpu_build.compiled())
    assert module.source_sha() == cpu_build.source_sha() and module.cpu_isa() >= 0
    assert len(list(tmp_path.rglob("_sparse_cpu*"))) == 1
    assert cpu_build.compiled().parent.parent == tmp_path  # found again, not rebuilt


def test_a_failed_build_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(ImportError, match="compiling it with false failed"):
        cpu_build.compiled()


def test_without_the_kernels_one_warning_and_everything_runs_dense(monkeypatch):
    """No built module and no compiler: a one-line warning, once; convert keeps the layers dense; a BitmaskLinear
    made by hand runs its dense product."""
    import prunekit
    from conftest import tiny

    def unavailable():
        raise ImportError("no C++ compiler found to build it (install g++, or set CXX)")

    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu_build, "load", unavailable)
    with pytest.warns(RuntimeWarning, match="CPU sparse kernels are unavailable .*no C\\+\\+ compiler.*run dense"):
        assert "no C++ compiler" in cpu.unavailable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert cpu.unavailable() is not None
        model = tiny("llama")
        prunekit.prune(model, 0.5, importance="magnitude", progress=False)
        report = prunekit.kernels.convert(model, rows=(1,))
        assert report.converted == 0 and all(c.became == "dense" for c in report)
        with pytest.raises(prunekit.PrunekitError, match="CPU sparse kernels are unavailable"):
            prunekit.kernels.convert(model, backend="cpu")
        layer = bitmask.BitmaskLinear.from_dense(model.model.layers[0].mlp.up_proj)
        x = torch.randn(3, 32)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), model.model.layers[0].mlp.up_proj(x))
