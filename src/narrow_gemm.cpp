// The narrow GEMM kernels (flora/detail/narrow_gemm.h). One source, two copies: the loop bodies
// are written once with GCC/Clang vector types (8 floats) and inlined into an AVX2 + FMA copy
// and a portable one; the exported functions pick at run time, as functional.cpp's depthwise
// loops do. Each kernel keeps a block of R rows x NV vectors of c in registers (R NV <= 12 of
// the 16 ymm registers) and streams the other operand once per block.
#include "flora/detail/narrow_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace flora {
namespace detail {
namespace {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FLORA_NARROW_X86 1
#else
#define FLORA_NARROW_X86 0
#endif
#define FLORA_INLINE __attribute__((always_inline)) inline

using v8 = float __attribute__((vector_size(32)));

FLORA_INLINE v8 load(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FLORA_INLINE void store(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
// A shuffle of lane 0, which compiles to one broadcast: `v8{} + x` costs an add first (0 + x is
// not x for x = -0), and `v8{x, x, ...}` became a chain of lane inserts.
FLORA_INLINE v8 splat(float x) {
  const v8 v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
}

// Rows per register block for NV vectors per row: R NV accumulators, NV operand vectors and a
// broadcast within 16 registers.
template <int NV>
constexpr int block_rows() {
  return NV == 1 ? 8 : NV == 2 ? 6 : NV == 3 ? 4 : 3;
}

// acc[r] += a[r * step] b for r < R: R broadcasts of a times one row b of NV vectors.
template <int R, int NV>
FLORA_INLINE void rank1(v8 (&acc)[R][NV], const float* a, int64_t step, const float* b) {
  v8 bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bv[v] = load(b + v * 8);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const v8 x = splat(a[r * step]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
  }
}

template <int R, int NV>
FLORA_INLINE void load_block(v8 (&acc)[R][NV], const float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = load(c + r * ldc + v * 8);
}

template <int R, int NV>
FLORA_INLINE void store_block(const v8 (&acc)[R][NV], float* c, int64_t ldc) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * 8, acc[r][v]);
}

// c[r] = a[r] b for R rows of a (row stride lda): k rank-1 updates.
template <int R, int NV>
FLORA_INLINE void mm_block(const float* a, int64_t lda, const float* b, float* c, int64_t k) {
  v8 acc[R][NV] = {};
  for (int64_t j = 0; j < k; ++j) rank1(acc, a + j, lda, b + j * NV * 8);
  store_block(acc, c, NV * 8);
}

template <int NV>
FLORA_INLINE void mm_rows(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k) {
  constexpr int R = block_rows<NV>();
  int64_t p = 0;
  for (; p + R <= rows; p += R) mm_block<R, NV>(a + p * lda, lda, b, c + p * NV * 8, k);
  for (; p < rows; ++p) mm_block<1, NV>(a + p * lda, lda, b, c + p * NV * 8, k);
}

// c[i] (+)= sum_p a[p, i] b[p] for R output rows i: one rank-1 update per row p of a and b.
template <int R, int NV>
FLORA_INLINE void tmm_block(const float* a, int64_t lda, const float* b, float* c, int64_t rows, bool add) {
  v8 acc[R][NV] = {};
  if (add) load_block(acc, c, NV * 8);
  for (int64_t p = 0; p < rows; ++p) rank1(acc, a + p * lda, 1, b + p * NV * 8);
  store_block(acc, c, NV * 8);
}

// Over chunks of rows small enough that a's chunk stays in L1 while every block of output rows
// reads its columns of it (one pass over all of a per block read a [4096, 144] im2col matrix 24
// times from memory).
template <int NV>
FLORA_INLINE void tmm_rows(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0,
                           int64_t i1) {
  constexpr int R = block_rows<NV>();
  const int64_t chunk = std::max<int64_t>(16, 8192 / std::max<int64_t>(1, i1 - i0));
  for (int64_t p = 0; p < rows || p == 0; p += chunk) {
    const int64_t len = std::min(chunk, rows - p);
    const float* ap = a + p * lda;
    const float* bp = b + p * NV * 8;
    int64_t i = i0;
    for (; i + R <= i1; i += R) tmm_block<R, NV>(ap + i, lda, bp, c + i * NV * 8, len, p > 0);
    for (; i < i1; ++i) tmm_block<1, NV>(ap + i, lda, bp, c + i * NV * 8, len, p > 0);
  }
}

// c[r, cols] (+)= a[r, :k] b[:k, cols] for R rows and NV vectors of columns from column 0 of the
// pointers given.
template <int R, int NV>
FLORA_INLINE void addmm_block(const float* a, const float* b, float* c, int64_t ldc, int64_t k, int64_t m, bool add) {
  v8 acc[R][NV] = {};
  if (add) load_block(acc, c, ldc);
  for (int64_t j = 0; j < k; ++j) rank1(acc, a + j, k, b + j * m);
  store_block(acc, c, ldc);
}

template <int R>
FLORA_INLINE void addmm_row_block(const float* a, const float* b, float* c, int64_t ldc, int64_t k, int64_t m,
                                  bool add) {
  int64_t col = 0;
  for (; col + 16 <= m; col += 16) addmm_block<R, 2>(a, b + col, c + col, ldc, k, m, add);
  for (; col + 8 <= m; col += 8) addmm_block<R, 1>(a, b + col, c + col, ldc, k, m, add);
  for (; col < m; ++col)
    for (int r = 0; r < R; ++r) {
      float s = add ? c[r * ldc + col] : 0.0f;
      for (int64_t j = 0; j < k; ++j) s += a[r * k + j] * b[j * m + col];
      c[r * ldc + col] = s;
    }
}

FLORA_INLINE void mm_any(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n) {
  switch (n / 8) {
    case 1: return mm_rows<1>(a, lda, b, c, rows, k);
    case 2: return mm_rows<2>(a, lda, b, c, rows, k);
    case 3: return mm_rows<3>(a, lda, b, c, rows, k);
    default: return mm_rows<4>(a, lda, b, c, rows, k);
  }
}

FLORA_INLINE void tmm_any(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0, int64_t i1,
                          int64_t n) {
  switch (n / 8) {
    case 1: return tmm_rows<1>(a, lda, b, c, rows, i0, i1);
    case 2: return tmm_rows<2>(a, lda, b, c, rows, i0, i1);
    case 3: return tmm_rows<3>(a, lda, b, c, rows, i0, i1);
    default: return tmm_rows<4>(a, lda, b, c, rows, i0, i1);
  }
}

FLORA_INLINE void addmm_any(const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t k, int64_t m,
                            bool add) {
  int64_t p = 0;
  for (; p + 4 <= rows; p += 4) addmm_row_block<4>(a + p * k, b, c + p * ldc, ldc, k, m, add);
  for (; p < rows; ++p) addmm_row_block<1>(a + p * k, b, c + p * ldc, ldc, k, m, add);
}

#if FLORA_NARROW_X86
__attribute__((target("avx2,fma"))) void mm_avx2(const float* a, int64_t lda, const float* b, float* c, int64_t rows,
                                                 int64_t k, int64_t n) {
  mm_any(a, lda, b, c, rows, k, n);
}
__attribute__((target("avx2,fma"))) void tmm_avx2(const float* a, int64_t lda, const float* b, float* c, int64_t rows,
                                                  int64_t i0, int64_t i1, int64_t n) {
  tmm_any(a, lda, b, c, rows, i0, i1, n);
}
__attribute__((target("avx2,fma"))) void addmm_avx2(const float* a, const float* b, float* c, int64_t ldc,
                                                    int64_t rows, int64_t k, int64_t m, bool add) {
  addmm_any(a, b, c, ldc, rows, k, m, add);
}
#endif

}  // namespace

bool avx2_fma_enabled() {
#if FLORA_NARROW_X86
  static const bool yes =
      !std::getenv("FLORA_NO_AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

void narrow_mm(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n) {
#if FLORA_NARROW_X86
  if (avx2_fma_enabled()) return mm_avx2(a, lda, b, c, rows, k, n);
#endif
  mm_any(a, lda, b, c, rows, k, n);
}

void narrow_tmm(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0, int64_t i1, int64_t n) {
#if FLORA_NARROW_X86
  if (avx2_fma_enabled()) return tmm_avx2(a, lda, b, c, rows, i0, i1, n);
#endif
  tmm_any(a, lda, b, c, rows, i0, i1, n);
}

void narrow_wide_mm(const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t k, int64_t m,
                    bool accumulate) {
#if FLORA_NARROW_X86
  if (avx2_fma_enabled()) return addmm_avx2(a, b, c, ldc, rows, k, m, accumulate);
#endif
  addmm_any(a, b, c, ldc, rows, k, m, accumulate);
}

}  // namespace detail
}  // namespace flora
