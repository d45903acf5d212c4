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
// - skinny (one row, or fp32 up to 16: memory-bound decode): every weight byte is read once, with 16-byte loads;
//   threads of a warp split each block's rows and columns, warps split a block row's blocks, partial sums meet in
//   shared memory. Accumulates in fp32 for every dtype.
// - bt (fp16/bf16, 2-64 rows: batched decode, speculative decoding): tensor cores on the transposed product,
//   out^T = W x^T, so that a block's output features fill the mma's 16-row side and 16 rows of x the other
//   (the "swap AB" of small-batch GEMM); 16 warps split a block row's blocks and meet in a tree reduction.
// - tc (fp16/bf16, more rows, compute-bound: prefill, training): a TM x B tile per thread block on tensor cores
//   (WMMA m16n16k16, fp32 accumulation), each warp a 64 x 32 part of it, the operands of the next blocks streamed
//   into a four-stage shared-memory ring by cp.async while the current one is multiplied.
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
#endif

template <bool C, typename A, typename B> struct Pick { using type = A; };
template <typename A, typename B> struct Pick<false, A, B> { using type = B; };

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<unsigned long long>(ptr) & 15ull) == 0;
}

__device__ __forceinline__ bool aligned32(const void* ptr) {
  return (reinterpret_cast<unsigned long long>(ptr) & 31ull) == 0;
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

template <typename T>
__device__ __forceinline__ void write_out(const PkParams& p, long long m, long long n, float value) {
  if (m >= p.M || n >= p.N) return;
  if (p.bias) value += Cvt<T>::to_f(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[m * p.ldo + n] = Cvt<T>::from_f(value);
}

// ---------------------------------------------------------------------------------------------------------------
// skinny: grid (block rows, ceil(M / MT)), 256 threads.
template <typename T, int B>
struct Skinny {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int VR = B / VEC;                       // lanes across one row of a block (a 16-byte chunk each)
  static constexpr int RP = 32 / VR;                       // block rows a warp covers per pass
  static constexpr int Q = B / RP < 4 ? B / RP : 4;        // passes, i.e. 16-byte weight loads per lane and block
  static constexpr int RS = RP * Q;                        // rows of a slab: what one warp reads of each block
  static constexpr int SLABS = B / RS;
  static constexpr int WARPS = 8;
  static constexpr int GROUPS = WARPS / SLABS;             // warps on the same slab, splitting the row's blocks
  static_assert(VR >= 1 && VR <= 32 && SLABS <= WARPS, "block size and dtype do not fit the skinny layout");
};

template <typename T, int B, int MT>
__device__ __forceinline__ void skinny(const PkParams& p) {
  using S = Skinny<T, B>;
  __shared__ float partial[S::GROUPS][MT][B];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slab = warp % S::SLABS, group = warp / S::SLABS;
  const int kc = lane % S::VR, rr = lane / S::VR;
  const long long j = blockIdx.x, m0 = (long long)blockIdx.y * MT;
  const T* x = static_cast<const T*>(p.x);
  const T* values = static_cast<const T*>(p.values);
  const bool vec_ok = aligned16(p.x) && p.ldx % S::VEC == 0;

  float acc[S::Q][MT];
#pragma unroll
  for (int q = 0; q < S::Q; ++q)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[q][m] = 0.f;

  const int end = p.row_ptr[j + 1];
#pragma unroll 2
  for (int i = p.row_ptr[j] + group; i < end; i += S::GROUPS) {
    const T* blk = values + (long long)i * B * B + (long long)(slab * S::RS + rr) * B + kc * S::VEC;
    float w[S::Q][S::VEC];
#pragma unroll
    for (int q = 0; q < S::Q; ++q) unpack16<T>(__ldg(reinterpret_cast<const uint4*>(blk + q * S::RP * B)), w[q]);
    const long long k0 = (long long)p.col_idx[i] * B + kc * S::VEC;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m0 + m >= p.M) break;
      float xv[S::VEC];
      unpack16<T>(load16<T>(x, m0 + m, p.M, k0, p.K, p.ldx, vec_ok), xv);
#pragma unroll
      for (int q = 0; q < S::Q; ++q)
#pragma unroll
        for (int v = 0; v < S::VEC; ++v) acc[q][m] += w[q][v] * xv[v];
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
  for (int t = threadIdx.x; t < MT * B; t += blockDim.x) {
    const int m = t / B, r = t % B;
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < S::GROUPS; ++g) sum += partial[g][m][r];
    write_out<T>(p, m0 + m, j * B + r, sum);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// bt: grid (block rows, ceil(M / 16)), 512 threads (16 warps), fp16/bf16. Few rows leave each warp little to do
// per block, so the time goes to load latency: many warps per block row keep more loads in flight.
template <typename T, int B>
struct Bt {
  static constexpr int WARPS = 16, THREADS = 32 * WARPS, MT = 16, FB = B / 16, HALF = WARPS / 2;
  static constexpr int RED_BYTES = HALF * MT * B * 4;  // partial sums of half the warps, [warp][MT][B] fp32
  static constexpr int BYTES = RED_BYTES + WARPS * 256 * 2;  // and one staged 16 x 16 x^T fragment per warp
  static_assert(BYTES <= 48 * 1024, "bt tile does not fit");
};

template <typename T, int B>
__device__ __forceinline__ void bt(const PkParams& p) {
  if constexpr (!MmaOk<T>::value) {
    __trap();  // never launched: launch.py picks skinny or simt where tensor cores do not take T
  } else {
    namespace wmma = nvcuda::wmma;
    using S = Bt<T, B>;
    __shared__ __align__(128) unsigned char smem[S::BYTES];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* red = reinterpret_cast<float*>(smem);
    T* scratch = reinterpret_cast<T*>(smem + S::RED_BYTES) + warp * 256;
    const long long j = blockIdx.x, m0 = (long long)blockIdx.y * S::MT;
    const T* x = static_cast<const T*>(p.x);
    const T* values = static_cast<const T*>(p.values);
    // x^T fragments load straight from x where 16 whole rows are there and every row starts 32-byte aligned;
    // otherwise through a zero-padded copy, 16 bytes per lane where rows are 16-byte aligned
    const bool direct = aligned32(p.x) && p.ldx % 16 == 0 && m0 + S::MT <= p.M;
    const bool vec_ok = aligned16(p.x) && p.ldx % 8 == 0;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::FB];
#pragma unroll
    for (int a = 0; a < S::FB; ++a) wmma::fill_fragment(acc[a], 0.f);

    const int end = p.row_ptr[j + 1];
    for (int i = p.row_ptr[j] + warp; i < end; i += S::WARPS) {
      const T* blk = values + (long long)i * B * B;
      const long long c0 = (long long)p.col_idx[i] * B;
#pragma unroll
      for (int kk = 0; kk < B; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[S::FB];  // W: (n, k) at blk[n * B + k]
#pragma unroll
        for (int a = 0; a < S::FB; ++a) wmma::load_matrix_sync(af[a], blk + a * 16 * B + kk, B);
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;  // x^T: (k, m) at x[m * ldx + k]
        const long long k0 = c0 + kk;
        if (direct && k0 + 16 <= p.K) {
          wmma::load_matrix_sync(bf, x + m0 * p.ldx + k0, static_cast<unsigned>(p.ldx));
        } else {  // lane l: row l / 2, columns 8 (l % 2) .. + 8; (k, m) at scratch[16 m + k]
          const int r = lane / 2, h = (lane % 2) * 8;
          *reinterpret_cast<uint4*>(scratch + r * 16 + h) = load16<T>(x, m0 + r, p.M, k0 + h, p.K, p.ldx, vec_ok);
          __syncwarp();
          wmma::load_matrix_sync(bf, scratch, 16);
          __syncwarp();
        }
#pragma unroll
        for (int a = 0; a < S::FB; ++a) wmma::mma_sync(acc[a], af[a], bf, acc[a]);
      }
    }
    // Tree reduction: warps [h, 2h) hand their sums to warps [0, h). C^T (n, m) is kept as red[m * B + n].
    for (int h = S::HALF; h >= 1; h /= 2) {
      if (warp >= h && warp < 2 * h)
#pragma unroll
        for (int a = 0; a < S::FB; ++a)
          wmma::store_matrix_sync(red + (warp - h) * S::MT * B + a * 16, acc[a], B, wmma::mem_col_major);
      __syncthreads();
      if (warp < h)
#pragma unroll
        for (int a = 0; a < S::FB; ++a) {
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> other;
          wmma::load_matrix_sync(other, red + warp * S::MT * B + a * 16, B, wmma::mem_col_major);
#pragma unroll
          for (int e = 0; e < other.num_elements; ++e) acc[a].x[e] += other.x[e];
        }
      __syncthreads();
    }
    if (warp == 0)
#pragma unroll
      for (int a = 0; a < S::FB; ++a) wmma::store_matrix_sync(red + a * 16, acc[a], B, wmma::mem_col_major);
    __syncthreads();
    for (int e = threadIdx.x; e < S::MT * B; e += S::THREADS) write_out<T>(p, m0 + e / B, j * B + e % B, red[e]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// tc: grid (block rows, ceil(M / TM)), 128 threads (4 warps, each 64 x 32 of the TM x B result tile), fp16/bf16.
template <typename T, int B>
struct Tc {
  static constexpr int WARPS = 4, THREADS = 32 * WARPS, VEC = 8, STAGES = 4;
  static constexpr int WN = B >= 64 ? B / 32 : 1, WM = WARPS / WN;  // warps over the tile's columns and rows
  static constexpr int WTM = 64, WTN = B / WN, TM = WM * WTM;      // one warp's tile; the thread block's rows
  static constexpr int FM = WTM / 16, FN = WTN / 16;               // its 16 x 16 fragments
  static constexpr int LD = B + 8;   // padded row of a 16-bit tile: rows stay 16-byte aligned, banks shift
  static constexpr int LDC = B + 4;  // padded row of the fp32 result tile
  static constexpr int STAGE = (TM + B) * LD;  // elements of one stage: TM rows of x, then the block
  static constexpr int IN_BYTES = STAGES * STAGE * 2;
  static constexpr int OUT_BYTES = TM * LDC * 4;
  static constexpr int BYTES = IN_BYTES > OUT_BYTES ? IN_BYTES : OUT_BYTES;  // dynamic shared memory
};

// Stage `stage` <- rows m0.. of x at block i's columns, and block i: cp.async where a row is whole and aligned,
// plain stores (zeros outside x) at ragged edges.
template <typename T, int B>
__device__ __forceinline__ void tc_stage(const PkParams& p, T* stage, int i, long long m0, bool vec_ok) {
  using S = Tc<T, B>;
  constexpr int CHUNKS = B / S::VEC;  // 16-byte chunks per row of a tile
  const T* x = static_cast<const T*>(p.x);
  const T* blk = static_cast<const T*>(p.values) + (long long)(p.perm ? p.perm[i] : i) * B * B;
  const long long c0 = (long long)p.col_idx[i] * B;
  for (int v = threadIdx.x; v < S::TM * CHUNKS; v += S::THREADS) {
    const int row = v / CHUNKS, kc = v % CHUNKS;
    const long long m = m0 + row, k = c0 + kc * S::VEC;
    T* dst = stage + row * S::LD + kc * S::VEC;
    if (vec_ok && m < p.M && k + S::VEC <= p.K)
      __pipeline_memcpy_async(dst, x + m * p.ldx + k, 16);
    else
      *reinterpret_cast<uint4*>(dst) = load16<T>(x, m, p.M, k, p.K, p.ldx, vec_ok);
  }
  T* ws = stage + S::TM * S::LD;
  for (int v = threadIdx.x; v < B * CHUNKS; v += S::THREADS)
    __pipeline_memcpy_async(ws + (v / CHUNKS) * S::LD + (v % CHUNKS) * S::VEC, blk + v * S::VEC, 16);
}

template <typename T, int B, bool TRANS>
__device__ __forceinline__ void tc(const PkParams& p) {
  if constexpr (!MmaOk<T>::value) {
    __trap();  // never launched: launch.py picks simt where tensor cores do not take T
  } else {
    namespace wmma = nvcuda::wmma;
    using S = Tc<T, B>;
    // Transposed products read each block as its transpose: the same copy into shared memory, the other layout.
    using BLayout = typename Pick<TRANS, wmma::row_major, wmma::col_major>::type;
    PK_DYNAMIC_SMEM(smem);
    T* stages = reinterpret_cast<T*>(smem);
    float* cs = reinterpret_cast<float*>(smem);  // [TM][LDC], after the main loop
    const int warp = threadIdx.x / 32, wm = warp / S::WN, wn = warp % S::WN;
    const long long j = blockIdx.x, m0 = (long long)blockIdx.y * S::TM;
    const bool vec_ok = aligned16(p.x) && p.ldx % S::VEC == 0;
    const int begin = p.row_ptr[j], end = p.row_ptr[j + 1];

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[S::FM][S::FN];
#pragma unroll
    for (int a = 0; a < S::FM; ++a)
#pragma unroll
      for (int b = 0; b < S::FN; ++b) wmma::fill_fragment(acc[a][b], 0.f);

    // The ring: block begin + s goes to stage s % STAGES; one commit group per block, empty past the end, so
    // that "all but the newest STAGES - 2 groups have landed" always means "block i has".
#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s) {
      if (begin + s < end) tc_stage<T, B>(p, stages + s * S::STAGE, begin + s, m0, vec_ok);
      __pipeline_commit();
    }
    for (int i = begin; i < end; ++i) {
      __pipeline_wait_prior(S::STAGES - 2);
      __syncthreads();  // block i is in for every thread, and every warp is done with block i - 1's stage
      const int next = i + S::STAGES - 1;  // refills the stage block i - 1 used
      if (next < end) tc_stage<T, B>(p, stages + ((next - begin) % S::STAGES) * S::STAGE, next, m0, vec_ok);
      __pipeline_commit();
      const T* as = stages + ((i - begin) % S::STAGES) * S::STAGE;
      const T* ws = as + S::TM * S::LD;
#pragma unroll
      for (int kk = 0; kk < B; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[S::FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> bf[S::FN];
#pragma unroll
        for (int a = 0; a < S::FM; ++a) wmma::load_matrix_sync(af[a], as + (wm * S::WTM + a * 16) * S::LD + kk, S::LD);
#pragma unroll
        for (int b = 0; b < S::FN; ++b) {
          const int n0 = wn * S::WTN + b * 16;
          wmma::load_matrix_sync(bf[b], TRANS ? ws + kk * S::LD + n0 : ws + n0 * S::LD + kk, S::LD);
        }
#pragma unroll
        for (int a = 0; a < S::FM; ++a)
#pragma unroll
          for (int b = 0; b < S::FN; ++b) wmma::mma_sync(acc[a][b], af[a], bf[b], acc[a][b]);
      }
    }
    __pipeline_wait_prior(0);
    __syncthreads();  // the result tile overwrites the ring
#pragma unroll
    for (int a = 0; a < S::FM; ++a)
#pragma unroll
      for (int b = 0; b < S::FN; ++b)
        wmma::store_matrix_sync(cs + (wm * S::WTM + a * 16) * S::LDC + wn * S::WTN + b * 16, acc[a][b], S::LDC,
                                wmma::mem_row_major);
    __syncthreads();
    for (int t = threadIdx.x; t < S::TM * B; t += S::THREADS)
      write_out<T>(p, m0 + t / B, j * B + t % B, cs[(t / B) * S::LDC + t % B]);
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
  X(pk_skinny_##tn##_b##B##_m1, 256, 0, (pk::skinny<T, B, 1>(p)))      \
  X(pk_skinny_##tn##_b##B##_m4, 256, 0, (pk::skinny<T, B, 4>(p)))      \
  X(pk_skinny_##tn##_b##B##_m16, 256, 0, (pk::skinny<T, B, 16>(p)))
#define PK_SIMT_B(X, tn, T, B)                                         \
  X(pk_simt_##tn##_b##B##_n, 256, 0, (pk::simt<T, B, false>(p)))       \
  X(pk_simt_##tn##_b##B##_t, 256, 0, (pk::simt<T, B, true>(p)))        \
  X(pk_dw_simt_##tn##_b##B, 256, 0, (pk::dw_simt<T, B>(p)))
#define PK_TC_B(X, tn, T, B)                                                        \
  X(pk_tc_##tn##_b##B##_n, 128, (pk::Tc<T, B>::BYTES), (pk::tc<T, B, false>(p)))    \
  X(pk_tc_##tn##_b##B##_t, 128, (pk::Tc<T, B>::BYTES), (pk::tc<T, B, true>(p)))     \
  X(pk_dw_tc_##tn##_b##B, 128, 0, (pk::dw_tc<T, B>(p)))                             \
  X(pk_bt_##tn##_b##B, 512, 0, (pk::bt<T, B>(p)))
#define PK_EACH_B(F, X, tn, T) F(X, tn, T, 16) F(X, tn, T, 32) F(X, tn, T, 64)
#define PK_KERNELS(X)                                                                                              \
  PK_EACH_B(PK_SKINNY_B, X, f32, float) PK_EACH_B(PK_SKINNY_B, X, f16, __half)                                     \
  PK_EACH_B(PK_SKINNY_B, X, bf16, __nv_bfloat16)                                                                   \
  PK_EACH_B(PK_SIMT_B, X, f32, float) PK_EACH_B(PK_SIMT_B, X, f16, __half) PK_EACH_B(PK_SIMT_B, X, bf16, __nv_bfloat16) \
  PK_EACH_B(PK_TC_B, X, f16, __half) PK_EACH_B(PK_TC_B, X, bf16, __nv_bfloat16)

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
