// The narrow GEMM kernels (flora/detail/narrow_gemm.h). One source, three copies: the loop bodies
// are written once with GCC/Clang vector types (8 or 16 floats) and inlined into an AVX-512
// copy (16-lane vectors where the narrow side is 16 or 32 wide), an AVX2 + FMA copy and a
// portable one; the exported functions pick at run time, as functional.cpp's depthwise loops
// do. Each kernel keeps a block of R rows x NV vectors of c in registers (R NV <= 12 of the 16
// ymm registers, <= 24 of the 32 zmm ones) and streams the other operand once per block.
#include "flora/detail/narrow_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace flora {
namespace detail {
namespace {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FLORA_NARROW_X86 1
#else
#define FLORA_NARROW_X86 0
#endif
#define FLORA_INLINE __attribute__((always_inline)) inline

// The vector types: 8 floats (AVX2's ymm registers, or two SSE halves in the portable copy) and
// 16 (AVX-512's zmm). Kernels take one as a template parameter; `L` is its lane count.
struct V8 {
  using t = float __attribute__((vector_size(32)));
  static constexpr int L = 8;
  // Registers for one kernel's accumulators, operand rows and broadcast (16 ymm).
  static constexpr int regs = 16;
};
struct V16 {
  using t = float __attribute__((vector_size(64)));
  static constexpr int L = 16;
  static constexpr int regs = 32;  // zmm0-31
};

template <class V>
FLORA_INLINE typename V::t load(const float* p) {
  typename V::t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
FLORA_INLINE void store(float* p, typename V::t v) { std::memcpy(p, &v, sizeof v); }
// A shuffle of lane 0, which compiles to one broadcast: `v{} + x` costs an add first (0 + x is
// not x for x = -0), and `v{x, x, ...}` became a chain of lane inserts.
template <class V>
FLORA_INLINE typename V::t splat(float x);
template <>
FLORA_INLINE V8::t splat<V8>(float x) {
  const V8::t v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
}
template <>
FLORA_INLINE V16::t splat<V16>(float x) {
  const V16::t v = {x};
  return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
}

// Rows per register block for NV vectors per row: R NV accumulators, NV operand vectors and a
// broadcast within the register file (16 ymm: 8, 6, 4, 3 rows; 32 zmm: 16, 12 rows).
template <class V, int NV>
constexpr int block_rows() {
  if (V::regs == 32) return NV == 1 ? 16 : NV == 2 ? 12 : NV == 3 ? 8 : 6;
  return NV == 1 ? 8 : NV == 2 ? 6 : NV == 3 ? 4 : 3;
}

// acc[r] += a[r * step] b for r < R: R broadcasts of a times one row b of NV vectors.
template <class V, int R, int NV>
FLORA_INLINE void rank1(typename V::t (&acc)[R][NV], const float* a, int64_t step, const float* b) {
  typename V::t bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) bv[v] = load<V>(b + v * V::L);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const typename V::t x = splat<V>(a[r * step]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
  }
}

template <class V, int R, int NV>
FLORA_INLINE void load_block(typename V::t (&acc)[R][NV], const float* c, int64_t ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = load<V>(c + r * ldc + v * V::L);
}

template <class V, int R, int NV>
FLORA_INLINE void store_block(const typename V::t (&acc)[R][NV], float* c, int64_t ldc) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store<V>(c + r * ldc + v * V::L, acc[r][v]);
}

// c[r] = a[r] b for R rows of a (row stride lda): k rank-1 updates.
template <class V, int R, int NV>
FLORA_INLINE void mm_block(const float* a, int64_t lda, const float* b, float* c, int64_t k) {
  typename V::t acc[R][NV] = {};
  for (int64_t j = 0; j < k; ++j) rank1<V>(acc, a + j, lda, b + j * NV * V::L);
  store_block<V>(acc, c, NV * V::L);
}

template <class V, int NV>
FLORA_INLINE void mm_rows(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k) {
  constexpr int R = block_rows<V, NV>();
  int64_t p = 0;
  for (; p + R <= rows; p += R) mm_block<V, R, NV>(a + p * lda, lda, b, c + p * NV * V::L, k);
  for (; p < rows; ++p) mm_block<V, 1, NV>(a + p * lda, lda, b, c + p * NV * V::L, k);
}

// c[i] (+)= sum_p a[p, i] b[p] for R output rows i: one rank-1 update per row p of a and b.
template <class V, int R, int NV>
FLORA_INLINE void tmm_block(const float* a, int64_t lda, const float* b, float* c, int64_t rows, bool add) {
  typename V::t acc[R][NV] = {};
  if (add) load_block<V>(acc, c, NV * V::L);
  for (int64_t p = 0; p < rows; ++p) rank1<V>(acc, a + p * lda, 1, b + p * NV * V::L);
  store_block<V>(acc, c, NV * V::L);
}

// Over chunks of rows small enough that a's chunk stays in L1 while every block of output rows
// reads its columns of it (one pass over all of a per block read a [4096, 144] im2col matrix 24
// times from memory).
template <class V, int NV>
FLORA_INLINE void tmm_rows(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0,
                           int64_t i1) {
  constexpr int R = block_rows<V, NV>();
  const int64_t chunk = std::max<int64_t>(16, 8192 / std::max<int64_t>(1, i1 - i0));
  for (int64_t p = 0; p < rows || p == 0; p += chunk) {
    const int64_t len = std::min(chunk, rows - p);
    const float* ap = a + p * lda;
    const float* bp = b + p * NV * V::L;
    int64_t i = i0;
    for (; i + R <= i1; i += R) tmm_block<V, R, NV>(ap + i, lda, bp, c + i * NV * V::L, len, p > 0);
    for (; i < i1; ++i) tmm_block<V, 1, NV>(ap + i, lda, bp, c + i * NV * V::L, len, p > 0);
  }
}

// c[r, cols] = base[r, cols] + a[r, :k] b[:k, cols] for R rows and NV vectors of columns from
// column 0 of the pointers given; no base term where base is null (base may be c).
template <class V, int R, int NV>
FLORA_INLINE void addmm_block(const float* a, const float* b, float* c, int64_t ldc, int64_t k, int64_t m,
                              const float* base, int64_t ldb) {
  typename V::t acc[R][NV] = {};
  if (base) load_block<V>(acc, base, ldb);
  for (int64_t j = 0; j < k; ++j) rank1<V>(acc, a + j, k, b + j * m);
  store_block<V>(acc, c, ldc);
}

// Columns in steps of two vectors, then one, then (16-lane vectors) one 8-lane vector, then one.
template <class V, int R>
FLORA_INLINE void addmm_row_block(const float* a, const float* b, float* c, int64_t ldc, int64_t k, int64_t m,
                                  const float* base, int64_t ldb) {
  auto at = [base](int64_t col) { return base ? base + col : nullptr; };
  int64_t col = 0;
  for (; col + 2 * V::L <= m; col += 2 * V::L) addmm_block<V, R, 2>(a, b + col, c + col, ldc, k, m, at(col), ldb);
  for (; col + V::L <= m; col += V::L) addmm_block<V, R, 1>(a, b + col, c + col, ldc, k, m, at(col), ldb);
  if constexpr (V::L > 8)
    for (; col + 8 <= m; col += 8) addmm_block<V8, R, 1>(a, b + col, c + col, ldc, k, m, at(col), ldb);
  for (; col < m; ++col)
    for (int r = 0; r < R; ++r) {
      float s = base ? base[r * ldb + col] : 0.0f;
      for (int64_t j = 0; j < k; ++j) s += a[r * k + j] * b[j * m + col];
      c[r * ldc + col] = s;
    }
}

// n narrow: 16 and 32 as whole 16-lane vectors where V has them; 8 and 24 on 8-lane ones.
template <class V>
FLORA_INLINE void mm_any(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n) {
  if constexpr (V::L == 16) {
    if (n % 16 == 0) {
      if (n == 16) return mm_rows<V, 1>(a, lda, b, c, rows, k);
      return mm_rows<V, 2>(a, lda, b, c, rows, k);
    }
  }
  switch (n / 8) {
    case 1: return mm_rows<V8, 1>(a, lda, b, c, rows, k);
    case 2: return mm_rows<V8, 2>(a, lda, b, c, rows, k);
    case 3: return mm_rows<V8, 3>(a, lda, b, c, rows, k);
    default: return mm_rows<V8, 4>(a, lda, b, c, rows, k);
  }
}

template <class V>
FLORA_INLINE void tmm_any(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0, int64_t i1,
                          int64_t n) {
  if constexpr (V::L == 16) {
    if (n % 16 == 0) {
      if (n == 16) return tmm_rows<V, 1>(a, lda, b, c, rows, i0, i1);
      return tmm_rows<V, 2>(a, lda, b, c, rows, i0, i1);
    }
  }
  switch (n / 8) {
    case 1: return tmm_rows<V8, 1>(a, lda, b, c, rows, i0, i1);
    case 2: return tmm_rows<V8, 2>(a, lda, b, c, rows, i0, i1);
    case 3: return tmm_rows<V8, 3>(a, lda, b, c, rows, i0, i1);
    default: return tmm_rows<V8, 4>(a, lda, b, c, rows, i0, i1);
  }
}

template <class V>
FLORA_INLINE void addmm_any(const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t k, int64_t m,
                            const float* base, int64_t ldb) {
  constexpr int R = V::L == 16 ? 6 : 4;
  int64_t p = 0;
  for (; p + R <= rows; p += R)
    addmm_row_block<V, R>(a + p * k, b, c + p * ldc, ldc, k, m, base ? base + p * ldb : nullptr, ldb);
  for (; p < rows; ++p) addmm_row_block<V, 1>(a + p * k, b, c + p * ldc, ldc, k, m, base ? base + p * ldb : nullptr, ldb);
}

// The separable core conv's two filters (separable_conv below), on rows of c channels (c a
// multiple of L), with at most kMaxTaps taps broadcast once per call. W-filter: out[x] = sum_j
// taps[j rw] row[x + j - kw / 2], zero outside the row; the interior without bounds checks.
constexpr int64_t kMaxTaps = 63;
template <class V>
FLORA_INLINE void w_filter(const float* row, float* out, const float* taps, int64_t rw, int64_t kw, int64_t w, int64_t c) {
  constexpr int L = V::L;
  const int64_t pw = kw / 2;
  typename V::t t[kMaxTaps];
  for (int64_t j = 0; j < kw; ++j) t[j] = splat<V>(taps[j * rw]);
  auto edge = [&](int64_t x) {
    for (int64_t ch = 0; ch < c; ch += L) {
      typename V::t acc{};
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t xx = x + j - pw;
        if (xx >= 0 && xx < w) acc += t[j] * load<V>(row + xx * c + ch);
      }
      store<V>(out + x * c + ch, acc);
    }
  };
  const int64_t lo = std::min(pw, w), hi = std::max(lo, w - pw);
  for (int64_t x = 0; x < lo; ++x) edge(x);
  if (kw == 3) {
    for (int64_t x = lo; x < hi; ++x) {
      const float* r = row + (x - 1) * c;
      for (int64_t ch = 0; ch < c; ch += L)
        store<V>(out + x * c + ch, t[0] * load<V>(r + ch) + t[1] * load<V>(r + c + ch) + t[2] * load<V>(r + 2 * c + ch));
    }
  } else {
    for (int64_t x = lo; x < hi; ++x) {
      const float* r = row + (x - pw) * c;
      for (int64_t ch = 0; ch < c; ch += L) {
        typename V::t acc{};
        for (int64_t j = 0; j < kw; ++j) acc += t[j] * load<V>(r + j * c + ch);
        store<V>(out + x * c + ch, acc);
      }
    }
  }
  for (int64_t x = hi; x < w; ++x) edge(x);
}

// H-filter into the mix's rows: s[x, ch] = sum_dh taps[dh rh] rows[dh][x, ch] over the rows
// present (nullptr: outside the image), s with row stride lds.
template <class V>
FLORA_INLINE void h_filter(const float* const* rows, const float* taps, int64_t rh, int64_t kh, float* s, int64_t lds,
                           int64_t w, int64_t c) {
  constexpr int L = V::L;
  typename V::t t[kMaxTaps];
  const float* in[kMaxTaps];
  int64_t m = 0;
  for (int64_t dh = 0; dh < kh; ++dh)
    if (rows[dh]) {
      t[m] = splat<V>(taps[dh * rh]);
      in[m++] = rows[dh];
    }
  const int64_t n = w * c;
  if (m == 3) {
    for (int64_t x = 0, o = 0; o < n; ++x, o += c)
      for (int64_t ch = 0; ch < c; ch += L)
        store<V>(s + x * lds + ch, t[0] * load<V>(in[0] + o + ch) + t[1] * load<V>(in[1] + o + ch) + t[2] * load<V>(in[2] + o + ch));
    return;
  }
  for (int64_t x = 0, o = 0; o < n; ++x, o += c)
    for (int64_t ch = 0; ch < c; ch += L) {
      typename V::t acc{};
      for (int64_t i = 0; i < m; ++i) acc += t[i] * load<V>(in[i] + o + ch);
      store<V>(s + x * lds + ch, acc);
    }
}

#if FLORA_NARROW_X86
#define FLORA_AVX2 __attribute__((target("avx2,fma")))
#define FLORA_AVX512 __attribute__((target("avx512f,avx2,fma")))
FLORA_AVX2 void mm_avx2(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n) {
  mm_any<V8>(a, lda, b, c, rows, k, n);
}
FLORA_AVX2 void tmm_avx2(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0, int64_t i1,
                         int64_t n) {
  tmm_any<V8>(a, lda, b, c, rows, i0, i1, n);
}
FLORA_AVX2 void addmm_avx2(const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t k, int64_t m,
                           const float* base, int64_t ldb) {
  addmm_any<V8>(a, b, c, ldc, rows, k, m, base, ldb);
}
FLORA_AVX2 void w_filter_avx2(const float* row, float* out, const float* taps, int64_t rw, int64_t kw, int64_t w,
                              int64_t c) {
  w_filter<V8>(row, out, taps, rw, kw, w, c);
}
FLORA_AVX2 void h_filter_avx2(const float* const* rows, const float* taps, int64_t rh, int64_t kh, float* s, int64_t lds,
                              int64_t w, int64_t c) {
  h_filter<V8>(rows, taps, rh, kh, s, lds, w, c);
}
FLORA_AVX512 void mm_avx512(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n) {
  mm_any<V16>(a, lda, b, c, rows, k, n);
}
FLORA_AVX512 void tmm_avx512(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0,
                             int64_t i1, int64_t n) {
  tmm_any<V16>(a, lda, b, c, rows, i0, i1, n);
}
FLORA_AVX512 void addmm_avx512(const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t k,
                               int64_t m, const float* base, int64_t ldb) {
  addmm_any<V16>(a, b, c, ldc, rows, k, m, base, ldb);
}
#endif

// One count per kernel entry (relaxed: the tests read them after the threads joined).
std::atomic<uint64_t> g_mm{0}, g_tmm{0}, g_add{0}, g_pair{0}, g_separable{0};

// Rows of a per chunk in narrow_mm_tmm: 256 rows of up to 512 floats (512 KB) stay in L2 between
// the two products.
constexpr int64_t kPairChunk = 256;

}  // namespace

NarrowCalls narrow_calls() {
  return {g_mm.load(std::memory_order_relaxed), g_tmm.load(std::memory_order_relaxed),
          g_add.load(std::memory_order_relaxed), g_pair.load(std::memory_order_relaxed),
          g_separable.load(std::memory_order_relaxed)};
}

bool avx2_fma_enabled() {
#if FLORA_NARROW_X86
  static const bool yes =
      !std::getenv("FLORA_NO_AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

bool avx512_enabled() {
#if FLORA_NARROW_X86
  static const bool yes = avx2_fma_enabled() && !std::getenv("FLORA_NO_AVX512") && __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

namespace {

// The copies picked at run time, uncounted (the public entries count).
void mm_dispatch(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n) {
#if FLORA_NARROW_X86
  if (avx512_enabled()) return mm_avx512(a, lda, b, c, rows, k, n);
  if (avx2_fma_enabled()) return mm_avx2(a, lda, b, c, rows, k, n);
#endif
  mm_any<V8>(a, lda, b, c, rows, k, n);
}

void tmm_dispatch(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0, int64_t i1, int64_t n) {
#if FLORA_NARROW_X86
  if (avx512_enabled()) return tmm_avx512(a, lda, b, c, rows, i0, i1, n);
  if (avx2_fma_enabled()) return tmm_avx2(a, lda, b, c, rows, i0, i1, n);
#endif
  tmm_any<V8>(a, lda, b, c, rows, i0, i1, n);
}

}  // namespace

void narrow_mm(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n) {
  g_mm.fetch_add(1, std::memory_order_relaxed);
  mm_dispatch(a, lda, b, c, rows, k, n);
}

void narrow_tmm(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0, int64_t i1, int64_t n) {
  g_tmm.fetch_add(1, std::memory_order_relaxed);
  tmm_dispatch(a, lda, b, c, rows, i0, i1, n);
}

void narrow_mm_tmm(const float* a, int64_t lda, const float* u, const float* g, float* c, float* acc, float* scratch,
                   int64_t rows, int64_t k, int64_t n) {
  g_pair.fetch_add(1, std::memory_order_relaxed);
  for (int64_t p = 0; p < rows; p += kPairChunk) {
    const int64_t m = std::min(kPairChunk, rows - p);
    mm_dispatch(a + p * lda, lda, u, c + p * n, m, k, n);
    tmm_dispatch(a + p * lda, lda, g + p * n, scratch, m, 0, k, n);  // the chunk's rows again, from cache
    for (int64_t i = 0; i < k * n; ++i) acc[i] += scratch[i];
  }
}

void narrow_wide_mm(const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t k, int64_t m,
                    bool accumulate) {
  narrow_add_mm(accumulate ? c : nullptr, ldc, a, b, c, ldc, rows, k, m);
}

void narrow_add_mm(const float* base, int64_t ldb, const float* a, const float* b, float* c, int64_t ldc, int64_t rows,
                   int64_t k, int64_t m) {
  g_add.fetch_add(1, std::memory_order_relaxed);
#if FLORA_NARROW_X86
  if (avx512_enabled()) return addmm_avx512(a, b, c, ldc, rows, k, m, base, ldb);
  if (avx2_fma_enabled()) return addmm_avx2(a, b, c, ldc, rows, k, m, base, ldb);
#endif
  addmm_any<V8>(a, b, c, ldc, rows, k, m, base, ldb);
}

void separable_conv(const float* x, const float* uh, const float* uw, const float* gm, float* z, int64_t h, int64_t w,
                    int64_t ci, int64_t co, int64_t kh, int64_t rh, int64_t kw, int64_t rw, int64_t row0, int64_t row1) {
  g_separable.fetch_add(1, std::memory_order_relaxed);
  if (row0 >= row1) return;
#if FLORA_NARROW_X86
  const bool avx2 = avx2_fma_enabled();
#endif
  auto wf = [&](const float* row, float* out, const float* taps) {
#if FLORA_NARROW_X86
    if (avx2) return w_filter_avx2(row, out, taps, rw, kw, w, ci);
#endif
    w_filter<V8>(row, out, taps, rw, kw, w, ci);
  };
  auto hf = [&](const float* const* rows, const float* taps, float* s, int64_t lds) {
#if FLORA_NARROW_X86
    if (avx2) return h_filter_avx2(rows, taps, rh, kh, s, lds, w, ci);
#endif
    h_filter<V8>(rows, taps, rh, kh, s, lds, w, ci);
  };
  // A ring of kh input rows, each W-filtered rw ways ([rw][w][ci]): slot (row % kh) holds the
  // row (image n, row hh) keyed as n h + hh, so consecutive output rows W-filter each input row once.
  const int64_t filtered = rw * w * ci, mix = rh * rw * ci, ph = kh / 2;
  std::vector<float> ring(static_cast<size_t>(kh * filtered)), s(static_cast<size_t>(w * mix));
  std::vector<int64_t> held(static_cast<size_t>(kh), -1);
  std::vector<const float*> rows(static_cast<size_t>(kh));
  for (int64_t r = row0; r < row1; ++r) {
    const int64_t n = r / h, y = r % h;
    for (int64_t dh = 0; dh < kh; ++dh) {
      const int64_t hh = y + dh - ph;
      if (hh < 0 || hh >= h) {
        rows[dh] = nullptr;
        continue;
      }
      float* slot = ring.data() + (hh % kh) * filtered;
      if (held[hh % kh] != n * h + hh) {
        for (int64_t b = 0; b < rw; ++b) wf(x + (n * h + hh) * w * ci, slot + b * w * ci, uw + b);
        held[hh % kh] = n * h + hh;
      }
      rows[dh] = slot;
    }
    for (int64_t a = 0; a < rh; ++a)
      for (int64_t b = 0; b < rw; ++b) {
        const float* shifted[64];  // kh <= 63: the b-th filtered copy of each row
        for (int64_t dh = 0; dh < kh; ++dh) shifted[dh] = rows[dh] ? rows[dh] + b * w * ci : nullptr;
        hf(shifted, uh + a, s.data() + (a * rw + b) * ci, mix);
      }
    mm_dispatch(s.data(), mix, gm, z + r * w * co, w, mix, co);
  }
}

}  // namespace detail
}  // namespace flora
