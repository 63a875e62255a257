#include "flora/functional.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <numeric>
#include <sstream>

#include "flora/detail/narrow_gemm.h"
#include "flora/spec.h"

namespace flora {
namespace functional {
namespace {

std::vector<int64_t> full_shape(const Tensor& core, const std::vector<Tensor>& factors) {
  std::vector<int64_t> shape(core.sizes().begin(), core.sizes().end());
  for (size_t n = 0; n < factors.size(); ++n)
    if (factors[n].defined()) shape[n] = factors[n].size(0);
  return shape;
}

void check_factors(const Tensor& core, const std::vector<Tensor>& factors, const char* where) {
  if (static_cast<int64_t>(factors.size()) != core.dim()) {
    std::ostringstream os;
    os << where << ": core has order " << core.dim() << " but " << factors.size()
       << " factors were given (hint: pass an undefined tensor for identity modes)";
    throw InvalidArgument(os.str());
  }
  for (size_t n = 0; n < factors.size(); ++n) {
    const auto& u = factors[n];
    if (u.defined() && (u.dim() != 2 || u.size(1) != core.size(static_cast<int64_t>(n)))) {
      std::ostringstream os;
      os << where << ": factor " << n << " has shape " << u.sizes() << ", expected [I_" << n << ", "
         << core.size(static_cast<int64_t>(n)) << "] to match the core " << core.sizes();
      throw InvalidArgument(os.str());
    }
  }
}

// Weight of a 1x1 conv in `dims` spatial dims from a matrix [out, in].
Tensor pointwise(const Tensor& m, int64_t dims) {
  std::vector<int64_t> shape{m.size(0), m.size(1)};
  shape.resize(2 + dims, 1);
  return m.reshape(shape);
}

// The Kronecker product U_a (x) U_b (x) ... of factors [k_i, r_i]: [prod k, prod r], rows and
// columns in C order (the layout of the modes they replace, flattened).
Tensor kronecker(const std::vector<Tensor>& us) {
  Tensor k = us.front();
  for (size_t i = 1; i < us.size(); ++i)
    k = (k.unsqueeze(1).unsqueeze(3) * us[i].unsqueeze(0).unsqueeze(2))
            .reshape({k.size(0) * us[i].size(0), k.size(1) * us[i].size(1)});
  return k;
}

// Geometry of a grouped 1x1 conv: stride 1, no padding, no dilation.
ConvGeometry pointwise_geometry(int64_t dims, int64_t groups) {
  return {std::vector<int64_t>(dims, 1), std::vector<int64_t>(dims, 0), std::vector<int64_t>(dims, 1), groups,
          PaddingMode::Zeros};
}

}  // namespace

Tensor mode_product(const Tensor& t, const Tensor& u, int64_t mode) {
  // View t as [P, r, Q] (P, Q: the modes before and after) and multiply by u [I, r] in place of
  // r: a GEMM whose output is already contiguous in the final layout, so no permute copies.
  const auto sizes = t.sizes();
  const int64_t r = sizes[mode];
  int64_t P = 1, Q = 1;
  for (int64_t i = 0; i < mode; ++i) P *= sizes[i];
  for (int64_t i = mode + 1; i < t.dim(); ++i) Q *= sizes[i];
  auto shape = sizes.vec();
  shape[mode] = u.size(0);
  if (r == 1) {  // rank 1 (a 1x1 kernel's spatial factors, a depthwise conv's U_in): a broadcast
    std::vector<int64_t> ushape(sizes.size(), 1);  // multiply, one op instead of a GEMM's several
    ushape[mode] = u.size(0);
    return t * u.reshape(ushape);
  }
  if (P == 1) return u.matmul(t.reshape({r, Q})).view(shape);
  if (Q == 1) return t.reshape({P, r}).matmul(u.t()).view(shape);
  return at::matmul(u, t.reshape({P, r, Q})).view(shape);
}

Tensor superdiagonal(const Tensor& values, int64_t order) {
  const int64_t R = values.size(0);
  // Flat index of (i, i, ..., i) in an order-N [R, ..., R] tensor is i * (R^{N-1} + ... + R + 1).
  int64_t numel = 1, step = 0;
  for (int64_t p = 0; p < order; ++p) {
    step += numel;
    numel *= R;
  }
  Tensor flat = at::zeros({numel}, values.options());
  flat = flat.index_put({at::arange(R, values.options().dtype(at::kLong)) * step}, values);
  return flat.view(std::vector<int64_t>(order, R));
}

namespace {

// One step of tucker_delta's contraction: a single mode, or the kernel's trailing modes
// [first, N) contracted at once with the Kronecker product of their factors.
struct DeltaStep {
  int64_t first = 0, count = 1;
};

// The steps in the order flora::plan_contraction chose. The kernel's modes (2 and up in a
// weight's layout), when all have factors, run as one GEMM with the Kronecker product of their
// factors, t [P, r_2 ... r_N] K^T, instead of one mode product each: K is tiny ([9, 4] for a 3x3
// kernel at rank 2), and a conv adapter builds dW every step.
constexpr int64_t kMaxKroneckerElements = 4096;  // larger K: mode products one by one
std::vector<DeltaStep> delta_steps(const Tensor& core, const std::vector<Tensor>& factors) {
  std::vector<bool> identity(factors.size());
  for (size_t n = 0; n < factors.size(); ++n) identity[n] = !factors[n].defined();
  const auto plan = plan_contraction(full_shape(core, factors),
                                     std::vector<int64_t>(core.sizes().begin(), core.sizes().end()), identity);
  const int64_t N = static_cast<int64_t>(factors.size());
  int64_t first = N;
  while (first > 2 && factors[first - 1].defined()) --first;
  int64_t kron_elements = 1;
  for (int64_t n = first; n < N; ++n) kron_elements *= factors[n].size(0) * factors[n].size(1);
  const auto at_pos = std::find(plan.order.begin(), plan.order.end(), first);
  const bool fuse = N - first >= 2 && kron_elements <= kMaxKroneckerElements && plan.order.end() - at_pos >= N - first &&
                    std::all_of(at_pos, at_pos + (N - first), [&](int64_t n) { return n >= first; });
  std::vector<DeltaStep> steps;
  for (size_t i = 0; i < plan.order.size();) {
    if (fuse && plan.order[i] == first) {
      steps.push_back({first, N - first});
      i += static_cast<size_t>(N - first);
    } else {
      steps.push_back({plan.order[i], 1});
      ++i;
    }
  }
  return steps;
}

// t x_step: one mode product, or the fused kernel modes' GEMM with k = their Kronecker product.
Tensor apply_step(const Tensor& t, const DeltaStep& s, const Tensor& u_or_k, const std::vector<int64_t>& out_sizes) {
  if (s.count == 1) return mode_product(t, u_or_k, s.first);
  const int64_t cols = u_or_k.size(1);
  auto shape = t.sizes().vec();
  for (int64_t m = s.first; m < s.first + s.count; ++m) shape[m] = out_sizes[m];
  return t.reshape({t.numel() / cols, cols}).matmul(u_or_k.t()).view(shape);
}

// d(loss)/d(factor n) of a Kronecker product K = U_a (x) U_b (x) ... from d(loss)/dK: gK viewed
// as [k_a, k_b, ..., r_a, r_b, ...] contracted with every other factor over its (k, r) pair.
Tensor kronecker_factor_grad(const Tensor& gk, const std::vector<Tensor>& us, size_t n) {
  const size_t m = us.size();
  if (m == 2) {  // a 2-d kernel: one matrix-vector product on [k_a r_a, k_b r_b], no einsum parsing
    const Tensor pairs = gk.view({us[0].size(0), us[1].size(0), us[0].size(1), us[1].size(1)})
                             .permute({0, 2, 1, 3})
                             .reshape({us[0].numel(), us[1].numel()});
    return n == 0 ? pairs.mv(us[1].reshape(-1)).view(us[0].sizes()) : us[0].reshape(-1).matmul(pairs).view(us[1].sizes());
  }
  std::vector<int64_t> shape;
  for (const auto& u : us) shape.push_back(u.size(0));
  for (const auto& u : us) shape.push_back(u.size(1));
  std::string lhs(2 * m, ' ');
  for (size_t i = 0; i < m; ++i) lhs[i] = static_cast<char>('a' + i), lhs[m + i] = static_cast<char>('n' + i);
  std::string eq = lhs;
  std::vector<Tensor> operands{gk.reshape(shape)};
  for (size_t i = 0; i < m; ++i)
    if (i != n) eq += std::string(",") + lhs[i] + lhs[m + i], operands.push_back(us[i]);
  eq += std::string("->") + lhs[n] + lhs[m + n];
  return at::einsum(eq, operands);
}

// d(loss)/du of t' = t x_mode u (u [I, r]) from g = d(loss)/dt': sum over every other mode of
// g (I at `mode`) times t (r at `mode`).
Tensor mode_factor_grad(const Tensor& g, const Tensor& t, int64_t mode) {
  const int64_t I = g.size(mode), r = t.size(mode);
  if (I == 1 && r == 1) return (g * t).sum().view({1, 1});  // a depthwise conv's U_in: a scalar
  int64_t P = 1;
  for (int64_t i = 0; i < mode; ++i) P *= t.size(i);
  const int64_t Q = t.numel() / (P * r);
  if (P == 1) return g.reshape({I, Q}).mm(t.reshape({r, Q}).t());
  if (Q == 1) return g.reshape({P, I}).t().mm(t.reshape({P, r}));
  return at::tensordot(g.reshape({P, I, Q}), t.reshape({P, r, Q}), {0, 2}, {0, 2});
}

// tucker_delta's nodes save plain tensors, no history: backward with create_graph cannot differentiate them.
void refuse_double_backward() {
  if (torch::GradMode::is_enabled())
    throw InvalidArgument("tucker_delta: double backward (create_graph) is not supported (hint: differentiate dW once)");
}

// tucker_delta as one autograd node. Autograd of the same chain records 5 to 8 nodes per mode
// (reshape, matmul, view, their backwards); a conv adapter rebuilds dW (or its core conv's
// kernel) every training step, so those nodes were a measurable share of a small layer's step.
// Forward saves each step's input; backward walks the steps in reverse: a factor's gradient
// pairs the incoming gradient with that input, and the gradient passed on is the incoming one
// times the factor's transpose (the Kronecker product's, for the fused kernel modes).
// Inputs: core, the defined factors (in mode order), their modes, the scale.
struct TuckerDeltaFunction : public torch::autograd::Function<TuckerDeltaFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& core, at::TensorList defined,
                        std::vector<int64_t> modes, double scale) {
    // Autocast would round dW to bfloat16 here and hand backward a gradient of that type: dW
    // stays in the factors' dtype, and the layer's own ops cast where autocast wants them to.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    std::vector<Tensor> factors(static_cast<size_t>(core.dim()));
    for (size_t i = 0; i < modes.size(); ++i) factors[static_cast<size_t>(modes[i])] = defined[i];
    const auto steps = delta_steps(core, factors);
    const auto out_sizes = full_shape(core, factors);
    std::vector<Tensor> saved(defined.begin(), defined.end());
    // The core is the smallest tensor: scale it there (and never return the input itself).
    Tensor t = scale == 1.0 && !steps.empty() ? core : core * scale;
    std::vector<int64_t> step_info;
    for (const auto& s : steps) {
      Tensor u = s.count == 1 ? factors[static_cast<size_t>(s.first)]
                              : kronecker({factors.begin() + s.first, factors.begin() + s.first + s.count});
      saved.push_back(t);
      saved.push_back(u);
      step_info.push_back(s.first);
      step_info.push_back(s.count);
      t = apply_step(t, s, u, out_sizes);
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["modes"] = modes;
    ctx->saved_data["steps"] = step_info;
    ctx->saved_data["scale"] = scale;
    return t;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    refuse_double_backward();
    const auto saved = ctx->get_saved_variables();
    const auto modes = ctx->saved_data["modes"].toIntVector();
    const auto step_info = ctx->saved_data["steps"].toIntVector();
    const double scale = ctx->saved_data["scale"].toDouble();
    const size_t F = modes.size(), S = step_info.size() / 2;
    std::vector<Tensor> factors;  // by mode
    std::vector<int64_t> slot;    // mode -> index among the defined factors, -1 for identity
    for (size_t i = 0; i < F; ++i) {
      const auto n = static_cast<size_t>(modes[i]);
      if (slot.size() <= n) slot.resize(n + 1, -1), factors.resize(n + 1);
      slot[n] = static_cast<int64_t>(i);
      factors[n] = saved[i];
    }
    torch::autograd::variable_list grads(1 + F + 2);  // core, factors, modes, scale
    Tensor g = grad_out[0];
    if (!g.defined()) return grads;
    const Tensor& first_input = S > 0 ? saved[F] : Tensor();
    g = g.to(first_input.defined() ? first_input.scalar_type() : g.scalar_type());
    for (size_t k = S; k-- > 0;) {
      const DeltaStep s{step_info[2 * k], step_info[2 * k + 1]};
      const Tensor& in = saved[F + 2 * k];
      const Tensor& u = saved[F + 2 * k + 1];
      if (s.count == 1) {
        const auto i = static_cast<size_t>(slot[static_cast<size_t>(s.first)]);
        if (ctx->needs_input_grad(1 + i)) grads[1 + i] = mode_factor_grad(g, in, s.first);
        g = mode_product(g, u.t(), s.first);
      } else {
        const int64_t rows = u.size(0), cols = u.size(1);
        const Tensor g2 = g.reshape({g.numel() / rows, rows});
        const std::vector<Tensor> us(factors.begin() + s.first, factors.begin() + s.first + s.count);
        bool any = false;
        for (int64_t m = 0; m < s.count; ++m) any = any || ctx->needs_input_grad(1 + static_cast<size_t>(slot[static_cast<size_t>(s.first + m)]));
        if (any) {
          const Tensor gk = g2.t().mm(in.reshape({in.numel() / cols, cols}));
          for (int64_t m = 0; m < s.count; ++m) {
            const auto i = static_cast<size_t>(slot[static_cast<size_t>(s.first + m)]);
            if (ctx->needs_input_grad(1 + i)) grads[1 + i] = kronecker_factor_grad(gk, us, static_cast<size_t>(m));
          }
        }
        g = g2.mm(u).view(in.sizes());
      }
    }
    if (ctx->needs_input_grad(0)) grads[0] = scale == 1.0 ? g : g * scale;
    return grads;
  }
};

// tucker_delta for a depthwise 2-d conv's weight [C, 1, kh, kw] with ranks [r, 1, a, b]: dW =
// U_0 S K^T viewed as [C, kh kw], with S = s u_1 G [r, a b] (u_1 the in/groups mode's 1x1 factor,
// or 1 where that mode is identity) and K = U_2 (x) U_3 [kh kw, a b]. Forward and backward are
// plain loops over the [C, a b] and [C, kh kw] rows, one pass each over C: the generic node
// spends about 60 LibTorch ops on these tiny tensors (kronecker products, permutes, mv, the 1x1
// factor's broadcast and sum), each costing more than its arithmetic. Measured forward plus
// backward at 2 threads (docs/PERFORMANCE.md): 71 -> 26 us at 96 channels, 82 -> 50 us at 384,
// 97 -> 78 us at 768, where LoRA's dW at rank 16 takes 30, 52 and 81 us; ConvNeXt-tiny has 18
// such layers.
// The loops below get an AVX2 + FMA copy, chosen at run time, where the compiler can make one
// (GCC or Clang on x86): built for baseline x86-64 (SSE2) they ran 1.3x slower at 384 and 768
// channels. Elsewhere, or with FLORA_NO_AVX2 set (the tests run both), the portable copy runs
// (detail::avx2_fma_enabled decides, as for the narrow GEMMs).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FLORA_X86_DISPATCH 1
#define FLORA_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FLORA_X86_DISPATCH 0
#define FLORA_ALWAYS_INLINE inline
#endif

template <typename T>
struct DepthwiseDeltaLoops {
  int64_t C, r, R, KK;  // channels, rank, a b, kh kw
  std::vector<T> st;            // S^T [a b, r]

  DepthwiseDeltaLoops(const Tensor& core, const Tensor& u0, T u1_scale, int64_t kernel_elements)
      : C(u0.size(0)), r(core.size(0)), R(core.size(2) * core.size(3)), KK(kernel_elements),
        st(static_cast<size_t>(R * r)) {
    const T* g = core.data_ptr<T>();
    for (int64_t p = 0; p < r; ++p)
      for (int64_t q = 0; q < R; ++q) st[q * r + p] = u1_scale * g[p * R + q];
  }
  // K^T [a b, kh kw]: K^T[(i_a, i_b), (i, j)] = U_2[i, i_a] U_3[j, i_b].
  static void kron_t(const Tensor& u2, const Tensor& u3, T* kt) {
    const int64_t A = u2.size(1), B = u3.size(1), kh = u2.size(0), kw = u3.size(0);
    const T *p2 = u2.data_ptr<T>(), *p3 = u3.data_ptr<T>();
    for (int64_t a = 0; a < A; ++a)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) kt[(a * B + b) * kh * kw + i * kw + j] = p2[i * A + a] * p3[j * B + b];
  }
  // From gK^T [a b, kh kw]: gU_2[i, a] = sum_{b, j} gK^T[(a, b), (i, j)] U_3[j, b] into *g2, and
  // gU_3 likewise into *g3 (each skipped where null).
  static void kron_factor_grads(const T* gkt, const Tensor& u2, const Tensor& u3, Tensor* g2, Tensor* g3) {
    const int64_t A = u2.size(1), B = u3.size(1), kh = u2.size(0), kw = u3.size(0), KK = kh * kw;
    if (g2) *g2 = at::zeros_like(u2);
    if (g3) *g3 = at::zeros_like(u3);
    const T *p2 = u2.data_ptr<T>(), *p3 = u3.data_ptr<T>();
    T* o2 = g2 ? g2->data_ptr<T>() : nullptr;
    T* o3 = g3 ? g3->data_ptr<T>() : nullptr;
    for (int64_t a = 0; a < A; ++a)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const T v = gkt[(a * B + b) * KK + i * kw + j];
            if (o2) o2[i * A + a] += v * p3[j * B + b];
            if (o3) o3[j * B + b] += v * p2[i * A + a];
          }
  }
  // M = U_0 S [C, a b] into m, dW = M K^T [C, kh kw] into d. NR: a b at compile time (4, the
  // 2 x 2 kernel ranks FLoRA uses by default: one pass per row), or 0 for any.
  template <int NR>
  FLORA_ALWAYS_INLINE void forward_rows(const T* __restrict__ u0, const T* __restrict__ kt, T* __restrict__ m, T* __restrict__ d) const {
    const int64_t nr = NR ? NR : R;
    const T* __restrict__ s = st.data();
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict__ row = u0 + c * r;
      T* __restrict__ mc = m + c * nr;
      for (int64_t q = 0; q < nr; ++q) {
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t p = 0; p < r; ++p) acc += row[p] * s[q * r + p];
        mc[q] = acc;
      }
      T* __restrict__ out = d + c * KK;
      if (NR == 4) {
#pragma omp simd
        for (int64_t k = 0; k < KK; ++k)
          out[k] = mc[0] * kt[k] + mc[1] * kt[KK + k] + mc[2] * kt[2 * KK + k] + mc[3] * kt[3 * KK + k];
      } else {
        for (int64_t k = 0; k < KK; ++k) out[k] = 0;
        for (int64_t q = 0; q < nr; ++q) {
          const T mq = mc[q];
#pragma omp simd
          for (int64_t k = 0; k < KK; ++k) out[k] += mq * kt[q * KK + k];
        }
      }
    }
  }
  void forward_any(const T* u0, const T* kt, T* m, T* d) const {
    R == 4 ? forward_rows<4>(u0, kt, m, d) : forward_rows<0>(u0, kt, m, d);
  }
#if FLORA_X86_DISPATCH
  __attribute__((target("avx2,fma"))) void forward_avx2(const T* u0, const T* kt, T* m, T* d) const {
    R == 4 ? forward_rows<4>(u0, kt, m, d) : forward_rows<0>(u0, kt, m, d);
  }
  void forward(const T* u0, const T* kt, T* m, T* d) const {
    detail::avx2_fma_enabled() ? forward_avx2(u0, kt, m, d) : forward_any(u0, kt, m, d);
  }
#else
  void forward(const T* u0, const T* kt, T* m, T* d) const { forward_any(u0, kt, m, d); }
#endif
  // From gD [C, kh kw]: gU_0 [C, r] into gu0 (may be null), and the sums gS^T [a b, r], gK^T
  // [a b, kh kw] (zeroed by the caller) for the core, u_1 and the kernel factors.
  template <int NR>
  FLORA_ALWAYS_INLINE void backward_rows(const T* __restrict__ gd, const T* __restrict__ u0, const T* __restrict__ kt,
                     const T* __restrict__ m, T* __restrict__ gu0, T* __restrict__ gst, T* __restrict__ gkt) const {
    const int64_t nr = NR ? NR : R;
    const T* __restrict__ s = st.data();
    T gm[NR ? NR : 1];
    std::vector<T> gm_any(NR ? 0 : static_cast<size_t>(nr));
    T* __restrict__ g = NR ? gm : gm_any.data();
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict__ grow = gd + c * KK;
      const T* __restrict__ mc = m + c * nr;
      for (int64_t q = 0; q < nr; ++q) {
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < KK; ++k) acc += grow[k] * kt[q * KK + k];
        g[q] = acc;
        const T mq = mc[q];
#pragma omp simd
        for (int64_t k = 0; k < KK; ++k) gkt[q * KK + k] += mq * grow[k];
      }
      const T* __restrict__ urow = u0 + c * r;
      if (gu0) {
        T* __restrict__ o = gu0 + c * r;
        if (NR == 4) {
#pragma omp simd
          for (int64_t p = 0; p < r; ++p) o[p] = g[0] * s[p] + g[1] * s[r + p] + g[2] * s[2 * r + p] + g[3] * s[3 * r + p];
        } else {
          for (int64_t p = 0; p < r; ++p) o[p] = 0;
          for (int64_t q = 0; q < nr; ++q) {
#pragma omp simd
            for (int64_t p = 0; p < r; ++p) o[p] += g[q] * s[q * r + p];
          }
        }
      }
      for (int64_t q = 0; q < nr; ++q) {
        const T gq = g[q];
#pragma omp simd
        for (int64_t p = 0; p < r; ++p) gst[q * r + p] += urow[p] * gq;
      }
    }
  }
  void backward_any(const T* gd, const T* u0, const T* kt, const T* m, T* gu0, T* gst, T* gkt) const {
    R == 4 ? backward_rows<4>(gd, u0, kt, m, gu0, gst, gkt) : backward_rows<0>(gd, u0, kt, m, gu0, gst, gkt);
  }
#if FLORA_X86_DISPATCH
  __attribute__((target("avx2,fma"))) void backward_avx2(const T* gd, const T* u0, const T* kt, const T* m, T* gu0,
                                                         T* gst, T* gkt) const {
    R == 4 ? backward_rows<4>(gd, u0, kt, m, gu0, gst, gkt) : backward_rows<0>(gd, u0, kt, m, gu0, gst, gkt);
  }
  void backward(const T* gd, const T* u0, const T* kt, const T* m, T* gu0, T* gst, T* gkt) const {
    detail::avx2_fma_enabled() ? backward_avx2(gd, u0, kt, m, gu0, gst, gkt) : backward_any(gd, u0, kt, m, gu0, gst, gkt);
  }
#else
  void backward(const T* gd, const T* u0, const T* kt, const T* m, T* gu0, T* gst, T* gkt) const {
    backward_any(gd, u0, kt, m, gu0, gst, gkt);
  }
#endif
};

// Inputs: core [r, 1, a, b], U_0 [C, r], U_1 ([1, 1], or empty for an identity mode), U_2 [kh, a],
// U_3 [kw, b]; all contiguous CPU tensors of one floating dtype.
struct DepthwiseDeltaFunction : public torch::autograd::Function<DepthwiseDeltaFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& core, const Tensor& u0, const Tensor& u1,
                        const Tensor& u2, const Tensor& u3, double scale) {
    const int64_t C = u0.size(0), R = core.size(2) * core.size(3), kh = u2.size(0), kw = u3.size(0);
    Tensor mk = at::empty({C * R + R * kh * kw}, core.options());  // M [C, a b] and K^T, kept for backward
    Tensor d = at::empty({C, 1, kh, kw}, core.options());
    AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "depthwise_delta", [&] {
      const scalar_t u1s = static_cast<scalar_t>(scale) * (u1.numel() ? u1.data_ptr<scalar_t>()[0] : scalar_t(1));
      const DepthwiseDeltaLoops<scalar_t> loops(core, u0, u1s, kh * kw);
      scalar_t* m = mk.data_ptr<scalar_t>();
      DepthwiseDeltaLoops<scalar_t>::kron_t(u2, u3, m + C * R);
      loops.forward(u0.data_ptr<scalar_t>(), m + C * R, m, d.data_ptr<scalar_t>());
    });
    ctx->save_for_backward({core, u0, u1, u2, u3, mk});
    ctx->saved_data["scale"] = scale;
    return d;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    refuse_double_backward();
    torch::autograd::variable_list grads(6);
    if (!grad_out[0].defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const Tensor &core = saved[0], &u0 = saved[1], &u1 = saved[2], &u2 = saved[3], &u3 = saved[4], &mk = saved[5];
    const double scale = ctx->saved_data["scale"].toDouble();
    const Tensor gd = grad_out[0].to(core.scalar_type()).contiguous();
    const int64_t C = u0.size(0), r = core.size(0), R = u2.size(1) * u3.size(1), KK = u2.size(0) * u3.size(0);
    const bool want_u0 = ctx->needs_input_grad(1);
    Tensor gu0 = want_u0 ? at::empty({C, r}, core.options()) : Tensor();
    Tensor sums = at::zeros({R * r + R * KK}, core.options());  // gS^T, gK^T
    AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "depthwise_delta_backward", [&] {
      const scalar_t u1v = u1.numel() ? u1.data_ptr<scalar_t>()[0] : scalar_t(1);
      const DepthwiseDeltaLoops<scalar_t> loops(core, u0, static_cast<scalar_t>(scale) * u1v, KK);
      const scalar_t* m = mk.data_ptr<scalar_t>();
      scalar_t* gst = sums.data_ptr<scalar_t>();
      scalar_t* gkt = gst + R * r;
      loops.backward(gd.data_ptr<scalar_t>(), u0.data_ptr<scalar_t>(), m + C * R, m,
                     want_u0 ? gu0.data_ptr<scalar_t>() : nullptr, gst, gkt);
      const scalar_t* g = core.data_ptr<scalar_t>();
      if (ctx->needs_input_grad(0)) {  // gG = s u_1 gS
        grads[0] = at::empty_like(core);
        scalar_t* gg = grads[0].data_ptr<scalar_t>();
        for (int64_t p = 0; p < r; ++p)
          for (int64_t q = 0; q < R; ++q) gg[p * R + q] = static_cast<scalar_t>(scale) * u1v * gst[q * r + p];
      }
      if (u1.numel() && ctx->needs_input_grad(2)) {  // gu_1 = s <G, gS>
        scalar_t acc = 0;
        for (int64_t p = 0; p < r; ++p)
          for (int64_t q = 0; q < R; ++q) acc += g[p * R + q] * gst[q * r + p];
        grads[2] = at::full({1, 1}, static_cast<double>(acc) * scale, core.options());
      }
      DepthwiseDeltaLoops<scalar_t>::kron_factor_grads(gkt, u2, u3, ctx->needs_input_grad(3) ? &grads[3] : nullptr,
                                                        ctx->needs_input_grad(4) ? &grads[4] : nullptr);
    });
    grads[1] = gu0;
    return grads;
  }
};

// tucker_delta for a 2-d conv weight whose two kernel modes have factors (every conv FLoRA
// adapts by default but the depthwise ones above): core [r_0, r_1, a, b], U_0 [P, r_0] and U_1
// [Q, r_1] each a factor or identity, K = U_2 (x) U_3 as above. Forward: the kernel rows
// Kc = s G K^T [r_0, r_1, kh kw] as plain loops, then T = U_1 Kc and dW = U_0 T (one GEMM
// each); backward the same in reverse, the core's and kernel factors' gradients again as loops.
// The factorized and hybrid paths' core-conv kernel (modes 0 and 1 identity) is the loops
// alone, or the loops and U_1's GEMM where the factorized path folds U_in into it. The generic
// node ran 40 to 60 LibTorch ops here, each costing more than its arithmetic: ResNet-18 builds
// 20 such tensors a step, ConvNeXt-tiny 4.
struct KernelDeltaFunction : public torch::autograd::Function<KernelDeltaFunction> {
  // Where Kc's row c = (i_0, i_1) starts, and the stride of its kh kw entries, in the layout
  // forward chose: [r_1, r_0, kh kw] where U_1 follows, else T = Kc itself in dW's order,
  // [r_0, r_1, kh kw], or [r_0, kh kw, r_1] channels-last.
  struct KcLayout {
    int64_t r0, r1, KK;
    bool by_in, kk_outer;
    int64_t row(int64_t c) const {
      const int64_t i0 = c / r1, i1 = c % r1;
      return by_in ? (i1 * r0 + i0) * KK : kk_outer ? i0 * KK * r1 + i1 : c * KK;
    }
    int64_t step() const { return kk_outer ? r1 : 1; }
  };

  // Inputs: core, U_0 and U_1 (empty for an identity mode), U_2, U_3; contiguous, one dtype.
  // channels_last: dW comes out with channels-last strides, built there (the layout of the conv
  // that takes it, when the model runs channels-last): no reorder of it before that conv, and
  // its weight gradient arrives in the same layout, so backward copies nothing either.
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& core, const Tensor& u0, const Tensor& u1,
                        const Tensor& u2, const Tensor& u3, double scale, bool channels_last) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // as TuckerDeltaFunction
    const int64_t r0 = core.size(0), r1 = core.size(1), R = core.size(2) * core.size(3), kh = u2.size(0),
                  kw = u3.size(0), KK = kh * kw;
    const int64_t P = u0.numel() ? u0.size(0) : r0, Q = u1.numel() ? u1.size(0) : r1;
    Tensor kt = at::empty({R * KK}, core.options());  // K^T [a b, kh kw], kept for backward
    // Kc's rows: where U_1 follows, [r_1, r_0, kh kw], so that T = U_1 Kc is one GEMM
    // ([r_0, r_1, kh kw] would need r_0 of them); else T = Kc in dW's order.
    const bool by_in = u1.numel() > 0;
    const KcLayout lay{r0, r1, KK, by_in, !by_in && channels_last};
    Tensor kc = at::empty({r0 * r1 * KK}, core.options());
    AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "kernel_delta", [&] {
      scalar_t* k = kt.data_ptr<scalar_t>();
      DepthwiseDeltaLoops<scalar_t>::kron_t(u2, u3, k);
      const scalar_t s = static_cast<scalar_t>(scale);
      const scalar_t* g = core.data_ptr<scalar_t>();
      scalar_t* out = kc.data_ptr<scalar_t>();
      const int64_t sj = lay.step();
      for (int64_t c = 0; c < r0 * r1; ++c) {
        scalar_t* o = out + lay.row(c);
        for (int64_t j = 0; j < KK; ++j) o[j * sj] = 0;
        for (int64_t q = 0; q < R; ++q) {
          const scalar_t gq = s * g[c * R + q];
          const scalar_t* kq = k + q * KK;
          for (int64_t j = 0; j < KK; ++j) o[j * sj] += gq * kq[j];
        }
      }
    });
    // T [r_0, Q, kh kw], or channels-last [r_0, kh kw, Q] = (Kc^T [r_0 kh kw, r_1]) U_1^T:
    // contiguous either way (U_0's GEMM and the caller take it as is).
    Tensor t = kc;
    if (by_in)
      t = channels_last ? kc.view({r1, r0 * KK}).t().mm(u1.t())
                        : u1.mm(kc.view({r1, r0 * KK})).view({Q, r0, KK}).transpose(0, 1).contiguous();
    Tensor d = u0.numel() ? u0.mm(t.view({r0, Q * KK})) : t;
    // Backward needs Kc for U_1's gradient and T for U_0's; an empty stand-in otherwise.
    const Tensor none = at::empty({0}, core.options());
    ctx->save_for_backward({core, u0, u1, u2, u3, kt, u1.numel() ? kc : none, u0.numel() ? t : none});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["channels_last"] = channels_last;
    return channels_last ? d.view({P, kh, kw, Q}).permute({0, 3, 1, 2}) : d.view({P, Q, kh, kw});
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    refuse_double_backward();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    torch::autograd::variable_list grads(7);
    if (!grad_out[0].defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const Tensor &core = saved[0], &u0 = saved[1], &u1 = saved[2], &u2 = saved[3], &u3 = saved[4], &kt = saved[5],
                 &kc = saved[6], &t = saved[7];
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool channels_last = ctx->saved_data["channels_last"].toBool();
    const int64_t r0 = core.size(0), r1 = core.size(1), R = core.size(2) * core.size(3), KK = u2.size(0) * u3.size(0);
    const int64_t P = u0.numel() ? u0.size(0) : r0, Q = u1.numel() ? u1.size(0) : r1;
    const bool want_core = ctx->needs_input_grad(0), want_u2 = ctx->needs_input_grad(3),
               want_u3 = ctx->needs_input_grad(4);
    // gD as [P, Q kh kw], or [P, kh kw Q] channels-last: forward's order, a view where the
    // gradient came in that layout (it does from a conv that took dW).
    Tensor g = grad_out[0].to(core.scalar_type());
    g = channels_last ? g.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({P, KK * Q})
                      : g.contiguous().view({P, Q * KK});
    if (u0.numel()) {  // dW = U_0 T
      if (ctx->needs_input_grad(1)) grads[1] = g.mm(t.view({r0, Q * KK}).t());
      g = u0.t().mm(g);
    }
    if (u1.numel()) {  // T = U_1 Kc with Kc [r_1, r_0 kh kw]; gKc in that layout too
      const bool more = want_core || want_u2 || want_u3;
      if (channels_last) {  // gT^T [Q, r_0 kh kw] as a transposed view: no copy
        const Tensor gtt = g.view({r0 * KK, Q}).t();
        if (ctx->needs_input_grad(2)) grads[2] = gtt.mm(kc.view({r1, r0 * KK}).t());
        if (more) g = u1.t().mm(gtt);
      } else {
        const Tensor gt = g.view({r0, Q, KK}).transpose(0, 1).contiguous().view({Q, r0 * KK});
        if (ctx->needs_input_grad(2)) grads[2] = gt.mm(kc.view({r1, r0 * KK}).t());
        if (more) g = u1.t().mm(gt);
      }
    }
    if (!want_core && !want_u2 && !want_u3) return grads;
    const KcLayout lay{r0, r1, KK, u1.numel() > 0, u1.numel() == 0 && channels_last};
    const Tensor gd = g.contiguous();  // gKc, in forward's Kc layout
    if (want_core) grads[0] = at::empty_like(core);
    Tensor gkt = want_u2 || want_u3 ? at::zeros({R * KK}, core.options()) : Tensor();
    AT_DISPATCH_FLOATING_TYPES(core.scalar_type(), "kernel_delta_backward", [&] {
      const scalar_t s = static_cast<scalar_t>(scale);
      const scalar_t *gc = core.data_ptr<scalar_t>(), *k = kt.data_ptr<scalar_t>(), *gdp = gd.data_ptr<scalar_t>();
      scalar_t* gg = want_core ? grads[0].data_ptr<scalar_t>() : nullptr;
      scalar_t* gk = gkt.defined() ? gkt.data_ptr<scalar_t>() : nullptr;
      const int64_t sj = lay.step();
      for (int64_t c = 0; c < r0 * r1; ++c) {
        const scalar_t* grow = gdp + lay.row(c);
        for (int64_t q = 0; q < R; ++q) {
          const scalar_t* kq = k + q * KK;
          if (gg) {
            scalar_t acc = 0;
            for (int64_t j = 0; j < KK; ++j) acc += grow[j * sj] * kq[j];
            gg[c * R + q] = s * acc;
          }
          if (gk) {
            const scalar_t m = s * gc[c * R + q];
            scalar_t* o = gk + q * KK;
            for (int64_t j = 0; j < KK; ++j) o[j] += m * grow[j * sj];
          }
        }
      }
      if (gk)
        DepthwiseDeltaLoops<scalar_t>::kron_factor_grads(gk, u2, u3, want_u2 ? &grads[3] : nullptr,
                                                         want_u3 ? &grads[4] : nullptr);
    });
    return grads;
  }
};

// The loop nodes above take CPU tensors of one dtype, float or double.
bool loops_take(const Tensor& core, const std::vector<Tensor>& factors) {
  const auto dtype = core.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || !core.device().is_cpu()) return false;
  for (const auto& t : factors)
    if (t.defined() && (t.scalar_type() != dtype || !t.device().is_cpu())) return false;
  return true;
}

// The loops above apply: a depthwise 2-d conv weight's delta ([C, 1, kh, kw], core [r, 1, a, b])
// with factors on the channel and both kernel modes.
bool depthwise_delta_applies(const Tensor& core, const std::vector<Tensor>& factors) {
  if (core.dim() != 4 || core.size(1) != 1 || !factors[0].defined() || !factors[2].defined() || !factors[3].defined())
    return false;
  if (factors[1].defined() && factors[1].size(0) != 1) return false;
  return loops_take(core, factors);
}

// ... and any other 2-d conv weight whose two kernel modes have factors, where K = U_2 (x) U_3
// is small (as the generic plan's Kronecker fusion: the loops cost r_0 r_1 times its size).
bool kernel_delta_applies(const Tensor& core, const std::vector<Tensor>& factors) {
  if (core.dim() != 4 || !factors[2].defined() || !factors[3].defined() || core.numel() == 0) return false;
  if (factors[2].numel() * factors[3].numel() > kMaxKroneckerElements) return false;
  for (const auto& t : factors)  // an empty factor would read as identity in the node
    if (t.defined() && t.numel() == 0) return false;
  return loops_take(core, factors);
}

}  // namespace

Tensor tucker_delta(const Tensor& core, const std::vector<Tensor>& factors, double scale) {
  return tucker_delta(core, factors, scale, at::MemoryFormat::Preserve);
}

Tensor tucker_delta(const Tensor& core, const std::vector<Tensor>& factors, double scale, at::MemoryFormat format) {
  check_factors(core, factors, "tucker_delta");
  if ((format == at::MemoryFormat::ChannelsLast && core.dim() != 4) ||
      (format == at::MemoryFormat::ChannelsLast3d && core.dim() != 5))
    throw InvalidArgument("tucker_delta: memory format " + std::string(c10::toString(format)) + " needs an order-" +
                          (format == at::MemoryFormat::ChannelsLast ? "4 (2-d conv)" : "5 (3-d conv)") +
                          " weight, got order " + std::to_string(core.dim()) + " (hint: Contiguous for other weights)");
  if (depthwise_delta_applies(core, factors)) {  // [C, 1, kh, kw]: the same memory in both layouts
    const Tensor none = at::empty({0}, core.options());
    const Tensor d = DepthwiseDeltaFunction::apply(core.contiguous(), factors[0].contiguous(),
                                                   factors[1].defined() ? factors[1].contiguous() : none,
                                                   factors[2].contiguous(), factors[3].contiguous(), scale);
    return format == at::MemoryFormat::Preserve ? d : d.contiguous(format);
  }
  if (kernel_delta_applies(core, factors)) {
    const Tensor none = at::empty({0}, core.options());
    auto or_none = [&](const Tensor& u) { return u.defined() ? u.contiguous() : none; };
    return KernelDeltaFunction::apply(core.contiguous(), or_none(factors[0]), or_none(factors[1]),
                                      factors[2].contiguous(), factors[3].contiguous(), scale,
                                      format == at::MemoryFormat::ChannelsLast);
  }
  std::vector<Tensor> defined;
  std::vector<int64_t> modes;
  for (size_t n = 0; n < factors.size(); ++n)
    if (factors[n].defined()) defined.push_back(factors[n]), modes.push_back(static_cast<int64_t>(n));
  const Tensor d = TuckerDeltaFunction::apply(core, at::TensorList(defined), modes, scale);
  return format == at::MemoryFormat::Preserve ? d : d.contiguous(format);
}

std::string to_string(PaddingMode m) {
  switch (m) {
    case PaddingMode::Zeros: return "zeros";
    case PaddingMode::Reflect: return "reflect";
    case PaddingMode::Replicate: return "replicate";
    case PaddingMode::Circular: return "circular";
  }
  return "?";
}

PaddingMode parse_padding_mode(const std::string& s) {
  if (s == "zeros") return PaddingMode::Zeros;
  if (s == "reflect") return PaddingMode::Reflect;
  if (s == "replicate") return PaddingMode::Replicate;
  if (s == "circular") return PaddingMode::Circular;
  throw InvalidArgument("unknown padding mode '" + s + "', expected zeros, reflect, replicate or circular");
}

std::vector<int64_t> ConvGeometry::output_size(const std::vector<int64_t>& in,
                                               const std::vector<int64_t>& kernel) const {
  std::vector<int64_t> out(in.size());
  for (size_t i = 0; i < in.size(); ++i)
    out[i] = (in[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1;
  return out;
}

namespace {

// The weight gradient of a 2-d depthwise conv (weight [C m, 1, kh, kw], groups C) as one forward
// depthwise conv with the batch folded into the channels:
//   gW[c m + j, 0, i, l] = sum_{n, h, w} gy[n, c m + j, h, w] x_pad[n, c, h s_h + i d_h, w s_w + l d_w]
// is conv(x [1, N C, H, W], gy [N C m, 1, Ho, Wo], groups N C, stride d, dilation s, padding p),
// cropped to [kh, kw] and summed over n. LibTorch 1.13's oneDNN computes depthwise weight gradients
// 10 to 30x slower than its forward (6.6 ms against 0.28 ms for 96 channels at 16x16, batch 16,
// 2 threads); this takes 0.4 ms. Where the padding reaches past gy (p >= Ho: ConvNeXt's last stage
// at 2x2) oneDNN's NCHW kernel falls back to a slow path, and channels-last runs it instead.
Tensor depthwise_weight_grad(const Tensor& x, const Tensor& gy, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cm = gy.size(1), Ho = gy.size(2), Wo = gy.size(3);
  Tensor xs = x.reshape({1, N * C, H, W});
  Tensor k = gy.reshape({N * Cm, 1, Ho, Wo});
  if (padding[0] >= Ho || padding[1] >= Wo) {
    xs = xs.contiguous(at::MemoryFormat::ChannelsLast);
    k = k.contiguous(at::MemoryFormat::ChannelsLast);
  }
  const Tensor o = at::conv2d(xs, k, {}, dilation, padding, stride, N * C);  // [1, N C m, >= kh, >= kw]
  return o.narrow(2, 0, kernel[0]).narrow(3, 0, kernel[1]).reshape({N, Cm, kernel[0], kernel[1]}).sum(0).unsqueeze(1);
}

// conv2d(x, w, b) for a depthwise w that requires grad, with the weight gradient above; b may be
// empty (no bias).
struct DepthwiseConv2d : public torch::autograd::Function<DepthwiseConv2d> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b,
                        const ConvGeometry& geo) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["stride"] = geo.stride;
    ctx->saved_data["padding"] = geo.padding;
    ctx->saved_data["dilation"] = geo.dilation;
    ctx->saved_data["groups"] = geo.groups;
    const c10::optional<Tensor> bias = b.numel() > 0 ? c10::optional<Tensor>(b) : c10::nullopt;
    return at::conv2d(x, w, bias, geo.stride, geo.padding, geo.dilation, geo.groups);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    // The input gradient takes gy as it comes: oneDNN makes it contiguous in x's memory format
    // itself, and a channels-last gy (ConvNeXt's blocks permute around their convs) forced to
    // NCHW here was copied back there, once more per layer and step (profiled: 3 ms per ConvNeXt
    // step at 1 thread). The batch-folded weight gradient needs NCHW.
    const Tensor& gy = grads[0];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    Tensor gx, gw, gb;
    if (ctx->needs_input_grad(0))
      gx = std::get<0>(at::convolution_backward(gy, x, w, c10::nullopt, stride, padding, dilation, false, {0, 0},
                                                groups, {true, false, false}));
    if (ctx->needs_input_grad(1)) gw = depthwise_weight_grad(x, gy.contiguous(), w.sizes().slice(2), stride, padding, dilation);
    if (ctx->needs_input_grad(2)) gb = gy.sum(std::vector<int64_t>{0, 2, 3});
    return {gx, gw, gb, Tensor()};
  }
};

// The fast depthwise weight gradient applies: a CPU 2-d conv with in/groups == 1 whose weight
// needs a gradient, in float32/64 outside autocast (under autocast torch's conv runs as usual).
bool fast_depthwise(const Tensor& x, const Tensor& weight, const ConvGeometry& geo) {
  return geo.dims() == 2 && x.dim() == 4 && weight.dim() == 4 && weight.size(1) == 1 && geo.groups > 1 &&
         x.size(1) == geo.groups && weight.requires_grad() && torch::autograd::GradMode::is_enabled() &&
         x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
         x.scalar_type() == weight.scalar_type() && !at::autocast::is_cpu_enabled();
}

}  // namespace

namespace {

// A non-zero padding mode as torch.nn.ConvNd applies it: x padded explicitly (last dim first),
// and `pad` (the conv's own padding, in: geo.padding) set to 0. Zeros mode: x and pad unchanged.
Tensor pad_explicitly(const Tensor& x, const ConvGeometry& geo, std::vector<int64_t>& pad) {
  pad = geo.padding;
  const bool any_pad = std::any_of(pad.begin(), pad.end(), [](int64_t p) { return p != 0; });
  if (geo.padding_mode == PaddingMode::Zeros || !any_pad) return x;
  std::vector<int64_t> rev;
  for (int64_t i = geo.dims() - 1; i >= 0; --i) {
    rev.push_back(pad[i]);
    rev.push_back(pad[i]);
  }
  std::fill(pad.begin(), pad.end(), 0);
  return at::pad(x, rev, to_string(geo.padding_mode));
}

}  // namespace

Tensor conv_nd(const Tensor& x, const Tensor& weight, const Tensor& bias, const ConvGeometry& geo) {
  const int64_t d = geo.dims();
  std::vector<int64_t> pad;
  const Tensor in = pad_explicitly(x, geo, pad);
  if (fast_depthwise(in, weight, geo)) {
    ConvGeometry g = geo;
    g.padding = pad;
    // No bias travels as an empty tensor: custom functions cannot take undefined tensors.
    return DepthwiseConv2d::apply(in, weight, bias.defined() ? bias : at::empty({0}, weight.options()), g);
  }
  const c10::optional<Tensor> b = bias.defined() ? c10::optional<Tensor>(bias) : c10::nullopt;
  switch (d) {
    case 1: return at::conv1d(in, weight, b, geo.stride, pad, geo.dilation, geo.groups);
    case 2: return at::conv2d(in, weight, b, geo.stride, pad, geo.dilation, geo.groups);
    case 3: return at::conv3d(in, weight, b, geo.stride, pad, geo.dilation, geo.groups);
    default: throw InvalidArgument("conv_nd: " + std::to_string(d) + " spatial dims, expected 1, 2 or 3");
  }
}

namespace {

// The Linear branch's input side, checked: A = s G U_in^T [r_out, in]. Folding the (small) core
// in once leaves two thin matmuls per token, x A^T U_out^T, exactly as LoRA does.
Tensor linear_input_side(const Tensor& core, const std::vector<Tensor>& factors, double scale) {
  check_factors(core, factors, "linear_branch");
  if (core.dim() != 2) throw InvalidArgument("linear_branch: core must be [r_out, r_in], got " + format_shape(core.sizes().vec()));
  Tensor a = scale == 1.0 ? core : core * scale;
  return factors[1].defined() ? a.matmul(factors[1].t()) : a;
}

}  // namespace

Tensor linear_branch(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale) {
  Tensor h = x.matmul(linear_input_side(core, factors, scale).t());
  if (factors[0].defined()) h = h.matmul(factors[0].t());
  return h;
}

RecomputableInput RecomputableInput::recipe(Op op, std::string approximate, std::vector<int64_t> normalized_shape,
                                            double eps) {
  RecomputableInput r;
  r.op_ = op;
  r.approximate_ = std::move(approximate);
  r.shape_ = std::move(normalized_shape);
  r.eps_ = eps;
  return r;
}

RecomputableInput RecomputableInput::gelu(const Tensor& h, const std::string& approximate) {
  if (approximate != "none" && approximate != "tanh")
    throw InvalidArgument("RecomputableInput::gelu: approximate '" + approximate + "', expected 'none' or 'tanh'");
  RecomputableInput r = recipe(Op::Gelu, approximate, {}, 0.0);
  r.sources_ = {h};
  r.value_ = r.recompute(r.sources_);
  return r;
}

RecomputableInput RecomputableInput::layer_norm(const Tensor& h, std::vector<int64_t> normalized_shape,
                                                const Tensor& weight, const Tensor& bias, double eps) {
  RecomputableInput r = recipe(Op::LayerNorm, "none", std::move(normalized_shape), eps);
  r.sources_ = {h, weight, bias};
  r.value_ = r.recompute(r.sources_);
  return r;
}

RecomputableInput RecomputableInput::attention_heads(const Tensor& attn, const Tensor& v) {
  if (attn.dim() != 4 || v.dim() != 4 || attn.size(0) != v.size(0) || attn.size(1) != v.size(1) ||
      attn.size(3) != v.size(2))
    throw InvalidArgument("RecomputableInput::attention_heads: attn " + format_shape(attn.sizes().vec()) + " and v " +
                          format_shape(v.sizes().vec()) + ", expected [N, H, L, S] and [N, H, S, hd]");
  RecomputableInput r = recipe(Op::AttentionHeads, "none", {}, 0.0);
  r.sources_ = {attn, v.contiguous()};
  r.value_ = r.recompute(r.sources_);
  return r;
}

Tensor RecomputableInput::recompute(const std::vector<Tensor>& sources) const {
  switch (op_) {
    case Op::Gelu: return at::gelu(sources.at(0), approximate_);
    case Op::LayerNorm: return at::layer_norm(sources.at(0), shape_, sources.at(1), sources.at(2), eps_);
    case Op::AttentionHeads: {
      const Tensor &attn = sources.at(0), &v = sources.at(1);
      return at::matmul(attn, v).transpose(1, 2).reshape({attn.size(0), attn.size(2), v.size(1) * v.size(3)});
    }
  }
  throw InvalidArgument("RecomputableInput: unknown op");
}

namespace {

// Autocast's state, saved in forward and put back around backward's recomputation, so that the
// recomputed input has the bits forward's had (under autocast, LayerNorm and GELU may run in
// another dtype than without).
struct AutocastState {
  bool cpu = at::autocast::is_cpu_enabled(), gpu = at::autocast::is_enabled();
  at::ScalarType cpu_dtype = at::autocast::get_autocast_cpu_dtype(), gpu_dtype = at::autocast::get_autocast_gpu_dtype();
  bool cache = at::autocast::is_autocast_cache_enabled();
  void apply() const {
    at::autocast::set_cpu_enabled(cpu);
    at::autocast::set_enabled(gpu);
    at::autocast::set_autocast_cpu_dtype(cpu_dtype);
    at::autocast::set_autocast_gpu_dtype(gpu_dtype);
    at::autocast::set_autocast_cache_enabled(cache);
  }
};

// Puts a saved autocast state in place for its lifetime, with autocast's cast cache off (a cast
// cached during backward would outlive the caller's clear_cache()), and the current one back after.
class AutocastStateGuard {
 public:
  explicit AutocastStateGuard(AutocastState then) {
    then.cache = false;
    then.apply();
  }
  ~AutocastStateGuard() { now_.apply(); }
  AutocastStateGuard(const AutocastStateGuard&) = delete;
  AutocastStateGuard& operator=(const AutocastStateGuard&) = delete;

 private:
  AutocastState now_;
};

// A RecomputableInput's recipe and the autocast state forward ran under, kept in a node's
// saved_data (the sources go to save_for_backward), and x rebuilt from them in backward.
void save_recipe(torch::autograd::AutogradContext* ctx, const RecomputableInput& in, const AutocastState& autocast) {
  auto& d = ctx->saved_data;
  d["op"] = static_cast<int64_t>(in.op());
  d["approximate"] = in.approximate();
  d["shape"] = in.normalized_shape();
  d["eps"] = in.eps();
  d["cpu"] = autocast.cpu;
  d["gpu"] = autocast.gpu;
  d["cpu_dtype"] = static_cast<int64_t>(autocast.cpu_dtype);
  d["gpu_dtype"] = static_cast<int64_t>(autocast.gpu_dtype);
}

// A backward that recomputes its input records no dependence of the gradients on the sources,
// so create_graph is refused there. `who` names the caller.
void refuse_create_graph_through_recompute(const char* who) {
  if (torch::GradMode::is_enabled())
    throw InvalidArgument(std::string(who) + ": double backward (create_graph) through a RecomputableInput is not supported "
                          "(hint: pass in.value() instead, or flora::nn::set_recompute_inputs(false))");
}

// x = f(sources) as forward had it, in dtype (no create_graph: see above).
Tensor recompute_saved(torch::autograd::AutogradContext* ctx, const std::vector<Tensor>& sources, at::ScalarType dtype,
                       const char* who) {
  refuse_create_graph_through_recompute(who);
  auto& d = ctx->saved_data;
  const auto recipe = RecomputableInput::recipe(static_cast<RecomputableInput::Op>(d["op"].toInt()),
                                                d["approximate"].toStringRef(), d["shape"].toIntVector(), d["eps"].toDouble());
  AutocastState then;
  then.cpu = d["cpu"].toBool();
  then.gpu = d["gpu"].toBool();
  then.cpu_dtype = static_cast<at::ScalarType>(d["cpu_dtype"].toInt());
  then.gpu_dtype = static_cast<at::ScalarType>(d["gpu_dtype"].toInt());
  Tensor x;
  {
    AutocastStateGuard as_in_forward(then);
    x = recipe.recompute(sources);
  }
  return x.scalar_type() != dtype ? x.to(dtype) : x;
}

// h = x A^T for x = f(sources) [..., in] and A [r, in], keeping the sources and A but not x.
struct RecomputedProjection : public torch::autograd::Function<RecomputedProjection> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& a,
                        const RecomputableInput* in, const AutocastState* autocast) {
    std::vector<Tensor> keep{a};
    for (const auto& t : in->sources()) keep.push_back(t);
    ctx->save_for_backward(keep);
    save_recipe(ctx, *in, *autocast);
    return x.matmul(a.t());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& a = saved[0];
    const Tensor& g = grads[0];
    torch::autograd::variable_list out(4);
    if (ctx->needs_input_grad(0)) out[0] = g.matmul(a);
    if (ctx->needs_input_grad(1)) {
      const Tensor x = recompute_saved(ctx, std::vector<Tensor>(saved.begin() + 1, saved.end()), a.scalar_type(), "linear_branch");
      out[1] = g.reshape({-1, g.size(-1)}).t().matmul(x.reshape({-1, x.size(-1)}));
    }
    return out;
  }
};

// The dtype the plain branch's matmul runs in: autocast's where it is on, else t's own
// (autocast leaves double alone).
at::ScalarType branch_dtype(const Tensor& t, const AutocastState& autocast) {
  if (!at::isFloatingType(t.scalar_type()) || t.scalar_type() == at::kDouble) return t.scalar_type();
  if (t.is_cuda() && autocast.gpu) return autocast.gpu_dtype;
  if (t.is_cpu() && autocast.cpu) return autocast.cpu_dtype;
  return t.scalar_type();
}

}  // namespace

Tensor linear_branch(const RecomputableInput& x, const Tensor& core, const std::vector<Tensor>& factors, double scale) {
  Tensor a = linear_input_side(core, factors, scale);
  const AutocastState autocast;
  const auto dtype = branch_dtype(a, autocast);
  Tensor in = x.value();
  if (in.scalar_type() != dtype && autocast.cpu + autocast.gpu > 0) in = in.to(dtype);
  if (a.scalar_type() != dtype) a = a.to(dtype);
  Tensor h;
  {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    h = RecomputedProjection::apply(in, a, &x, &autocast);
  }
  if (factors[0].defined()) h = h.matmul(factors[0].t());
  return h;
}

namespace {

// The layout a d-dim conv's weight should have next to t (an input or a weight): channels-last
// where t is (2-d convs only: the kernel node builds no other layout natively), else contiguous.
at::MemoryFormat weight_format(const Tensor& t, int64_t d) {
  return d == 2 && t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// A conv's sizes as the fold rules (flora::fold_input_factor, hybrid_folds_input) take them:
// kernel elements, and input and output pixels for input x.
struct ConvCounts {
  int64_t kernel;
  double in_pixels, out_pixels;
};
ConvCounts conv_counts(const Tensor& x, const std::vector<int64_t>& kernel, const ConvGeometry& geo) {
  auto count = [](const std::vector<int64_t>& v) {
    return std::accumulate(v.begin(), v.end(), 1.0, [](double a, int64_t b) { return a * static_cast<double>(b); });
  };
  const std::vector<int64_t> in_spatial(x.sizes().end() - geo.dims(), x.sizes().end());
  return {static_cast<int64_t>(count(kernel)), count(in_spatial), count(geo.output_size(in_spatial, kernel))};
}

// Steps 1 and 2 of the factorized branch: [N, in, ...] -> [N, g*r_0 (or out), ...].
Tensor conv_branch_inner(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale,
                         const ConvGeometry& geo);

}  // namespace

Tensor conv_branch(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale,
                   const ConvGeometry& geo) {
  Tensor w = conv_branch_inner(x, core, factors, scale, geo);
  // 3) grouped 1x1: group gi's r_0 channels -> its out/g output channels, weights U_out rows.
  if (factors[0].defined()) {
    const int64_t d = geo.dims();
    w = conv_nd(w, pointwise(factors[0], d), {}, pointwise_geometry(d, geo.groups));
  }
  return w;
}

namespace {

Tensor conv_branch_inner(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale,
                         const ConvGeometry& geo) {
  check_factors(core, factors, "conv_branch");
  const int64_t d = geo.dims();
  if (core.dim() != 2 + d)
    throw InvalidArgument("conv_branch: core has order " + std::to_string(core.dim()) + ", expected " + std::to_string(2 + d));
  const int64_t g = geo.groups;
  const auto& u_out = factors[0];
  const auto& u_in = factors[1];

  // Kernel of the middle conv: s * G x_2 U_2 ... x_{N-1} U_{N-1}  -> [r_0, r_1, k...].
  // Where flora::fold_input_factor says it is no more work (a 1x1 kernel, as linear_branch does;
  // a kernel no larger than its stride), U_in is folded into it: s * G x_1 U_in [r_0, in/g, k...],
  // one conv fewer (3 fewer ops per training step) and no r_1-channel copy of the input.
  const auto shape = full_shape(core, factors);
  const auto n = conv_counts(x, std::vector<int64_t>(shape.begin() + 2, shape.end()), geo);
  const bool fold_in = u_in.defined() && fold_input_factor(x.size(x.dim() - d - 1), g, core.size(1), core.size(0), n.kernel,
                                                           n.in_pixels, n.out_pixels);
  std::vector<Tensor> spatial(factors.size());
  for (size_t n = 2; n < factors.size(); ++n) spatial[n] = factors[n];
  if (fold_in) spatial[1] = u_in;
  // The kernel in x's layout: the conv takes it without a reorder.
  Tensor kernel = tucker_delta(core, spatial, scale, weight_format(x, d));

  // 1) grouped 1x1: each group's in/g channels -> r_1 channels. z: [N, g*r_1, ...].
  Tensor z = x;
  if (u_in.defined() && !fold_in) {
    Tensor w1 = pointwise(g == 1 ? u_in.t() : u_in.t().repeat({g, 1}), d);
    z = conv_nd(x, w1, {}, pointwise_geometry(d, g));
  }
  // 2) grouped core conv with the base's stride/padding/dilation (padding modes commute with the
  //    pointwise step 1, so padding z equals padding x). With U_out, each group gets all r_0
  //    outputs (kernel repeated); without it, the kernel's r_0 == out rows are already grouped.
  Tensor w2 = kernel;
  if (u_out.defined() && g > 1) {
    std::vector<int64_t> rep(2 + d, 1);
    rep[0] = g;
    w2 = kernel.repeat(rep);
  }
  return conv_nd(z, w2, {}, geo);
}

}  // namespace

namespace {

// The dense banded matrix of a 1-d correlation along one axis: T [n_out, n_in, r] with
// T[o, h, :] = u[i, :] where h = o * stride + i * dilation - pad (0 <= i < k), zero elsewhere
// (positions in the zero padding are simply absent). The gather's backward scatters into u.
Tensor band_matrix(const Tensor& u, int64_t n_in, int64_t stride, int64_t pad, int64_t dilation) {
  const int64_t k = u.size(0), r = u.size(1);
  const int64_t n_out = (n_in + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
  std::vector<int64_t> idx(static_cast<size_t>(n_out * n_in), k);  // k: the appended zero row
  for (int64_t o = 0; o < n_out; ++o)
    for (int64_t i = 0; i < k; ++i) {
      const int64_t h = o * stride + i * dilation - pad;
      if (h >= 0 && h < n_in) idx[static_cast<size_t>(o * n_in + h)] = i;
    }
  const Tensor index = at::tensor(idx, u.options().dtype(at::kLong));
  return at::cat({u, at::zeros({1, r}, u.options())}).index_select(0, index).view({n_out, n_in, r});
}

}  // namespace

namespace {

// The GEMMs of separable_branch with a hand-written backward that saves only its inputs (x is
// already kept by the base conv) and recomputes v and w: autograd of the same ops would keep
// x's permuted copy and every intermediate per layer (+26 % peak memory on ConvNeXt-tiny).
// Shapes: x [N, C, H, W]; t2r [r2 Ho, H] (rows (b, ho)); t3r [r3 W, Wo] (rows (d, w));
// mb [r2, C, m, r3]; y [N, C m, Ho, Wo].
//   v[b, ho, n, c, w]       = sum_h T2[ho, h, b] x[n, c, h, w]           one GEMM, all channels
//   w[ho, n, c, j, d, w]    = sum_b M[c, j, b, d] v[b, ho, n, c, w]      per-channel mix
//   y[ho, n, (c, j), wo]    = sum_{d, w} w[..., d, w] T3[wo, w, d]        one GEMM, all channels
// Mixing between the two GEMMs makes the second one r_2 times smaller than mixing at the end.
// The mix runs as one multiply-add per (b, d, j) on strided slices: a broadcast 7-d reduction
// was 30x slower (15 ms against 0.5 ms for 96 channels at 16x16, batch 16).
struct SeparableBranch : public torch::autograd::Function<SeparableBranch> {
  static Tensor coeff(const Tensor& mb, int64_t b, int64_t j, int64_t d) {
    return mb.select(0, b).select(1, j).select(1, d).view({1, 1, mb.size(1), 1});  // M[:, j, b, d]
  }
  // Forward intermediates: xt [H, N C W], v [r2, Ho, N, C, W], w [Ho, N, C, m, r3, W].
  static std::array<Tensor, 3> run(const Tensor& x, const Tensor& t2r, const Tensor& mb) {
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const int64_t r2 = mb.size(0), m = mb.size(2), r3 = mb.size(3), Ho = t2r.size(0) / r2;
    Tensor xt = x.permute({2, 0, 1, 3}).reshape({H, N * C * W});
    Tensor v = t2r.mm(xt).view({r2, Ho, N, C, W});
    Tensor w = at::zeros({Ho, N, C, m, r3, W}, x.options());
    for (int64_t b = 0; b < r2; ++b)
      for (int64_t j = 0; j < m; ++j)
        for (int64_t d = 0; d < r3; ++d) w.select(3, j).select(3, d).addcmul_(v[b], coeff(mb, b, j, d));
    return {xt, v, w};
  }
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& t2r, const Tensor& t3r,
                        const Tensor& mb) {
    ctx->save_for_backward({x, t2r, t3r, mb});
    const int64_t N = x.size(0), C = x.size(1), W = x.size(3);
    const int64_t r2 = mb.size(0), m = mb.size(2), r3 = mb.size(3), Ho = t2r.size(0) / r2, Wo = t3r.size(1);
    const auto parts = run(x, t2r, mb);
    return parts[2].view({Ho * N * C * m, r3 * W}).mm(t3r).view({Ho, N, C * m, Wo}).permute({1, 2, 0, 3});
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &t2r = saved[1], &t3r = saved[2], &mb = saved[3];
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const int64_t r2 = mb.size(0), m = mb.size(2), r3 = mb.size(3), Ho = t2r.size(0) / r2, Wo = t3r.size(1);
    const auto parts = run(x, t2r, mb);
    const Tensor &xt = parts[0], &v = parts[1], &w = parts[2];
    const Tensor gy = grads[0].permute({2, 0, 1, 3}).reshape({Ho * N * C * m, Wo});
    const Tensor grad_t3r = w.view({-1, r3 * W}).t().mm(gy);
    const Tensor grad_w = gy.mm(t3r.t()).view({Ho, N, C, m, r3, W});
    Tensor grad_mb = at::empty({r2, C, m, r3}, x.options());
    Tensor grad_v = at::zeros({r2, Ho, N, C, W}, x.options());
    for (int64_t b = 0; b < r2; ++b)
      for (int64_t j = 0; j < m; ++j)
        for (int64_t d = 0; d < r3; ++d) {
          const Tensor g = grad_w.select(3, j).select(3, d);  // [Ho, N, C, W]
          grad_mb.select(0, b).select(1, j).select(1, d).copy_((v[b] * g).sum(std::vector<int64_t>{0, 1, 3}));
          grad_v[b].addcmul_(g, coeff(mb, b, j, d));
        }
    const Tensor gv = grad_v.view({r2 * Ho, N * C * W});
    const Tensor grad_t2r = gv.mm(xt.t());
    Tensor grad_x;
    if (ctx->needs_input_grad(0)) grad_x = t2r.t().mm(gv).view({H, N, C, W}).permute({1, 2, 0, 3});
    return {grad_x, grad_t2r, grad_t3r, grad_mb};
  }
};

}  // namespace

Tensor separable_branch(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale,
                        const ConvGeometry& geo) {
  check_factors(core, factors, "separable_branch");
  const auto shape = full_shape(core, factors);  // [out, 1, kh, kw]
  if (geo.dims() != 2 || core.dim() != 4 || shape[1] != 1 || x.dim() != 4 || x.size(1) != geo.groups ||
      shape[0] % geo.groups != 0)
    throw InvalidArgument("separable_branch: needs a 2-d conv with in_channels/groups == 1 and input [N, groups, H, W], "
                          "got weight " + format_shape(shape) + ", groups " + std::to_string(geo.groups) +
                          ", input " + format_shape(x.sizes().vec()) +
                          " (hint: use conv_branch or conv_nd(x, dW) for other convs)");
  // M = s * G x_0 U_0 x_1 U_1: [out, 1, r_2, r_3] -> [C, m, r_2, r_3] (m = out / C, the multiplier).
  const int64_t C = geo.groups, out = shape[0], m = out / C;
  Tensor mix = tucker_delta(core, {factors[0], factors[1], Tensor(), Tensor()}, scale);
  const int64_t r2 = mix.size(2), r3 = mix.size(3);
  auto spatial = [&](size_t n) {
    return factors[n].defined() ? factors[n] : at::eye(shape[n], core.options());
  };

  std::vector<int64_t> pad;
  const Tensor in = pad_explicitly(x, geo, pad);
  const int64_t H = in.size(2), W = in.size(3);
  const Tensor t2 = band_matrix(spatial(2), H, geo.stride[0], pad[0], geo.dilation[0]);  // [Ho, H, r2]
  const Tensor t3 = band_matrix(spatial(3), W, geo.stride[1], pad[1], geo.dilation[1]);  // [Wo, W, r3]
  const int64_t Ho = t2.size(0), Wo = t3.size(0);
  const Tensor t2r = t2.permute({2, 0, 1}).reshape({r2 * Ho, H});          // rows (b, ho)
  const Tensor t3r = t3.permute({2, 1, 0}).reshape({r3 * W, Wo});          // rows (d, w)
  const Tensor mb = mix.view({C, m, r2, r3}).permute({2, 0, 1, 3}).contiguous();  // [r2, C, m, r3]
  return SeparableBranch::apply(in, t2r, t3r, mb);
}

namespace {

// The permutation [O, I, k_1..k_d] -> [O, k_1..k_d, I] (channels-last order) and its inverse.
std::vector<int64_t> channels_last_order(int64_t d) {
  std::vector<int64_t> perm{0};
  for (int64_t i = 2; i < 2 + d; ++i) perm.push_back(i);
  perm.push_back(1);
  return perm;
}
std::vector<int64_t> from_channels_last_order(int64_t d) {
  std::vector<int64_t> perm{0, d + 1};
  for (int64_t i = 1; i <= d; ++i) perm.push_back(i);
  return perm;
}

// Wm = W0 + K x_0 U_out x_1 U_in (K [r_0, r_1, k...] already carries s and the kernel factors;
// an undefined factor is an identity mode) as one GEMM, Wm = W0 + U_out T, written straight
// into W0's memory layout: T [r_0, (k, in)] for a channels-last W0, [r_0, (in, k)] otherwise,
// so that W0 viewed as [out, rest] is a view and Wm needs no permute copy. For a ResNet conv at
// 512 channels this is 0.2 ms where two mode products and a layout copy took 1 ms.
Tensor add_product(const Tensor& base, const Tensor& a, const Tensor& b);
Tensor narrow_wide_mm(const Tensor& a, const Tensor& b);

Tensor merged_weight(const Tensor& w0, const Tensor& k, const Tensor& u_out, const Tensor& u_in) {
  const int64_t d = w0.dim() - 2;
  const int64_t O = w0.size(0), I = w0.size(1), ro = k.size(0), ri = k.size(1), kk = k.numel() / (ro * ri);
  const auto cl = d == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  if ((d == 2 || d == 3) && !w0.is_contiguous() && w0.is_contiguous(cl)) {
    const auto to_cl = channels_last_order(d);
    Tensor t = k.permute(to_cl).reshape({ro * kk, ri});
    t = (u_in.defined() ? narrow_wide_mm(t, u_in.t()) : t).reshape({ro, kk * I});
    const Tensor w_cl = w0.permute(to_cl);               // [out, k..., in], contiguous
    const Tensor w2 = w_cl.reshape({O, kk * I});         // a view
    const Tensor wm = u_out.defined() ? add_product(w2, u_out, t) : w2 + t;
    return wm.view(w_cl.sizes()).permute(from_channels_last_order(d));
  }
  const Tensor t = u_in.defined() ? u_in.mm(k.transpose(0, 1).reshape({ri, ro * kk})).view({I, ro, kk}).transpose(0, 1).reshape({ro, I * kk})
                                  : k.reshape({ro, I * kk});
  const Tensor w2 = w0.reshape({O, I * kk});
  const Tensor wm = u_out.defined() ? add_product(w2, u_out, t) : w2 + t;
  return wm.view(w0.sizes());
}

// The fused and hybrid nodes' products where one side is narrow (a rank: 8 to 32 wide):
// flora/detail/narrow_gemm.h's kernels for float32 on an AVX2 + FMA CPU, about 2.5x OpenBLAS's
// speed on these shapes (docs/PERFORMANCE.md, session 19); LibTorch's GEMM otherwise. Rows are
// split over LibTorch's threads in tasks of at least 16 K multiply-adds.
int64_t narrow_grain(int64_t macs_per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, macs_per_row)); }

// Whether a branch on input x with ranks r_out and r_in (0: no such factor) runs its products on
// the narrow kernels: x float32 on the CPU, an AVX2 + FMA CPU, each rank 8 to 32 wide.
bool narrow_ranks(const Tensor& x, int64_t r_out, int64_t r_in) {
  return x.scalar_type() == at::kFloat && x.device().is_cpu() && detail::avx2_fma_enabled() &&
         (r_out == 0 || detail::narrow_width(r_out)) && (r_in == 0 || detail::narrow_width(r_in));
}

// A 2-d float32 CPU tensor (the kernels read raw host memory); with rows, also of unit column
// stride. Shapes that do not fit go to LibTorch, whose GEMM then reports them.
bool narrow_operand(const Tensor& t, bool rows = false) {
  return t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
         (!rows || t.stride(1) == 1 || t.size(1) <= 1) && detail::avx2_fma_enabled();
}

// a b for a [P, K] and b [K, n], n narrow.
Tensor narrow_mm(const Tensor& a, const Tensor& b) {
  if (!narrow_operand(a, true) || !narrow_operand(b) || b.size(0) != a.size(1) || !detail::narrow_width(b.size(1)))
    return a.mm(b);
  const int64_t P = a.size(0), K = a.size(1), n = b.size(1);
  const Tensor bc = b.contiguous();
  Tensor c = at::empty({P, n}, a.options());
  const float* pa = a.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  const int64_t lda = a.stride(0);
  at::parallel_for(0, P, narrow_grain(K * n), [&](int64_t s, int64_t e) {
    detail::narrow_mm(pa + s * lda, lda, pb, pc + s * n, e - s, K, n);
  });
  return c;
}

// a^T b for a [P, K] and b [P, n], n narrow.
Tensor narrow_tmm(const Tensor& a, const Tensor& b) {
  if (!narrow_operand(a, true) || !narrow_operand(b) || b.size(0) != a.size(0) || !detail::narrow_width(b.size(1)))
    return a.t().mm(b);
  const int64_t P = a.size(0), K = a.size(1), n = b.size(1);
  const Tensor bc = b.contiguous();
  Tensor c = at::empty({K, n}, a.options());
  const float* pa = a.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  const int64_t lda = a.stride(0);
  at::parallel_for(0, K, narrow_grain(P * n), [&](int64_t s, int64_t e) {
    detail::narrow_tmm(pa, lda, pb, pc, P, s, e, n);
  });
  return c;
}

// x u into xu and x^T g, in one pass over x (detail::narrow_mm_tmm): x [P, C] with unit column
// stride, u [C, r], g [P, r], xu [P, r] contiguous, r narrow. The rows are split over the threads,
// each adding its share of x^T g into a partial sum of its own. Returns x^T g [C, r], or an
// undefined tensor where the kernels do not apply (nothing written then).
Tensor narrow_mm_tmm(const Tensor& x, const Tensor& u, const Tensor& g, Tensor& xu) {
  if (!narrow_operand(x, true) || !narrow_operand(u) || !narrow_operand(g) || !narrow_operand(xu) ||
      !xu.is_contiguous() || !detail::narrow_width(u.size(1)) || u.size(0) != x.size(1) ||
      g.sizes() != xu.sizes() || xu.size(0) != x.size(0) || xu.size(1) != u.size(1))
    return {};
  const int64_t P = x.size(0), C = x.size(1), r = u.size(1), lda = x.stride(0);
  const Tensor uc = u.contiguous(), gc = g.contiguous();
  Tensor partial = at::zeros({at::get_num_threads(), C, r}, x.options());
  const float* px = x.data_ptr<float>();
  const float* pu = uc.data_ptr<float>();
  const float* pg = gc.data_ptr<float>();
  float* pxu = xu.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, P, narrow_grain(2 * C * r), [&](int64_t s, int64_t e) {
    std::vector<float> scratch(static_cast<size_t>(C * r));
    detail::narrow_mm_tmm(px + s * lda, lda, pu, pg + s * r, pxu + s * r, pp + at::get_thread_num() * C * r,
                          scratch.data(), e - s, C, r);
  });
  return partial.sum(0);
}

// NCHW maps as planes. A contiguous t [N, C, H, W] (or [N, C, L], [N, C, D, H, W]) holds each
// image's channels as rows of its H W pixels, so t's products with a narrow factor are the same
// kernels with the roles swapped, reading t where it lies: t U is narrow_tmm of each image's
// [C, H W] block against U, written as pixel rows (channels-last order), and t^T g is narrow_mm
// of that block against g's rows, with the pixels as the summed side. oneDNN's 1x1 convs reorder NCHW maps first and took 2.2 to 2.9x
// as long at 64 to 256 channels (docs/PERFORMANCE.md, session 22).
bool narrow_planes(const Tensor& t) {
  return t.dim() >= 3 && t.dim() <= 5 && t.numel() > 0 && t.is_contiguous() && t.scalar_type() == at::kFloat &&
         t.device().is_cpu() && detail::avx2_fma_enabled();
}

// The planes kernels' tasks: (image, pixel range) pairs, each image cut into enough ranges that
// every thread has work when there are fewer images than threads.
struct PlaneTasks {
  int64_t images, pixels, parts;
  PlaneTasks(const Tensor& t)
      : images(t.size(0)), pixels(t.numel() / (t.size(0) * t.size(1))),
        parts(std::max<int64_t>(1, (at::get_num_threads() + t.size(0) - 1) / std::max<int64_t>(1, t.size(0)))) {}
  int64_t count() const { return images * parts; }
  int64_t image(int64_t task) const { return task / parts; }
  int64_t begin(int64_t task) const { return pixels * (task % parts) / parts; }
  int64_t end(int64_t task) const { return pixels * (task % parts + 1) / parts; }
};

// t U for t [N, C, H, W] planes and u [C, r], r narrow: pixel rows [N H W, r].
Tensor planes_mm(const Tensor& t, const Tensor& u) {
  const int64_t C = t.size(1), r = u.size(1);
  const PlaneTasks tasks(t);
  const Tensor uc = u.contiguous();
  Tensor c = at::empty({tasks.images * tasks.pixels, r}, t.options());
  const float* pt = t.data_ptr<float>();
  const float* pu = uc.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  at::parallel_for(0, tasks.count(), 1, [&](int64_t s, int64_t e) {
    for (int64_t q = s; q < e; ++q) {
      const int64_t n = tasks.image(q);
      detail::narrow_tmm(pt + n * C * tasks.pixels, tasks.pixels, pu, pc + n * tasks.pixels * r, C, tasks.begin(q),
                         tasks.end(q), r);
    }
  });
  return c;
}

// t^T g summed over the pixels of every image, [C, r], for t [N, C, H, W] planes and g contiguous
// pixel rows [N H W, r]; with u and tu, also tu = t U, each pixel range's two products back to
// back in chunks of at most 512 KB of t (kept in L2 between them: one pass over t). Each thread
// adds into a partial sum of its own.
Tensor planes_tmm(const Tensor& t, const Tensor& g, const Tensor& u = {}, Tensor* tu = nullptr) {
  const int64_t C = t.size(1), r = g.size(1);
  const PlaneTasks tasks(t);
  const Tensor gc = g.contiguous(), uc = u.defined() ? u.contiguous() : Tensor();
  Tensor partial = at::zeros({at::get_num_threads(), C, r}, t.options());
  const float* pt = t.data_ptr<float>();
  const float* pg = gc.data_ptr<float>();
  const float* pu = uc.defined() ? uc.data_ptr<float>() : nullptr;
  float* ptu = tu ? tu->data_ptr<float>() : nullptr;
  float* pp = partial.data_ptr<float>();
  const int64_t chunk = pu ? std::max<int64_t>(64, 131072 / C) : tasks.pixels;
  at::parallel_for(0, tasks.count(), 1, [&](int64_t s, int64_t e) {
    std::vector<float> scratch(static_cast<size_t>(C * r));
    float* acc = pp + at::get_thread_num() * C * r;
    for (int64_t q = s; q < e; ++q) {
      const int64_t n = tasks.image(q);
      const float* plane = pt + n * C * tasks.pixels;
      for (int64_t i = tasks.begin(q); i < tasks.end(q); i += chunk) {
        const int64_t len = std::min(chunk, tasks.end(q) - i);
        if (pu) detail::narrow_tmm(plane, tasks.pixels, pu, ptu + n * tasks.pixels * r, C, i, i + len, r);
        detail::narrow_mm(plane + i, tasks.pixels, pg + (n * tasks.pixels + i) * r, scratch.data(), C, len, r);
        for (int64_t j = 0; j < C * r; ++j) acc[j] += scratch[j];
      }
    }
  });
  return partial.sum(0);
}

// c = base + a b for c [P, m] (unit column stride), a [P, k] with k narrow (at most 32), b [k, m],
// base undefined (no base term), c itself (accumulate in place) or another [P, m] tensor with
// unit column stride: written into c's memory. False where the kernels do not apply (the caller
// uses LibTorch then).
bool narrow_add_mm(Tensor& c, const Tensor& base, const Tensor& a, const Tensor& b) {
  if (!narrow_operand(c, true) || !narrow_operand(a) || !narrow_operand(b) || a.size(0) != c.size(0) ||
      b.size(0) != a.size(1) || b.size(1) != c.size(1) || a.size(1) > 32 ||
      (c.size(0) > 1 && c.stride(0) < c.size(1)) ||  // written: rows must not overlap
      (base.defined() && (!narrow_operand(base, true) || base.sizes() != c.sizes())))
    return false;
  const int64_t P = c.size(0), m = c.size(1), k = a.size(1);
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  const float* pa = ac.data_ptr<float>();
  const float* pb = bc.data_ptr<float>();
  float* pc = c.data_ptr<float>();
  const float* pbase = base.defined() ? base.data_ptr<float>() : nullptr;
  const int64_t ldc = c.stride(0), ldb = base.defined() ? base.stride(0) : 0;
  at::parallel_for(0, P, narrow_grain(k * m), [&](int64_t s, int64_t e) {
    detail::narrow_add_mm(pbase ? pbase + s * ldb : nullptr, ldb, pa + s * k, pb, pc + s * ldc, ldc, e - s, k, m);
  });
  return true;
}

// c (+)= a b in place (narrow_add_mm with c's own values as the base where accumulate).
bool narrow_wide_mm(Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
  return narrow_add_mm(c, accumulate ? c : Tensor(), a, b);
}

// c += a b in place: on the kernels where they apply, LibTorch's addmm_ otherwise.
void add_product_(Tensor& c, const Tensor& a, const Tensor& b) {
  if (!narrow_wide_mm(c, a, b, true)) c.addmm_(a, b);
}

// a b for a [P, k] (k narrow) and b [k, m], a new tensor.
Tensor narrow_wide_mm(const Tensor& a, const Tensor& b) {
  if (!narrow_operand(a) || !narrow_operand(b)) return a.mm(b);  // no output allocated for nothing
  Tensor c = at::empty({a.size(0), b.size(1)}, a.options());
  return narrow_wide_mm(c, a, b, false) ? c : a.mm(b);
}

// base + a b (a [P, k], k narrow): a new contiguous tensor, in one pass over base where the
// kernels apply (the merged weight W0 + U_out T: 397 against addmm's 755 us at 512 channels,
// docs/PERFORMANCE.md session 20).
Tensor add_product(const Tensor& base, const Tensor& a, const Tensor& b) {
  if (!narrow_operand(base, true) || !narrow_operand(a)) return at::addmm(base, a, b);  // no output for nothing
  Tensor c = at::empty(base.sizes(), base.options());
  return narrow_add_mm(c, base, a, b) ? c : at::addmm(base, a, b);
}

// t [N, C, H, W] as rows [N H W, C] (any number of spatial dims): a view where t is
// channels-last, else a copy.
Tensor pixel_rows(const Tensor& t) {
  return t.permute(channels_last_order(t.dim() - 2)).reshape({-1, t.size(1)});
}

// The hybrid node's core conv as separable filters + a channel mix (detail::separable_conv), where
// hybrid_conv finds it cheaper: a 2-d "same" conv (stride 1, dilation 1, zero padding k / 2, odd
// k) with both spatial modes factored, narrow ranks in float32 on the AVX2 kernels. `forward`
// holds z = conv(xp, K)'s operands: gm [rh rw r_in, r_out] = s G as [(a, b, i), o], U_h, U_w;
// `transposed` the core's input gradient's (conv_transpose(gp, K) = the same conv with G's
// channel modes swapped and U_h, U_w flipped along the kernel): [(a, b, o), i]. Detached copies:
// they only compute values, K's own autograd node takes the kernel's gradient.
struct SeparableCore {
  std::vector<Tensor> forward, transposed;  // {gm, uh, uw}
};

// Whether hybrid_conv gives its node a SeparableCore: a 2-d "same" conv (stride 1, dilation 1,
// zero padding k / 2, odd kernels under 64) with both spatial modes factored (factored), where
// the separable form takes at most 3/4 of the direct conv's multiply-adds per pixel both ways
// ((r_w k_w + r_h r_w k_h + r_h r_w c_out) c_in against k_h k_w c_in c_out, c = r_0, r_1).
// ResNet's 3x3 convs at ranks [16, 16, 2, 2]: 1,312 against 2,304.
bool hybrid_core_separable(const ConvGeometry& g, const std::vector<int64_t>& weight, const std::vector<int64_t>& core,
                           bool factored) {
  if (!factored || g.dims() != 2 || weight.size() != 4 || core.size() != 4) return false;
  for (int64_t i = 0; i < 2; ++i) {
    const int64_t k = weight[static_cast<size_t>(2 + i)];
    if (g.stride[i] != 1 || g.dilation[i] != 1 || k % 2 == 0 || k >= 64 || g.padding[i] != k / 2) return false;
  }
  const double kh = static_cast<double>(weight[2]), kw = static_cast<double>(weight[3]);
  const double rh = static_cast<double>(core[2]), rw = static_cast<double>(core[3]);
  auto cheaper = [&](double ci, double co) { return (rw * kw + rh * rw * kh + rh * rw * co) * ci <= 0.75 * kh * kw * ci * co; };
  return cheaper(static_cast<double>(core[1]), static_cast<double>(core[0])) &&
         cheaper(static_cast<double>(core[0]), static_cast<double>(core[1]));
}

// z = conv(t, K) on t's channels-last rows, as a channels-last map [N, co, H, W]; the rows split
// over the threads (each W-filters its rows' inputs once, in its own ring).
Tensor separable_core_conv(const Tensor& t, const std::vector<Tensor>& op) {
  const Tensor &gm = op[0], &uh = op[1], &uw = op[2];
  const int64_t n = t.size(0), ci = t.size(1), h = t.size(2), w = t.size(3), co = gm.size(1);
  Tensor z = at::empty({n, co, h, w}, t.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* x = t.data_ptr<float>();
  float* out = z.data_ptr<float>();
  at::parallel_for(0, n * h, 1, [&](int64_t r0, int64_t r1) {
    detail::separable_conv(x, uh.data_ptr<float>(), uw.data_ptr<float>(), gm.data_ptr<float>(), out, h, w, ci, co,
                           uh.size(0), uh.size(1), uw.size(0), uw.size(1), r0, r1);
  });
  return z;
}

// Whether the node runs its core conv (op: SeparableCore::forward or ::transposed) on t through
// separable_core_conv: t a float32 channels-last CPU map with the op's input channels.
bool separable_takes(const Tensor& t, const std::vector<Tensor>& op) {
  return !op.empty() && t.dim() == 4 && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
         t.is_contiguous(at::MemoryFormat::ChannelsLast) && t.size(1) * op[1].size(1) * op[2].size(1) == op[0].size(0);
}

// The custom conv nodes' geometry (groups 1, zero padding: x arrives padded) and whether a bias
// came, kept in saved_data between forward and backward.
void save_geometry(torch::autograd::AutogradContext* ctx, const ConvGeometry& geo, bool bias) {
  ctx->saved_data["stride"] = geo.stride;
  ctx->saved_data["padding"] = geo.padding;
  ctx->saved_data["dilation"] = geo.dilation;
  ctx->saved_data["bias"] = bias;
}
ConvGeometry saved_geometry(torch::autograd::AutogradContext* ctx) {
  return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), 1, PaddingMode::Zeros};
}
// A custom node's optional input: empty stands for none (custom functions take no undefined tensors).
Tensor present(const Tensor& t) { return t.numel() ? t : Tensor(); }

// Whether this LibTorch's 3-d CPU convolution keeps channels-last-3d maps (1.13's oneDNN path
// copies them to contiguous and returns contiguous outputs; later versions may keep the layout).
bool convs_take_channels_last_3d() {
  static const bool yes = [] {
    torch::NoGradGuard no_grad;
    const auto cl = at::MemoryFormat::ChannelsLast3d;
    const Tensor t = at::zeros({1, 8, 2, 2, 2}).contiguous(cl), w = at::zeros({8, 8, 1, 1, 1}).contiguous(cl);
    return at::conv3d(t, w).is_contiguous(cl);
  }();
  return yes;
}

// The hybrid conv path as one autograd node. Inputs: x (padded already), W0, bias, the core
// conv's kernel K = s G x_2 U_2 ... [r_0, r_1, k...], U_out [out, r_0], U_in [in, r_1]; an
// empty tensor stands for no bias or an identity mode (custom functions take no undefined
// tensors). Forward: y = conv(x, Wm), Wm = W0 + U_out K U_in (merged_weight), exactly the
// merged path's convolution. Backward, from gy:
//   gx   = conv input gradient of gy through Wm        (the frozen layer's own cost)
//   xp   = x U_in, gp = gy U_out                       (1x1 projections to r_1 / r_0 channels)
//   gK   = core conv weight gradient (xp, gp)          (r_0 x r_1 channels)
//   gU_out = sum gy (x) core(xp, K)                    (1x1 weight gradient)
//   gU_in  = sum x (x) core input gradient of gp       (1x1 weight gradient)
// which are the factorized branch's gradients computed without its forward 1x1 to `out`
// channels, its input gradient through U_in, and the two full-size adds (branch + base output,
// input gradient of the branch + the base's); and without the merged path's full weight
// gradient. Saved: x, W0, K and the factors, not Wm: backward rebuilds it (one GEMM, 0.2 ms at
// 512 channels) rather than keep a second copy of every hybrid layer's weight alive from
// forward to backward (11.4 MB, a quarter of FLoRA's extra peak memory, on ResNet-50).
struct HybridConv : public torch::autograd::Function<HybridConv> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w0, const Tensor& b,
                        const Tensor& k, const Tensor& u_out, const Tensor& u_in, const ConvGeometry& geo,
                        const SeparableCore* sep) {
    const Tensor wm = merged_weight(w0, k, present(u_out), present(u_in));
    ctx->save_for_backward({x, w0, k, u_out, u_in});
    save_geometry(ctx, geo, b.numel() > 0);
    if (sep) {
      ctx->saved_data["separable"] = sep->forward;
      ctx->saved_data["separable_t"] = sep->transposed;
    }
    return conv_nd(x, wm, present(b), geo);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (torch::GradMode::is_enabled())  // create_graph: this backward records no history
      throw InvalidArgument("hybrid_conv: double backward (create_graph) is not supported (hint: use conv path merged or factorized)");
    // As forward: the weight's dtype throughout, even if backward() is called inside an autocast scope.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    torch::autograd::variable_list out(8);  // one per forward input: x, w0, b, k, u_out, u_in, geo, sep
    const Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &k = saved[2];
    std::vector<Tensor> sep, sep_t;  // the core conv as separable filters (SeparableCore), where given
    if (ctx->saved_data.count("separable")) {
      sep = ctx->saved_data["separable"].toTensorVector();
      sep_t = ctx->saved_data["separable_t"].toTensorVector();
    }
    const Tensor u_out = present(saved[3]), u_in = present(saved[4]);
    const ConvGeometry geo = saved_geometry(ctx);
    const int64_t d = geo.dims();
    const ConvGeometry one = pointwise_geometry(d, 1);
    auto conv_grads = [d](const Tensor& g, const Tensor& in, const Tensor& w, const ConvGeometry& c, bool want_in, bool want_w) {
      return at::convolution_backward(g, in, w, c10::nullopt, c.stride, c.padding, c.dilation, false,
                                      std::vector<int64_t>(static_cast<size_t>(d), 0), 1, {want_in, want_w, false});
    };
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      const Tensor wm = merged_weight(saved[1], k, u_out, u_in);
      auto r = conv_grads(gy, x, wm, geo, ctx->needs_input_grad(0), ctx->needs_input_grad(1));
      out[0] = std::get<0>(r);
      out[1] = std::get<1>(r);
    }
    if (ctx->needs_input_grad(2) && ctx->saved_data["bias"].toBool()) {
      std::vector<int64_t> dims{0};
      for (int64_t i = 2; i < 2 + d; ++i) dims.push_back(i);
      out[2] = gy.sum(dims);
    }
    const bool want_k = ctx->needs_input_grad(3);
    const bool want_out = u_out.defined() && ctx->needs_input_grad(4);
    const bool want_in = u_in.defined() && ctx->needs_input_grad(5);
    if (!want_k && !want_out && !want_in) return out;
    // Narrow ranks in float32 on AVX2: the four 1x1 steps on flora/detail/narrow_gemm.h's kernels.
    // Contiguous (NCHW, NCL, NCDHW) x and gy as planes (narrow_planes: every size and every
    // spatial order, no copy); otherwise, 2-d only, at small maps (flora::narrow_hybrid_steps) as
    // GEMMs on the pixels' channel rows (narrow_mm, narrow_tmm), views where the tensors are
    // channels-last. Planes and rows both give the core's maps (xp, gp, zc, gxp) channels-last.
    const int64_t r_out = u_out.defined() ? u_out.size(1) : 0, r_in = u_in.defined() ? u_in.size(1) : 0;
    const bool narrow_both = narrow_ranks(x, r_out, r_in);
    const bool planes = narrow_both && narrow_planes(x) && narrow_planes(gy);
    const bool narrow = d == 2 && narrow_both;
    const bool rows = narrow && !planes && narrow_hybrid_steps(static_cast<double>(std::max(x.numel(), gy.numel())));
    auto as_map = [d](const Tensor& r, const Tensor& like) {  // [N H W, c] -> [N, c, H, W], channels-last
      std::vector<int64_t> sizes{like.size(0)};
      for (int64_t i = 2; i < 2 + d; ++i) sizes.push_back(like.size(i));
      sizes.push_back(r.size(1));
      return r.view(sizes).permute(from_channels_last_order(d));
    };
    auto project = [&](const Tensor& t, const Tensor& u) {  // t u: t's channels to u's r, a map
      return planes ? as_map(planes_mm(t, u), t)
             : rows ? as_map(narrow_mm(pixel_rows(t), u), t)
                    : conv_nd(t, pointwise(u.t(), d), {}, one);
    };
    // gy's steps first: the input-gradient conv above has just read gy, so it is still in cache
    // (after the frozen convs, x and gy otherwise come from DRAM at about half the speed; the
    // node's step 0.001 to 0.014 faster at 128/28 and 64/56 than projecting x first,
    // docs/PERFORMANCE.md session 21).
    // The core's convs read the r-channel maps as they lie where oneDNN takes channels-last maps
    // of their order. This LibTorch's 3-d convs do not: each call copied xp and gp to contiguous
    // (three copies of xp and two of gp a step), so 3-d maps go contiguous once, here.
    const bool contiguous_maps = planes && d == 3 && !convs_take_channels_last_3d();
    auto core_map = [&](const Tensor& t) { return contiguous_maps ? t.contiguous() : t; };
    const Tensor gp = u_out.defined() ? core_map(project(gy, u_out)) : gy;
    // x's two products in one pass over x (the core's input gradient first, then x U_in and x^T
    // gxp chunk by chunk): as planes, or on x's rows where they are a view and x has at least
    // 2^18 elements (narrow_mm_tmm). In-process A/B against the two apart on rows, 64/56 0.008 to
    // 0.026 faster, 128/28 up to 0.012, 64/16 0.008 to 0.018; below (256/4, 128/8) level to 0.05
    // slower, the partial sums and the core's split gradients costing more than the pass saves
    // (docs/PERFORMANCE.md, session 21).
    constexpr double kOneXPassElements = 262144.0;
    bool one_x_pass = want_in && (planes || (d == 2 && narrow_ranks(x, 0, r_in) &&
                                             static_cast<double>(x.numel()) >= kOneXPassElements &&
                                             (rows || x.is_contiguous(at::MemoryFormat::ChannelsLast))));
    Tensor xp, gxp;
    if (one_x_pass) {
      Tensor xp_rows = at::empty({x.numel() / x.size(1), r_in}, x.options());
      xp = as_map(xp_rows, x);
      // Only the shape of the input-gradient conv's input is read, not its values (xp is empty).
      const Tensor shape_donor = contiguous_maps ? at::empty(xp.sizes(), xp.options()) : xp;
      gxp = separable_takes(gp, sep_t) ? separable_core_conv(gp, sep_t) : std::get<0>(conv_grads(gp, shape_donor, k, geo, true, false));
      out[5] = planes ? planes_tmm(x, pixel_rows(gxp), u_in, &xp_rows)
                      : narrow_mm_tmm(pixel_rows(x), u_in, pixel_rows(gxp), xp_rows);
      one_x_pass = out[5].defined();  // refused operands: the two products apart, below
      xp = core_map(xp);
    }
    const bool in_apart = want_in && !one_x_pass;
    if (!one_x_pass) xp = u_in.defined() ? core_map(project(x, u_in)) : x;
    if (want_out) {
      const Tensor zc = separable_takes(xp, sep) ? separable_core_conv(xp, sep) : conv_nd(xp, k, {}, geo);
      out[4] = planes ? planes_tmm(gy, pixel_rows(zc))
               : rows ? narrow_tmm(pixel_rows(gy), pixel_rows(zc))
                      : std::get<1>(conv_grads(gy, zc, pointwise(u_out, d), one, false, true)).view(u_out.sizes());
    }
    const bool gxp_separable = in_apart && separable_takes(gp, sep_t);
    if (gxp_separable) gxp = separable_core_conv(gp, sep_t);
    if (want_k || (in_apart && !gxp_separable)) {
      auto r = conv_grads(gp, xp, k, geo, in_apart && !gxp_separable, want_k);
      if (in_apart && !gxp_separable) gxp = std::get<0>(r);
      out[3] = std::get<1>(r);
    }
    if (in_apart)
      out[5] = planes ? planes_tmm(x, pixel_rows(gxp))
               : rows ? narrow_tmm(pixel_rows(x), pixel_rows(gxp))
                      : std::get<1>(conv_grads(gxp, x, pointwise(u_in.t(), d), one, false, true))
                            .view({u_in.size(1), u_in.size(0)})
                            .t();
    return out;
  }
};

}  // namespace

namespace {

// linear(x, W0, b) + x A^T U_out^T as one autograd node, A = s G U_in^T [r, in] (r narrow; A =
// s G where U_in is an identity mode) built inside it, so the core's and U_in's gradients come
// from A's in the node too (no autograd nodes of their own). Forward: A, the base GEMM, then h =
// x A^T (narrow_mm) and y += h U_out^T in place (narrow_add_mm). Backward: gx = gy W0, then gh =
// gy U_out and gx += gh A in place; gU_out = gy^T h and x^T gh (narrow_tmm), whence gG = s (x^T
// gh)^T U_in and gU_in = s (x^T gh) G. So no full-size adds (the branch's output onto the
// base's, its input gradient onto the base's), seven autograd nodes fewer, and the four thin
// products on the narrow kernels rather than OpenBLAS (docs/PERFORMANCE.md, sessions 22 and
// 23). Saved: W0, A, U_out, h ([P, r]), G, U_in and x, or, given a RecomputableInput, its
// sources instead of x (rebuilt for the factor gradients as RecomputedProjection does). With
// create_graph, backward runs the same products as differentiable ATen ops (A rebuilt from G
// and U_in, h from x and A), so double backward is the composition's.
struct AdaptedLinear : public torch::autograd::Function<AdaptedLinear> {
  // A = s G U_in^T (s G without U_in), as linear_branch builds it; u_in is the empty placeholder there.
  static Tensor input_side(const Tensor& core, const Tensor& u_in, const Tensor& u_out, bool has_u_in, double scale) {
    return linear_input_side(core, {u_out, has_u_in ? u_in : Tensor()}, scale);
  }

  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w0, const Tensor& b,
                        const Tensor& core, const Tensor& u_in, const Tensor& u_out, double scale,
                        const RecomputableInput* in) {
    const bool has_u_in = u_in.numel() > 0;
    const Tensor rows = x.view({-1, x.size(-1)});
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = w0.size(0);
    // y is returned as allocated: a view made here would refuse in-place ops on the output (autograd
    // forbids them on views created inside a custom function), y_rows is the same memory.
    Tensor y = at::empty(shape, x.options());
    Tensor y_rows = y.view({-1, w0.size(0)});
    if (b.numel() > 0)
      at::addmm_out(y_rows, b, rows, w0.t());
    else
      at::mm_out(y_rows, rows, w0.t());
    const Tensor a = input_side(core, u_in, u_out, has_u_in, scale);
    const Tensor h = narrow_mm(rows, a.t());
    add_product_(y_rows, h, u_out.t());
    std::vector<Tensor> keep{w0, a, u_out, h, core, u_in};
    if (in) {
      for (const auto& t : in->sources()) keep.push_back(t);
      save_recipe(ctx, *in, AutocastState{});
    } else {
      keep.push_back(x);  // x itself, not a view made here: that would carry no graph for create_graph
    }
    ctx->save_for_backward(keep);
    ctx->saved_data["bias"] = b.numel() > 0;
    ctx->saved_data["u_in"] = has_u_in;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["recompute"] = in != nullptr;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list out(8);  // x, w0, b, core, u_in, u_out, scale, in
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &w0 = saved[0], &u_out = saved[2], &core = saved[4], &u_in = saved[5];
    const bool has_u_in = ctx->saved_data["u_in"].toBool();
    const double scale = ctx->saved_data["scale"].toDouble();
    const bool recompute = ctx->saved_data["recompute"].toBool();
    const bool graph = torch::GradMode::is_enabled();  // create_graph: differentiable ops only
    if (recompute) refuse_create_graph_through_recompute("adapted_linear");
    auto rows = [&] {  // x as [P, in]
      const Tensor x = recompute ? recompute_saved(ctx, std::vector<Tensor>(saved.begin() + 6, saved.end()), core.scalar_type(), "adapted_linear")
                                 : saved[6];
      return x.reshape({-1, x.size(-1)}).contiguous();
    };
    const Tensor a = graph ? input_side(core, u_in, u_out, has_u_in, scale) : saved[1];
    const Tensor gy = grads[0].reshape({-1, w0.size(0)}).contiguous();
    const Tensor h = graph ? rows().mm(a.t()) : saved[3];
    const Tensor gh = graph ? gy.mm(u_out) : narrow_mm(gy, u_out);
    if (ctx->needs_input_grad(0)) {
      Tensor gx = gy.mm(w0);
      if (graph)
        gx = gx + gh.mm(a);
      else
        add_product_(gx, gh, a);
      std::vector<int64_t> shape = grads[0].sizes().vec();
      shape.back() = w0.size(1);
      out[0] = gx.view(shape);
    }
    const bool want_core = ctx->needs_input_grad(3), want_u_in = has_u_in && ctx->needs_input_grad(4);
    const Tensor x = ctx->needs_input_grad(1) || want_core || want_u_in ? rows() : Tensor();
    if (ctx->needs_input_grad(1)) out[1] = gy.t().mm(x);
    if (ctx->needs_input_grad(2) && ctx->saved_data["bias"].toBool()) out[2] = gy.sum(0);
    if (want_core || want_u_in) {
      const Tensor xg = graph ? x.t().mm(gh) * scale : narrow_tmm(x, gh).mul_(scale);  // s (x^T gh) = s gA^T [in, r_out]
      if (want_core) out[3] = has_u_in ? xg.t().mm(u_in) : xg.t();
      if (want_u_in) out[4] = xg.mm(core);
    }
    if (ctx->needs_input_grad(5)) out[5] = graph ? gy.t().mm(h) : narrow_tmm(gy, h);
    return out;
  }
};

// adapted_linear's two overloads: the node where it applies, checked, else the composition.
Tensor adapted_linear_node(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                           const std::vector<Tensor>& factors, double scale, const RecomputableInput* in) {
  check_factors(core, factors, "adapted_linear");
  const int64_t in_features = factors[1].defined() ? factors[1].size(0) : core.size(1);
  if (x.size(-1) != in_features || weight.dim() != 2 || weight.size(1) != in_features || factors[0].size(0) != weight.size(0))
    throw InvalidArgument("adapted_linear: x " + format_shape(x.sizes().vec()) + ", weight " +
                          format_shape(weight.sizes().vec()) + " and the update's [" +
                          std::to_string(factors[0].size(0)) + ", " + std::to_string(in_features) +
                          "] disagree (hint: x [..., in], weight [out, in], factors [out, r_out] and [in, r_in])");
  const Tensor none = at::empty({0}, weight.options());
  return AdaptedLinear::apply(x, weight, bias.defined() ? bias : none, core, factors[1].defined() ? factors[1] : none,
                              factors[0], scale, in);
}

}  // namespace

bool adapted_linear_fuses(const Tensor& x, const Tensor& weight, const Tensor& core, const std::vector<Tensor>& factors) {
  return factors.size() == 2 && factors[0].defined() && core.dim() == 2 && x.dim() >= 1 && x.is_contiguous() &&
         x.numel() > 0 && narrow_ranks(x, core.size(0), 0) && weight.scalar_type() == at::kFloat &&
         core.scalar_type() == at::kFloat && factors[0].scalar_type() == at::kFloat &&
         (!factors[1].defined() || factors[1].scalar_type() == at::kFloat) &&
         !at::autocast::is_cpu_enabled();
}

Tensor adapted_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                      const std::vector<Tensor>& factors, double scale) {
  if (!adapted_linear_fuses(x, weight, core, factors))
    return torch::linear(x, weight, bias) + linear_branch(x, core, factors, scale);
  return adapted_linear_node(x, weight, bias, core, factors, scale, nullptr);
}

Tensor adapted_linear(const RecomputableInput& in, const Tensor& weight, const Tensor& bias, const Tensor& core,
                      const std::vector<Tensor>& factors, double scale) {
  if (!adapted_linear_fuses(in.value(), weight, core, factors))
    return torch::linear(in.value(), weight, bias) + linear_branch(in, core, factors, scale);
  return adapted_linear_node(in.value(), weight, bias, core, factors, scale, &in);
}

Tensor hybrid_conv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                   const std::vector<Tensor>& factors, double scale, const ConvGeometry& geo) {
  check_factors(core, factors, "hybrid_conv");
  const int64_t d = geo.dims();
  if (x.dim() == 1 + d && core.dim() == 2 + d)  // unbatched, as conv1d/2d/3d accept: a batch of one
    return hybrid_conv(x.unsqueeze(0), weight, bias, core, factors, scale, geo).squeeze(0);
  if (core.dim() != 2 + d || weight.dim() != 2 + d || x.dim() != 2 + d)
    throw InvalidArgument("hybrid_conv: " + std::to_string(d) + " spatial dims need a core, weight and input of order " +
                          std::to_string(2 + d) + ", got " + std::to_string(core.dim()) + ", " +
                          std::to_string(weight.dim()) + " and " + std::to_string(x.dim()));
  if (geo.groups != 1)
    throw InvalidArgument("hybrid_conv: groups " + std::to_string(geo.groups) +
                          ", expected 1 (hint: use conv_branch or conv_nd(x, W0 + dW) for grouped convs)");
  if (full_shape(core, factors) != weight.sizes().vec())
    throw InvalidArgument("hybrid_conv: the update's shape " + format_shape(full_shape(core, factors)) +
                          " differs from the weight's " + format_shape(weight.sizes().vec()));
  // A Conv1d as the 2-d conv over [N, C, 1, L] that conv1d itself runs: oneDNN's 2-d convs take
  // the node's channels-last r-channel maps as they are, where conv1d copies each to contiguous
  // first (eight copies of 3.2 MB a step at 64 channels, L 3136; docs/PERFORMANCE.md, session 22).
  if (d == 1) {
    const ConvGeometry g2{{1, geo.stride[0]}, {0, geo.padding[0]}, {1, geo.dilation[0]}, 1, geo.padding_mode};
    const std::vector<Tensor> f2{factors[0], factors[1], Tensor(), factors[2]};
    return hybrid_conv(x.unsqueeze(2), weight.unsqueeze(2), bias, core.unsqueeze(2), f2, scale, g2).squeeze(2);
  }
  // Every tensor in the weight's dtype, autocast off: the hand-written backward runs after any
  // autocast scope has closed, and forward and backward must agree.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  std::vector<Tensor> spatial(factors.size());
  for (size_t n = 2; n < factors.size(); ++n) spatial[n] = factors[n];
  // U_in folded into the core kernel where flora::hybrid_folds_input says (kernels larger than
  // 1x1 and no larger than their stride): the node then sees an identity input mode, and U_in's
  // gradient comes through the kernel's autograd node.
  const Tensor& u_in = factors[1];
  if (u_in.defined()) {
    const auto n = conv_counts(x, std::vector<int64_t>(weight.sizes().begin() + 2, weight.sizes().end()), geo);
    if (hybrid_folds_input(weight.size(1), core.size(1), core.size(0), n.kernel, n.in_pixels, n.out_pixels))
      spatial[1] = u_in;
  }
  const bool folded = spatial[1].defined();
  const auto dtype = weight.scalar_type();
  auto in_dtype = [dtype](const Tensor& t) { return t.defined() && t.scalar_type() != dtype ? t.to(dtype) : t; };
  // [r_0, r_1, k...] in W0's layout (merged_weight then reads it as a view): autograd to G and U_2..
  const Tensor k = in_dtype(tucker_delta(core, spatial, scale, weight_format(weight, d)));
  std::vector<int64_t> pad;
  const Tensor in = pad_explicitly(x.scalar_type() == dtype ? x : x.to(dtype), geo, pad);
  ConvGeometry g = geo;
  g.padding = pad;
  g.padding_mode = PaddingMode::Zeros;  // x is padded already
  const Tensor none = at::empty({0}, weight.options());
  SeparableCore sep;
  const bool separable = !folded && factors[0].defined() && factors[1].defined() &&
                         hybrid_core_separable(g, weight.sizes().vec(), core.sizes().vec(), spatial[2].defined() && spatial[3].defined()) &&
                         narrow_ranks(in, core.size(0), core.size(1)) && core.scalar_type() == at::kFloat &&
                         spatial[2].scalar_type() == at::kFloat && spatial[3].scalar_type() == at::kFloat;
  if (separable) {
    torch::NoGradGuard no_grad;
    const Tensor gs = core.detach() * scale;  // [r_0, r_1, rh, rw]
    const Tensor uh = spatial[2].detach().contiguous(), uw = spatial[3].detach().contiguous();
    const int64_t rk = core.size(2) * core.size(3);
    sep.forward = {gs.permute({2, 3, 1, 0}).reshape({rk * core.size(1), core.size(0)}).contiguous(), uh, uw};
    sep.transposed = {gs.permute({2, 3, 0, 1}).reshape({rk * core.size(0), core.size(1)}).contiguous(), uh.flip(0).contiguous(),
                      uw.flip(0).contiguous()};
  }
  return HybridConv::apply(in, weight, bias.defined() ? in_dtype(bias) : none, k,
                           factors[0].defined() ? in_dtype(factors[0]) : none,
                           factors[1].defined() && !folded ? in_dtype(factors[1]) : none, g, separable ? &sep : nullptr);
}

namespace {

// The windows of a 2-d conv over channels-last rows: x [N H W, c] (contiguous) ->
// col [N Ho Wo, kh kw c], row (n, ho, wo) holding x's rows at (ho s_h - p_h + i d_h,
// wo s_w - p_w + j d_w) for i < kh, j < kw in that order, zeros where a window reaches into the
// padding (im2col, with each pixel's c channels contiguous). `add_back` is its adjoint: every
// segment of col added into the x row it came from (col2im).
struct Windows {
  int64_t n, h, w, c, kh, kw, ho, wo;
  ConvGeometry geo;
  int64_t length() const { return kh * kw * c; }

  Tensor gather(const Tensor& x) const {
    Tensor col = at::empty({n * ho * wo, length()}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "Windows::gather", [&] {
      const scalar_t* src = x.data_ptr<scalar_t>();
      scalar_t* dst = col.data_ptr<scalar_t>();
      const int64_t row = wo * length();
      if (row == 0) return;
      at::parallel_for(0, n * ho, std::max<int64_t>(1, 32768 / row), [&](int64_t b, int64_t e) {
        for (int64_t nh = b; nh < e; ++nh) {
          const int64_t img = nh / ho, oh = nh % ho;
          scalar_t* out = dst + nh * row;
          for (int64_t ow = 0; ow < wo; ++ow)
            for (int64_t i = 0; i < kh; ++i) {
              const int64_t ih = oh * geo.stride[0] - geo.padding[0] + i * geo.dilation[0];
              for (int64_t j = 0; j < kw; ++j, out += c) {
                const int64_t iw = ow * geo.stride[1] - geo.padding[1] + j * geo.dilation[1];
                if (ih < 0 || ih >= h || iw < 0 || iw >= w) std::fill(out, out + c, scalar_t(0));
                else std::copy_n(src + ((img * h + ih) * w + iw) * c, c, out);
              }
            }
        }
      });
    });
    return col;
  }

  Tensor add_back(const Tensor& col) const {
    Tensor x = at::zeros({n * h * w, c}, col.options());
    AT_DISPATCH_FLOATING_TYPES(col.scalar_type(), "Windows::add_back", [&] {
      const scalar_t* src = col.data_ptr<scalar_t>();
      scalar_t* dst = x.data_ptr<scalar_t>();
      const int64_t image = ho * wo * length();
      if (image == 0) return;
      // One image per task: windows overlap within an image only.
      at::parallel_for(0, n, std::max<int64_t>(1, 32768 / image), [&](int64_t b, int64_t e) {
        for (int64_t img = b; img < e; ++img) {
          const scalar_t* in = src + img * image;
          for (int64_t oh = 0; oh < ho; ++oh)
            for (int64_t ow = 0; ow < wo; ++ow)
              for (int64_t i = 0; i < kh; ++i) {
                const int64_t ih = oh * geo.stride[0] - geo.padding[0] + i * geo.dilation[0];
                for (int64_t j = 0; j < kw; ++j, in += c) {
                  const int64_t iw = ow * geo.stride[1] - geo.padding[1] + j * geo.dilation[1];
                  if (ih < 0 || ih >= h || iw < 0 || iw >= w) continue;
                  scalar_t* out = dst + ((img * h + ih) * w + iw) * c;
                  for (int64_t k = 0; k < c; ++k) out[k] += in[k];
                }
              }
        }
      });
    });
    return x;
  }
};

// t += rows ([N H W, C] as pixel_rows reads t), in place: one addmm into t's memory where t is
// channels-last, a strided add otherwise. rows = a b (b given as its transpose's view) or a.
void add_rows(Tensor& t, const Tensor& a, const Tensor& b) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    Tensor rows = t.permute({0, 2, 3, 1}).view({-1, C});
    if (!b.defined()) rows.add_(a);
    else add_product_(rows, a, b);
    return;
  }
  t.permute({0, 2, 3, 1}).add_((b.defined() ? narrow_wide_mm(a, b) : a).view({N, H, W, C}));
}

// conv_nd(x, W0, b, geo) + conv_branch(x, ...) for a 2-d conv with groups 1 as one autograd node,
// the branch as GEMMs on the pixels' channel rows: xp = X U_in [N H W, r_1], z = windows(xp) Kt^T
// [N Ho Wo, r_0] (Kt the core conv's kernel [r_0, (kh, kw, r_1)]), y += z U_out^T in place.
// Backward, from gy's rows Gy:
//   gx   = conv input gradient of gy through W0, then += gxp U_in^T in place
//   gp   = Gy U_out,  gU_out = Gy^T z
//   gKt  = gp^T windows(xp),  gxp = add_back(gp Kt)
//   gU_in = X^T gxp
// At ResNet-18's small maps (layer3 and layer4 at 64-px images: 256 to 1024 pixels a batch) the
// op chain (three convs forward, three convolution backwards, two full-size adds and their
// autograd records) costs 30 to 180 us per op where its arithmetic is a few microseconds; these
// are about 12 GEMMs and loops of that size. Inputs: x (padded already), W0, bias, K [r_0, r_1,
// kh, kw] (with U_in folded in: [r_0, in, kh, kw]), U_out [out, r_0], U_in [in, r_1]; an empty
// tensor stands for no bias or an identity mode. Saved: x, W0, K, the factors, xp and z.
struct FusedFactorizedConv : public torch::autograd::Function<FusedFactorizedConv> {
  static Windows windows(const Tensor& x, const Tensor& k, const ConvGeometry& geo) {
    Windows win{x.size(0), x.size(2), x.size(3), k.size(1), k.size(2), k.size(3), 0, 0, geo};
    const auto out = geo.output_size({win.h, win.w}, {win.kh, win.kw});
    win.ho = out[0];
    win.wo = out[1];
    return win;
  }

  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const Tensor& w0, const Tensor& b,
                        const Tensor& k, const Tensor& u_out, const Tensor& u_in, const ConvGeometry& geo) {
    Tensor y = conv_nd(x, w0, present(b), geo);
    const Windows win = windows(x, k, geo);
    const Tensor rows = pixel_rows(x);
    const Tensor xp = u_in.numel() ? narrow_mm(rows, u_in) : rows.contiguous();
    const Tensor kt = k.permute({0, 2, 3, 1}).reshape({k.size(0), win.length()});
    const Tensor z = narrow_mm(win.gather(xp), kt.t());
    add_rows(y, z, u_out.numel() ? u_out.t() : Tensor());
    ctx->save_for_backward({x, w0, k, u_out, u_in, xp, z});
    save_geometry(ctx, geo, b.numel() > 0);
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (torch::GradMode::is_enabled())  // create_graph: this backward records no history
      throw InvalidArgument("factorized_conv: double backward (create_graph) is not supported (hint: use conv path merged)");
    // As forward: the tensors' own dtype, even if backward() is called inside an autocast scope.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    torch::autograd::variable_list out(7);  // one per forward input: x, w0, b, k, u_out, u_in, geo
    const Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w0 = saved[1], &k = saved[2], &xp = saved[5], &z = saved[6];
    const Tensor u_out = present(saved[3]), u_in = present(saved[4]);
    const ConvGeometry geo = saved_geometry(ctx);
    Tensor gx;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      auto r = at::convolution_backward(gy, x, w0, c10::nullopt, geo.stride, geo.padding, geo.dilation, false, {0, 0}, 1,
                                        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), false});
      gx = std::get<0>(r);
      out[1] = std::get<1>(r);
    }
    if (ctx->needs_input_grad(2) && ctx->saved_data["bias"].toBool()) out[2] = gy.sum({0, 2, 3});
    const bool want_k = ctx->needs_input_grad(3), want_out = u_out.defined() && ctx->needs_input_grad(4);
    const bool want_in = u_in.defined() && ctx->needs_input_grad(5), want_x = gx.defined();
    if (want_k || want_out || want_in || want_x) {
      const Tensor gyr = pixel_rows(gy);
      const Tensor gp = u_out.defined() ? narrow_mm(gyr, u_out) : gyr.contiguous();
      if (want_out) out[4] = narrow_tmm(gyr, z);
      const Windows win = windows(x, k, geo);
      const Tensor kt = k.permute({0, 2, 3, 1}).reshape({k.size(0), win.length()});
      if (want_k)
        out[3] = narrow_tmm(win.gather(xp), gp).t().reshape({k.size(0), win.kh, win.kw, win.c}).permute({0, 3, 1, 2});
      if (want_in || want_x) {
        const Tensor gxp = win.add_back(narrow_wide_mm(gp, kt));
        if (want_in) out[5] = narrow_tmm(pixel_rows(x), gxp);
        if (want_x) add_rows(gx, gxp, u_in.defined() ? u_in.t() : Tensor());
      }
    }
    out[0] = gx;
    return out;
  }
};

}  // namespace

namespace {

// Whether the fused node folds U_in into the core conv's kernel, as the op chain does
// (conv_branch_inner, flora::fold_input_factor) for a groups-1 conv.
bool fused_folds_input(const Tensor& x, const Tensor& weight, const Tensor& core, const std::vector<Tensor>& factors,
                       const ConvGeometry& geo) {
  if (!factors[1].defined()) return false;
  const auto n = conv_counts(x, std::vector<int64_t>(weight.sizes().begin() + 2, weight.sizes().end()), geo);
  return fold_input_factor(weight.size(1), 1, core.size(1), core.size(0), n.kernel, n.in_pixels, n.out_pixels);
}

}  // namespace

bool fused_factorized_applies(const Tensor& x, const Tensor& weight, const Tensor& core, const ConvGeometry& geo) {
  const auto dtype = weight.scalar_type();
  return geo.dims() == 2 && geo.groups == 1 && (x.dim() == 4 || x.dim() == 3) && weight.dim() == 4 && core.dim() == 4 &&
         x.device().is_cpu() && weight.device().is_cpu() && (dtype == at::kFloat || dtype == at::kDouble) &&
         x.scalar_type() == dtype && core.scalar_type() == dtype && !at::autocast::is_cpu_enabled();
}

namespace {

// How factorized_conv runs for input x: as the fused node or not, and its products on the narrow
// GEMMs or not.
struct Fusion {
  bool fuse = false, narrow = false;
};

Fusion factorized_fusion(const Tensor& x, const Tensor& weight, const Tensor& core, const std::vector<Tensor>& factors,
                         const ConvGeometry& geo) {
  Fusion f;
  if (fused_factorized_applies(x, weight, core, geo) && factors.size() == 4) {
    // The im2col matrix: one row per output pixel of the batch, kernel x (r_1, or in where U_in is folded) columns.
    const auto n = conv_counts(x, std::vector<int64_t>(weight.sizes().begin() + 2, weight.sizes().end()), geo);
    const double rows = (x.dim() == 4 ? static_cast<double>(x.size(0)) : 1.0) * n.out_pixels;
    const bool folded = fused_folds_input(x, weight, core, factors, geo);
    const auto columns = n.kernel * (folded ? weight.size(1) : core.size(1));
    // The core's output rank is the width of z and of gy U_out; its input rank that of x U_in,
    // unless U_in is folded or absent.
    f.narrow = narrow_ranks(x, core.size(0), folded || !factors[1].defined() ? 0 : core.size(1));
    f.fuse = fuse_factorized_conv(rows * static_cast<double>(columns), f.narrow);
  }
  return f;
}

}  // namespace

bool factorized_fuses_narrow(const std::vector<int64_t>& input_shape, const Tensor& weight, const Tensor& core,
                             const std::vector<Tensor>& factors, const ConvGeometry& geo) {
  // An input of that shape in the weight's dtype and device, one element broadcast: no memory.
  const Tensor x = at::empty({1}, weight.options()).expand(input_shape);
  const Fusion f = factorized_fusion(x, weight, core, factors, geo);
  return f.fuse && f.narrow;
}

Tensor factorized_conv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                       const std::vector<Tensor>& factors, double scale, const ConvGeometry& geo) {
  if (factorized_fusion(x, weight, core, factors, geo).fuse)
    return fused_factorized_conv(x, weight, bias, core, factors, scale, geo);
  return conv_nd(x, weight, bias, geo) + conv_branch(x, core, factors, scale, geo);
}

Tensor fused_factorized_conv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                             const std::vector<Tensor>& factors, double scale, const ConvGeometry& geo) {
  check_factors(core, factors, "fused_factorized_conv");
  if (x.dim() == 3 && core.dim() == 4)  // unbatched, as conv2d accepts: a batch of one
    return fused_factorized_conv(x.unsqueeze(0), weight, bias, core, factors, scale, geo).squeeze(0);
  if (!fused_factorized_applies(x, weight, core, geo))
    throw InvalidArgument("fused_factorized_conv: needs a 2-d conv with groups 1 on a CPU input [N, C, H, W] of the "
                          "weight's dtype (float or double), outside autocast; got input " + format_shape(x.sizes().vec()) +
                          " (" + std::string(c10::toString(x.scalar_type())) + "), weight " + format_shape(weight.sizes().vec()) +
                          " (" + std::string(c10::toString(weight.scalar_type())) + "), groups " + std::to_string(geo.groups) +
                          " (hint: factorized_conv runs the op chain where this does not apply)");
  if (full_shape(core, factors) != weight.sizes().vec())
    throw InvalidArgument("fused_factorized_conv: the update's shape " + format_shape(full_shape(core, factors)) +
                          " differs from the weight's " + format_shape(weight.sizes().vec()));
  std::vector<int64_t> pad;
  const Tensor in = pad_explicitly(x, geo, pad);
  ConvGeometry g = geo;
  g.padding = pad;
  g.padding_mode = PaddingMode::Zeros;  // x is padded already
  // U_in folded into the core conv's kernel as the op chain folds it (flora::fold_input_factor).
  const Tensor& u_in = factors[1];
  std::vector<Tensor> spatial(factors.size());
  for (size_t n = 2; n < factors.size(); ++n) spatial[n] = factors[n];
  if (fused_folds_input(x, weight, core, factors, geo)) spatial[1] = u_in;
  const Tensor k = tucker_delta(core, spatial, scale, at::MemoryFormat::ChannelsLast);
  const Tensor none = at::empty({0}, weight.options());
  return FusedFactorizedConv::apply(in, weight, bias.defined() ? bias : none, k, factors[0].defined() ? factors[0] : none,
                                    u_in.defined() && !spatial[1].defined() ? u_in : none, g);
}

Tensor embedding_branch(const Tensor& indices, const Tensor& core, const std::vector<Tensor>& factors,
                        double scale, c10::optional<int64_t> padding_idx) {
  check_factors(core, factors, "embedding_branch");
  if (core.dim() != 2) throw InvalidArgument("embedding_branch: core must be [r_num, r_dim], got " + format_shape(core.sizes().vec()));
  Tensor r = scale == 1.0 ? core : core * scale;                // [r_num, r_dim]
  if (factors[1].defined()) r = r.matmul(factors[1].t());       // [r_num, dim]
  const int64_t pad = padding_idx.value_or(-1);
  if (factors[0].defined()) return at::embedding(factors[0], indices, pad).matmul(r);
  return at::embedding(r, indices, pad);  // identity num mode: r has num rows
}

}  // namespace functional
}  // namespace flora
