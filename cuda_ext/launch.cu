// Host side of the kernels: a table of every entry point in bsr_kernels.cuh and one launcher that looks a kernel up
// by name. No torch headers: extension.cpp binds this to Python, and CI compiles this file alone with nvcc.
#include <cuda_runtime.h>

#include <cstring>

#include "bsr_kernels.cuh"

namespace {

struct Entry {
  const char* name;
  const void* fn;
  int threads;  // the block size the kernel's launch bounds were compiled for
};

#define PK_ENTRY(name, threads, call) {#name, reinterpret_cast<const void*>(&name), threads},
const Entry kEntries[] = {PK_KERNELS(PK_ENTRY)};
#undef PK_ENTRY
constexpr int kCount = sizeof(kEntries) / sizeof(kEntries[0]);

}  // namespace

extern "C" int pk_kernel_count() { return kCount; }

extern "C" const char* pk_kernel_name(int i) { return i >= 0 && i < kCount ? kEntries[i].name : nullptr; }

extern "C" int pk_params_size() { return static_cast<int>(sizeof(PkParams)); }

// 0 on success, -1 for an unknown name, -2 for a block size other than the kernel's, else a cudaError_t.
extern "C" int pk_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                         unsigned bz, const void* params, cudaStream_t stream) {
  for (int i = 0; i < kCount; ++i) {
    if (std::strcmp(kEntries[i].name, name) != 0) continue;
    if (static_cast<int>(bx * by * bz) != kEntries[i].threads) return -2;
    PkParams p;
    std::memcpy(&p, params, sizeof(PkParams));
    void* args[] = {&p.x,   &p.values, &p.row_ptr, &p.col_idx, &p.perm, &p.row_idx, &p.bias, &p.out,
                    &p.grad, &p.M,     &p.N,       &p.K,       &p.ldx,  &p.ldo,     &p.ldg};
    static_assert(sizeof(args) / sizeof(args[0]) * 8 == sizeof(PkParams), "one argument per PkParams field");
    return static_cast<int>(cudaLaunchKernel(kEntries[i].fn, dim3(gx, gy, gz), dim3(bx, by, bz), args, 0, stream));
  }
  return -1;
}
