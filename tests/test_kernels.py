"""Block-sparse kernels against the dense reference (masked dense matmul, autograd of it), every backend that runs
here: the CUDA kernels on the CPU emulator (tests/cuda_emu), PyTorch's BSR, and on a GPU the compiled extension
and CuPy. Shapes include ragged edges, empty block rows, fully dense block rows and partly kept blocks."""
import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.kernels import BlockLayout, BlockSparseLinear, backends, block_sparse_linear
from prunekit.kernels import launch as plan

pytestmark = pytest.mark.usefixtures("one_thread")

HALF = (torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from cuda_emu.build import compiler, registered

    if compiler() is None:
        pytest.skip("no host C++ compiler to build the kernel emulator")
    return registered(tmp_path_factory)


def gpu_backend(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = backends.unavailable(name, torch.device("cuda"), torch.float16, 32)
    if reason:
        pytest.skip(reason)
    return backends.get(name)


@pytest.fixture(params=["emulated", "torch", "cuda_ext", "cupy"])
def runner(request):
    """(backend, device) for each backend that can run here."""
    if request.param == "emulated":
        return request.getfixturevalue("emulated"), torch.device("cpu")
    if request.param == "torch":
        return backends.get("torch"), torch.device("cpu")
    return gpu_backend(request.param), torch.device("cuda")


def skip_unless_supported(backend, device, dtype, b):
    reason = backend.unsupported(device, dtype, b)
    if reason:
        pytest.skip(reason)


def block_pattern(n_rows: int, n_cols: int, seed: int) -> torch.Tensor:
    """Tiles kept: block row 0 whole (a fully dense row), block row 1 empty, the rest at random."""
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(n_rows, n_cols, generator=g) < 0.5
    tiles[0] = True
    if n_rows > 1:
        tiles[1] = False
    return tiles


def problem(out_f, in_f, b, dtype, device, seed=0, partial=True):
    """(weight, keep, layout, values): a random weight, a keep-mask of whole tiles (plus, if `partial`, some pruned
    entries inside kept tiles), and its BSR form."""
    g = torch.Generator().manual_seed(seed)
    tiles = block_pattern(-(-out_f // b), -(-in_f // b), seed)
    keep = tiles.repeat_interleave(b, 0).repeat_interleave(b, 1)[:out_f, :in_f]
    if partial:
        keep &= torch.rand(out_f, in_f, generator=g) < 0.8
    weight = (torch.randn(out_f, in_f, generator=g) / in_f ** 0.5).to(dtype)
    layout = BlockLayout.from_mask(keep, b).to(device)
    values = layout.gather((weight * keep).to(device))
    return weight, keep, layout, values


def strided(rows, cols, dtype, device, seed):
    """[rows, cols] random values inside a NaN-filled buffer 8 columns wider: any read past a row's end shows."""
    g = torch.Generator().manual_seed(seed)
    big = torch.full((rows, cols + 8), float("nan"), dtype=dtype)
    big[:, :cols] = torch.randn(rows, cols, generator=g).to(dtype)
    return big.to(device)[:, :cols]


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=TOL[dtype], atol=TOL[dtype])


# Ragged both ways with vector loads up to the edge (in a multiple of 8), an odd input width (scalar loads), and
# block rows of up to 20 blocks (more than the skinny kernel's 8 warps, so each warp adds several blocks).
SHAPES = [(lambda b: (2 * b + 5, 3 * b - 8)), (lambda b: (b, 2 * b + 3)), (lambda b: (b + 1, 20 * b))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [16, 32, 64])
def test_forward_matches_masked_dense_matmul(runner, dtype, b):
    backend, device = runner
    skip_unless_supported(backend, device, dtype, b)
    for s, shape in enumerate(SHAPES):
        out_f, in_f = shape(b)
        weight, keep, layout, values = problem(out_f, in_f, b, dtype, device, seed=s)
        bias = torch.randn(out_f).to(dtype).to(device)
        # skinny (1 row; fp32 to 16), bt's tiles of 16, 32 and 64 (ragged: 37), tc over one and several tiles of
        # 128 rows, and of 256 (past launch.TC_SMALL_ROWS)
        for rows in (1, 3, 16, 32, 37, 130, 300, 1100):
            x = strided(rows, in_f, dtype, device, seed=rows)
            y = backend.forward(x, values, layout, bias if rows % 2 else None)
            ref = x.double() @ (weight.double() * keep).t().to(device) + (bias.double() if rows % 2 else 0)
            close(y, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [16, 32, 64])
def test_backward_matches_autograd_of_the_dense_reference(runner, dtype, b):
    backend, device = runner
    skip_unless_supported(backend, device, dtype, b)
    # ragged both ways; and 20 block rows, so that dX's transposed listing has many blocks per block column
    for out_f, in_f in (SHAPES[0](b), (20 * b, b + 3)):
        weight, keep, layout, values = problem(out_f, in_f, b, dtype, device)
        # one and two row tiles of the dW kernels (64 rows per step for tensor cores); dX's tc tiles of 256 rows
        # (tensor-core dtypes: fp32 sums over 1100 rows drift past fp32's tolerance)
        for rows in (5, 70) + ((1100,) if dtype in HALF else ()):
            x = strided(rows, in_f, dtype, device, seed=rows)
            dy = strided(rows, out_f, dtype, device, seed=rows + 1)
            w = (weight.double() * keep).to(device).requires_grad_()
            xd = x.double().requires_grad_()
            (xd @ w.t()).backward(dy.double())
            close(backend.grad_input(dy, values, layout), xd.grad, dtype)
            # every entry of a stored block, kept or not (the module masks the rest): gather of the dense gradient
            close(backend.grad_values(dy, x, layout, values), layout.gather(w.grad), dtype)


def test_module_trains_only_kept_weights_and_matches_dense(runner):
    """BlockSparseLinear end to end through autograd: outputs, input gradient, and a weight gradient that is the
    dense one on kept weights and nothing elsewhere; after an optimizer step pruned weights are still zero."""
    backend, device = runner
    dtype = next((d for d in (torch.float16, torch.float32) if backend.unsupported(device, d, 32) is None), None)
    if dtype is None:
        pytest.skip(f"{backend.name} runs neither float16 nor float32 here")
    weight, keep, layout, values = problem(70, 100, 32, dtype, torch.device("cpu"))
    linear = torch.nn.Linear(100, 70).to(dtype)
    linear.weight.data.copy_(weight)
    module = BlockSparseLinear.from_dense(linear, keep, 32, backend=backend.name).to(device)
    x = strided(9, 100, dtype, device, seed=3).requires_grad_()
    module(x).sum().backward()
    ref_w = (weight.double() * keep).to(device).requires_grad_()
    xd = x.detach().double().requires_grad_()
    (xd @ ref_w.t() + linear.bias.double().to(device)).sum().backward()
    close(x.grad, xd.grad, dtype)
    close(module.layout.scatter(module.values.grad.double()), ref_w.grad * keep.to(device), dtype)
    with torch.no_grad():  # as if weight decay or momentum from before pruning had moved a pruned entry
        module.values[~module.prune_mask] = 1
    torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1).step()
    dense = module.to_dense()
    assert bool((dense.weight[~keep.to(device)] == 0).all()) and torch.equal(dense.prune_mask.cpu(), keep)


def test_three_dimensional_inputs_and_no_rows(emulated):
    weight, keep, layout, values = problem(40, 48, 16, torch.float32, torch.device("cpu"))
    x = torch.randn(2, 3, 48)
    y = block_sparse_linear(x, values, layout, None, emulated)
    close(y, x.double() @ (weight.double() * keep).t(), torch.float32)
    assert block_sparse_linear(torch.randn(0, 48), values, layout, None, emulated).shape == (0, 40)


def test_layout_lists_the_same_blocks_both_ways():
    keep = torch.zeros(70, 50, dtype=torch.bool)
    keep[0, 0] = keep[40, 10] = keep[69, 49] = keep[35, 49] = True  # edge blocks padded: 70 = 2*32 + 6
    layout = BlockLayout.from_mask(keep, 32)
    assert layout.grid == (3, 2) and layout.nnzb == 4
    assert layout.row_ptr.tolist() == [0, 1, 3, 4] and layout.col_idx.tolist() == [0, 0, 1, 1]
    assert layout.t_row_ptr.tolist() == [0, 2, 4] and layout.t_col_idx.tolist() == [0, 1, 1, 2]
    assert layout.t_perm.tolist() == [0, 1, 2, 3]
    weight = torch.randn(70, 50)
    assert torch.equal(layout.scatter(layout.gather(weight)) != 0, layout.scatter(layout.gather(torch.ones(70, 50))) != 0)
    assert torch.equal(layout.scatter(layout.gather(weight * keep)), weight * keep)


def test_layout_refuses_a_weight_on_another_device():
    """The GPU run of the backward test once gathered a CPU gradient with CUDA indices: a clear error, not torch's."""
    layout = BlockLayout.from_mask(torch.ones(32, 32, dtype=torch.bool), 16).to("meta")
    with pytest.raises(PrunekitError, match="weight on cpu but the layout on meta"):
        layout.gather(torch.randn(32, 32))


@pytest.mark.parametrize("kernel,rows,dtype", [("skinny", 1, torch.float32), ("skinny", 1, torch.bfloat16),
                                               ("bt", 37, torch.float16), ("bt", 37, torch.bfloat16),
                                               ("tc", 300, torch.bfloat16), ("tc", 1100, torch.float16)])
@pytest.mark.parametrize("b", [32, 64])
def test_every_variant_of_a_launch_gives_the_same_product(runner, kernel, rows, dtype, b):
    """launch.variants: the one-row and bt kernels whole and split over each block row's output features in every
    way they can be, tc with either tile and, where the kernels have wgmma (the emulator; sm_90a builds), tcw with
    either (the planner picks one by layer width or rows; benchmarks time them all), on a ragged layer with empty and
    full block rows. For skinny and bt the full one has 520 blocks, more than 32 for each of 16 warps (the lanes fetch
    column indices 32 at a time)."""
    backend, device = runner
    if not hasattr(backend, "launch_forward"):
        pytest.skip(f"{backend.name} does not run prunekit's kernels")
    skip_unless_supported(backend, device, dtype, b)
    out_f, in_f = 3 * b - 7, (5 if kernel == "tc" else 520) * b + 24
    weight, keep, layout, values = problem(out_f, in_f, b, dtype, device)
    x = strided(rows, in_f, dtype, device, seed=1)
    bias = torch.randn(out_f).to(dtype).to(device)
    ref = x.double() @ (weight.double() * keep).t().to(device) + bias.double()
    wgmma = backend.wgmma(device)
    launches = plan.variants(rows, layout.grid[0], b, dtype, (9, 0), wgmma=wgmma)
    assert all(v.name.startswith(f"pk_{kernel}") for v in launches) and len(launches) == len({v.name for v in launches})
    expected = 1 + len(plan.SPLITS.get(kernel, {}).get(b, ())) if kernel != "tc" else 4 if wgmma else 2
    assert len(launches) == expected
    for launch in launches:
        close(backend.launch_forward(launch, x, values, layout, bias), ref, dtype)


def test_launch_plan_matches_the_kernel_table():
    """Every name the planner can produce is an entry point of bsr_kernels.cuh (read from PK_KERNELS' macros)."""
    from cuda_emu.build import directory

    source = (directory() / "bsr_kernels.cuh").read_text()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b in (16, 32, 64):
            for rows in (1, 2, 5, 16, 17, 33, 64, 65, 4096):
                for transposed in (False, True):
                    for cap in ((7, 5), (9, 0)):
                        for launch in plan.variants(rows, 4, b, dtype, cap, wgmma=True) if not transposed else [
                                plan.forward(rows, 4, b, dtype, cap, transposed)]:
                            family = launch.name.split(f"_{plan.DTYPE_NAMES[dtype]}_")[0]
                            assert f"X({family}_##tn##_b##B" in source, launch.name
            assert f"X({plan.grad_values(3, b, dtype, (9, 0)).name.split('_' + plan.DTYPE_NAMES[dtype])[0]}_##tn" \
                in source


def test_tcw_is_planned_only_when_asked_for_built_and_the_forward_of_a_wide_block(monkeypatch):
    bf16 = torch.bfloat16
    assert plan.forward(300, 4, 64, bf16, (9, 0), wgmma=True).name == "pk_tc_bf16_b64_m128_n"  # TC_WGMMA off
    monkeypatch.setattr(plan, "TC_WGMMA", True)
    assert plan.forward(300, 4, 64, bf16, (9, 0), wgmma=True).name == "pk_tcw_bf16_b64_m128"
    assert plan.forward(2000, 4, 32, bf16, (9, 0), wgmma=True).name == "pk_tcw_bf16_b32_m256"
    assert plan.forward(300, 4, 64, bf16, (9, 0), wgmma=False).name == "pk_tc_bf16_b64_m128_n"  # not built
    assert plan.forward(300, 4, 64, bf16, (9, 0), transposed=True, wgmma=True).name == "pk_tc_bf16_b64_m128_t"
    assert plan.forward(300, 4, 16, bf16, (9, 0), wgmma=True).name == "pk_tc_bf16_b16_m128_n"  # 16-wide: no tcw
    assert plan.forward(40, 4, 64, bf16, (9, 0), wgmma=True).name.startswith("pk_bt_")  # 2-64 rows stay on bt
    assert plan.forward(300, 4, 64, torch.float32, (9, 0), wgmma=True).name == "pk_simt_f32_b64_n"


def test_the_operator_is_thin_capturable_and_compilable():
    """prunekit::bsr_linear (the extension's inference forward): torch's operator checks, the same numbers in a CUDA
    graph and under torch.compile as eagerly, and auto's choice per mode."""
    backend = gpu_backend("cuda_ext")
    from prunekit.kernels import dispatch

    device = torch.device("cuda")
    weight, keep, layout, values = problem(300, 200, 32, torch.bfloat16, device)
    bias = torch.randn(300, dtype=torch.bfloat16, device=device)
    for rows in (1, 5, 40, 200):  # skinny, bt at 16 and 64 rows, tc
        x = torch.randn(rows, 200, dtype=torch.bfloat16, device=device)
        kernel, tile, threads, split = backend.operator_plan(x, values, layout, bias)  # tuned on this first call
        variants = plan.variants(rows, layout.grid[0], 32, x.dtype, torch.cuda.get_device_capability(),
                                 wgmma=backend.wgmma(device))
        assert backend.planned(x, values, layout, bias).name in {v.name for v in variants}
        args = (x, values, layout.row_ptr, layout.col_idx, bias, 300, kernel, tile, threads, split)
        torch.library.opcheck(torch.ops.prunekit.bsr_linear.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        close(torch.ops.prunekit.bsr_linear(*args), x.double() @ (weight.double() * keep).t().to(device) + bias.double(),
              torch.bfloat16)
    # [batch, tokens, features], here not a view of rows (the operator flattens, copying where it must)
    x = torch.randn(20, 2, 200, dtype=torch.bfloat16, device=device).transpose(0, 1)
    args = (x, values, layout.row_ptr, layout.col_idx, bias, 300,
            *backend.operator_plan(x.reshape(-1, 200), values, layout, bias))
    torch.library.opcheck(torch.ops.prunekit.bsr_linear.default, args, test_utils=("test_schema", "test_faketensor"))
    close(torch.ops.prunekit.bsr_linear(*args), x.double() @ (weight.double() * keep).t().to(device) + bias.double(),
          torch.bfloat16)
    linear = torch.nn.Linear(200, 300, dtype=torch.bfloat16)
    linear.weight.data.copy_(weight)
    module = BlockSparseLinear.from_dense(linear, keep, 32, backend="cuda_ext").to(device)
    x = torch.randn(2, 2, 200, dtype=torch.bfloat16, device=device)  # through the module's remembered run
    with torch.no_grad():
        eager = module(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            module(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = module(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        assert torch.equal(torch.compile(module)(x), eager)
    dispatch.forget()
    module.backend = "auto"
    with torch.no_grad():
        for mode in ("eager", "graph"):
            with dispatch.mode(mode):
                module(x)
    modes = {p.mode for p in dispatch.decisions() if p.shape == (300, 200)}
    assert modes == {"eager", "graph"}
