// prunekit::bsr_linear: y = x W^T + b on the block-sparse kernels as one torch operator, the inference path of
// BlockSparseLinear. Going through the dispatcher in C++ (device guard, current stream, output allocation, launch)
// costs a few microseconds where the Python route through launch.py cost about fifty, it can be captured in CUDA
// graphs, and torch.compile sees an opaque op (its fake implementation is registered in prunekit/kernels/native.py).
// The kernel, its tile and its thread blocks per block row are chosen in Python (prunekit/kernels/native.py, among
// launch.py's variants), once per layer shape and batch-size bucket, and passed in by index.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

extern "C" int pk_launch_at(int index, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            const void* params, cudaStream_t stream);
extern "C" const char* pk_error_string(int err);

namespace {

std::uint64_t address(const at::Tensor& t) { return reinterpret_cast<std::uint64_t>(t.data_ptr()); }

at::Tensor bsr_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx, const std::optional<at::Tensor>& bias, int64_t out_features,
                      int64_t kernel, int64_t tile_rows, int64_t threads, int64_t split) {
  TORCH_CHECK(x.is_cuda() && x.dim() >= 1, "prunekit::bsr_linear: x must be a CUDA tensor of at least one dimension");
  TORCH_CHECK(values.is_contiguous() && values.scalar_type() == x.scalar_type() && values.device() == x.device(),
              "prunekit::bsr_linear: the blocks must be contiguous, of x's dtype and on x's device");
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && col_idx.scalar_type() == at::kInt && row_ptr.device() == x.device(),
              "prunekit::bsr_linear: the layout's indices must be int32 on x's device");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == out_features && bias->device() == x.device()),
              "prunekit::bsr_linear: the bias must be contiguous, with out_features entries, on x's device");
  TORCH_CHECK(tile_rows > 0 && threads > 0 && split > 0,
              "prunekit::bsr_linear: tile_rows, threads and split must be positive");
  // Leading dimensions are rows: [batch, tokens, features] (a transformer's activations) is flattened here, a view
  // where it can be, since the same reshape and view in Python cost more than the launch.
  at::Tensor rows_of_x = x.reshape({-1, x.size(-1)});
  if (rows_of_x.stride(1) != 1) rows_of_x = rows_of_x.contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = out_features;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t rows = rows_of_x.size(0);
  if (rows == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  // PkParams (bsr_kernels.cuh), field by field: x, values, row_ptr, col_idx, perm, row_idx, bias, out, grad, M, N,
  // K, ldx, ldo, ldg.
  const std::uint64_t params[15] = {address(rows_of_x), address(values), address(row_ptr), address(col_idx), 0, 0,
                                    bias ? address(*bias) : 0, address(out), 0,
                                    static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(out_features),
                                    static_cast<std::uint64_t>(rows_of_x.size(1)),
                                    static_cast<std::uint64_t>(rows_of_x.stride(0)),
                                    static_cast<std::uint64_t>(out_features), 0};
  const unsigned grid_x = static_cast<unsigned>((row_ptr.numel() - 1) * split);  // split thread blocks a block row
  const unsigned row_tiles = static_cast<unsigned>((rows + tile_rows - 1) / tile_rows);
  const int err = pk_launch_at(static_cast<int>(kernel), grid_x, row_tiles, 1, static_cast<unsigned>(threads), 1,
                               1, params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != -1, "prunekit::bsr_linear: no kernel ", kernel);
  TORCH_CHECK(err != -2, "prunekit::bsr_linear: kernel ", kernel, " takes another block size than ", threads);
  TORCH_CHECK(err == 0, "prunekit::bsr_linear: ", pk_error_string(err));
  return out;
}

}  // namespace

TORCH_LIBRARY(prunekit, m) {
  m.def("bsr_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias, int out_features, "
        "int kernel, int tile_rows, int threads, int split) -> Tensor");
}

TORCH_LIBRARY_IMPL(prunekit, CUDA, m) { m.impl("bsr_linear", &bsr_linear); }
