// Runs the CUDA kernels of cuda_ext/bsr_kernels.cuh on the CPU, to test them where there is no GPU.
//
// Every thread of a thread block is a std::thread; __syncthreads is a barrier over them, __shfl_xor_sync an
// exchange through memory between two barriers of the warp; thread blocks run one after another, so __shared__
// arrays become function statics. WMMA fragments hold the whole 16 x 16 tile (in fp32, converted from the
// operand type as tensor cores do) and lane 0 of each warp does the warp's work; the documented preconditions
// of load/store_matrix_sync (32-byte aligned pointer, ldm a multiple of 16 bytes) and of 16-byte vector loads
// are checked on every call. ldmatrix and mma.sync, by contrast, are emulated lane by lane: each lane holds only
// the registers PTX gives it, so a fragment layout the kernel gets wrong gives a wrong product here too; cp.async and
// wgmma are asynchronous, landing or computing only when their group is waited for. What this
// cannot show: speed, and anything a real warp does differently from the CUDA programming model (which the kernels
// must not rely on anyway).
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#define PK_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
static_assert(sizeof(uint4) == 16, "uint4 is one 16-byte vector");
struct emu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace emu {
struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> slots;  // one per thread, for shuffles
  std::vector<std::uint64_t> posts;  // two sets of 8 per thread: what lanes show each other in warp collectives
  std::vector<unsigned char> dynamic;  // the kernel's dynamic shared memory (128 bytes of slack for alignment)
};
inline Block* block = nullptr;
inline thread_local emu_dim3 thread_idx, block_idx;
inline emu_dim3 block_dim, grid_dim;
inline unsigned linear_tid() { return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z); }
inline unsigned lane() { return linear_tid() % 32; }
inline unsigned char* dynamic_smem() {
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(block->dynamic.data());
  return reinterpret_cast<unsigned char*>((at + 127) / 128 * 128);
}

inline void fail(const char* what, const void* ptr) {
  std::fprintf(stderr, "emu: %s (pointer %p)\n", what, ptr);
  std::abort();
}
inline void require_aligned(const void* ptr, unsigned bytes, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % bytes) fail(what, ptr);
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block->all->arrive_and_wait(); }
inline void __trap() { emu::fail("__trap", nullptr); }
inline uint4 __ldg(const uint4* ptr) {
  emu::require_aligned(ptr, 16, "16-byte vector load from an unaligned address");
  return *ptr;
}
inline void __syncwarp() { emu::block->warps[emu::linear_tid() / 32]->arrive_and_wait(); }

// cp.async as the pipeline primitives spell it, asynchronous as on the GPU: a copy lands only when
// __pipeline_wait_prior retires its commit group, so a kernel that reads a stage before waiting for it reads
// whatever was there before (the ring's invariant in bsr_kernels.cuh is tested, not assumed).
namespace emu {
struct Copy {
  void* dst;
  const void* src;
  std::size_t size, zfill;
};
inline thread_local std::vector<Copy> copies_open;                 // issued since the last commit
inline thread_local std::vector<std::vector<Copy>> copy_groups;    // committed, oldest first
}  // namespace emu
inline void __pipeline_memcpy_async(void* dst, const void* src, std::size_t size, std::size_t zfill = 0) {
  emu::require_aligned(dst, size, "cp.async to an unaligned shared address");
  emu::require_aligned(src, size, "cp.async from an unaligned global address");
  emu::copies_open.push_back({dst, src, size, zfill});
}
inline void __pipeline_commit() {
  emu::copy_groups.push_back(std::move(emu::copies_open));
  emu::copies_open.clear();
}
inline void __pipeline_wait_prior(std::size_t newest) {
  while (emu::copy_groups.size() > newest) {
    for (const emu::Copy& c : emu::copy_groups.front()) {
      std::memcpy(c.dst, c.src, c.size - c.zfill);
      std::memset(static_cast<char*>(c.dst) + c.size - c.zfill, 0, c.zfill);
    }
    emu::copy_groups.erase(emu::copy_groups.begin());
  }
}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned tid = emu::linear_tid(), warp = tid / 32;
  emu::block->slots[tid] = v;
  emu::block->warps[warp]->arrive_and_wait();
  const float other = emu::block->slots[warp * 32 + ((tid % 32) ^ lane_mask)];
  emu::block->warps[warp]->arrive_and_wait();
  return other;
}

namespace emu {
// A warp collective's exchange: the lane posts up to 8 words, the warp meets once, and `read(lane, word)` sees any
// lane's posts. Consecutive collectives alternate between two sets, so one meeting per collective is enough: a lane
// can only overwrite a set after every lane has met again, i.e. has finished reading it.
struct Posts {
  std::uint64_t* set;
  unsigned warp;
  std::uint64_t read(unsigned lane, unsigned word) const { return set[(warp * 32 + lane) * 8 + word]; }
};
inline thread_local unsigned post_round = 0;
inline Posts post(const std::uint64_t* words, unsigned n) {
  const unsigned tid = linear_tid(), threads = static_cast<unsigned>(block->slots.size());
  std::uint64_t* set = block->posts.data() + (post_round++ % 2) * threads * 8;
  std::memcpy(set + tid * 8, words, n * 8);
  block->warps[tid / 32]->arrive_and_wait();
  return {set, tid / 32};
}
}  // namespace emu

// __shfl_sync: the value of lane `src` (every lane of the warp takes part, as in the kernels).
template <typename V>
inline V __shfl_sync(unsigned, V v, int src) {
  static_assert(sizeof(V) <= 8, "one word a lane");
  std::uint64_t mine = 0;
  std::memcpy(&mine, &v, sizeof(V));
  const std::uint64_t theirs = emu::post(&mine, 1).read(static_cast<unsigned>(src) % 32, 0);
  V out;
  std::memcpy(&out, &theirs, sizeof(V));
  return out;
}

struct __half {
  std::uint16_t bits;
};
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const std::uint32_t u = std::uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {std::uint16_t(u >> 16)};
}

namespace emu {
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace emu

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of matrix l / 8 (16
// bytes each) and receives, in r[q], two 16-bit elements of matrix q: row l / 4, columns 2 (l % 4) and + 1, or
// with .trans the same of the transposed matrix.
template <bool TRANS>
inline void pk_ldmatrix_x4(unsigned (&r)[4], const void* row) {
  emu::require_aligned(row, 16, "ldmatrix needs 16-byte aligned rows");
  const std::uint64_t mine = reinterpret_cast<std::uintptr_t>(row);
  const emu::Posts posts = emu::post(&mine, 1);
  const unsigned l = emu::lane();
  auto at = [&](unsigned q, unsigned r8, unsigned c) {
    return reinterpret_cast<const std::uint16_t*>(posts.read(8 * q + r8, 0))[c];
  };
  for (unsigned q = 0; q < 4; ++q) {
    const unsigned lo = TRANS ? at(q, 2 * (l % 4), l / 4) : at(q, l / 4, 2 * (l % 4));
    const unsigned hi = TRANS ? at(q, 2 * (l % 4) + 1, l / 4) : at(q, l / 4, 2 * (l % 4) + 1);
    r[q] = lo | hi << 16;
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += a b for a 16 x 16 A, a 16 x 8 B, fp32 D. With g = l / 4,
// t = l % 4: a[0..3] hold A (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..); b0, b1 hold B (2t.., g) and
// (2t + 8.., g); d holds D (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1). Two elements a register, low half first.
template <typename T>
inline void pk_mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  const std::uint64_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const emu::Posts posts = emu::post(mine, 6);
  auto element = [&](unsigned lane, unsigned word, unsigned k) {
    return emu::to_float(T{std::uint16_t(posts.read(lane, word) >> (16 * (k % 2)))});
  };
  auto A = [&](unsigned row, unsigned k) { return element(4 * (row % 8) + (k % 8) / 2, row / 8 + 2 * (k / 8), k); };
  auto Bk = [&](unsigned k, unsigned n) { return element(4 * n + (k % 8) / 2, 4 + k / 8, k); };
  const unsigned g = emu::lane() / 4, t = emu::lane() % 4;
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = 0.f;
    for (unsigned k = 0; k < 16; ++k) sum += A(row, k) * Bk(k, col);
    d[e] += sum;
  }
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} with both operands K-major in shared memory, no swizzle:
// d += A B for A 64 x 16 and B N x 16 (its rows are D's columns), each stored as 8-row x 16-byte core matrices (128
// contiguous bytes, a row 16 bytes on), the next along K 128 bytes on, the next 8 rows `sbo` bytes on. Thread 32 w + l
// of the warpgroup holds D (16 w + l / 4 + 8 ((i / 2) % 2), 8 (i / 4) + 2 (l % 4) + i % 2) in d[i]. As on the GPU
// the product is asynchronous: it is only computed when pk_wgmma_wait retires its group, from what shared memory
// holds then, so a kernel that overwrites an operand before waiting gets a wrong product here too.
#define PK_WGMMA 1
namespace emu {
struct Wgmma {
  float* d;
  const unsigned char *a, *b;
  unsigned n, sbo;
  float (*element)(const unsigned char*);
};
inline thread_local std::vector<Wgmma> wgmma_open;                 // issued since the last commit
inline thread_local std::vector<std::vector<Wgmma>> wgmma_groups;  // committed, oldest first
template <typename T>
inline float element_at(const unsigned char* at) {
  T v;
  std::memcpy(&v, at, sizeof v);
  return to_float(v);
}
inline void run(const Wgmma& op) {
  const unsigned w = (linear_tid() / 32) % 4, g = lane() / 4, t = lane() % 4;
  auto at = [&](const unsigned char* base, unsigned row, unsigned k) {
    return op.element(base + (row / 8) * op.sbo + (k / 8) * 128 + (row % 8) * 16 + (k % 8) * 2);
  };
  for (unsigned i = 0; i < op.n / 2; ++i) {
    const unsigned row = 16 * w + g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * t + i % 2;
    float sum = 0.f;
    for (unsigned k = 0; k < 16; ++k) sum += at(op.a, row, k) * at(op.b, col, k);
    op.d[i] += sum;
  }
}
}  // namespace emu

template <typename T, int N>
inline void pk_wgmma(float (&d)[N / 2], const T* a, const T* b, unsigned sbo) {
  emu::require_aligned(a, 16, "wgmma operand A not 16-byte aligned");
  emu::require_aligned(b, 16, "wgmma operand B not 16-byte aligned");
  emu::wgmma_open.push_back({d, reinterpret_cast<const unsigned char*>(a), reinterpret_cast<const unsigned char*>(b),
                             unsigned(N), sbo, &emu::element_at<T>});
}
inline void pk_wgmma_fence() {}
inline void pk_wgmma_commit() {
  emu::wgmma_groups.push_back(std::move(emu::wgmma_open));
  emu::wgmma_open.clear();
}
template <int G>
inline void pk_wgmma_wait() {
  while (emu::wgmma_groups.size() > G) {
    for (const emu::Wgmma& op : emu::wgmma_groups.front()) emu::run(op);
    emu::wgmma_groups.erase(emu::wgmma_groups.begin());
  }
}
inline void pk_fence_proxy_async() {}

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator knows m16n16k16 only");
  float x[256];  // element (i, j) at x[16 * i + j]
  static constexpr int num_elements = 256;
};

template <typename T>
inline void check_operand(const T* ptr, unsigned ldm) {
  emu::require_aligned(ptr, 32, "load/store_matrix_sync needs a 256-bit aligned pointer");
  if ((ldm * sizeof(T)) % 16) emu::fail("load/store_matrix_sync needs ldm to be a multiple of 16 bytes", ptr);
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  check_operand(ptr, ldm);
  if (emu::lane()) return;  // lane 0 works for the warp
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[16 * i + j] = emu::to_float(row ? ptr[i * ldm + j] : ptr[i + j * ldm]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* ptr, unsigned ldm,
                             layout_t layout) {
  check_operand(ptr, ldm);
  if (emu::lane()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[16 * i + j] = layout == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (emu::lane()) return;
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[16 * i + j];
      for (int k = 0; k < 16; ++k) s += a.x[16 * i + k] * b.x[16 * k + j];
      out[16 * i + j] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_operand(ptr, ldm);
  if (emu::lane()) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (layout == mem_row_major ? ptr[i * ldm + j] : ptr[i + j * ldm]) = f.x[16 * i + j];
}
}  // namespace wmma
}  // namespace nvcuda
