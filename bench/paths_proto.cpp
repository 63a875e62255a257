// Sessions 19, 21 and 22's prototype measurements (docs/PERFORMANCE.md, "Session 19",
// "Session 21" and "Session 22"), kept so the figures there can be reproduced. Not part of the CMake build (it
// calls flora::functional and flora::detail directly, forcing paths the module would not pick);
// build it against a built libflora.a:
//
//   g++ -O2 -fopenmp -std=gnu++17 -D_GLIBCXX_USE_CXX11_ABI=1 -isystem /usr/include/torch/csrc/api/include \
//     -Iinclude bench/paths_proto.cpp -o /tmp/paths_proto build/libflora.a \
//     -Wl,-rpath,/usr/lib/x86_64-linux-gnu/openblas-openmp /usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3 \
//     -ltorch -ltorch_cpu -lc10
//   /tmp/paths_proto paths    # each 2-d conv path forced, per shape: variant / frozen, 30 interleaved rounds
//   /tmp/paths_proto gemm     # the narrow GEMMs against at::mm, hot, microseconds
//   FLORA_NO_AVX2=1 /tmp/paths_proto paths   # the same without the narrow GEMMs
//   /tmp/paths_proto after   # session 21: a 16-channel step after the frozen convs against alone
//   /tmp/paths_proto planes  # session 22: NCHW 1x1 products as planes against oneDNN, hot
//   /tmp/paths_proto nd      # session 22: hybrid / frozen step for Conv1d (NCL) and Conv3d (NCDHW)
//   /tmp/paths_proto sepcore # session 23: the hybrid core conv as separable filters + a
//                            # channel mix (detail::separable_conv), against oneDNN
#include <torch/torch.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <thread>
#include <tuple>
#include <vector>

#include "flora/detail/narrow_gemm.h"
#include "flora/functional.h"
#include "flora/runtime.h"

namespace F = flora::functional;
using torch::Tensor;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Frozen (conv forward + input gradient) and each path stepped in turn, 30 rounds after 3
// warm-up ones; prints the median of variant / frozen per path. Ranks [16, 16, 2, 2] (kernel
// ranks clipped to the kernel), U_in folded where the kernel equals its stride (as the library
// folds ConvNeXt's 2x2/2 downsampling), channels-last, batch 16.
void paths() {
  const auto cl = at::MemoryFormat::ChannelsLast;
  // in, out, map, kernel, stride, padding
  const std::vector<std::tuple<int, int, int, int, int, int>> shapes{
      {512, 512, 2, 3, 1, 1}, {256, 256, 4, 3, 1, 1}, {128, 128, 8, 3, 1, 1}, {64, 128, 16, 3, 2, 1},
      {192, 384, 8, 2, 2, 0}, {96, 96, 12, 3, 1, 1},  {96, 192, 16, 2, 2, 0}, {64, 64, 16, 3, 1, 1},
      {256, 256, 14, 3, 1, 1}, {512, 512, 7, 3, 1, 1}, {128, 128, 28, 3, 1, 1}, {64, 64, 56, 3, 1, 1}};
  for (const auto& [C, O, H, k, s, p] : shapes) {
    const bool fold = k == s;
    const int kr = std::min(k, 2);
    Tensor x = torch::randn({16, C, H, H}).contiguous(cl).requires_grad_(true);
    Tensor w = (torch::randn({O, C, k, k}) * 0.05).contiguous(cl);
    Tensor core = (fold ? torch::randn({16, C, kr, kr}) : torch::randn({16, 16, kr, kr})).mul(0.1).requires_grad_(true);
    std::vector<Tensor> f{(torch::randn({O, 16}) * 0.1).requires_grad_(true),
                          fold ? Tensor() : (torch::randn({C, 16}) * 0.1).requires_grad_(true),
                          torch::randn({k, kr}).requires_grad_(true), torch::randn({k, kr}).requires_grad_(true)};
    const F::ConvGeometry g{{s, s}, {p, p}, {1, 1}, 1, F::PaddingMode::Zeros};
    const int Ho = (H + 2 * p - k) / s + 1;
    const Tensor gy = torch::randn({16, O, Ho, Ho}).contiguous(cl);
    const std::vector<std::function<Tensor()>> variants{
        [&] { return F::conv_nd(x, w, {}, g); },
        [&] { return F::fused_factorized_conv(x, w, {}, core, f, 0.5, g); },
        [&] { return F::conv_nd(x, w, {}, g) + F::conv_branch(x, core, f, 0.5, g); },
        [&] { return F::hybrid_conv(x, w, {}, core, f, 0.5, g); }};
    auto step = [&](size_t j) {
      const double t0 = now();
      variants[j]().backward(gy);
      const double t = now() - t0;
      x.mutable_grad().reset();
      core.mutable_grad().reset();
      for (auto& t2 : f)
        if (t2.defined()) t2.mutable_grad().reset();
      return t;
    };
    for (int i = 0; i < 3; ++i)
      for (size_t j = 0; j < variants.size(); ++j) step(j);
    std::vector<std::vector<double>> ratio(variants.size());
    for (int i = 0; i < 30; ++i) {
      const double frozen = step(0);
      for (size_t j = 1; j < variants.size(); ++j) ratio[j].push_back(step(j) / frozen);
    }
    const double window = 16.0 * Ho * Ho * k * k * (fold ? C : 16);
    std::printf("%4d -> %4d at %2dx%-2d %dx%d/%d  im2col %8.0f  fused %.3f  chain %.3f  hybrid %.3f\n", C, O, H, H, k, k, s,
                window, median(ratio[1]), median(ratio[2]), median(ratio[3]));
  }
}

template <class Fn>
double time_us(Fn fn) {
  for (int i = 0; i < 10; ++i) fn();
  std::vector<double> v;
  for (int i = 0; i < 200; ++i) {
    const double t0 = now();
    fn();
    v.push_back((now() - t0) * 1e6);
  }
  return median(v);
}

// The narrow GEMMs, rows split over LibTorch's threads as functional.cpp does, against at::mm.
void gemm() {
  torch::NoGradGuard no_grad;
  for (const auto& [P, K] : std::vector<std::pair<int64_t, int64_t>>{{4096, 64}, {1024, 144}, {1024, 128}, {256, 144}}) {
    const Tensor a = torch::randn({P, K}), b = torch::randn({K, 16}), g = torch::randn({P, 16}), u = torch::randn({16, K});
    Tensor c = torch::randn({P, K});
    const double mm = time_us([&] { a.mm(b); });
    const double nmm = time_us([&] {
      Tensor out = at::empty({P, 16});
      at::parallel_for(0, P, std::max<int64_t>(1, 16384 / (K * 16)), [&](int64_t s, int64_t e) {
        flora::detail::narrow_mm(a.data_ptr<float>() + s * K, K, b.data_ptr<float>(), out.data_ptr<float>() + s * 16, e - s, K, 16);
      });
    });
    const double tmm = time_us([&] { a.t().mm(g); });
    const double ntmm = time_us([&] {
      Tensor out = at::empty({K, 16});
      at::parallel_for(0, K, std::max<int64_t>(1, 16384 / (P * 16)), [&](int64_t s, int64_t e) {
        flora::detail::narrow_tmm(a.data_ptr<float>(), K, g.data_ptr<float>(), out.data_ptr<float>(), P, s, e, 16);
      });
    });
    const double add = time_us([&] { c.addmm_(g, u); });
    const double nadd = time_us([&] {
      at::parallel_for(0, P, std::max<int64_t>(1, 16384 / (16 * K)), [&](int64_t s, int64_t e) {
        flora::detail::narrow_wide_mm(g.data_ptr<float>() + s * 16, u.data_ptr<float>(), c.data_ptr<float>() + s * K, K, e - s,
                                      16, K, true);
      });
    });
    std::printf("P %5lld K %4lld | [P,K]x[K,16] mm %6.1f narrow %6.1f | [P,K]^T[P,16] mm %6.1f narrow %6.1f | "
                "[P,16]x[16,K] added mm %6.1f narrow %6.1f us\n",
                static_cast<long long>(P), static_cast<long long>(K), mm, nmm, tmm, ntmm, add, nadd);
  }
}

// Session 21: how much slower the hybrid node's memory-heavy small steps run right after the
// frozen layer's two convs (forward, input gradient) than repeated alone, at 64/56 and 128/28
// (channels-last, batch 16, median of 20 rounds in microseconds). Each row runs something first,
// then times one step: x U_in by oneDNN's 1x1 conv, the same by narrow_mm, or a plain read of x.
void after() {
  torch::NoGradGuard no_grad;
  const auto cl = at::MemoryFormat::ChannelsLast;
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  for (const int64_t C : {64, 128}) {
    const int64_t H = 56 * 64 / C, P = 16 * H * H;
    const Tensor x = torch::randn({16, C, H, H}).contiguous(cl), gy = torch::randn({16, C, H, H}).contiguous(cl);
    const Tensor w = (torch::randn({C, C, 3, 3}) * 0.05).contiguous(cl), u = torch::randn({C, 16});
    const Tensor w1 = u.t().reshape({16, C, 1, 1}).contiguous(cl);
    const Tensor src = torch::randn({1 << 24}), dst = torch::empty({1 << 24});
    Tensor rows = torch::empty({P, 16});
    auto convs = [&] {
      const Tensor y = at::convolution(x, w, {}, one, one, one, false, zero, 1);
      at::convolution_backward(gy, x, w, c10::nullopt, one, one, one, false, zero, 1, {true, false, false});
    };
    const std::vector<std::pair<const char*, std::function<void()>>> steps{
        {"oneDNN 1x1 x U_in", [&] { at::convolution(x, w1, {}, one, zero, one, false, zero, 1); }},
        {"narrow_mm x U_in", [&] {
           at::parallel_for(0, P, 256, [&](int64_t s, int64_t e) {
             flora::detail::narrow_mm(x.data_ptr<float>() + s * C, C, u.data_ptr<float>(), rows.data_ptr<float>() + s * 16,
                                      e - s, C, 16);
           });
         }},
        {"read x (sum)", [&] { x.sum().item<float>(); }}};
    const std::vector<std::pair<const char*, std::function<void(const std::function<void()>&)>>> before{
        {"alone (after itself)", [](const std::function<void()>& f) { f(); }},
        {"after the convs", [&](const std::function<void()>&) { convs(); }},
        {"after the convs, x read", [&](const std::function<void()>&) { convs(); x.sum().item<float>(); }},
        {"after the convs and itself", [&](const std::function<void()>& f) { convs(); f(); }},
        {"after the convs, 3 ms asleep", [&](const std::function<void()>&) {
           convs();
           std::this_thread::sleep_for(std::chrono::milliseconds(3));
         }},
        {"after copying 64 MB", [&](const std::function<void()>&) {
           std::memcpy(dst.data_ptr<float>(), src.data_ptr<float>(), sizeof(float) << 24);
         }}};
    std::printf("%lld ch %lldx%lld:\n", static_cast<long long>(C), static_cast<long long>(H), static_cast<long long>(H));
    for (const auto& [bname, b] : before) {
      std::printf("  %-30s", bname);
      for (const auto& [sname, f] : steps) {
        std::vector<double> v;
        for (int i = 0; i < 25; ++i) {
          b(f);
          const double t0 = now();
          f();
          if (i >= 5) v.push_back((now() - t0) * 1e6);
        }
        std::printf("  %s %6.0f", sname, median(v));
      }
      std::printf("\n");
    }
  }
}

// Session 22: the hybrid node's 1x1 products on NCHW maps, hot, median of 25 in microseconds,
// batch 16, rank 16: oneDNN's 1x1 conv (projection) and 1x1 weight gradient on the NCHW map and
// on its channels-last copy, against the kernels reading each image's [C, H W] block in place
// (narrow_tmm for t U, narrow_mm for t^T g summed over the pixels), one image per task as the
// library splits a batch of 16 over 2 threads.
void planes() {
  torch::NoGradGuard no_grad;
  const std::vector<int64_t> one{1, 1}, zero{0, 0};
  for (const auto& [C, H] : std::vector<std::pair<int64_t, int64_t>>{{64, 56}, {128, 28}, {256, 14}, {512, 7}}) {
    const int64_t N = 16, r = 16, HW = H * H;
    const Tensor x = torch::randn({N, C, H, H}), u = torch::randn({C, r}), g = torch::randn({N, r, H, H});
    const Tensor xcl = x.contiguous(at::MemoryFormat::ChannelsLast), gcl = g.contiguous(at::MemoryFormat::ChannelsLast);
    const Tensor w = u.t().reshape({r, C, 1, 1}).contiguous(), grows = gcl.permute({0, 2, 3, 1}).reshape({-1, r});
    auto time_med = [](const std::function<void()>& f) {
      std::vector<double> v;
      for (int i = 0; i < 28; ++i) {
        const double t0 = now();
        f();
        if (i >= 3) v.push_back((now() - t0) * 1e6);
      }
      return median(v);
    };
    auto wgrad = [&](const Tensor& in, const Tensor& go) {
      at::convolution_backward(go, in, w, c10::nullopt, one, zero, one, false, zero, 1, {false, true, false});
    };
    Tensor rows = torch::empty({N * HW, r});
    const double p_nchw = time_med([&] { at::convolution(x, w, {}, one, zero, one, false, zero, 1); });
    const double p_nhwc = time_med([&] { at::convolution(xcl, w, {}, one, zero, one, false, zero, 1); });
    const double p_planes = time_med([&] {
      at::parallel_for(0, N, 1, [&](int64_t s, int64_t e) {
        for (int64_t n = s; n < e; ++n)
          flora::detail::narrow_tmm(x.data_ptr<float>() + n * C * HW, HW, u.data_ptr<float>(),
                                    rows.data_ptr<float>() + n * HW * r, C, 0, HW, r);
      });
    });
    const double w_nchw = time_med([&] { wgrad(x, g); });
    const double w_nhwc = time_med([&] { wgrad(xcl, gcl); });
    const double w_planes = time_med([&] {
      Tensor partial = at::zeros({at::get_num_threads(), C, r});
      at::parallel_for(0, N, 1, [&](int64_t s, int64_t e) {
        std::vector<float> scratch(static_cast<size_t>(C * r));
        float* acc = partial.data_ptr<float>() + at::get_thread_num() * C * r;
        for (int64_t n = s; n < e; ++n) {
          flora::detail::narrow_mm(x.data_ptr<float>() + n * C * HW, HW, grows.data_ptr<float>() + n * HW * r, scratch.data(),
                                   C, HW, r);
          for (int64_t i = 0; i < C * r; ++i) acc[i] += scratch[i];
        }
      });
      partial.sum(0);
    });
    std::printf("%3lld ch %2lldx%-2lld | t U: oneDNN NCHW %5.0f  channels-last %5.0f  planes %5.0f | "
                "t^T g: oneDNN NCHW %5.0f  channels-last %5.0f  planes %5.0f us\n",
                static_cast<long long>(C), static_cast<long long>(H), static_cast<long long>(H), p_nchw, p_nhwc, p_planes,
                w_nchw, w_nhwc, w_planes);
  }
}

// Session 22: the hybrid path's step against the frozen conv's (forward + input gradient) for
// Conv1d and Conv3d on contiguous maps (NCL, NCDHW: the node reads them as planes), ranks 16 for
// the channels and 2 per kernel mode, batch 16, 20 interleaved rounds after 3 warm-up ones.
void nd() {
  struct Shape {
    const char* name;
    std::vector<int64_t> x, w, ranks;
  };
  const std::vector<Shape> shapes{{"conv1d 64 ch, L 3136", {16, 64, 3136}, {64, 64, 3}, {16, 16, 2}},
                                  {"conv1d 128 ch, L 784", {16, 128, 784}, {128, 128, 3}, {16, 16, 2}},
                                  {"conv3d 64 ch, 4x28x28", {16, 64, 4, 28, 28}, {64, 64, 3, 3, 3}, {16, 16, 2, 2, 2}},
                                  {"conv3d 128 ch, 4x14x14", {16, 128, 4, 14, 14}, {128, 128, 3, 3, 3}, {16, 16, 2, 2, 2}}};
  for (const auto& s : shapes) {
    const Tensor x = torch::randn(s.x).requires_grad_(true);
    const Tensor w = torch::randn(s.w) * 0.05;
    Tensor core = (torch::randn(s.ranks) * 0.1).requires_grad_(true);
    std::vector<Tensor> f;
    for (size_t n = 0; n < s.ranks.size(); ++n) f.push_back((torch::randn({s.w[n], s.ranks[n]}) * 0.1).requires_grad_(true));
    const std::vector<int64_t> one(s.x.size() - 2, 1);
    const F::ConvGeometry g{one, one, one, 1, F::PaddingMode::Zeros};
    const Tensor gy = torch::randn_like(F::conv_nd(x.detach(), w, {}, g));
    auto reset = [&] {
      x.mutable_grad().reset();
      core.mutable_grad().reset();
      for (auto& t : f) t.mutable_grad().reset();
    };
    auto frozen = [&] {
      const double t0 = now();
      F::conv_nd(x, w, {}, g).backward(gy);
      reset();
      return now() - t0;
    };
    auto hybrid = [&] {
      const double t0 = now();
      F::hybrid_conv(x, w, {}, core, f, 0.5, g).backward(gy);
      reset();
      return now() - t0;
    };
    std::vector<double> r;
    for (int i = 0; i < 23; ++i) {
      const double a = frozen(), b = hybrid();
      if (i >= 3) r.push_back(b / a);
    }
    std::printf("%-24s hybrid / frozen %.3f\n", s.name, median(r));
  }
}

}  // namespace

// Session 23: the core conv of the hybrid node (r -> r channels, 3x3, stride 1, padding 1) has
// a kernel of spatial ranks (2, 2): K[o, i] = sum_ab G[o, i, a, b] U_h[:, a] U_w[:, b]^T, so
// z = conv(xp, K) runs as separable filters and a channel mix (detail::separable_conv, which the
// hybrid node calls; first prototyped here as plain loops): 1,312 multiply-adds per pixel
// against 2,304. Checked against oneDNN's conv on each shape; times are medians of 21 calls,
// hot (docs/PERFORMANCE.md, "Session 23").
namespace sepcore_proto {
constexpr int R = 16;
template <class Fn>
double med(Fn f) {  // median of 21 calls after 3, milliseconds
  for (int i = 0; i < 3; ++i) f();
  std::vector<double> v;
  for (int i = 0; i < 21; ++i) {
    const double t = now();
    f();
    v.push_back(now() - t);
  }
  return median(v) * 1e3;
}
}  // namespace sepcore_proto

void sepcore() {
  using namespace sepcore_proto;
  for (int64_t H : {56, 28, 14, 7}) {
    const int64_t N = 16, W = H;
    Tensor xp = torch::randn({N, R, H, W}).contiguous(at::MemoryFormat::ChannelsLast);
    Tensor G = torch::randn({R, R, 2, 2}), uh = torch::randn({3, 2}), uw = torch::randn({3, 2});
    Tensor K = torch::einsum("oiab,ha,wb->oihw", {G, uh, uw}).contiguous(at::MemoryFormat::ChannelsLast);
    Tensor gm = G.permute({2, 3, 1, 0}).reshape({64, R}).contiguous();  // [(a, b, i), o]
    Tensor ref = at::convolution(xp, K, {}, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1);
    Tensor z = torch::empty_like(ref);
    auto run = [&] {
      at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
        flora::detail::separable_conv(xp.data_ptr<float>(), uh.data_ptr<float>(), uw.data_ptr<float>(), gm.data_ptr<float>(),
                                      z.data_ptr<float>(), H, W, R, R, 3, 2, 3, 2, r0, r1);
      });
    };
    run();
    const double err = ((z - ref).abs().max() / ref.abs().max()).item<double>();
    const double onednn = med([&] { at::convolution(xp, K, {}, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1); });
    const double separable = med(run);
    std::printf("r %d, %ldx%ld, batch 16: oneDNN %.2f ms, separable %.2f ms (max relative difference %.1e)\n", R, (long)H, (long)W,
                onednn, separable, err);
  }
}

int main(int argc, char** argv) {
  flora::configure_threads();
  flora::configure_allocator();
  const char* what = argc > 1 ? argv[1] : "paths";
  if (std::strcmp(what, "gemm") == 0) gemm();
  else if (std::strcmp(what, "after") == 0) after();
  else if (std::strcmp(what, "planes") == 0) planes();
  else if (std::strcmp(what, "nd") == 0) nd();
  else if (std::strcmp(what, "sepcore") == 0) sepcore();
  else paths();
  return 0;
}
