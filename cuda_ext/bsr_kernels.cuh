// prunekit block-sparse kernels: y = x W^T + b with W in block-sparse-row (BSR) form (a Linear's forward), the
// product with the transposed block structure (its input gradient), and the gradient of the stored blocks only.
//
// Device code only, with no torch or host headers, so that one text compiles three ways: with nvcc for the torch
// extension (launch.cu), with NVRTC through CuPy's RawModule (prunekit/kernels/cupy_loader.py), and on the host
// against tests/cuda_emu/emu.h, which runs every thread of a block on a CPU thread so the kernels can be tested
// without a GPU. Every kernel is an extern "C" entry point listed in PK_KERNELS taking the fields of PkParams as
// its parameters, all 8 bytes wide, so that any launcher can pass them as plain 64-bit values (CuPy's scalars
// included); prunekit/kernels/launch.py chooses the kernel and its grid, so that choice is written once.
//
// BSR here: W [N, K] cut into B x B blocks (the last block row / column zero-padded when B does not divide N or
// K); block row j holds col_idx[row_ptr[j] .. row_ptr[j+1]) and its blocks are values[i] (B x B, row-major:
// output row, input column). The transposed structure (for dX = dY W) lists the same blocks by block column,
// with perm[i] naming the stored block, which is then read transposed.
//
// Four forward paths, as in cuSPARSE/Triton's split between GEMV- and GEMM-like problems:
// - skinny (one row, or fp32 up to 16: decode): every weight byte is read once, with 16-byte loads;
//   threads of a warp split each block's rows and columns, warps split a block row's blocks, partial sums meet in
//   shared memory. Accumulates in fp32 for every dtype.
// - bt (fp16/bf16, 2-64 rows: batched decode, speculative decoding): tensor cores on the transposed product,
//   out^T = W x^T, so that a block's output features fill the mma's 16-row side and 16 rows of x the other
//   (the "swap AB" of small-batch GEMM); 16 warps split a block row's blocks and add up in shared memory.
// - tc (fp16/bf16 on sm_80+, more rows, compute-bound: prefill, training): a TM x B tile per thread block on
//   tensor cores (mma.sync m16n8k16 fed by ldmatrix, fp32 accumulation), each warp a quarter of its rows across the
//   whole block, the operands of the next steps (up to 32 columns of a block each) streamed into a four-stage
//   shared-memory ring by cp.async while the current one is multiplied.
// - simt (fp32, or any dtype where tensor cores are not available): a 64 x B tile on CUDA cores, 4 x B/16 outputs
//   per thread.
// Gradient of the blocks: dV[i] = dY[:, rows of i]^T X[:, cols of i], one thread block per stored block looping
// over all rows (tc or simt), so pruned blocks never get a gradient.
//
// Kernels that need more than 48 KiB of shared memory take it dynamically (PK_DYNAMIC_SMEM); PK_KERNELS names each
// kernel's dynamic bytes, which every launcher passes (and raises the kernel's limit to, where CUDA requires it).
#pragma once

#ifndef PK_EMULATE
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_pipeline_primitives.h>
#include <mma.h>
#define PK_BOUNDS(threads) __launch_bounds__(threads)
#define PK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

// ldmatrix and mma.sync as inline PTX (sm_80+; tests/cuda_emu/emu.h emulates both lane by lane, and says what each
// lane gives and gets).
template <bool TRANS>
__device__ __forceinline__ void pk_ldmatrix_x4(unsigned (&r)[4], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(at));
#endif
}

template <typename T>
__device__ __forceinline__ void pk_mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define PK_MMA_ASM(type)                                                                                          \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type                                             \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                          \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
#else
#define PK_MMA_ASM(type)
#endif
#define PK_MMA_16816(T, type)                                                                                     \
  template <>                                                                                                     \
  __device__ __forceinline__ void pk_mma_16816<T>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) { \
    PK_MMA_ASM(type);                                                                                             \
  }
PK_MMA_16816(__half, "f16")
PK_MMA_16816(__nv_bfloat16, "bf16")
#undef PK_MMA_16816
#undef PK_MMA_ASM

// wgmma, Hopper's warpgroup MMA, exists only in code built for the arch-specific target sm_90a (nvcc -gencode
// arch=compute_90a,code=sm_90a; TORCH_CUDA_ARCH_LIST=9.0a): PK_WGMMA says whether this compilation has it, and the
// device constant pk_wgmma_built (below) tells a launcher which kind of code it loaded.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PK_WGMMA 1
#else
#define PK_WGMMA 0
#endif

// d += A B over 16 columns, by the four warps of a warpgroup: A 64 x 16 and B N x 16 (the block's rows), both K-major
// in shared memory without swizzling, i.e. in 8-row x 16-byte core matrices of 128 contiguous bytes, the next one
// along K 128 bytes on and the next 8 rows `sbo` bytes on. Thread 32 w + l holds D (16 w + l / 4 + 8 ((i / 2) % 2),
// 8 (i / 4) + 2 (l % 4) + i % 2) in d[i] (PTX ISA: "Matrix Descriptor Format", "Register Fragments").
__device__ __forceinline__ unsigned long long pk_smem_desc(const void* at, unsigned sbo) {
  const unsigned long long address = static_cast<unsigned>(__cvta_generic_to_shared(at));
  constexpr unsigned long long lbo = 128;
  const unsigned long long stride = (sbo & 0x3FFFF) >> 4;
  return ((address & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | (stride << 32);
}

template <typename T, int N>
__device__ __forceinline__ void pk_wgmma(float (&d)[N / 2], const T* a, const T* b, unsigned sbo);
#if PK_WGMMA
#define PK_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define PK_F16(i) PK_F4(i), PK_F4(i + 4), PK_F4(i + 8), PK_F4(i + 12)
#define PK_WGMMA_N32(T, type)                                                                                     \
  template <>                                                                                                     \
  __device__ __forceinline__ void pk_wgmma<T, 32>(float (&d)[16], const T* a, const T* b, unsigned sbo) {         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                     \
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32." type "." type " "                                  \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "                        \
                 "%16, %17, p, 1, 1, 0, 0;\n}\n"                                                                   \
                 : PK_F16(0)                                                                                      \
                 : "l"(pk_smem_desc(a, sbo)), "l"(pk_smem_desc(b, sbo)), "r"(1));                                  \
  }
#define PK_WGMMA_N64(T, type)                                                                                     \
  template <>                                                                                                     \
  __device__ __forceinline__ void pk_wgmma<T, 64>(float (&d)[32], const T* a, const T* b, unsigned sbo) {         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                     \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " "                                  \
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "     \
                 "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"       \
                 : PK_F16(0), PK_F16(16)                                                                          \
                 : "l"(pk_smem_desc(a, sbo)), "l"(pk_smem_desc(b, sbo)), "r"(1));                                  \
  }
PK_WGMMA_N32(__half, "f16")
PK_WGMMA_N32(__nv_bfloat16, "bf16")
PK_WGMMA_N64(__half, "f16")
PK_WGMMA_N64(__nv_bfloat16, "bf16")
#undef PK_WGMMA_N32
#undef PK_WGMMA_N64
#undef PK_F16
#undef PK_F4
// Before the first wgmma of a step (orders the accumulators' registers), after the step's last (closes the group),
// and to wait until all but the newest G groups are done (their accumulators final, their shared memory free).
__device__ __forceinline__ void pk_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void pk_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int G>
__device__ __forceinline__ void pk_wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(G) : "memory");
}
// What this thread wrote to shared memory (cp.async or plain stores), visible to the tensor cores' async reads.
__device__ __forceinline__ void pk_fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#else
__device__ __forceinline__ void pk_wgmma_fence() {}
__device__ __forceinline__ void pk_wgmma_commit() {}
template <int G>
__device__ __forceinline__ void pk_wgmma_wait() {}
__device__ __forceinline__ void pk_fence_proxy_async() {}
#endif
#else
#define PK_BOUNDS(threads)
#define PK_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()
#endif

struct PkParams {
  const void* x;        // [M, K] input rows (dW: X)
  const void* values;   // [nnzb, B, B] stored blocks
  const int* row_ptr;   // [block rows + 1], in this product's orientation
  const int* col_idx;   // [nnzb] block column of each listed block, in this product's orientation
  const int* perm;      // [nnzb] stored block of each listed block (transposed products); null: the identity
  const int* row_idx;   // [nnzb] block row of each stored block (dW only)
  const void* bias;     // [N] or null
  void* out;            // [M, N] (dW: [nnzb, B, B])
  const void* grad;     // dW: dY [M, N]
  long long M, N, K;    // rows, output features, input features of this product
  long long ldx, ldo, ldg;  // row strides in elements of x, out, grad
};

// The fields as kernel parameters, and back. Keep the three lists in the order of the struct (and of
// prunekit/kernels/launch.py's PARAMS).
#define PK_PARAM_DECL                                                                                        \
  const void *x, const void *values, const int *row_ptr, const int *col_idx, const int *perm,               \
      const int *row_idx, const void *bias, void *out, const void *grad, long long M, long long N, long long K, \
      long long ldx, long long ldo, long long ldg
#define PK_PARAM_INIT {x, values, row_ptr, col_idx, perm, row_idx, bias, out, grad, M, N, K, ldx, ldo, ldg}
#define PK_PARAM_FIELDS(p) \
  (p).x, (p).values, (p).row_ptr, (p).col_idx, (p).perm, (p).row_idx, (p).bias, (p).out, (p).grad, (p).M, (p).N, \
      (p).K, (p).ldx, (p).ldo, (p).ldg

namespace pk {

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// Tensor cores take bf16 from sm_80 on; the host pass of nvcc and the emulator see every instantiation.
template <typename T> struct MmaOk { static constexpr bool value = true; };
template <> struct MmaOk<float> { static constexpr bool value = false; };
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <> struct MmaOk<__nv_bfloat16> { static constexpr bool value = false; };
#define PK_SM80 0  // mma.sync m16n8k16 and cp.async: sm_80 on (WMMA takes fp16 from sm_70)
#else
#define PK_SM80 1
#endif

template <bool C, typename A, typename B> struct Pick { using type = A; };
template <typename A, typename B> struct Pick<false, A, B> { using type = B; };

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<unsigned long long>(ptr) & 15ull) == 0;
}

__device__ __forceinline__ uint4 zero16() {
  uint4 u;
  u.x = u.y = u.z = u.w = 0u;  // all-zero bits are +0 in fp32, fp16 and bf16
  return u;
}

// 16 bytes of row `row` (of `rows`, stride ld) from column k0 on, of a matrix with `cols` columns: one vector load
// when it is aligned and inside the matrix, element by element (zero outside) at ragged edges.
template <typename T>
__device__ __forceinline__ uint4 load16(const T* base, long long row, long long rows, long long k0, long long cols,
                                        long long ld, bool vec_ok) {
  constexpr int VEC = 16 / sizeof(T);
  if (row >= rows) return zero16();
  const T* src = base + row * ld + k0;
  if (vec_ok && k0 + VEC <= cols) return __ldg(reinterpret_cast<const uint4*>(src));
  uint4 u = zero16();
  T* e = reinterpret_cast<T*>(&u);
  for (int v = 0; v < VEC; ++v)
    if (k0 + v < cols) e[v] = src[v];
  return u;
}

template <typename T>
__device__ __forceinline__ void unpack16(const uint4& u, float (&out)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int v = 0; v < int(16 / sizeof(T)); ++v) out[v] = Cvt<T>::to_f(e[v]);
}

// acc += a b^T: the rank-1 update of a thread's R x C register tile.
template <int R, int C>
__device__ __forceinline__ void outer(float (&acc)[R][C], const float (&a)[R], const float (&b)[C]) {
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] += a[r] * b[c];
}

// A warp's blocks of a row are base, base + stride, ... up to end: lane l fetches the column index of the l-th of
// the next 32 into `column` (the loop hands it out by __shfl_sync), so that no load of x waits on an index load of
// its own. Returns how many of the 32 there are, the same in every lane.
__device__ __forceinline__ int column_window(const int* col_idx, int base, int stride, int end, int lane,
                                             int& column) {
  const int mine = base + lane * stride, left = (end - base + stride - 1) / stride;
  column = mine < end ? col_idx[mine] : 0;
  return left < 32 ? left : 32;
}

template <typename T>
__device__ __forceinline__ void write_out(const PkParams& p, long long m, long long n, float value) {
  if (m >= p.M || n >= p.N) return;
  if (p.bias) value += Cvt<T>::to_f(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[m * p.ldo + n] = Cvt<T>::from_f(value);
}

// Registers per lane the skinny and bt kernels give to loads in flight: a warp issues the loads of as many blocks
// as fit (or of as many 16-column steps of one) before it uses the first, so that it waits on memory once per batch.
// The compiler does not do this by itself: unrolled, each block's loads still followed the previous block's
// arithmetic in the SASS, one round trip a block. More registers would cost thread blocks per SM.
constexpr int IN_FLIGHT_REGS = 32;
constexpr int clamp(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ---------------------------------------------------------------------------------------------------------------
// skinny: grid (block rows x SPLIT, ceil(M / MT)), 32 x WARPS threads. At one row the time is latency, not
// bandwidth (the H200 ran 4096 x 4096 and 11008 x 4096 at 70% in about the same 6-7 us): each warp's blocks come in
// dependent rounds, so more warps on a block row (16 at one row), the loads of D blocks issued together (up to four:
// IN_FLIGHT_REGS), and the column indices fetched 32 at a time by the lanes, ahead of the loads of x that need them.
// With SPLIT > 1, SPLIT thread blocks share a block row, each taking B / SPLIT of every block's rows (output
// features): for 64-wide blocks that quarters the slabs a warp must cover, so four times the warps split the row's
// blocks, and a layer of 64 block rows fills more than half of the GPU.
template <typename T, int B, int MT, int SPLIT>
struct Skinny {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int VR = B / VEC;                       // lanes across one row of a block (a 16-byte chunk each)
  static constexpr int RP = 32 / VR;                       // block rows a warp covers per pass
  static constexpr int CR = B / SPLIT;                     // rows of each block this thread block reads
  static constexpr int Q = CR / RP < 4 ? CR / RP : 4;      // passes, i.e. 16-byte weight loads per lane and block
  static constexpr int RS = RP * Q;                        // rows of a slab: what one warp reads of each block
  static constexpr int SLABS = CR / RS;
  static constexpr int WARPS = MT == 1 ? 16 : 8, THREADS = 32 * WARPS;
  static constexpr bool X_AHEAD = MT * 4 <= IN_FLIGHT_REGS;  // x's rows loaded with the weights (not 16 of them)
  static constexpr int D = clamp(IN_FLIGHT_REGS / ((Q + (X_AHEAD ? MT : 0)) * 4), 1, 4);  // blocks loaded at once
  static constexpr int GROUPS = WARPS / SLABS;             // warps on the same slab, splitting the row's blocks
  static_assert(VR >= 1 && VR <= 32 && Q >= 1 && SLABS <= WARPS, "block size and dtype do not fit the skinny layout");
};

template <typename T, int B, int MT, int SPLIT>
__device__ __forceinline__ void skinny(const PkParams& p) {
  using S = Skinny<T, B, MT, SPLIT>;
  __shared__ float partial[S::GROUPS][MT][S::CR];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slab = warp % S::SLABS, group = warp / S::SLABS;
  const int kc = lane % S::VR, rr = lane / S::VR;
  const long long j = blockIdx.x / SPLIT, m0 = (long long)blockIdx.y * MT;
  const int r0 = (blockIdx.x % SPLIT) * S::CR;  // this thread block's first row of each block
  const T* x = static_cast<const T*>(p.x);
  const T* values = static_cast<const T*>(p.values);
  const bool vec_ok = aligned16(p.x) && p.ldx % S::VEC == 0;

  float acc[S::Q][MT];
#pragma unroll
  for (int q = 0; q < S::Q; ++q)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[q][m] = 0.f;

  const int end = p.row_ptr[j + 1];
  for (int base = p.row_ptr[j] + group; base < end; base += 32 * S::GROUPS) {
    int column;
    const int count = column_window(p.col_idx, base, S::GROUPS, end, lane, column);
    for (int u = 0; u < count; u += S::D) {
      uint4 wq[S::D][S::Q], xq[S::D][S::X_AHEAD ? MT : 1];  // the loads of D blocks, issued before any is used
      long long k0[S::D];
#pragma unroll
      for (int d = 0; d < S::D; ++d) {
        if (u + d >= count) break;  // (count is the same in every lane)
        const long long i = base + (u + d) * S::GROUPS;
        const T* blk = values + i * B * B + (long long)(r0 + slab * S::RS + rr) * B + kc * S::VEC;
#pragma unroll
        for (int q = 0; q < S::Q; ++q) wq[d][q] = __ldg(reinterpret_cast<const uint4*>(blk + q * S::RP * B));
        k0[d] = (long long)__shfl_sync(0xffffffffu, column, u + d) * B + kc * S::VEC;
        if constexpr (S::X_AHEAD)
#pragma unroll
          for (int m = 0; m < MT; ++m) xq[d][m] = load16<T>(x, m0 + m, p.M, k0[d], p.K, p.ldx, vec_ok);
      }
#pragma unroll
      for (int d = 0; d < S::D; ++d) {
        if (u + d >= count) break;
        float w[S::Q][S::VEC];
#pragma unroll
        for (int q = 0; q < S::Q; ++q) unpack16<T>(wq[d][q], w[q]);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m0 + m >= p.M) break;
          float xv[S::VEC];
          if constexpr (S::X_AHEAD)
            unpack16<T>(xq[d][m], xv);
          else
            unpack16<T>(load16<T>(x, m0 + m, p.M, k0[d], p.K, p.ldx, vec_ok), xv);
#pragma unroll
          for (int q = 0; q < S::Q; ++q)
#pragma unroll
            for (int v = 0; v < S::VEC; ++v) acc[q][m] += w[q][v] * xv[v];
        }
      }
    }
  }
  // The VR lanes of one row hold sums over different columns: add them up (they differ in the low lane bits).
#pragma unroll
  for (int q = 0; q < S::Q; ++q)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int offset = S::VR / 2; offset > 0; offset /= 2)
        acc[q][m] += __shfl_xor_sync(0xffffffffu, acc[q][m], offset);
  if (kc == 0)
#pragma unroll
    for (int q = 0; q < S::Q; ++q)
#pragma unroll
      for (int m = 0; m < MT; ++m) partial[group][m][slab * S::RS + q * S::RP + rr] = acc[q][m];
  __syncthreads();
  for (int t = threadIdx.x; t < MT * S::CR; t += S::THREADS) {
    const int m = t / S::CR, r = t % S::CR;
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < S::GROUPS; ++g) sum += partial[g][m][r];
    write_out<T>(p, m0 + m, j * B + r0 + r, sum);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// bt: grid (block rows x SPLIT, ceil(M / 16)), 512 threads (16 warps), fp16/bf16. Few rows leave each warp little
// to do per block, so the time goes to load latency: many warps per block row keep more loads in flight, their lanes
// fetch the column indices of the next 32 blocks at once (x's loads need them), and with SPLIT > 1 each of SPLIT
// thread blocks takes B / SPLIT of a block row's output features (more thread blocks where block rows are few). A
// warp issues the loads of G 16-column steps of D blocks (their weights and x) before their MMAs, so that it waits
// on memory once per D blocks, or per G steps of one: loading and multiplying 16 columns at a time, as it did, made
// a 32-wide block two round trips and a 64-wide one four. G and D are what about 32 registers of loads in flight a
// lane allow (all four steps of a 64-wide block at once took its two-way split from 64 registers a thread to 94: one
// thread block an SM, not two).
template <typename T, int B, int SPLIT>
struct Bt {
  static constexpr int WARPS = 16, THREADS = 32 * WARPS, MT = 16, CB = B / SPLIT, FB = CB / 16, HALF = WARPS / 2;
  static constexpr int KK = B / 16;                   // 16-column steps of a block
  static constexpr int STEP_REGS = (FB + 1) * 4;      // a step's weight and x fragments, registers per lane
  static constexpr int G = clamp(IN_FLIGHT_REGS / STEP_REGS, 1, KK);
  static constexpr int D = G < KK ? 1 : clamp(IN_FLIGHT_REGS / (KK * STEP_REGS), 1, 4);
  static constexpr int RED_BYTES = HALF * MT * CB * 4;  // partial sums of half the warps, [warp][MT][CB] fp32
  static constexpr int BYTES = RED_BYTES + WARPS * 256 * 2;  // and one staged 16 x 16 x^T fragment per warp
  static_assert(FB >= 1 && BYTES <= 48 * 1024, "bt tile does not fit");
};

template <typename T, int B, int SPLIT>
__device__ __forceinline__ void bt(const PkParams& p) {
  if constexpr (!MmaOk<T>::value) {
    __trap();  // never launched: launch.py picks skinny or simt where tensor cores do not take T
  } else {
    namespace wmma = nvcuda::wmma;
    using S = Bt<T, B, SPLIT>;
    __shared__ __align__(128) unsigned char smem[S::BYTES];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* red = reinterpret_cast<float*>(smem);
    T* scratch = reinterpret_cast<T*>(smem + S::RED_BYTES) + warp * 256;
    const long long j = blockIdx.x / SPLIT, m0 = (long long)blockIdx.y * S::MT;
    const int n0 = (blockIdx.x % SPLIT) * S::CB;  // this thread block's first output feature of the block row
    const T* x = static_cast<const T*>(p.x);
    const T* values = static_cast<const T*>(p.values);
    const bool vec_ok = aligned16(p.x) && p.ldx % 8 == 0;
    // x^T reaches the MMA through the warp's scratch: lane l loads row l / 2, columns 8 (l % 2) .. + 8 of a 16 x 16
    // tile (zeros past the rows and columns there are), kept as (k, m) at scratch[16 m + k]
    const int xr = lane / 2, xc = (lane % 2) * 8;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::FB];
#pragma unroll
    for (int a = 0; a < S::FB; ++a) wmma::fill_fragment(acc[a], 0.f);

    const int end = p.row_ptr[j + 1];
    for (int base = p.row_ptr[j] + warp; base < end; base += 32 * S::WARPS) {
      int column;
      const int count = column_window(p.col_idx, base, S::WARPS, end, lane, column);
      for (int u = 0; u < count; u += S::D) {
#pragma unroll
        for (int g0 = 0; g0 < S::KK; g0 += S::G) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[S::D][S::G][S::FB];  // W: blk[n * B + k]
          uint4 xs[S::D][S::G];
#pragma unroll
          for (int d = 0; d < S::D; ++d) {
            if (u + d >= count) break;  // (count is the same in every lane)
            const T* blk = values + (long long)(base + (u + d) * S::WARPS) * B * B + (long long)n0 * B;
            const long long c0 = (long long)__shfl_sync(0xffffffffu, column, u + d) * B;
#pragma unroll
            for (int g = 0; g < S::G; ++g) {
              const int k = (g0 + g) * 16;
#pragma unroll
              for (int a = 0; a < S::FB; ++a) wmma::load_matrix_sync(af[d][g][a], blk + a * 16 * B + k, B);
              xs[d][g] = load16<T>(x, m0 + xr, p.M, c0 + k + xc, p.K, p.ldx, vec_ok);
            }
          }
#pragma unroll
          for (int d = 0; d < S::D; ++d) {
            if (u + d >= count) break;
#pragma unroll
            for (int g = 0; g < S::G; ++g) {
              *reinterpret_cast<uint4*>(scratch + xr * 16 + xc) = xs[d][g];
              __syncwarp();
              wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;  // x^T: (k, m)
              wmma::load_matrix_sync(bf, scratch, 16);
              __syncwarp();
#pragma unroll
              for (int a = 0; a < S::FB; ++a) wmma::mma_sync(acc[a], af[d][g][a], bf, acc[a]);
            }
          }
        }
      }
    }
    // Reduction in two barriers (a tree of halvings took nine): warps [0, HALF) leave their sums in slots of red,
    // warps [HALF, WARPS) add theirs to one slot each, then every thread adds up one element's HALF slots. Slot h
    // keeps C^T (n, m) at red[h * MT * CB + m * CB + n].
    float* slot = red + (warp % S::HALF) * S::MT * S::CB;
    if (warp < S::HALF)
#pragma unroll
      for (int a = 0; a < S::FB; ++a) wmma::store_matrix_sync(slot + a * 16, acc[a], S::CB, wmma::mem_col_major);
    __syncthreads();
    if (warp >= S::HALF)
#pragma unroll
      for (int a = 0; a < S::FB; ++a) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> other;
        wmma::load_matrix_sync(other, slot + a * 16, S::CB, wmma::mem_col_major);
#pragma unroll
        for (int e = 0; e < other.num_elements; ++e) acc[a].x[e] += other.x[e];
        wmma::store_matrix_sync(slot + a * 16, acc[a], S::CB, wmma::mem_col_major);
      }
    __syncthreads();
    for (int e = threadIdx.x; e < S::MT * S::CB; e += S::THREADS) {
      float sum = 0.f;
#pragma unroll
      for (int h = 0; h < S::HALF; ++h) sum += red[h * S::MT * S::CB + e];
      write_out<T>(p, m0 + e / S::CB, j * B + n0 + e % S::CB, sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// tc: grid (block rows, ceil(M / TM)), 128 threads, fp16/bf16 on sm_80+. Four warps side by side over the TM x B
// result tile, each TM / 4 rows by the whole block width in 16 x 8 fp32 accumulators (mma.sync m16n8k16, operands
// from shared memory by ldmatrix). A step is KC columns of one stored block: TM rows of x and the block's part,
// streamed by cp.async into a ring of STAGES while the step STAGES - 1 before it is multiplied. TM = 256 gives
// 64 x 64 warp tiles on 64-wide blocks (a third fewer shared-memory bytes per multiply-add than 32 x 64); TM = 128
// keeps more thread blocks in flight where there are few rows.
template <typename T, int B, int TM>
struct Tc {
  static constexpr int WARPS = 4, THREADS = 32 * WARPS, VEC = 8, STAGES = 4;
  static constexpr int WTM = TM / WARPS, FM = WTM / 16, FN = B / 8;  // a warp's rows; its 16 x 8 accumulator tiles
  static constexpr int KC = B < 32 ? B : 32, STEPS = B / KC;          // columns of a block per step; steps a block
  // Padded rows (16-byte aligned, and 8 ldmatrix rows fall in distinct banks): x [TM][KC]; the block's part as
  // stored, [B][KC], or read transposed, [KC][B] (which fits in the same space).
  static constexpr int LDA = KC + 8, LDW_N = KC + 8, LDW_T = B + 8, LDC = B + 8;
  static constexpr int STAGE = (TM + B) * LDA;  // elements of one stage
  static constexpr int IN_BYTES = STAGES * STAGE * 2;
  static constexpr int OUT_BYTES = TM * LDC * 4;  // the fp32 result tile, after the main loop
  static constexpr int BYTES = IN_BYTES > OUT_BYTES ? IN_BYTES : OUT_BYTES;  // dynamic shared memory
  static_assert(WTM % 16 == 0 && B % 16 == 0 && KC * LDW_T <= B * LDW_N, "tc tile does not fit");
};

// 16 bytes of x, row m from column k on, into shared memory at dst: by cp.async where they lie whole and aligned in x,
// else by a plain store (zeros outside x).
template <typename T>
__device__ __forceinline__ void x_chunk(const PkParams& p, T* dst, long long m, long long k, bool vec_ok) {
  constexpr int VEC = 16 / sizeof(T);
  const T* x = static_cast<const T*>(p.x);
  if (vec_ok && m < p.M && k + VEC <= p.K)
    __pipeline_memcpy_async(dst, x + m * p.ldx + k, 16);
  else
    *reinterpret_cast<uint4*>(dst) = load16<T>(x, m, p.M, k, p.K, p.ldx, vec_ok);
}

// Ring stage <- step `step` of the block row starting at `begin`: rows m0.. of x at the step's columns, and the
// block's part.
template <typename T, int B, int TM, bool TRANS>
__device__ __forceinline__ void tc_stage(const PkParams& p, T* stage, int begin, int step, long long m0, bool vec_ok) {
  using S = Tc<T, B, TM>;
  constexpr int CHUNKS = S::KC / S::VEC;  // 16-byte chunks per row of x's part
  const int i = begin + step / S::STEPS, k0 = (step % S::STEPS) * S::KC;
  const T* blk = static_cast<const T*>(p.values) + (long long)(p.perm ? p.perm[i] : i) * B * B;
  const long long c0 = (long long)p.col_idx[i] * B + k0;
  for (int v = threadIdx.x; v < TM * CHUNKS; v += S::THREADS) {
    const int row = v / CHUNKS, kc = v % CHUNKS;
    x_chunk<T>(p, stage + row * S::LDA + kc * S::VEC, m0 + row, c0 + kc * S::VEC, vec_ok);
  }
  T* ws = stage + TM * S::LDA;
  if (TRANS) {  // the stored rows k0.. are this product's k: [KC][B]
    for (int v = threadIdx.x; v < S::KC * (B / S::VEC); v += S::THREADS) {
      const int r = v / (B / S::VEC), c = (v % (B / S::VEC)) * S::VEC;
      __pipeline_memcpy_async(ws + r * S::LDW_T + c, blk + (long long)(k0 + r) * B + c, 16);
    }
  } else {  // every stored row (this product's n), columns k0..: [B][KC]
    for (int v = threadIdx.x; v < B * CHUNKS; v += S::THREADS) {
      const int r = v / CHUNKS, c = (v % CHUNKS) * S::VEC;
      __pipeline_memcpy_async(ws + r * S::LDW_N + c, blk + (long long)r * B + k0 + c, 16);
    }
  }
}

// The TM x B result tile, fp32 in shared memory (row stride LDC), to rows m0.. and block row j of the output with the
// bias: 8 outputs a thread (16 bytes of T), element by element at ragged edges.
template <typename T, int B, int TM, int LDC>
__device__ __forceinline__ void tc_store(const PkParams& p, const float* cs, long long m0, long long j) {
  constexpr int VEC = 8, THREADS = 128;
  const bool vec_out = aligned16(p.out) && p.ldo % VEC == 0;
  for (int v = threadIdx.x; v < TM * (B / VEC); v += THREADS) {
    const int r = v / (B / VEC), c = (v % (B / VEC)) * VEC;
    const long long m = m0 + r, n = j * B + c;
    if (m >= p.M) continue;
    const float* src = cs + r * LDC + c;
    if (vec_out && n + VEC <= p.N) {
      uint4 u;
      T* e = reinterpret_cast<T*>(&u);
#pragma unroll
      for (int q = 0; q < VEC; ++q)
        e[q] = Cvt<T>::from_f(src[q] + (p.bias ? Cvt<T>::to_f(static_cast<const T*>(p.bias)[n + q]) : 0.f));
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + m * p.ldo + n) = u;
    } else {
      for (int q = 0; q < VEC; ++q) write_out<T>(p, m, n + q, src[q]);
    }
  }
}

template <typename T, int B, int TM, bool TRANS>
__device__ __forceinline__ void tc(const PkParams& p) {
  if constexpr (!MmaOk<T>::value || !PK_SM80) {
    __trap();  // never launched: launch.py picks simt where mma.sync does not take T
  } else {
    using S = Tc<T, B, TM>;
    PK_DYNAMIC_SMEM(smem);
    T* stages = reinterpret_cast<T*>(smem);
    float* cs = reinterpret_cast<float*>(smem);  // [TM][LDC], after the main loop
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const long long j = blockIdx.x, m0 = (long long)blockIdx.y * TM;
    const bool vec_ok = aligned16(p.x) && p.ldx % S::VEC == 0;
    const int begin = p.row_ptr[j], steps = (p.row_ptr[j + 1] - begin) * S::STEPS;

    float acc[S::FM][S::FN][4];
#pragma unroll
    for (int a = 0; a < S::FM; ++a)
#pragma unroll
      for (int b = 0; b < S::FN; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

    // One commit group per step, empty past the end, so that "all but the newest STAGES - 2 groups have landed"
    // always means "step s has".
#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s) {
      if (s < steps) tc_stage<T, B, TM, TRANS>(p, stages + s * S::STAGE, begin, s, m0, vec_ok);
      __pipeline_commit();
    }
    for (int s = 0; s < steps; ++s) {
      __pipeline_wait_prior(S::STAGES - 2);
      __syncthreads();  // step s is in for every thread, and every warp is done with step s - 1's stage
      const int next = s + S::STAGES - 1;  // refills the stage step s - 1 used
      if (next < steps) tc_stage<T, B, TM, TRANS>(p, stages + (next % S::STAGES) * S::STAGE, begin, next, m0, vec_ok);
      __pipeline_commit();
      const T* as = stages + (s % S::STAGES) * S::STAGE + warp * S::WTM * S::LDA;
      const T* ws = stages + (s % S::STAGES) * S::STAGE + TM * S::LDA;
#pragma unroll
      for (int kk = 0; kk < S::KC; kk += 16) {
        // ldmatrix x4: lane l names row l % 8 of 8 x 8 matrix l / 8. A's four are (rows +0/+8) x (k +0/+8), in
        // the order of the mma's a registers; B's are two 8-column tiles' (k +0, k +8).
        unsigned a[S::FM][4], b[S::FN][2];
#pragma unroll
        for (int f = 0; f < S::FM; ++f)
          pk_ldmatrix_x4<false>(a[f], as + (f * 16 + lane % 16) * S::LDA + kk + (lane / 16) * 8);
#pragma unroll
        for (int h = 0; h < S::FN / 2; ++h) {
          const int n0 = h * 16;
          unsigned r[4];
          if (TRANS)  // [k][n]: matrices (k +0/+8) x (n +0/+8), transposed as they load
            pk_ldmatrix_x4<true>(r, ws + (kk + lane % 16) * S::LDW_T + n0 + (lane / 16) * 8);
          else  // [n][k]: matrices (n +0/+8) x (k +0/+8)
            pk_ldmatrix_x4<false>(r, ws + (n0 + lane % 8 + (lane / 16) * 8) * S::LDW_N + kk + ((lane / 8) % 2) * 8);
          b[2 * h][0] = r[0], b[2 * h][1] = r[1], b[2 * h + 1][0] = r[2], b[2 * h + 1][1] = r[3];
        }
#pragma unroll
        for (int f = 0; f < S::FM; ++f)
#pragma unroll
          for (int c = 0; c < S::FN; ++c) pk_mma_16816<T>(acc[f][c], a[f], b[c][0], b[c][1]);
      }
    }
    __pipeline_wait_prior(0);
    __syncthreads();  // the result tile overwrites the ring
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int f = 0; f < S::FM; ++f)
#pragma unroll
      for (int c = 0; c < S::FN; ++c)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // accumulator rows g and g + 8, columns 2t and 2t + 1
          float* at = cs + (warp * S::WTM + f * 16 + g + 8 * h) * S::LDC + c * 8 + 2 * t;
          at[0] = acc[f][c][2 * h], at[1] = acc[f][c][2 * h + 1];
        }
    __syncthreads();
    tc_store<T, B, TM, S::LDC>(p, cs, m0, j);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// tcw: tc's tile on Hopper's warpgroup MMA (wgmma, sm_90a builds), forward only. The four warps are one warpgroup;
// each wgmma multiplies 64 rows of x by all B output features of the block over 16 columns, both operands read by
// the tensor cores from shared memory, so no registers go to operands and no ldmatrix is issued. The ring holds them
// in wgmma's K-major core-matrix layout (no swizzle): chunk v of a stage, 16 bytes of row 8 (v / (8 CHUNKS)) + v % 8
// at column chunk (v / 8) % CHUNKS, lies at v x 16 bytes, so a warp's cp.async writes are contiguous and each reads
// whole 32-byte sectors of x. One step's MMAs stay in flight while the next step's are issued (as CUTLASS's
// mainloops do), so the ring has five stages: the step multiplied, the one before it whose MMAs may still read, and
// LOOK = 3 steps loading; the stage refilled at step s is that of step s - 2, whose MMAs were retired at step s - 1.
template <typename T, int B, int TM>
struct Tcw {
  static constexpr int THREADS = 128, VEC = 8, STAGES = 5, LOOK = STAGES - 2, KC = 32, STEPS = B / KC;
  static constexpr int CHUNKS = KC / VEC;
  static constexpr int SBO = CHUNKS * 128;         // bytes from one 8-row group of core matrices to the next
  static constexpr int STAGE = (TM + B) * KC;      // elements: x's TM rows, then the block's B rows
  static constexpr int LDC = B + 8;                // the fp32 result tile's row stride, after the main loop
  static constexpr int IN_BYTES = STAGES * STAGE * 2, OUT_BYTES = TM * LDC * 4;
  static constexpr int BYTES = IN_BYTES > OUT_BYTES ? IN_BYTES : OUT_BYTES;
  static_assert(B % KC == 0 && TM % 64 == 0, "tcw takes 32- and 64-wide blocks, 64-row slices");
};

template <typename T, int B, int TM>
__device__ __forceinline__ void tcw_stage(const PkParams& p, T* stage, int begin, int step, long long m0, bool vec_ok) {
  using S = Tcw<T, B, TM>;
  const int i = begin + step / S::STEPS, k0 = (step % S::STEPS) * S::KC;
  const T* blk = static_cast<const T*>(p.values) + (long long)i * B * B;
  const long long c0 = (long long)p.col_idx[i] * B + k0;
  for (int v = threadIdx.x; v < TM * S::CHUNKS; v += S::THREADS) {
    const int row = v / (8 * S::CHUNKS) * 8 + v % 8, kc = v / 8 % S::CHUNKS;
    x_chunk<T>(p, stage + v * S::VEC, m0 + row, c0 + kc * S::VEC, vec_ok);
  }
  T* ws = stage + TM * S::KC;
  for (int v = threadIdx.x; v < B * S::CHUNKS; v += S::THREADS) {
    const int n = v / (8 * S::CHUNKS) * 8 + v % 8, kc = v / 8 % S::CHUNKS;
    __pipeline_memcpy_async(ws + v * S::VEC, blk + (long long)n * B + k0 + kc * S::VEC, 16);
  }
}

template <typename T, int B, int TM>
__device__ __forceinline__ void tcw(const PkParams& p) {
  if constexpr (!MmaOk<T>::value || !PK_WGMMA) {
    __trap();  // never launched: launch.py plans tcw only where pk_wgmma_built says the loaded code has wgmma
  } else {
    using S = Tcw<T, B, TM>;
    constexpr int SLICES = TM / 64;
    PK_DYNAMIC_SMEM(smem);
    T* stages = reinterpret_cast<T*>(smem);
    const long long j = blockIdx.x, m0 = (long long)blockIdx.y * TM;
    const bool vec_ok = aligned16(p.x) && p.ldx % S::VEC == 0;
    const int begin = p.row_ptr[j], steps = (p.row_ptr[j + 1] - begin) * S::STEPS;

    float acc[SLICES][B / 2];
#pragma unroll
    for (int q = 0; q < SLICES; ++q)
#pragma unroll
      for (int e = 0; e < B / 2; ++e) acc[q][e] = 0.f;

#pragma unroll
    for (int s = 0; s < S::LOOK; ++s) {  // one commit group per step, empty past the end, as in tc
      if (s < steps) tcw_stage<T, B, TM>(p, stages + s * S::STAGE, begin, s, m0, vec_ok);
      __pipeline_commit();
    }
    for (int s = 0; s < steps; ++s) {
      __pipeline_wait_prior(S::LOOK - 1);  // step s has landed
      pk_fence_proxy_async();  // this thread's part of it, visible to the tensor cores
      __syncthreads();  // every thread's part; and every warp has retired step s - 2's MMAs (the wait below)
      const int next = s + S::LOOK;  // into the stage of step s - 2
      if (next < steps) tcw_stage<T, B, TM>(p, stages + (next % S::STAGES) * S::STAGE, begin, next, m0, vec_ok);
      __pipeline_commit();
      const T* as = stages + (s % S::STAGES) * S::STAGE;
      const T* ws = as + TM * S::KC;
      pk_wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < S::KC; kk += 16)  // a core matrix is 64 elements; 64 rows are 8 groups of SBO bytes
#pragma unroll
        for (int q = 0; q < SLICES; ++q)
          pk_wgmma<T, B>(acc[q], as + q * 8 * (S::SBO / 2) + kk / 8 * 64, ws + kk / 8 * 64, S::SBO);
      pk_wgmma_commit();
      pk_wgmma_wait<1>();  // step s - 1's MMAs are done; step s's may still run
    }
    pk_wgmma_wait<0>();
    __pipeline_wait_prior(0);
    __syncthreads();  // the result tile overwrites the ring
    float* cs = reinterpret_cast<float*>(smem);
    const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int q = 0; q < SLICES; ++q)
#pragma unroll
      for (int e = 0; e < B / 2; ++e)
        cs[(64 * q + 16 * warp + g + 8 * (e / 2 % 2)) * S::LDC + 8 * (e / 4) + 2 * t + e % 2] = acc[q][e];
    __syncthreads();
    tc_store<T, B, TM, S::LDC>(p, cs, m0, j);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// simt: grid (block rows, ceil(M / 64)), 256 threads as 16 x 16; each computes rows ty + 16r and columns tx + 16c.
template <typename T, int B, bool TRANS>
__device__ __forceinline__ void simt(const PkParams& p) {
  constexpr int TM = 64, T16 = 16, RM = TM / T16, CN = B / T16, THREADS = T16 * T16;
  __shared__ float As[TM][B + 1];
  __shared__ float Ws[B][B + 1];  // Ws[k][n]: the block as it multiplies (the transpose of the stored one)
  const int tx = threadIdx.x % T16, ty = threadIdx.x / T16;
  const long long j = blockIdx.x, m0 = (long long)blockIdx.y * TM;
  const T* x = static_cast<const T*>(p.x);
  const T* values = static_cast<const T*>(p.values);
  float acc[RM][CN];
#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int c = 0; c < CN; ++c) acc[r][c] = 0.f;

  const int end = p.row_ptr[j + 1];
  for (int i = p.row_ptr[j]; i < end; ++i) {
    const long long c0 = (long long)p.col_idx[i] * B;
    const T* blk = values + (long long)(p.perm ? p.perm[i] : i) * B * B;
    __syncthreads();
    for (int t = threadIdx.x; t < TM * B; t += THREADS) {
      const long long m = m0 + t / B, k = c0 + t % B;
      As[t / B][t % B] = m < p.M && k < p.K ? Cvt<T>::to_f(x[m * p.ldx + k]) : 0.f;
    }
    for (int t = threadIdx.x; t < B * B; t += THREADS) {
      const float v = Cvt<T>::to_f(blk[t]);
      if (TRANS) Ws[t / B][t % B] = v;  // stored [k][n] of this product
      else Ws[t % B][t / B] = v;        // stored [n][k]
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < B; ++k) {
      float a[RM], w[CN];
#pragma unroll
      for (int r = 0; r < RM; ++r) a[r] = As[ty + r * T16][k];
#pragma unroll
      for (int c = 0; c < CN; ++c) w[c] = Ws[k][tx + c * T16];
      outer(acc, a, w);
    }
  }
#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int c = 0; c < CN; ++c) write_out<T>(p, m0 + ty + r * T16, j * B + tx + c * T16, acc[r][c]);
}

// ---------------------------------------------------------------------------------------------------------------
// Gradient of the stored blocks, dV[i][r][k] = sum_m dY[m][jB + r] X[m][cB + k]: grid (nnzb), one block each.
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int ld, const T* src, long long m0, long long rows,
                                          long long c0, long long cols, long long lds, int tile_rows, int width,
                                          int threads) {
  for (int t = threadIdx.x; t < tile_rows * width; t += threads) {
    const long long m = m0 + t / width, k = c0 + t % width;
    dst[(t / width) * ld + t % width] = m < rows && k < cols ? Cvt<T>::to_f(src[m * lds + k]) : 0.f;
  }
}

template <typename T, int B>
__device__ __forceinline__ void dw_simt(const PkParams& p) {
  constexpr int MK = 32, T16 = 16, RN = B / T16, THREADS = T16 * T16;
  __shared__ float Gs[MK][B + 1];
  __shared__ float Xs[MK][B + 1];
  const int tx = threadIdx.x % T16, ty = threadIdx.x / T16;
  const long long i = blockIdx.x;
  const long long r0 = (long long)p.row_idx[i] * B, c0 = (long long)p.col_idx[i] * B;
  float acc[RN][RN];
#pragma unroll
  for (int a = 0; a < RN; ++a)
#pragma unroll
    for (int b = 0; b < RN; ++b) acc[a][b] = 0.f;
  for (long long m0 = 0; m0 < p.M; m0 += MK) {
    __syncthreads();
    load_tile<T>(&Gs[0][0], B + 1, static_cast<const T*>(p.grad), m0, p.M, r0, p.N, p.ldg, MK, B, THREADS);
    load_tile<T>(&Xs[0][0], B + 1, static_cast<const T*>(p.x), m0, p.M, c0, p.K, p.ldx, MK, B, THREADS);
    __syncthreads();
#pragma unroll 8
    for (int m = 0; m < MK; ++m) {
      float g[RN], xv[RN];
#pragma unroll
      for (int a = 0; a < RN; ++a) g[a] = Gs[m][ty + a * T16];
#pragma unroll
      for (int b = 0; b < RN; ++b) xv[b] = Xs[m][tx + b * T16];
      outer(acc, g, xv);
    }
  }
  T* out = static_cast<T*>(p.out) + i * B * B;
#pragma unroll
  for (int a = 0; a < RN; ++a)
#pragma unroll
    for (int b = 0; b < RN; ++b) out[(ty + a * T16) * B + tx + b * T16] = Cvt<T>::from_f(acc[a][b]);
}

template <typename T, int B>
struct DwTc {
  static constexpr int MK = 64, WARPS = 4, THREADS = 32 * WARPS, VEC = 8, LD = B + 8, LDC = B + 4;
  static constexpr int FR = B / 16, F = FR * FR;
  static constexpr int FPW = F >= WARPS ? F / WARPS : 1;   // fragments of the result per warp
  static constexpr int KS = F >= WARPS ? 1 : WARPS / F;    // warps on one fragment, splitting the rows
  static constexpr int VECS = MK * B / VEC / THREADS;      // 16-byte loads per thread per operand and step
  static constexpr int IN_BYTES = 2 * MK * LD * 2;
  static constexpr int OUT_BYTES = KS * B * LDC * 4;
  static constexpr int BYTES = IN_BYTES > OUT_BYTES ? IN_BYTES : OUT_BYTES;
  static_assert(BYTES <= 48 * 1024 && VECS >= 1, "dW tile does not fit");
};

template <typename T, int B>
__device__ __forceinline__ void dw_tc(const PkParams& p) {
  if constexpr (!MmaOk<T>::value) {
    __trap();
  } else {
    namespace wmma = nvcuda::wmma;
    using S = DwTc<T, B>;
    __shared__ __align__(128) unsigned char smem[S::BYTES];
    T(*Gs)[S::LD] = reinterpret_cast<T(*)[S::LD]>(smem);                    // [MK][LD]: dY rows, block's rows
    T(*Xs)[S::LD] = reinterpret_cast<T(*)[S::LD]>(smem + S::MK * S::LD * 2);  // [MK][LD]: X rows, block's cols
    float* Cs = reinterpret_cast<float*>(smem);                              // [KS][B][LDC], at the end
    const int tid = threadIdx.x, warp = tid / 32;
    const int first = (warp / S::KS) * S::FPW, ks = warp % S::KS;
    const long long i = blockIdx.x;
    const long long r0 = (long long)p.row_idx[i] * B, c0 = (long long)p.col_idx[i] * B;
    const T* g = static_cast<const T*>(p.grad);
    const T* x = static_cast<const T*>(p.x);
    const bool g_ok = aligned16(p.grad) && p.ldg % S::VEC == 0, x_ok = aligned16(p.x) && p.ldx % S::VEC == 0;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::FPW];
#pragma unroll
    for (int f = 0; f < S::FPW; ++f) wmma::fill_fragment(acc[f], 0.f);
    for (long long m0 = 0; m0 < p.M; m0 += S::MK) {
      __syncthreads();
#pragma unroll
      for (int s = 0; s < S::VECS; ++s) {
        const int v = tid + s * S::THREADS, row = v / (B / S::VEC), kc = v % (B / S::VEC);
        *reinterpret_cast<uint4*>(&Gs[row][kc * S::VEC]) = load16<T>(g, m0 + row, p.M, r0 + kc * S::VEC, p.N, p.ldg, g_ok);
        *reinterpret_cast<uint4*>(&Xs[row][kc * S::VEC]) = load16<T>(x, m0 + row, p.M, c0 + kc * S::VEC, p.K, p.ldx, x_ok);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < S::MK; kk += 16) {
        if ((kk / 16) % S::KS != ks) continue;
#pragma unroll
        for (int f = 0; f < S::FPW; ++f) {
          const int fr = (first + f) / S::FR, fc = (first + f) % S::FR;
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> af;  // dY^T: (r, m) at Gs[m][r]
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;  // X: (m, k) at Xs[m][k]
          wmma::load_matrix_sync(af, &Gs[kk][fr * 16], S::LD);
          wmma::load_matrix_sync(bf, &Xs[kk][fc * 16], S::LD);
          wmma::mma_sync(acc[f], af, bf, acc[f]);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < S::FPW; ++f) {
      const int fr = (first + f) / S::FR, fc = (first + f) % S::FR;
      wmma::store_matrix_sync(Cs + (ks * B + fr * 16) * S::LDC + fc * 16, acc[f], S::LDC, wmma::mem_row_major);
    }
    __syncthreads();
    T* out = static_cast<T*>(p.out) + i * B * B;
    for (int t = tid; t < B * B; t += S::THREADS) {
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < S::KS; ++s) sum += Cs[(s * B + t / B) * S::LDC + t % B];
      out[t] = Cvt<T>::from_f(sum);
    }
  }
}

}  // namespace pk

// ---------------------------------------------------------------------------------------------------------------
// Entry points. X(name, threads per block, dynamic shared memory bytes, call); launch.py builds the same names.
#define PK_SKINNY_B(X, tn, T, B)                                       \
  X(pk_skinny_##tn##_b##B##_m1, 512, 0, (pk::skinny<T, B, 1, 1>(p)))   \
  X(pk_skinny_##tn##_b##B##_m4, 256, 0, (pk::skinny<T, B, 4, 1>(p)))   \
  X(pk_skinny_##tn##_b##B##_m16, 256, 0, (pk::skinny<T, B, 16, 1>(p)))
#define PK_SKINNY_SPLIT_B(X, tn, T, B)                                    \
  X(pk_skinny_##tn##_b##B##_m1_s2, 512, 0, (pk::skinny<T, B, 1, 2>(p)))   \
  X(pk_skinny_##tn##_b##B##_m1_s4, 512, 0, (pk::skinny<T, B, 1, 4>(p)))
#define PK_BT_SPLIT_B(X, tn, T, B) X(pk_bt_##tn##_b##B##_s2, 512, 0, (pk::bt<T, B, 2>(p)))
#define PK_BT_SPLIT4(X, tn, T) X(pk_bt_##tn##_b64_s4, 512, 0, (pk::bt<T, 64, 4>(p)))
#define PK_SIMT_B(X, tn, T, B)                                         \
  X(pk_simt_##tn##_b##B##_n, 256, 0, (pk::simt<T, B, false>(p)))       \
  X(pk_simt_##tn##_b##B##_t, 256, 0, (pk::simt<T, B, true>(p)))        \
  X(pk_dw_simt_##tn##_b##B, 256, 0, (pk::dw_simt<T, B>(p)))
#define PK_TC_B(X, tn, T, B)                                                                            \
  X(pk_tc_##tn##_b##B##_m128_n, 128, (pk::Tc<T, B, 128>::BYTES), (pk::tc<T, B, 128, false>(p)))         \
  X(pk_tc_##tn##_b##B##_m128_t, 128, (pk::Tc<T, B, 128>::BYTES), (pk::tc<T, B, 128, true>(p)))          \
  X(pk_tc_##tn##_b##B##_m256_n, 128, (pk::Tc<T, B, 256>::BYTES), (pk::tc<T, B, 256, false>(p)))         \
  X(pk_tc_##tn##_b##B##_m256_t, 128, (pk::Tc<T, B, 256>::BYTES), (pk::tc<T, B, 256, true>(p)))          \
  X(pk_dw_tc_##tn##_b##B, 128, 0, (pk::dw_tc<T, B>(p)))                             \
  X(pk_bt_##tn##_b##B, 512, 0, (pk::bt<T, B, 1>(p)))
#define PK_TCW_B(X, tn, T, B)                                                                     \
  X(pk_tcw_##tn##_b##B##_m128, 128, (pk::Tcw<T, B, 128>::BYTES), (pk::tcw<T, B, 128>(p)))         \
  X(pk_tcw_##tn##_b##B##_m256, 128, (pk::Tcw<T, B, 256>::BYTES), (pk::tcw<T, B, 256>(p)))
#define PK_EACH_B(F, X, tn, T) F(X, tn, T, 16) F(X, tn, T, 32) F(X, tn, T, 64)
#define PK_WIDE_B(F, X, tn, T) F(X, tn, T, 32) F(X, tn, T, 64)  // blocks wide enough to split (launch.SPLITS)
#define PK_KERNELS(X)                                                                                              \
  PK_EACH_B(PK_SKINNY_B, X, f32, float) PK_EACH_B(PK_SKINNY_B, X, f16, __half)                                     \
  PK_EACH_B(PK_SKINNY_B, X, bf16, __nv_bfloat16)                                                                   \
  PK_WIDE_B(PK_SKINNY_SPLIT_B, X, f32, float) PK_WIDE_B(PK_SKINNY_SPLIT_B, X, f16, __half)                         \
  PK_WIDE_B(PK_SKINNY_SPLIT_B, X, bf16, __nv_bfloat16)                                                             \
  PK_EACH_B(PK_SIMT_B, X, f32, float) PK_EACH_B(PK_SIMT_B, X, f16, __half) PK_EACH_B(PK_SIMT_B, X, bf16, __nv_bfloat16) \
  PK_EACH_B(PK_TC_B, X, f16, __half) PK_EACH_B(PK_TC_B, X, bf16, __nv_bfloat16)                                   \
  PK_WIDE_B(PK_BT_SPLIT_B, X, f16, __half) PK_WIDE_B(PK_BT_SPLIT_B, X, bf16, __nv_bfloat16)                         \
  PK_BT_SPLIT4(X, f16, __half) PK_BT_SPLIT4(X, bf16, __nv_bfloat16)                                               \
  PK_WIDE_B(PK_TCW_B, X, f16, __half) PK_WIDE_B(PK_TCW_B, X, bf16, __nv_bfloat16)

#define PK_DEFINE_KERNEL(name, threads, smem, call)                  \
  extern "C" __global__ void PK_BOUNDS(threads) name(PK_PARAM_DECL) { \
    const PkParams p = PK_PARAM_INIT;                                  \
    call;                                                              \
  }
PK_KERNELS(PK_DEFINE_KERNEL)
#undef PK_DEFINE_KERNEL

// Each kernel's dynamic shared memory as a device constant, for launchers that cannot include this file (CuPy reads
// <name>_smem from the compiled module).
#define PK_DEFINE_SMEM(name, threads, smem, call) extern "C" { __device__ int name##_smem = smem; }
PK_KERNELS(PK_DEFINE_SMEM)
#undef PK_DEFINE_SMEM
// 1 where this code was compiled with wgmma (sm_90a), so that tcw may be launched; read by launchers like the above.
extern "C" { __device__ int pk_wgmma_built = PK_WGMMA; }
