// prunekit's CPU sparse kernels: y = x W^T (+ b) with W in one of two compressed layouts.
//
// Bitmask layout (compressed-tensors' "sparse-bitmask"): `values` holds the kept weights row by row, `bits` one bit
// per weight (row-major, each row padded to whole bytes, least significant bit first, padding bits zero) and
// `offsets` the index in `values` where each row starts. A chunk of 16 inputs reads 16 bits, loads as many values
// as bits are set and spreads them to their lanes (AVX-512 vexpandps; AVX2 a permutation from a table), so the
// weights cross the memory bus compressed and the work per chunk does not depend on which weights were kept.
//
// Block layout (prunekit's BSR, the one its CUDA kernels read): `values` is [nnzb, B, B], the stored B x B blocks
// row-major, `row_ptr` [block rows + 1] and `col_idx` [nnzb] say where they sit.
//
// Weights are fp32 or bf16; products accumulate in fp32. x is fp32 or bf16 with any row stride and is first copied
// to a zero-padded fp32 scratch, so no kernel reads past a row. Output rows are split across threads (OpenMP).
// Each kernel has an AVX-512 path, an AVX2 path and a portable one; the caller says which to run (`isa`), having
// asked `cpu_isa()` what the CPU supports. No Python or torch headers beyond Python.h: the module builds in pip's
// isolated build environment and takes raw pointers.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define PK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi,bmi2,popcnt,fma")))
#define PK_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#else
#define PK_X86 0
#endif

namespace {

enum DType { F32 = 0, BF16 = 1 };
enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float load_one(const void* p, int dt, int64_t i) {
  return dt == BF16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store_one(void* p, int dt, int64_t i, float v) {
  if (dt == BF16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else
    static_cast<float*>(p)[i] = v;
}

struct Problem {
  const float* x = nullptr;      // scratch: M rows of kp floats, zero past K
  const uint16_t* xh = nullptr;  // or, for the bf16 dot-product kernel, M rows of kp bf16
  int64_t M = 0, K = 0, kp = 0, N = 0;
  const void* values = nullptr;
  int vdt = F32;
  int64_t nnz = 0;  // bitmask: number of values
  const uint8_t* bits = nullptr;
  int64_t kb = 0;  // bitmask: bytes per row
  const int64_t* offsets = nullptr;
  const int32_t* row_ptr = nullptr;  // block layout
  const int32_t* col_idx = nullptr;
  int64_t block = 0;
  const void* bias = nullptr;
  int bdt = F32;
  void* y = nullptr;
  int64_t ldy = 0;
  int ydt = F32;

  void write(int64_t m, int64_t n, float acc) const {
    if (bias) acc += load_one(bias, bdt, n);
    store_one(y, ydt, m * ldy + n, acc);
  }
};

// A thread-local scratch that only grows: a fresh large allocation per call would be mmap'ed and page-faulted anew.
template <class T>
T* scratch(size_t count) {
  static thread_local std::vector<T> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

// x [M, K] (row stride ldx, fp32 or bf16) -> fp32 [M, kp], zero-padded.
const float* stage_input(const void* x, int xdt, int64_t M, int64_t K, int64_t ldx, int64_t kp) {
  float* out = scratch<float>(size_t(M * kp));
  for (int64_t m = 0; m < M; ++m) {
    float* row = out + m * kp;
    if (xdt == F32) {
      std::memcpy(row, static_cast<const float*>(x) + m * ldx, size_t(K) * 4);
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(x) + m * ldx;
      for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_f32(src[k]);
    }
    std::fill(row + K, row + kp, 0.0f);
  }
  return out;
}

// x [M, K] bf16 (row stride ldx) -> bf16 [M, kp], zero-padded: the input of the bf16 dot-product kernel.
const uint16_t* stage_input_bf16(const void* x, int64_t M, int64_t K, int64_t ldx, int64_t kp) {
  uint16_t* out = scratch<uint16_t>(size_t(M * kp));
  for (int64_t m = 0; m < M; ++m) {
    std::memcpy(out + m * kp, static_cast<const uint16_t*>(x) + m * ldx, size_t(K) * 2);
    std::fill(out + m * kp + K, out + (m + 1) * kp, uint16_t(0));
  }
  return out;
}

// The 64-bit word `w` of a bitmask row of `kb` bytes (the last word of a row may be short: its missing bytes are 0).
inline uint64_t mask_word(const uint8_t* row, int64_t kb, int64_t w) {
  uint64_t m = 0;
  const int64_t have = kb - 8 * w;
  if (__builtin_expect(have >= 8, 1))
    std::memcpy(&m, row + 8 * w, 8);  // a fixed size: one load, not a call
  else
    for (int64_t i = 0; i < have; ++i) m |= uint64_t(row[8 * w + i]) << (8 * i);
  return m;
}

// body(begin, end) over [0, n), split across threads, each given at least kGrain of the `work` (weights and rows
// multiplied): a small layer gains nothing from a second thread it has to wake.
constexpr int64_t kGrain = int64_t(1) << 15;

template <class F>
void parallel_rows(int64_t n, int threads, int64_t work, F&& body) {
#ifdef _OPENMP
  const int64_t parts = std::min<int64_t>({n, int64_t(threads), std::max<int64_t>(1, work / kGrain)});
  if (parts > 1) {
#pragma omp parallel for num_threads(int(parts)) schedule(static)
    for (int64_t t = 0; t < parts; ++t) body(n * t / parts, n * (t + 1) / parts);
    return;
  }
#endif
  (void)threads, (void)work;
  body(0, n);
}

// ---------------------------------------------------------------------------------------------- portable paths

void bitmask_rows_scalar(const Problem& P, int64_t n0, int64_t n1) {
  std::vector<float> acc(static_cast<size_t>(P.M));
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    const uint8_t* row = P.bits + n * P.kb;
    int64_t p = P.offsets[n];
    for (int64_t k = 0; k < P.K; ++k) {
      if (!((row[k >> 3] >> (k & 7)) & 1)) continue;
      const float w = load_one(P.values, P.vdt, p++);
      for (int64_t m = 0; m < P.M; ++m) acc[size_t(m)] += w * P.x[m * P.kp + k];
    }
    for (int64_t m = 0; m < P.M; ++m) P.write(m, n, acc[size_t(m)]);
  }
}

void block_rows_scalar(const Problem& P, int64_t j0, int64_t j1) {
  const int64_t B = P.block;
  std::vector<float> acc(static_cast<size_t>(B));
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t m = 0; m < P.M; ++m) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int32_t b = P.row_ptr[j]; b < P.row_ptr[j + 1]; ++b) {
        const float* xs = P.x + m * P.kp + int64_t(P.col_idx[b]) * B;
        for (int64_t r = 0; r < B; ++r)
          for (int64_t c = 0; c < B; ++c) acc[size_t(r)] += load_one(P.values, P.vdt, (b * B + r) * B + c) * xs[c];
      }
      for (int64_t r = 0; r < B && j * B + r < P.N; ++r) P.write(m, j * B + r, acc[size_t(r)]);
    }
  }
}

void bitmask_dense_scalar(const Problem& P, void* out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = P.bits + n * P.kb;
    int64_t p = P.offsets[n];
    for (int64_t k = 0; k < P.K; ++k) {
      const bool kept = (row[k >> 3] >> (k & 7)) & 1;
      if (P.vdt == BF16)
        static_cast<uint16_t*>(out)[n * P.K + k] = kept ? static_cast<const uint16_t*>(P.values)[p++] : 0;
      else
        static_cast<float*>(out)[n * P.K + k] = kept ? static_cast<const float*>(P.values)[p++] : 0.0f;
    }
  }
}

#if PK_X86
// ---------------------------------------------------------------------------------------------- AVX-512

// 16 weights as fp32 from values[p ..]: `count` of them (all, when `all`, else only `count`: the last rows of the
// values must not be read past their end).
template <int VDT, bool SAFE>
PK_AVX512 inline __m512 load16_avx512(const void* values, int64_t p, unsigned count) {
  const __mmask16 k = SAFE ? __mmask16(0xffff) : __mmask16(_bzhi_u32(0xffffu, count));
  if (VDT == F32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(values) + p);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(values) + p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

typedef uint16_t __attribute__((may_alias)) u16_alias;

constexpr int64_t kAhead = 1024;  // values prefetched ahead of the one in use: DRAM latency at a row's pace
constexpr int kStreams = 4;        // weight rows read side by side
constexpr int64_t kBlocksAhead = 4;  // blocks prefetched ahead of the one in use

// One chunk of 16 inputs: the kept values spread to their lanes, times MT rows of x, into acc[0], acc[step], ...
template <int VDT, int MT, bool SAFE>
PK_AVX512 inline void chunk_avx512(__m512* acc, int step, __mmask16 k, unsigned count, const void* values,
                                   int64_t p, const float* x, int64_t kp) {
  const __m512 v = _mm512_maskz_expand_ps(k, load16_avx512<VDT, SAFE>(values, p, count));
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t) acc[t * step] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + t * kp), acc[t * step]);
}

// Where a weight row is read: its bitmask bytes and its next value.
struct Cursor {
  const uint8_t* row;
  int64_t p;
};

// Chunks c .. c+3 (64 inputs) of a weight row against MT rows of x, into U accumulators per row (they hide the FMA
// latency). The mask register is loaded straight from memory (kmovw k, m16) and the four chunks' starts come from
// one 64-bit word, so that port 5, which vexpandps needs, does nothing else and no chunk waits on another's count.
template <int VDT, int MT, int U, bool SAFE>
PK_AVX512 inline void four_chunks_avx512(const Problem& P, Cursor& r, int64_t c, const float* x, __m512* acc) {
  const u16_alias* bits = reinterpret_cast<const u16_alias*>(r.row);
  uint64_t word;
  std::memcpy(&word, bits + c, 8);
  const int64_t c0 = _mm_popcnt_u64(word & 0xffffu), c01 = _mm_popcnt_u64(word & 0xffffffffu);
  const int64_t c012 = _mm_popcnt_u64(word & 0xffffffffffffull);
  const int64_t start[4] = {r.p, r.p + c0, r.p + c01, r.p + c012};
  const unsigned count[4] = {unsigned(c0), unsigned(c01 - c0), unsigned(c012 - c01),
                             unsigned(_mm_popcnt_u64(word) - c012)};
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u)  // each chunk's values are at most a cache line: fetch the line kAhead values on
    _mm_prefetch(reinterpret_cast<const char*>(P.values) + (start[u] + kAhead) * (VDT == F32 ? 4 : 2), _MM_HINT_T0);
#pragma GCC unroll 4
  for (int u = 0; u < 4; ++u)
    chunk_avx512<VDT, MT, SAFE>(acc + u % U, U, _load_mask16(const_cast<__mmask16*>(
                                    reinterpret_cast<const __mmask16*>(bits + c + u))),
                                count[u], P.values, start[u], x + 16 * (c + u), P.kp);
  r.p = start[3] + count[3];
}

// The chunks from c to the end of the row: fewer than four of two bytes, and a last one of one byte.
template <int VDT, int MT, int U, bool SAFE>
PK_AVX512 inline void last_chunks_avx512(const Problem& P, Cursor& r, int64_t c, const float* x, __m512* acc) {
  const u16_alias* bits = reinterpret_cast<const u16_alias*>(r.row);
  for (; c < P.kb / 2; ++c) {
    const unsigned count = unsigned(_mm_popcnt_u32(bits[c]));
    chunk_avx512<VDT, MT, SAFE>(acc, U, __mmask16(bits[c]), count, P.values, r.p, x + 16 * c, P.kp);
    r.p += count;
  }
  if (P.kb & 1) {
    const unsigned k = r.row[P.kb - 1];
    chunk_avx512<VDT, MT, SAFE>(acc, U, __mmask16(k), unsigned(_mm_popcnt_u32(k)), P.values, r.p, x + 16 * c, P.kp);
  }
}

template <int MT, int U>
PK_AVX512 inline void write_rows_avx512(const Problem& P, int64_t n, int64_t m0, const __m512* acc) {
  for (int t = 0; t < MT; ++t) {
    __m512 sum = acc[t * U];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[t * U + u]);
    P.write(m0 + t, n, _mm512_reduce_add_ps(sum));
  }
}

// Rows m0 .. m0+MT of x against the S weight rows n[0..S): each chunk of x, loaded once, serves S weight rows
// (without that, 8 rows of x streamed from L2 for every weight row), and the S rows, far apart in memory, are S
// streams that one core keeps fed better than a single one (a single stream reached about 0.8x the dense
// product's bandwidth in decode).
template <int VDT, int S, int MT, int U, bool SAFE>
PK_AVX512 void bitmask_rows_of_avx512(const Problem& P, const int64_t* n, int64_t m0) {
  __m512 acc[S * MT * U];
  for (int i = 0; i < S * MT * U; ++i) acc[i] = _mm512_setzero_ps();
  Cursor r[S];
  for (int i = 0; i < S; ++i) r[i] = Cursor{P.bits + n[i] * P.kb, P.offsets[n[i]]};
  const float* x = P.x + m0 * P.kp;
  int64_t c = 0;
  for (; c + 4 <= P.kb / 2; c += 4)
#pragma GCC unroll 4
    for (int i = 0; i < S; ++i) four_chunks_avx512<VDT, MT, U, SAFE>(P, r[i], c, x, acc + i * MT * U);
  for (int i = 0; i < S; ++i) {
    last_chunks_avx512<VDT, MT, U, SAFE>(P, r[i], c, x, acc + i * MT * U);
    write_rows_avx512<MT, U>(P, n[i], m0, acc + i * MT * U);
  }
}

// The AVX-512 product's tiles (see bitmask_rows below).
template <int VDT>
struct Avx512Tiles {
  static constexpr int64_t kOverread = 16;  // values one unmasked chunk load may read past a row's last
  static constexpr int kOneRowSums = 4;     // accumulators in all for one row of x (they hide the FMA latency)
  static constexpr bool kEightRows = false;  // tiles of 8 rows of x: slower here (fp32 x, 8 loads per chunk; measured)
  template <int S, int MT, int U, bool SAFE>
  static void run(const Problem& P, const int64_t* n, int64_t m0) { bitmask_rows_of_avx512<VDT, S, MT, U, SAFE>(P, n, m0); }
};

// r[i] = sum of the 16 lanes of a[i]: a transposing reduction, 45 instructions for 16 sums.
PK_AVX512 inline __m512 reduce16_avx512(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Block row j, 16 output rows at a time, one accumulator each, blocks in storage order (each block's rows are read
// contiguously).
template <int VDT>
PK_AVX512 void block_rows_avx512(const Problem& P, int64_t j0, int64_t j1) {
  const int64_t B = P.block;
  alignas(64) float sums[16];
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t m = 0; m < P.M; ++m) {
      for (int64_t r0 = 0; r0 < B; r0 += 16) {
        __m512 acc[16];
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
        for (int32_t b = P.row_ptr[j]; b < P.row_ptr[j + 1]; ++b) {
          const float* xs = P.x + m * P.kp + int64_t(P.col_idx[b]) * B;
          const int64_t base = (int64_t(b) * B + r0) * B;
          // the first pass over a block row fetches the whole block kBlocksAhead on, line by line: the passes read
          // the blocks in strided halves or quarters, which the hardware prefetcher follows poorly, and the later
          // passes (rows r0 > 0, rows of x m > 0) then find the block row in L2
          if (m == 0 && r0 == 0) {
            const char* ahead = static_cast<const char*>(P.values) + (b + kBlocksAhead) * B * B * (VDT == F32 ? 4 : 2);
            for (int64_t line = 0; line < B * B * (VDT == F32 ? 4 : 2); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
          }
          for (int64_t h = 0; h < B; h += 16) {
            const __m512 xv = _mm512_loadu_ps(xs + h);
            for (int r = 0; r < 16; ++r)
              acc[r] = _mm512_fmadd_ps(load16_avx512<VDT, true>(P.values, base + r * B + h, 16), xv, acc[r]);
          }
        }
        _mm512_store_ps(sums, reduce16_avx512(acc));
        for (int r = 0; r < 16 && j * B + r0 + r < P.N; ++r) P.write(m, j * B + r0 + r, sums[r]);
      }
    }
  }
}

// One chunk of 16 weights of a dense row: the `count` values from values[p ..] spread to the lanes of `k`, into
// the `lanes` of out.
template <int VDT>
PK_AVX512 inline void dense_chunk_avx512(const void* values, int64_t p, unsigned k, unsigned count, void* out,
                                         __mmask16 lanes) {
  const __mmask16 load = __mmask16(_bzhi_u32(0xffffu, count));
  if (VDT == F32) {
    const __m512 v = _mm512_maskz_loadu_ps(load, static_cast<const float*>(values) + p);
    _mm512_mask_storeu_ps(out, lanes, _mm512_maskz_expand_ps(__mmask16(k), v));
  } else {  // bf16 as 32-bit lanes: expand, then narrow back
    const __m256i h = _mm256_maskz_loadu_epi16(load, static_cast<const uint16_t*>(values) + p);
    const __m512i v = _mm512_maskz_expand_epi32(__mmask16(k), _mm512_cvtepu16_epi32(h));
    _mm256_mask_storeu_epi16(out, lanes, _mm512_cvtepi32_epi16(v));
  }
}

// Rows n0 .. n1 decompressed: 64 inputs per step, the four chunks' starts from one 64-bit word (as in the product,
// so that no chunk waits on the previous one's count), then the row's last chunks.
template <int VDT>
PK_AVX512 void bitmask_dense_avx512(const Problem& P, void* out, int64_t n0, int64_t n1) {
  constexpr int64_t size = VDT == F32 ? 4 : 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = P.bits + n * P.kb;
    char* dst = static_cast<char*>(out) + n * P.K * size;
    int64_t p = P.offsets[n], c = 0;
    for (; 16 * (c + 4) <= P.K; c += 4) {
      uint64_t word;
      std::memcpy(&word, row + 2 * c, 8);
      const int64_t c0 = _mm_popcnt_u64(word & 0xffffu), c01 = _mm_popcnt_u64(word & 0xffffffffu);
      const int64_t c012 = _mm_popcnt_u64(word & 0xffffffffffffull), all = _mm_popcnt_u64(word);
      _mm_prefetch(reinterpret_cast<const char*>(P.values) + (p + kAhead) * size, _MM_HINT_T0);
      dense_chunk_avx512<VDT>(P.values, p, unsigned(word) & 0xffffu, unsigned(c0), dst + 16 * c * size, 0xffff);
      dense_chunk_avx512<VDT>(P.values, p + c0, unsigned(word >> 16) & 0xffffu, unsigned(c01 - c0),
                              dst + 16 * (c + 1) * size, 0xffff);
      dense_chunk_avx512<VDT>(P.values, p + c01, unsigned(word >> 32) & 0xffffu, unsigned(c012 - c01),
                              dst + 16 * (c + 2) * size, 0xffff);
      dense_chunk_avx512<VDT>(P.values, p + c012, unsigned(word >> 48), unsigned(all - c012),
                              dst + 16 * (c + 3) * size, 0xffff);
      p += all;
    }
    for (; c * 16 < P.K; ++c) {
      const unsigned k = unsigned(mask_word(row, P.kb, c / 4) >> (16 * (c % 4))) & 0xffffu;
      const unsigned count = unsigned(_mm_popcnt_u32(k));
      const __mmask16 lanes = __mmask16(_bzhi_u32(0xffffu, unsigned(std::min<int64_t>(16, P.K - 16 * c))));
      dense_chunk_avx512<VDT>(P.values, p, k, count, dst + 16 * c * size, lanes);
      p += count;
    }
  }
}

// bf16 rows decompressed 32 weights at a time where the CPU has AVX512-VBMI2: one 16-bit expand (vpexpandw) per 32
// weights instead of a widening, a 32-bit expand and a narrowing per 16, which kept port 5 busy for three times as
// long (a 50% bf16 layer decompressed in half the time of oneDNN's product, so prefill paid for it).
#define PK_VBMI2 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,bmi,bmi2,popcnt")))
PK_VBMI2 void bitmask_dense_bf16_vbmi2(const Problem& P, void* out, int64_t n0, int64_t n1) {
  const uint16_t* values = static_cast<const uint16_t*>(P.values);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = P.bits + n * P.kb;
    uint16_t* dst = static_cast<uint16_t*>(out) + n * P.K;
    int64_t p = P.offsets[n];
    for (int64_t c = 0; c * 16 < P.K; c += 2) {  // c: the row's 16-weight chunk, two per step
      const uint64_t word = mask_word(row, P.kb, c / 4) >> (16 * (c % 4));
      const uint32_t k = uint32_t(word);
      const unsigned count = unsigned(_mm_popcnt_u32(k));
      const __m512i v = _mm512_maskz_loadu_epi16(__mmask32(_bzhi_u32(0xffffffffu, count)), values + p);
      const __mmask32 lanes = __mmask32(_bzhi_u32(0xffffffffu, unsigned(std::min<int64_t>(32, P.K - 16 * c))));
      _mm512_mask_storeu_epi16(dst + 16 * c, lanes, _mm512_maskz_expand_epi16(__mmask32(k), v));
      p += count;
    }
  }
}

// PRUNEKIT_CPU_VBMI2=0 turns it off, to test the plain AVX-512 path on a CPU that has it.
bool use_vbmi2() {
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vbmi2"));
  const char* off = std::getenv("PRUNEKIT_CPU_VBMI2");
  return has && !(off && off[0] == '0');
}

// ---------------------------------------------------------------------------------------------- AVX512-BF16

// bf16 products where the CPU has AVX512-BF16 and VBMI2: x stays bf16 (the kernel takes bf16 x with bf16 weights, so
// nothing is rounded), one 16-bit expand spreads 32 kept weights to their lanes, and one vdpbf16ps multiplies them
// by 32 inputs of a row of x into 16 fp32 sums (a bf16 product is exact in fp32). Per weight that is half the
// multiply-adds and a third of the port-5 work of widening to fp32 first, which bounded 8-row products (where AMX
// runs the dense product's 8 rows in little more than the time of one) and 1-row products at 70-90%.
#define PK_BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512bf16,bmi,bmi2,popcnt,fma")))

// 32 weights of a row (mask bits k, their kept values from `values`) times MT rows of x into acc[0], acc[step], ...
template <int MT, bool SAFE>
PK_BF16DOT inline void chunk32_bf16dot(__m512* acc, int step, uint32_t k, const uint16_t* values, const uint16_t* x,
                                       int64_t kp) {
  const __mmask32 load = SAFE ? __mmask32(0xffffffffu) : __mmask32(_bzhi_u32(0xffffffffu, unsigned(_mm_popcnt_u32(k))));
  const __m512bh v = (__m512bh)_mm512_maskz_expand_epi16(__mmask32(k), _mm512_maskz_loadu_epi16(load, values));
#pragma GCC unroll 8
  for (int t = 0; t < MT; ++t)
    acc[t * step] = _mm512_dpbf16_ps(acc[t * step], v, (__m512bh)_mm512_loadu_si512(x + t * kp));
}

// Rows m0 .. m0+MT of x against the S weight rows n[0..S), 64 weights (one mask word) per step.
template <int S, int MT, int U, bool SAFE>
PK_BF16DOT void bitmask_rows_of_bf16dot(const Problem& P, const int64_t* n, int64_t m0) {
  __m512 acc[S * MT * U];
  for (int i = 0; i < S * MT * U; ++i) acc[i] = _mm512_setzero_ps();
  const uint16_t* values = static_cast<const uint16_t*>(P.values);
  const uint16_t* x = P.xh + m0 * P.kp;
  Cursor r[S];
  for (int i = 0; i < S; ++i) r[i] = Cursor{P.bits + n[i] * P.kb, P.offsets[n[i]]};
  for (int64_t w = 0; 8 * w < P.kb; ++w) {
#pragma GCC unroll 4
    for (int i = 0; i < S; ++i) {
      const uint64_t word = mask_word(r[i].row, P.kb, w);
      const int64_t low = _mm_popcnt_u64(word & 0xffffffffu);
      _mm_prefetch(reinterpret_cast<const char*>(values + r[i].p + kAhead), _MM_HINT_T0);
      chunk32_bf16dot<MT, SAFE>(acc + i * MT * U, U, uint32_t(word), values + r[i].p, x + 64 * w, P.kp);
      chunk32_bf16dot<MT, SAFE>(acc + i * MT * U + 1 % U, U, uint32_t(word >> 32), values + r[i].p + low,
                                x + 64 * w + 32, P.kp);
      r[i].p += _mm_popcnt_u64(word);
    }
  }
  for (int i = 0; i < S; ++i) write_rows_avx512<MT, U>(P, n[i], m0, acc + i * MT * U);
}

struct Bf16DotTiles {
  static constexpr int64_t kOverread = 32;
  static constexpr int kOneRowSums = 8;
  static constexpr bool kEightRows = true;
  template <int S, int MT, int U, bool SAFE>
  static void run(const Problem& P, const int64_t* n, int64_t m0) { bitmask_rows_of_bf16dot<S, MT, U, SAFE>(P, n, m0); }
};

bool use_bf16dot() {
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16"));
  return has && use_vbmi2();
}

// ---------------------------------------------------------------------------------------------- AVX2

struct Expand8 {  // for each byte of mask bits: the source lane of each of 8 lanes after expanding
  alignas(32) int32_t index[256][8];
  Expand8() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0, s = 0; i < 8; ++i) index[b][i] = ((b >> i) & 1) ? s++ : 0;
  }
};
const Expand8 kExpand8;

template <int VDT, bool SAFE>
PK_AVX2 inline __m256 load8_avx2(const void* values, int64_t p, unsigned count) {
  if (SAFE) {
    if (VDT == F32) return _mm256_loadu_ps(static_cast<const float*>(values) + p);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  alignas(32) float lane[8] = {0};
  for (unsigned i = 0; i < count; ++i) lane[i] = load_one(values, VDT, p + i);
  return _mm256_load_ps(lane);
}

template <int VDT, bool SAFE>
PK_AVX2 inline __m256 expand8_avx2(unsigned bits, const void* values, int64_t p, unsigned count) {
  static const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i lanes = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(int(bits)), select), select);
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand8.index[bits]));
  const __m256 v = _mm256_permutevar8x32_ps(load8_avx2<VDT, SAFE>(values, p, count), index);
  return _mm256_and_ps(v, _mm256_castsi256_ps(lanes));
}

PK_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int VDT, int MT, int U, bool SAFE>
PK_AVX2 void bitmask_row_avx2(const Problem& P, int64_t n, int64_t m0) {
  __m256 acc[MT][U];
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  const uint8_t* row = P.bits + n * P.kb;
  const float* x = P.x + m0 * P.kp;
  int64_t p = P.offsets[n];
  const int64_t words = (P.kb + 7) / 8;
  for (int64_t w = 0; w < words; ++w, x += 64) {
    const uint64_t m = mask_word(row, P.kb, w);
    if (!m) continue;
    int64_t q = p;
    for (int c = 0; c < 8; ++c) {
      const unsigned k = unsigned(m >> (8 * c)) & 0xffu;
      const unsigned count = unsigned(_mm_popcnt_u32(k));
      const __m256 v = expand8_avx2<VDT, SAFE>(k, P.values, q, count);
      for (int t = 0; t < MT; ++t)
        acc[t][c % U] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + t * P.kp + 8 * c), acc[t][c % U]);
      q += count;
    }
    p += int64_t(_mm_popcnt_u64(m));
  }
  for (int t = 0; t < MT; ++t) {
    __m256 sum = acc[t][0];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[t][u]);
    P.write(m0 + t, n, hsum_avx2(sum));
  }
}

template <int VDT, bool SAFE>
PK_AVX2 void bitmask_row_tiles_avx2(const Problem& P, int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= P.M; m += 4) bitmask_row_avx2<VDT, 4, 1, SAFE>(P, n, m);
  if (m + 2 <= P.M) bitmask_row_avx2<VDT, 2, 2, SAFE>(P, n, m), m += 2;
  if (m < P.M) bitmask_row_avx2<VDT, 1, 4, SAFE>(P, n, m);
}

template <int VDT>
PK_AVX2 void bitmask_rows_avx2(const Problem& P, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    if (P.offsets[n] + P.K + 8 <= P.nnz)
      bitmask_row_tiles_avx2<VDT, true>(P, n);
    else
      bitmask_row_tiles_avx2<VDT, false>(P, n);
  }
}

// r[i] = sum of the 8 lanes of a[i].
PK_AVX2 inline __m256 reduce8_avx2(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <int VDT>
PK_AVX2 void block_rows_avx2(const Problem& P, int64_t j0, int64_t j1) {
  const int64_t B = P.block;
  alignas(32) float sums[8];
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t m = 0; m < P.M; ++m) {
      for (int64_t r0 = 0; r0 < B; r0 += 8) {
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int32_t b = P.row_ptr[j]; b < P.row_ptr[j + 1]; ++b) {
          const float* xs = P.x + m * P.kp + int64_t(P.col_idx[b]) * B;
          const int64_t base = (int64_t(b) * B + r0) * B;
          for (int64_t h = 0; h < B; h += 8) {
            const __m256 xv = _mm256_loadu_ps(xs + h);
            for (int r = 0; r < 8; ++r)
              acc[r] = _mm256_fmadd_ps(load8_avx2<VDT, true>(P.values, base + r * B + h, 8), xv, acc[r]);
          }
        }
        _mm256_store_ps(sums, reduce8_avx2(acc));
        for (int r = 0; r < 8 && j * B + r0 + r < P.N; ++r) P.write(m, j * B + r0 + r, sums[r]);
      }
    }
  }
}

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return AVX2;
  return SCALAR;
}
#else
int detect_isa() { return SCALAR; }
#endif

// ---------------------------------------------------------------------------------------------- dispatch

#if PK_X86
// The AVX-512 products' outer loops, for either kernel (Avx512Tiles, Bf16DotTiles; a call per tile, the kernels'
// own instruction sets stay inside them): every row of x against the S weight rows n[0..S) in tiles of 8 (where
// the kernel gains by it: half the weight rows at a time, 16 accumulators, each chunk expanded once per 8 rows), 4,
// 2 and 1 rows of x ...
template <class Tiles, int S, bool SAFE>
void bitmask_tiles(const Problem& P, const int64_t* n) {
  if (P.M == 1) return Tiles::template run<S, 1, Tiles::kOneRowSums / S, SAFE>(P, n, 0);
  constexpr int H = S > 1 ? S / 2 : 1;
  int64_t m = 0;
  if constexpr (Tiles::kEightRows)
    for (; m + 8 <= P.M; m += 8)
      for (int i = 0; i < S; i += H) Tiles::template run<H, 8, 1, SAFE>(P, n + i, m);
  for (; m + 4 <= P.M; m += 4) Tiles::template run<S, 4, 1, SAFE>(P, n, m);
  if (m + 2 <= P.M) Tiles::template run<S, 2, 1, SAFE>(P, n, m), m += 2;
  if (m < P.M) Tiles::template run<S, 1, 1, SAFE>(P, n, m);
}

// ... with unmasked value loads unless one could run past the values: the last rows load only what they have ...
template <class Tiles, int S>
void bitmask_group(const Problem& P, const int64_t* n) {
  bool safe = true;
  for (int i = 0; i < S; ++i) safe = safe && P.offsets[n[i]] + P.K + Tiles::kOverread <= P.nnz;
  if (safe)
    bitmask_tiles<Tiles, S, true>(P, n);
  else
    bitmask_tiles<Tiles, S, false>(P, n);
}

// ... and the weight rows n0 .. n1 in kStreams runs, read side by side.
template <class Tiles>
void bitmask_rows(const Problem& P, int64_t n0, int64_t n1) {
  const int64_t step = (n1 - n0) / kStreams;
  int64_t rows[kStreams];
  for (int64_t i = 0; i < step; ++i) {
    for (int s = 0; s < kStreams; ++s) rows[s] = n0 + s * step + i;
    bitmask_group<Tiles, kStreams>(P, rows);
  }
  for (int64_t n = n0 + kStreams * step; n < n1; ++n) bitmask_group<Tiles, 1>(P, &n);
}
#endif

// `dot`: bf16 weights and x on the AVX512-BF16 kernel (x staged in P.xh, not P.x).
void run_bitmask(const Problem& P, int isa, int threads, bool dot) {
  parallel_rows(P.N, threads, P.M * P.nnz, [&](int64_t n0, int64_t n1) {
#if PK_X86
    if (dot) return bitmask_rows<Bf16DotTiles>(P, n0, n1);
    if (isa == AVX512)
      return P.vdt == BF16 ? bitmask_rows<Avx512Tiles<BF16>>(P, n0, n1) : bitmask_rows<Avx512Tiles<F32>>(P, n0, n1);
    if (isa == AVX2) return P.vdt == BF16 ? bitmask_rows_avx2<BF16>(P, n0, n1) : bitmask_rows_avx2<F32>(P, n0, n1);
#endif
    bitmask_rows_scalar(P, n0, n1);
  });
}

void run_block(const Problem& P, int isa, int threads) {
  const int64_t block_rows = (P.N + P.block - 1) / P.block;
  const int64_t blocks = P.row_ptr[block_rows] - P.row_ptr[0];
  parallel_rows(block_rows, threads, P.M * blocks * P.block * P.block, [&](int64_t j0, int64_t j1) {
#if PK_X86
    if (isa == AVX512 && P.block % 16 == 0)
      return P.vdt == BF16 ? block_rows_avx512<BF16>(P, j0, j1) : block_rows_avx512<F32>(P, j0, j1);
    if (isa >= AVX2 && P.block % 8 == 0)
      return P.vdt == BF16 ? block_rows_avx2<BF16>(P, j0, j1) : block_rows_avx2<F32>(P, j0, j1);
#endif
    block_rows_scalar(P, j0, j1);
  });
}

bool valid_dtype(int dt) { return dt == F32 || dt == BF16; }

}  // namespace

// ---------------------------------------------------------------------------------------------- Python

#ifndef PK_SOURCE_SHA
#define PK_SOURCE_SHA ""
#endif

static PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyLong_FromLong(detect_isa()); }

static PyObject* py_source_sha(PyObject*, PyObject*) { return PyUnicode_FromString(PK_SOURCE_SHA); }

#if PK_X86
bool has_clflushopt() {
  static const bool has = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 23));
  }();
  return has;
}

__attribute__((target("clflushopt"))) void flush_lines_opt(uintptr_t line, uintptr_t end) {
  for (; line < end; line += 64) _mm_clflushopt(reinterpret_cast<void*>(line));
}

// clflushopt where the CPU has it: clflush is ordered against every other flush, about 140 ns a line measured in a
// KVM guest (a 4096x4096 fp32 weight: 40 ms); clflushopt lets the flushes overlap.
void flush_lines(uintptr_t begin, uintptr_t end, bool opt) {
  const uintptr_t first = begin & ~uintptr_t(63);
  if (opt) {
    flush_lines_opt(first, end);
  } else {
    for (uintptr_t line = first; line < end; line += 64) _mm_clflush(reinterpret_cast<const void*>(line));
  }
  _mm_mfence();  // (the flushes are done before whatever runs next reads)
}
#endif

// Writes back and drops every cache line of [p, p + n) from every level of this machine's caches, so that the next
// read comes from memory, as a model's weights do where the model outgrows the cache. Returns whether it
// could (x86 only; elsewhere the lines stay).
static PyObject* py_evict(PyObject*, PyObject* args) {
  unsigned long long p;
  long long n;
  if (!PyArg_ParseTuple(args, "KL", &p, &n)) return nullptr;
#if PK_X86
  Py_BEGIN_ALLOW_THREADS
  flush_lines(uintptr_t(p), uintptr_t(p) + uintptr_t(n), has_clflushopt());
  Py_END_ALLOW_THREADS
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyObject* py_bitmask_linear(PyObject*, PyObject* args) {
  unsigned long long x, values, bits, offsets, bias, y;
  long long M, K, ldx, nnz, kb, N, ldy;
  int xdt, vdt, bdt, ydt, isa, threads;
  if (!PyArg_ParseTuple(args, "KLLLiKiLKLKLKiKLiii", &x, &M, &K, &ldx, &xdt, &values, &vdt, &nnz, &bits, &kb,
                        &offsets, &N, &bias, &bdt, &y, &ldy, &ydt, &isa, &threads))
    return nullptr;
  if (!valid_dtype(xdt) || !valid_dtype(vdt) || !valid_dtype(bdt) || !valid_dtype(ydt) || kb != (K + 7) / 8) {
    PyErr_SetString(PyExc_ValueError, "bitmask_linear: bad dtype code or bytes per row");
    return nullptr;
  }
  Problem P;
  P.M = M, P.K = K, P.N = N, P.kp = (K + 63) / 64 * 64;
  P.values = reinterpret_cast<const void*>(values), P.vdt = vdt, P.nnz = nnz;
  P.bits = reinterpret_cast<const uint8_t*>(bits), P.kb = kb, P.offsets = reinterpret_cast<const int64_t*>(offsets);
  P.bias = reinterpret_cast<const void*>(bias), P.bdt = bdt;
  P.y = reinterpret_cast<void*>(y), P.ldy = ldy, P.ydt = ydt;
#if PK_X86
  const bool dot = isa == AVX512 && vdt == BF16 && xdt == BF16 && use_bf16dot();
#else
  const bool dot = false;
#endif
  Py_BEGIN_ALLOW_THREADS
  if (dot)
    P.xh = stage_input_bf16(reinterpret_cast<const void*>(x), M, K, ldx, P.kp);
  else
    P.x = stage_input(reinterpret_cast<const void*>(x), xdt, M, K, ldx, P.kp);
  run_bitmask(P, isa, threads, dot);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_block_linear(PyObject*, PyObject* args) {
  unsigned long long x, values, row_ptr, col_idx, bias, y;
  long long M, K, ldx, B, N, ldy;
  int xdt, vdt, bdt, ydt, isa, threads;
  if (!PyArg_ParseTuple(args, "KLLLiKiLKKLKiKLiii", &x, &M, &K, &ldx, &xdt, &values, &vdt, &B, &row_ptr, &col_idx,
                        &N, &bias, &bdt, &y, &ldy, &ydt, &isa, &threads))
    return nullptr;
  if (!valid_dtype(xdt) || !valid_dtype(vdt) || !valid_dtype(bdt) || !valid_dtype(ydt) || B < 1) {
    PyErr_SetString(PyExc_ValueError, "block_linear: bad dtype code or block size");
    return nullptr;
  }
  Problem P;
  P.M = M, P.K = K, P.N = N, P.block = B, P.kp = (K + B - 1) / B * B;
  P.values = reinterpret_cast<const void*>(values), P.vdt = vdt;
  P.row_ptr = reinterpret_cast<const int32_t*>(row_ptr), P.col_idx = reinterpret_cast<const int32_t*>(col_idx);
  P.bias = reinterpret_cast<const void*>(bias), P.bdt = bdt;
  P.y = reinterpret_cast<void*>(y), P.ldy = ldy, P.ydt = ydt;
  Py_BEGIN_ALLOW_THREADS
  P.x = stage_input(reinterpret_cast<const void*>(x), xdt, M, K, ldx, P.kp);
  run_block(P, isa, threads);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject* py_bitmask_dense(PyObject*, PyObject* args) {
  unsigned long long values, bits, offsets, out;
  long long nnz, kb, N, K;
  int vdt, isa, threads;
  if (!PyArg_ParseTuple(args, "KiLKLKLLKii", &values, &vdt, &nnz, &bits, &kb, &offsets, &N, &K, &out, &isa,
                        &threads))
    return nullptr;
  if (!valid_dtype(vdt) || kb != (K + 7) / 8) {
    PyErr_SetString(PyExc_ValueError, "bitmask_dense: bad dtype code or bytes per row");
    return nullptr;
  }
  Problem P;
  P.K = K, P.N = N, P.values = reinterpret_cast<const void*>(values), P.vdt = vdt, P.nnz = nnz;
  P.bits = reinterpret_cast<const uint8_t*>(bits), P.kb = kb, P.offsets = reinterpret_cast<const int64_t*>(offsets);
  void* dst = reinterpret_cast<void*>(out);
  Py_BEGIN_ALLOW_THREADS
  parallel_rows(N, threads, N * K, [&](int64_t n0, int64_t n1) {
#if PK_X86
    if (isa == AVX512 && vdt == BF16 && use_vbmi2()) return bitmask_dense_bf16_vbmi2(P, dst, n0, n1);
    if (isa == AVX512) return vdt == BF16 ? bitmask_dense_avx512<BF16>(P, dst, n0, n1)
                                          : bitmask_dense_avx512<F32>(P, dst, n0, n1);
#endif
    bitmask_dense_scalar(P, dst, n0, n1);
  });
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "What this CPU runs: 0 portable, 1 AVX2, 2 AVX-512."},
    {"source_sha", py_source_sha, METH_NOARGS, "SHA-256 of the source this module was built from."},
    {"bitmask_linear", py_bitmask_linear, METH_VARARGS, "y = x W^T (+ b), W in the bitmask layout (raw pointers)."},
    {"block_linear", py_block_linear, METH_VARARGS, "y = x W^T (+ b), W in the block layout (raw pointers)."},
    {"bitmask_dense", py_bitmask_dense, METH_VARARGS, "The dense [N, K] weight of a bitmask layout (raw pointers)."},
    {"evict", py_evict, METH_VARARGS, "Flushes [pointer, pointer + bytes) from the caches; False where it cannot."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_sparse_cpu", "prunekit's CPU sparse kernels.", -1,
                                     kMethods, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__sparse_cpu(void) { return PyModule_Create(&kModule); }
