// The emulator's launcher: emu_launch(name, grid, block, params) runs a kernel of bsr_kernels.cuh on CPU threads,
// with the same arguments prunekit/kernels/native.py hands the CUDA extension's launch().
#include <thread>
#include <type_traits>


#include "emu.h"
#include "bsr_kernels.cuh"

namespace {
using Kernel = void (*)(PK_PARAM_DECL);
struct Entry {
  const char* name;
  Kernel fn;
  int threads;
  int smem;
};
#define PK_ENTRY(name, threads, smem, call) {#name, &name, threads, smem},
const Entry kEntries[] = {PK_KERNELS(PK_ENTRY)};
#undef PK_ENTRY
}  // namespace

extern "C" int emu_params_size() { return sizeof(PkParams); }

// 0 on success, -1 for an unknown name, -2 for a block size other than the kernel's.
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, const void* params) {
  const Entry* entry = nullptr;
  for (const Entry& e : kEntries)
    if (std::strcmp(e.name, name) == 0) entry = &e;
  if (!entry) return -1;
  const unsigned threads = bx * by * bz;
  if (int(threads) != entry->threads) return -2;
  PkParams p;
  std::memcpy(&p, params, sizeof p);
  emu::Block block;
  block.all = std::make_unique<std::barrier<>>(threads);
  for (unsigned w = 0; w < (threads + 31) / 32; ++w)
    block.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
  block.slots.assign(threads, 0.f);
  block.posts.assign(2 * threads * 8, 0);
  block.dynamic.assign(entry->smem + 128, 0xff);  // garbage, as on a GPU: kernels must not read before writing
  emu::block = &block;
  emu::block_dim = {bx, by, bz};
  emu::grid_dim = {gx, gy, gz};
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      emu::thread_idx = {t % bx, (t / bx) % by, t / (bx * by)};
      for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
          for (unsigned x = 0; x < gx; ++x) {
            emu::block_idx = {x, y, z};
            entry->fn(PK_PARAM_FIELDS(p));
            block.all->arrive_and_wait();  // the next thread block starts when this one is done
          }
    });
  for (std::thread& t : pool) t.join();
  emu::block = nullptr;
  return 0;
}
