// Python binding of launch.cu (built as prunekit._cuda_ext by setup.py through torch.utils.cpp_extension, with
// op.cpp). Only pybind11, which torch ships: tensors never cross this boundary, prunekit/kernels/native.py passes
// their pointers in a packed PkParams. The inference forward goes through op.cpp's torch operator instead.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::array arguments, std::vector results

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" int pk_kernel_count();
extern "C" const char* pk_kernel_name(int i);
extern "C" int pk_params_size();
extern "C" int pk_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                         unsigned bz, const void* params, cudaStream_t stream);
extern "C" int pk_kernel_index(const char* name);
extern "C" int pk_has_wgmma();

namespace py = pybind11;

static void launch(const std::string& name, std::array<unsigned, 3> grid, std::array<unsigned, 3> block,
                   py::bytes params, std::uintptr_t stream) {
  std::string raw = params;
  if (static_cast<int>(raw.size()) != pk_params_size())
    throw std::invalid_argument("PkParams is " + std::to_string(pk_params_size()) + " bytes, got " +
                                std::to_string(raw.size()));
  const int err = pk_launch(name.c_str(), grid[0], grid[1], grid[2], block[0], block[1], block[2], raw.data(),
                            reinterpret_cast<cudaStream_t>(stream));
  if (err == -1) throw std::invalid_argument("no kernel named " + name);
  if (err == -2) throw std::invalid_argument("wrong block size for " + name);
  if (err != 0) throw std::runtime_error(name + ": " + cudaGetErrorString(static_cast<cudaError_t>(err)));
}

static std::vector<std::string> kernels() {
  std::vector<std::string> names;
  for (int i = 0; i < pk_kernel_count(); ++i) names.emplace_back(pk_kernel_name(i));
  return names;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prunekit block-sparse CUDA kernels (see cuda_ext/bsr_kernels.cuh)";
  m.def("launch", &launch, "launch(name, grid, block, params: bytes, stream: int)");
  m.def("kernels", &kernels, "names of the compiled kernels");
  m.def("params_size", &pk_params_size, "sizeof(PkParams)");
  m.def("kernel_index", [](const std::string& name) { return pk_kernel_index(name.c_str()); },
        "a kernel's index in the table (what the prunekit::bsr_linear operator takes), -1 if there is none");
  m.def("has_wgmma", &pk_has_wgmma,
        "1 where the kernels loaded for the current device have wgmma (built for sm_90a), 0 if not, < 0 on error");
}
