// Validation, defaults, parameter counts, contraction planning and the conv cost model.
// Torch-free on purpose: see include/flora/spec.h.
#include "flora/spec.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>

namespace flora {
namespace {

constexpr double kContractionWriteCost = 16.0;
constexpr double kMiddleModeCost = 4.0;

int64_t product(const std::vector<int64_t>& v, size_t from = 0) {
  int64_t p = 1;
  for (size_t i = from; i < v.size(); ++i) p *= v[i];
  return p;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

[[noreturn]] void fail(const TargetInfo& t, const std::string& what, const std::string& hint) {
  std::ostringstream os;
  os << "layer '" << t.name << "' (" << to_string(t.kind) << ", weight " << format_shape(t.shape)
     << "): " << what;
  if (!hint.empty()) os << " (hint: " << hint << ")";
  throw InvalidArgument(os.str());
}

std::string mode_name(const TargetInfo& t, size_t n) {
  switch (t.kind) {
    case LayerKind::Linear: return n == 0 ? "out" : "in";
    case LayerKind::Embedding: return n == 0 ? "num_embeddings" : "embedding_dim";
    case LayerKind::Conv:
      if (n == 0) return "out";
      if (n == 1) return t.groups > 1 ? "in/groups" : "in";
      return "k" + std::to_string(n - 1);
    case LayerKind::Parameter: break;
  }
  return "mode " + std::to_string(n);
}

bool is_spatial_mode(const TargetInfo& t, size_t n) { return t.kind == LayerKind::Conv && n >= 2; }

void validate_target(const TargetInfo& t) {
  if (t.shape.empty()) fail(t, "a weight of order 0 (a scalar) cannot be adapted", "adapt a tensor parameter");
  for (size_t n = 0; n < t.shape.size(); ++n)
    if (t.shape[n] <= 0)
      fail(t, "mode " + std::to_string(n) + " has size " + std::to_string(t.shape[n]) + ", expected > 0",
           "empty weights have nothing to adapt");
  switch (t.kind) {
    case LayerKind::Linear:
    case LayerKind::Embedding:
      if (t.shape.size() != 2)
        fail(t, "expected a 2-D weight, got order " + std::to_string(t.shape.size()), "");
      break;
    case LayerKind::Conv:
      if (t.shape.size() < 3 || t.shape.size() > 5)
        fail(t, "expected a conv weight [out, in/groups, k...] of order 3 to 5, got order " +
                    std::to_string(t.shape.size()), "");
      if (t.groups < 1 || t.shape[0] % t.groups != 0)
        fail(t, "groups " + std::to_string(t.groups) + " do not divide out_channels " + std::to_string(t.shape[0]),
             "out_channels and in_channels must both be multiples of groups");
      break;
    case LayerKind::Parameter: break;
  }
}

}  // namespace

std::string to_string(Method m) { return m == Method::Flora ? "flora" : "lora"; }
std::string to_string(LayerKind k) {
  switch (k) {
    case LayerKind::Linear: return "Linear";
    case LayerKind::Conv: return "Conv";
    case LayerKind::Embedding: return "Embedding";
    case LayerKind::Parameter: return "Parameter";
  }
  return "?";
}
std::string to_string(CoreKind k) {
  switch (k) {
    case CoreKind::Full: return "full";
    case CoreKind::Diagonal: return "diagonal";
    case CoreKind::Identity: return "identity";
  }
  return "?";
}
std::string to_string(Init i) {
  switch (i) {
    case Init::Default: return "default";
    case Init::Authors: return "authors";
    case Init::LoraStyle: return "lora";
    case Init::Orthogonal: return "orthogonal";
  }
  return "?";
}
std::string to_string(ConvPath p) {
  switch (p) {
    case ConvPath::Auto: return "auto";
    case ConvPath::Merged: return "merged";
    case ConvPath::Factorized: return "factorized";
    case ConvPath::Separable: return "separable";
    case ConvPath::Hybrid: return "hybrid";
  }
  return "?";
}

Method parse_method(const std::string& s) {
  const auto v = lower(s);
  if (v == "flora") return Method::Flora;
  if (v == "lora") return Method::Lora;
  throw InvalidArgument("unknown adapter method '" + s + "', expected flora or lora");
}
CoreKind parse_core_kind(const std::string& s) {
  const auto v = lower(s);
  if (v == "full") return CoreKind::Full;
  if (v == "diagonal" || v == "cp") return CoreKind::Diagonal;
  if (v == "identity") return CoreKind::Identity;
  throw InvalidArgument("unknown core kind '" + s + "', expected full, diagonal (cp) or identity");
}
Init parse_init(const std::string& s) {
  const auto v = lower(s);
  if (v == "default") return Init::Default;
  if (v == "authors") return Init::Authors;
  if (v == "lora") return Init::LoraStyle;
  if (v == "orthogonal") return Init::Orthogonal;
  throw InvalidArgument("unknown init '" + s + "', expected default, authors, lora or orthogonal");
}
ConvPath parse_conv_path(const std::string& s) {
  const auto v = lower(s);
  if (v == "auto") return ConvPath::Auto;
  if (v == "merged") return ConvPath::Merged;
  if (v == "factorized") return ConvPath::Factorized;
  if (v == "separable") return ConvPath::Separable;
  if (v == "hybrid") return ConvPath::Hybrid;
  throw InvalidArgument("unknown conv path '" + s + "', expected auto, merged, factorized, separable or hybrid");
}

std::vector<int64_t> AdapterSpec::core_param_shape() const {
  switch (core) {
    case CoreKind::Full: return ranks;
    case CoreKind::Diagonal: return {ranks.empty() ? 0 : ranks[0]};
    case CoreKind::Identity: return {};
  }
  return ranks;
}

void check_scale(double scale, const std::string& where) {
  if (!std::isfinite(scale)) {
    std::ostringstream os;
    os << where << ": scale " << scale << " is not finite, expected a finite number (hint: check alpha, rank and scale)";
    throw InvalidArgument(os.str());
  }
}

AdapterSpec resolve_spec(const AdapterOptions& o, const TargetInfo& t) {
  validate_target(t);
  const size_t N = t.shape.size();
  AdapterSpec s;
  s.method = o.method();
  s.target = t;
  s.conv_path = o.conv_path();
  if (!(o.dropout() >= 0.0 && o.dropout() < 1.0))
    fail(t, "dropout " + std::to_string(o.dropout()) + " is outside [0, 1)", "");
  s.dropout = o.dropout();
  if (t.kind == LayerKind::Embedding && s.dropout > 0.0) {
    s.dropout = 0.0;
    s.notes.push_back("dropout not applied: an Embedding's input is indices (as in PEFT)");
  }
  check_conv_path(t, s.conv_path, s.dropout);

  if (o.method() == Method::Lora) {
    if (!o.ranks().empty())
      fail(t, "LoRA takes one `rank`, got per-mode ranks " + format_shape(o.ranks()), "per-mode ranks are FLoRA's");
    if (!o.identity_modes().empty() || o.core() != CoreKind::Full)
      fail(t, "identity modes and core kinds are FLoRA options, not LoRA's", "use method flora for special cases");
    // PEFT layout: A [r, prod(I_1..)] (a conv with the base's kernel), B [I_0, r].
    const int64_t max_rank = std::min(t.shape[0], product(t.shape, 1));
    int64_t r = o.rank();
    if (r < 1) fail(t, "LoRA rank " + std::to_string(r) + " is invalid, expected >= 1", "");
    if (r > max_rank && !o.allow_redundant_ranks()) {
      if (!o.clip_ranks())
        fail(t, "LoRA rank " + std::to_string(r) + " exceeds min(" + mode_name(t, 0) + ", fan_in) = " +
                    std::to_string(max_rank), "a larger rank cannot raise the update's rank; lower it");
      s.notes.push_back("rank clipped from " + std::to_string(r) + " to " + std::to_string(max_rank));
      r = max_rank;
    }
    s.ranks = t.shape;
    s.ranks[0] = r;
    s.identity.assign(N, true);
    s.identity[0] = false;
    s.core = CoreKind::Full;
    s.alpha = o.alpha();
    s.use_rslora = o.use_rslora();
    s.scale = o.use_rslora() ? o.alpha() / std::sqrt(static_cast<double>(r)) : o.alpha() / static_cast<double>(r);
    check_scale(s.scale, "layer '" + t.name + "'");
    s.init = o.init() == Init::Default ? Init::LoraStyle : o.init();
    return s;
  }

  // FLoRA.
  s.core = o.core();
  if (!o.identity_modes().empty() && o.identity_modes().size() != N)
    fail(t, "identity_modes has " + std::to_string(o.identity_modes().size()) + " entries, expected " +
                std::to_string(N) + " (one per weight mode)", "");
  s.identity = o.identity_modes().empty() ? std::vector<bool>(N, false) : o.identity_modes();
  if (!o.ranks().empty() && o.ranks().size() != N)
    fail(t, "got " + std::to_string(o.ranks().size()) + " ranks " + format_shape(o.ranks()) + ", expected " +
                std::to_string(N) + " (one per weight mode " + format_shape(t.shape) + ")",
         "give one rank per mode, or a single `rank` for every channel mode");
  s.ranks.resize(N);
  std::vector<std::string> clipped;
  for (size_t n = 0; n < N; ++n) {
    if (s.identity[n]) {
      s.ranks[n] = t.shape[n];
      continue;
    }
    const bool automatic = o.ranks().empty();
    int64_t r = automatic ? (is_spatial_mode(t, n) ? o.spatial_rank() : o.rank()) : o.ranks()[n];
    if (r < 1)
      fail(t, "rank " + std::to_string(r) + " for mode " + std::to_string(n) + " (" + mode_name(t, n) +
                  ") is invalid, expected >= 1", "mark the mode identity to leave it unfactored");
    if (r > t.shape[n] && !o.allow_redundant_ranks()) {
      if (!automatic && !o.clip_ranks())
        fail(t, "rank " + std::to_string(r) + " for mode " + std::to_string(n) + " (" + mode_name(t, n) +
                    ") exceeds its size " + std::to_string(t.shape[n]),
             "ranks are per mode and at most the mode size; enable rank clipping to clip");
      clipped.push_back(mode_name(t, n) + " " + std::to_string(r) + "->" + std::to_string(t.shape[n]));
      r = t.shape[n];
    }
    s.ranks[n] = r;
  }
  if (!clipped.empty()) {
    std::string note = "ranks clipped to mode sizes:";
    for (auto& c : clipped) note += " " + c;
    s.notes.push_back(note);
  }
  if (s.core != CoreKind::Full) {
    for (size_t n = 1; n < N; ++n)
      if (s.ranks[n] != s.ranks[0])
        fail(t, "a " + to_string(s.core) + " core needs equal ranks on every mode, got " + format_shape(s.ranks),
             "CP / LoRA special cases use one rank R for all modes");
  }
  check_scale(o.scale(), "layer '" + t.name + "'");
  s.scale = o.scale();
  s.init = o.init();
  if (s.init == Init::Default) s.init = s.core == CoreKind::Identity ? Init::LoraStyle : Init::Authors;
  return s;
}

int64_t parameter_count(const AdapterSpec& s) {
  int64_t n = 0;
  switch (s.core) {
    case CoreKind::Full: n = product(s.ranks); break;
    case CoreKind::Diagonal: n = s.ranks.empty() ? 0 : s.ranks[0]; break;
    case CoreKind::Identity: n = 0; break;
  }
  for (size_t m = 0; m < s.ranks.size(); ++m)
    if (!s.identity[m]) n += s.target.shape[m] * s.ranks[m];
  return n;
}

int64_t lora_parameter_count(const std::vector<int64_t>& shape, int64_t rank) {
  if (shape.empty()) return 0;
  return rank * (shape[0] + product(shape, 1));
}

ContractionPlan plan_contraction(const std::vector<int64_t>& shape, const std::vector<int64_t>& ranks,
                                 const std::vector<bool>& identity) {
  // Each step costs its multiply-adds (elements written x r_n) plus kContractionWriteCost per
  // element written: steps with small r_n are memory-bound, and a float written costs about as
  // much as tens of multiply-adds on a CPU (measured: docs/PERFORMANCE.md).
  std::vector<int64_t> modes;
  for (size_t n = 0; n < shape.size(); ++n)
    if (!identity[n]) modes.push_back(static_cast<int64_t>(n));
  const size_t F = modes.size();
  if (F > 20) throw Error("plan_contraction: " + std::to_string(F) + " factored modes, at most 20 supported");
  const size_t S = size_t{1} << F;
  std::vector<double> best(S, std::numeric_limits<double>::infinity());
  std::vector<int> parent(S, -1);
  best[0] = 0;
  for (size_t mask = 0; mask < S; ++mask) {
    if (!std::isfinite(best[mask])) continue;
    // Elements of the partially contracted tensor: I_n on applied modes, r_n elsewhere.
    double elems = 1;
    for (size_t n = 0; n < shape.size(); ++n) elems *= static_cast<double>(ranks[n]);
    for (size_t i = 0; i < F; ++i)
      if (mask & (size_t{1} << i)) elems = elems / static_cast<double>(ranks[modes[i]]) * shape[modes[i]];
    for (size_t i = 0; i < F; ++i) {
      if (mask & (size_t{1} << i)) continue;
      const size_t next = mask | (size_t{1} << i);
      const double r = static_cast<double>(ranks[modes[i]]), I = static_cast<double>(shape[modes[i]]);
      const double written = elems / r * I;
      // Middle modes run as many small batched GEMMs; first/last modes as one large GEMM.
      const bool middle = modes[i] != 0 && modes[i] != static_cast<int64_t>(shape.size()) - 1;
      const double cost = best[mask] + written * (r + kContractionWriteCost + (middle ? kMiddleModeCost : 0.0));
      if (cost < best[next]) {
        best[next] = cost;
        parent[next] = static_cast<int>(i);
      }
    }
  }
  ContractionPlan plan;
  plan.macs = best[S - 1];
  for (size_t mask = S - 1; mask != 0;) {
    const int i = parent[mask];
    plan.order.push_back(modes[i]);
    mask &= ~(size_t{1} << i);
  }
  std::reverse(plan.order.begin(), plan.order.end());
  return plan;
}

bool separable_applies(const TargetInfo& t) {
  return t.kind == LayerKind::Conv && t.shape.size() == 4 && t.shape[1] == 1;
}

bool hybrid_applies(const TargetInfo& t) { return t.kind == LayerKind::Conv && t.groups == 1; }

void check_conv_path(const TargetInfo& t, ConvPath path, double dropout) {
  if (path == ConvPath::Hybrid) {
    if (t.kind != LayerKind::Conv) return;  // a conv path means nothing to other layers
    if (!hybrid_applies(t))
      fail(t, "conv path 'hybrid' needs groups == 1, got groups " + std::to_string(t.groups),
           "use conv path auto, merged or factorized for grouped convs; restrict --targets to the other convs to use hybrid on them");
    if (dropout > 0.0)
      fail(t, "conv path 'hybrid' runs one conv for the base and the update, so it cannot drop the adapter's input: dropout " +
                  std::to_string(dropout) + ", expected 0",
           "use conv path auto or factorized with dropout");
    return;
  }
  if (path != ConvPath::Separable || separable_applies(t)) return;
  std::ostringstream what;
  what << "conv path 'separable' needs a 2-d convolution with in_channels/groups == 1 (weight [out, 1, kh, kw]), got ";
  if (t.kind != LayerKind::Conv)
    what << "a " << to_string(t.kind) << " layer";
  else if (t.shape.size() != 4)
    what << "a " << (t.shape.size() - 2) << "-d convolution";
  else
    what << "in_channels/groups = " << t.shape[1] << " (groups " << t.groups << ")";
  fail(t, what.str(), "use conv path auto, merged or factorized here; restrict --targets to the depthwise convs to use separable on them");
}

bool fold_input_factor(int64_t in_channels, int64_t groups, int64_t r_in, int64_t r_out, int64_t kernel_elements,
                       double in_pixels, double out_pixels) {
  const double cin_g = static_cast<double>(in_channels) / static_cast<double>(groups);
  const double g = static_cast<double>(groups), K = static_cast<double>(kernel_elements);
  const double folded = out_pixels * g * static_cast<double>(r_out) * cin_g * K;
  const double unfolded = in_pixels * static_cast<double>(in_channels) * static_cast<double>(r_in) +
                          out_pixels * g * static_cast<double>(r_out) * static_cast<double>(r_in) * K;
  return folded <= unfolded;
}

bool hybrid_folds_input(int64_t in_channels, int64_t r_in, int64_t r_out, int64_t kernel_elements, double in_pixels,
                        double out_pixels) {
  return kernel_elements > 1 && out_pixels * static_cast<double>(kernel_elements) <= in_pixels &&
         fold_input_factor(in_channels, 1, r_in, r_out, kernel_elements, in_pixels, out_pixels);
}

bool fuse_factorized_conv(double window_elements, bool narrow_kernels) {
  return window_elements <= (narrow_kernels ? 262144.0 : 131072.0);
}

bool narrow_hybrid_steps(double activation_elements) { return activation_elements <= 1048576.0; }

ConvPathCosts conv_path_costs(const AdapterSpec& s, const ConvCostInput& in) {
  // Multiply-adds, plus memory traffic of the extra activations weighted by kMemCost
  // (on CPU a float moved costs about as much as several multiply-adds; see docs/DESIGN.md).
  constexpr double kMemCost = 8.0;
  // The weight gradient of a depthwise conv (groups > 1, in/groups == 1) runs below the speed of
  // its forward even as functional::conv_nd computes it (one batch-folded forward conv: 0.41 ms
  // against the forward's 0.28 ms for 96 ch 7x7 on 16x16, batch 16; oneDNN's own took 6.6 ms).
  // Charged as this many multiply-adds per base one.
  constexpr double kDepthwiseWeightGradCost = 1.5;
  const double p_out = static_cast<double>(in.batch) * static_cast<double>(product(in.out_spatial));
  const double p_in = static_cast<double>(in.batch) * static_cast<double>(product(in.in_spatial));
  const double K = static_cast<double>(product(in.kernel));
  const double cin_g = static_cast<double>(in.in_channels) / static_cast<double>(in.groups);
  const double out = static_cast<double>(in.out_channels);
  const double g = static_cast<double>(in.groups);
  const double B = p_out * out * cin_g * K;
  const bool depthwise = in.groups > 1 && in.in_channels == in.groups;

  ConvPathCosts c;
  const bool grad_in = in.training && in.input_requires_grad;
  c.base = B * (grad_in ? 2.0 : 1.0);

  const double build = plan_contraction(s.target.shape, s.ranks, s.identity).macs;
  if (!in.training) {
    // Inference: dW is built once and cached (TuckerAdapter::delta_weight), so the merged path
    // costs exactly the base conv on every later call.
    c.merged = in.dropout ? B : 0.0;
  } else {
    c.merged = B /*weight grad*/ * (depthwise ? kDepthwiseWeightGradCost : 1.0) + 3.0 * build;
    if (in.dropout) c.merged += B /*second forward*/ + (grad_in ? B : 0.0);
  }

  const double r_out = static_cast<double>(s.ranks[0]);
  const double r_in = static_cast<double>(s.ranks[1]);
  // Folding U_in into the core conv (functional::conv_branch) removes step 1.
  const bool fold_in = !s.identity[1] && fold_input_factor(in.in_channels, in.groups, s.ranks[1], s.ranks[0],
                                                           static_cast<int64_t>(K), product(in.in_spatial), product(in.out_spatial));
  const bool step1 = !s.identity[1] && !fold_in;
  const double s1 = step1 ? p_in * static_cast<double>(in.in_channels) * r_in : 0.0;
  const double s2 = p_out * g * r_out * (fold_in ? cin_g : r_in) * K;
  const double s3 = s.identity[0] ? 0.0 : p_out * out * r_out;
  const double traffic = (step1 ? p_in * g * r_in : 0.0) + p_out * g * r_out + p_out * out;
  if (!in.training) {
    c.factorized = s1 + s2 + s3 + kMemCost * traffic;
  } else {
    c.factorized = s1 * (grad_in ? 3.0 : 2.0) + 3.0 * s2 + 3.0 * s3 + 2.0 * kMemCost * traffic;
  }

  // Separable (2-d, in/groups == 1), functional::separable_branch: a dense banded GEMM over all
  // channels (v = T_2 [r_2 Ho, H] x [H, N C W]), the per-channel mix with M into
  // w [Ho, N, out, r_3, W] (elementwise), a second GEMM w [Ho N out, r_3 W] T_3 [r_3 W, Wo].
  // T_2, T_3 are dense in H and W, which is why large images favour the merged path. Backward
  // recomputes v and w (memory: nothing saved beyond x), hence 4 passes of the first GEMM and
  // the mix, 3 of the second. The mix is charged as memory traffic (3 floats per multiply-add:
  // strided slices whose contiguous runs are only W long): with identity spatial modes (LoRA,
  // r_2 = r_3 = k) it has k^2 terms and the path measured 1.6x slower than merged on ConvNeXt.
  c.separable = std::numeric_limits<double>::infinity();
  if (separable_applies(s.target) && in.kernel.size() == 2 && in.in_spatial.size() == 2) {
    const double N = static_cast<double>(in.batch), C = static_cast<double>(in.in_channels);
    const double H = static_cast<double>(in.in_spatial[0]), W = static_cast<double>(in.in_spatial[1]);
    const double Ho = static_cast<double>(in.out_spatial[0]), Wo = static_cast<double>(in.out_spatial[1]);
    const double r2 = static_cast<double>(s.ranks[2]), r3 = static_cast<double>(s.ranks[3]);
    const double sv = N * C * W * H * r2 * Ho;
    const double mix = Ho * N * out * W * r2 * r3;
    const double sh = Ho * N * out * r3 * W * Wo;
    const double moved = N * C * H * W + N * C * r2 * Ho * W + Ho * N * out * r3 * W + p_out * out;
    if (!in.training)
      c.separable = sv + 3.0 * kMemCost * mix + sh + kMemCost * moved;
    else
      c.separable = sv * (grad_in ? 4.0 : 3.0) + 4.0 * 3.0 * kMemCost * mix + 3.0 * sh + 2.0 * kMemCost * moved;
  }

  // Hybrid (functional::hybrid_conv; groups 1, training, no active dropout): the base conv runs
  // with Wm = W0 + dW at the frozen layer's own cost. Extra: the 1x1 projections x U_in and
  // gy U_out, the core conv's weight gradient, its forward (for U_out's gradient) and input
  // gradient (for U_in's), the two 1x1 weight gradients, and Wm built by GEMMs (r_0 K in r_1 +
  // out r_0 K in multiply-adds), W0 read and Wm written. The r-channel tensors are charged as
  // the factorized branch's are; there is no full-size add. Backward rebuilds Wm instead of
  // keeping it; that second build's multiply-adds are charged, its memory traffic is not.
  // Charging the GEMM sends three of ResNet-18's layer2 convs (128 channels at 8x8 for 64-px
  // images) and nine of ResNet-50's to factorized: on session 15's machine 0.8 % faster per
  // ResNet-18 step at 2 threads, level at 1 thread (on session 12's the same choice measured 1 to
  // 2 % slower at 1 thread). Charging the traffic as well also moved 256 channels at 14x14 to
  // factorized, 2 % slower there (1.17x against 1.15x the frozen layer; docs/PERFORMANCE.md,
  // "Memory: the allocator and the optimizer's buckets").
  // Where U_in is folded into the core kernel (hybrid_folds_input), the core conv runs on the `in`
  // channels of x and its input-gradient pass, the projection and U_in's 1x1 gradient go.
  c.hybrid = std::numeric_limits<double>::infinity();
  if (in.training && in.groups == 1 && !in.dropout && !in.autocast) {
    const double cin = static_cast<double>(in.in_channels);
    const double weight = out * cin * K;
    const bool fold = !s.identity[1] && hybrid_folds_input(in.in_channels, s.ranks[1], s.ranks[0], static_cast<int64_t>(K),
                                                           product(in.in_spatial), product(in.out_spatial));
    const bool project_in = !s.identity[1] && !fold;
    const double proj_in = project_in ? p_in * cin * r_in : 0.0;
    const double proj_out = s.identity[0] ? 0.0 : p_out * out * r_out;
    const double core_passes = 1.0 + (s.identity[0] ? 0.0 : 1.0) + (project_in ? 1.0 : 0.0);
    const double core_in = fold ? cin : r_in;
    const double build = (s.identity[1] ? 0.0 : r_out * K * cin * r_in) + (s.identity[0] ? 0.0 : weight * r_out);
    const double moved = (project_in ? 2.0 * p_in * r_in : 0.0) + (s.identity[0] ? 0.0 : 2.0 * p_out * r_out);
    c.hybrid = 2.0 * proj_in + 2.0 * proj_out + core_passes * p_out * r_out * core_in * K + 2.0 * build +
               kMemCost * (2.0 * weight + 2.0 * moved);
  }

  if (s.conv_path != ConvPath::Auto) {
    c.choice = s.conv_path;
  } else {
    // Separable is estimated but never chosen here: its many small operations scale worse with
    // threads than this model can say (on ConvNeXt-tiny at 2 threads it measured 1.54x the frozen
    // step when merged measured 1.27x; docs/PERFORMANCE.md). It stays an explicit choice.
    c.choice = c.factorized < c.merged ? ConvPath::Factorized : ConvPath::Merged;
    // Where the factorized path runs as the fused node on the narrow GEMMs it measured faster than
    // hybrid at every such shape (docs/PERFORMANCE.md, "Session 19", bench/paths_proto.cpp:
    // 64 -> 128 3x3/2 at 8x8 1.66x against 1.68x, 128 ch 8x8 1.29x against 1.33x, 512 ch 7x7
    // 1.06x against 1.13x, ConvNeXt's 192 -> 384 2x2/2 1.40x against 1.47x), which this model's
    // per-op charges for the branch's convs do not see.
    if (c.hybrid < std::min(c.factorized, c.merged) && !(in.fused_narrow && c.factorized < c.merged))
      c.choice = ConvPath::Hybrid;
  }
  return c;
}

std::string format_count(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace flora
