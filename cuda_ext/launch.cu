// Host side of the kernels: a table of every entry point in bsr_kernels.cuh and launchers that find a kernel by name
// or by its index in the table. No torch headers: extension.cpp and op.cpp bind this to Python, and CI compiles
// this file alone with nvcc.
#include <cuda_runtime.h>

#include <cstring>

#include "bsr_kernels.cuh"

namespace {

struct Entry {
  const char* name;
  const void* fn;
  int threads;  // the block size the kernel's launch bounds were compiled for
  int smem;     // dynamic shared memory bytes
};

#define PK_ENTRY(name, threads, smem, call) {#name, reinterpret_cast<const void*>(&name), threads, smem},
const Entry kEntries[] = {PK_KERNELS(PK_ENTRY)};
#undef PK_ENTRY
constexpr int kCount = sizeof(kEntries) / sizeof(kEntries[0]);
bool raised[kCount] = {};  // kernels whose dynamic shared memory limit was raised past the default 48 KiB, per process

}  // namespace

extern "C" int pk_kernel_count() { return kCount; }

extern "C" const char* pk_kernel_name(int i) { return i >= 0 && i < kCount ? kEntries[i].name : nullptr; }

extern "C" int pk_params_size() { return static_cast<int>(sizeof(PkParams)); }

extern "C" int pk_kernel_index(const char* name) {
  for (int i = 0; i < kCount; ++i)
    if (std::strcmp(kEntries[i].name, name) == 0) return i;
  return -1;
}

// Kernel `index` of the table with `params` (a PkParams as bytes). 0 on success, -1 for an unknown kernel, -2 for a
// block size other than the kernel's, else a cudaError_t.
extern "C" int pk_launch_at(int index, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            const void* params, cudaStream_t stream) {
  if (index < 0 || index >= kCount) return -1;
  if (static_cast<int>(bx * by * bz) != kEntries[index].threads) return -2;
  const Entry& e = kEntries[index];
  if (e.smem > 48 * 1024 && !raised[index]) {  // once per kernel (a second time, from another thread, is harmless)
    const cudaError_t err = cudaFuncSetAttribute(e.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, e.smem);
    if (err != cudaSuccess) return static_cast<int>(err);
    raised[index] = true;
  }
  PkParams p;
  std::memcpy(&p, params, sizeof(PkParams));
  void* args[] = {&p.x,    &p.values, &p.row_ptr, &p.col_idx, &p.perm, &p.row_idx, &p.bias, &p.out,
                  &p.grad, &p.M,      &p.N,       &p.K,       &p.ldx,  &p.ldo,     &p.ldg};
  static_assert(sizeof(args) / sizeof(args[0]) * 8 == sizeof(PkParams), "one argument per PkParams field");
  return static_cast<int>(cudaLaunchKernel(e.fn, dim3(gx, gy, gz), dim3(bx, by, bz), args, e.smem, stream));
}

extern "C" int pk_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                         unsigned bz, const void* params, cudaStream_t stream) {
  return pk_launch_at(pk_kernel_index(name), gx, gy, gz, bx, by, bz, params, stream);
}

// 1 where the kernels loaded for the current device were built with wgmma (sm_90a: tcw runs), 0 where not, a negative
// cudaError_t where that cannot be read (no kernel image for this device, say).
extern "C" int pk_has_wgmma() {
  int built = 0;
  const cudaError_t err = cudaMemcpyFromSymbol(&built, pk_wgmma_built, sizeof built);
  if (err != cudaSuccess) cudaGetLastError();  // not sticky: clear it for the next call
  return err == cudaSuccess ? built : -static_cast<int>(err);
}

extern "C" const char* pk_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
