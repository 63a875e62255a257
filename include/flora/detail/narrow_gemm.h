// flora/detail/narrow_gemm.h: float GEMMs where one side is narrow (8 to 32 columns), on raw
// row-major memory. The factorized conv node's (functional.cpp) products are of this kind: a
// [pixels, channels] activation times a [channels, r] factor, its transposed product, and an
// [pixels, r] x [r, channels] update added in place. OpenBLAS 0.3.21 runs them at 30 to 70
// GFLOP/s on 2 cores; these register-blocked loops reach about 100 GFLOP/s per core (AVX2 + FMA),
// 1.2 to 1.5x that with their AVX-512 copy. The hybrid node's merged weight W0 + U_out T is the
// wide product with a separate base (narrow_add_mm), and its x U_in and x^T gxp one pass over x
// (narrow_mm_tmm). Its core conv, where the kernel's spatial modes are factored, is separable
// filters and a channel mix (separable_conv).
// No LibTorch here: callers split the rows over threads and check shapes; these only compute.
#pragma once

#include <cstdint>

namespace flora {
namespace detail {

/// Whether flora's hand-written loops run their AVX2 + FMA copies: an x86 CPU with both, built
/// by GCC or Clang, and FLORA_NO_AVX2 unset (the tests run both ways). Otherwise the portable
/// copies run; callers with a faster general GEMM should use it then.
bool avx2_fma_enabled();

/// Whether the narrow GEMMs run their AVX-512 copy (16-lane vectors where the narrow side is 16
/// or 32 wide; about twice the AVX2 copy's multiply-adds per cycle): avx2_fma_enabled(), an
/// AVX-512F CPU and FLORA_NO_AVX512 unset. The AVX2 + FMA copy runs otherwise.
bool avx512_enabled();

/// How many times each kernel has been entered in this process (narrow_wide_mm counts as
/// narrow_add_mm; a parallel caller enters once per thread's share of rows). The tests read these
/// to prove a path ran on the kernels rather than on LibTorch's GEMM or convolutions.
struct NarrowCalls {
  uint64_t mm = 0, tmm = 0, add = 0, pair = 0;  ///< pair: narrow_mm_tmm
  uint64_t separable = 0;                       ///< separable_conv
};
NarrowCalls narrow_calls();

/// The widths the narrow side may have: 8, 16, 24 or 32.
inline bool narrow_width(int64_t n) { return n >= 8 && n <= 32 && n % 8 == 0; }

/// c[p, :n] = a[p, :k] b[:k, :n] for p < rows. a has row stride lda (unit column stride), b is
/// contiguous [k, n], c contiguous [rows, n]; n a narrow width.
void narrow_mm(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t k, int64_t n);

/// c[i, :n] = sum_p a[p, i] b[p, :n] for i in [i0, i1): a^T b for a [rows, *] with row stride
/// lda, b contiguous [rows, n]; c contiguous with rows of n, only rows i0 to i1 written.
void narrow_tmm(const float* a, int64_t lda, const float* b, float* c, int64_t rows, int64_t i0, int64_t i1, int64_t n);

/// Both products of one pass over a (the hybrid node's x U_in and U_in's gradient x^T gxp):
/// c[p, :n] = a[p, :k] u[:k, :n] for p < rows, as narrow_mm, and acc[i, :n] += sum_p a[p, i]
/// g[p, :n] for i < k, as narrow_tmm over all of a's columns, added. Walks the rows in chunks
/// that stay in cache between the two, so a is read from memory once, not twice. a has row
/// stride lda (unit column stride); u [k, n], g [rows, n], c [rows, n] and acc [k, n] are
/// contiguous; scratch holds k n floats; n a narrow width.
void narrow_mm_tmm(const float* a, int64_t lda, const float* u, const float* g, float* c, float* acc, float* scratch,
                   int64_t rows, int64_t k, int64_t n);

/// Output rows [row0, row1) (row = image n, row y: n h + y) of z = conv(x, K) for a 2-d "same"
/// conv (stride 1, dilation 1, zero padding kh / 2 and kw / 2, odd kh and kw < 64) whose kernel is
/// a sum of rh rw separable filters: K[o, i] = sum_{a, b} G[o, i, a, b] uh[:, a] uw[:, b]^T (the
/// hybrid node's core, spatial modes factored). x [N h w, ci] and z [N h w, co] are channels-last
/// rows; uh [kh, rh] and uw [kw, rw] row-major; gm [rh rw ci, co] with row (a rw + b) ci + i equal
/// to G[:, i, a, b]. Per output row: rw W-filters of each input row it needs (a ring of kh
/// filtered rows), rh H-filters of those, then one [w, rh rw ci] x [rh rw ci, co] product on
/// narrow_mm's kernel: (rw kw + rh rw kh + rh rw co) ci multiply-adds per pixel against kh kw ci
/// co (1,312 against 2,304 at ci = co = 16, 3x3, ranks 2 x 2). ci a multiple of 8, co a narrow
/// width. The transposed conv (the core's input gradient) is this with G's channel modes swapped
/// and uh, uw flipped along the kernel.
void separable_conv(const float* x, const float* uh, const float* uw, const float* gm, float* z, int64_t h, int64_t w,
                    int64_t ci, int64_t co, int64_t kh, int64_t rh, int64_t kw, int64_t rw, int64_t row0, int64_t row1);

/// c[p, :m] = a[p, :k] b[:k, :m] for p < rows, added to c's values where accumulate: a
/// contiguous [rows, k] (k small: the narrow side), b contiguous [k, m], c with row stride ldc
/// (unit column stride); any m.
void narrow_wide_mm(const float* a, const float* b, float* c, int64_t ldc, int64_t rows, int64_t k, int64_t m,
                    bool accumulate);

/// c[p, :m] = base[p, :m] + a[p, :k] b[:k, :m] in one pass: narrow_wide_mm with the added term
/// read from base (row stride ldb; base may be c itself, or null for none).
void narrow_add_mm(const float* base, int64_t ldb, const float* a, const float* b, float* c, int64_t ldc, int64_t rows,
                   int64_t k, int64_t m);

}  // namespace detail
}  // namespace flora
