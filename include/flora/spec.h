// flora/spec.h: what an adapter is, before any tensor exists.
//
// This header has no LibTorch dependency: it is the shape algebra of FLoRA and LoRA, usable from
// a parameter calculator as well as from the layers.
//
// Usage:
//   1. Fill an AdapterOptions (method, ranks or rank, scale or alpha, special-case switches).
//   2. resolve_spec(options, target) validates them against one weight (its shape, its layer
//      kind, its conv groups) and returns an AdapterSpec: one rank per weight mode, which modes
//      are identity, the effective scale, the initialization. Bad values throw flora::Error
//      naming the layer, the value, what was expected and a hint.
//   3. parameter_count(spec) gives the trainable parameter count; plan_contraction(spec) the
//      cheapest order of mode products to materialize dW.
//
// Shape conventions (the weight's own mode order, as PyTorch stores it):
//   Linear    [out, in]
//   ConvNd    [out, in/groups, k_1, ..., k_d]
//   Embedding [num_embeddings, embedding_dim]
//   Parameter any shape [I_0, ..., I_{N-1}]
// FLoRA: dW = s * G x_0 U_0 x_1 U_1 ... x_{N-1} U_{N-1}, G [r_0..r_{N-1}], U_n [I_n, r_n].
// A mode marked identity has no factor; the core keeps size I_n there.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace flora {

/// Every error flora throws: what, where, expected vs got, and a hint, in one line.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A bad value supplied by the caller (options, shapes, flags): the command line exits 2.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// The adapter family. LoRA is FLoRA's special case with every mode but the first identity
/// (see docs/DESIGN.md): one implementation, two parameterizations.
enum class Method { Flora, Lora };

/// What kind of layer owns the adapted weight; decides mode names, defaults and LoRA layout.
enum class LayerKind { Linear, Conv, Embedding, Parameter };

/// How the core tensor G is parameterized.
enum class CoreKind {
  Full,      ///< G is a dense trainable [r_0..r_{N-1}] tensor (FLoRA).
  Diagonal,  ///< G is super-diagonal with R trainable values (N=2: SVD-style; N>2: CP).
  Identity,  ///< G is the fixed super-diagonal identity (N=2: plain LoRA dW = s U_0 U_1^T).
};

/// Parameter initialization.
enum class Init {
  Default,    ///< Authors for FLoRA, LoraStyle for LoRA.
  Authors,    ///< Core 0; factors Kaiming-normal a = sqrt(3), i.e. N(0, 1/(2 r_n)).
  LoraStyle,  ///< Mode-0 factor 0; core and other factors Kaiming-uniform a = sqrt(5)
              ///< (Embedding under LoRA: core N(0, 1), as PEFT's lora_embedding_B).
  Orthogonal, ///< Core 0; factors with orthonormal columns.
};

/// Which forward path a convolution uses (Linear is always factorized, Embedding gathers).
enum class ConvPath {
  Auto,        ///< Per call, by the cost model in conv_path_costs().
  Merged,      ///< conv(x, W0 + dW): one convolution, full weight gradient in backward.
  Factorized,  ///< base conv + 1x1 (in->r_1) -> core conv (k, stride, ...) -> 1x1 (r_0->out).
  Separable,   ///< Conv2d with in/groups == 1 (depthwise): base conv + the update as r_2 * r_3
               ///< shared separable spatial filters (GEMMs over all channels) mixed per channel
               ///< by M = s G x_0 U_0 x_1 U_1. No depthwise weight gradient is ever computed.
  Hybrid,      ///< groups == 1, no adapter dropout: conv(x, W0 + dW) forward and input gradient (as
               ///< merged); the adapter's gradients from r-channel projections (as factorized).
               ///< Under no-grad it is the merged path.
};

std::string to_string(Method m);
std::string to_string(LayerKind k);
std::string to_string(CoreKind k);
std::string to_string(Init i);
std::string to_string(ConvPath p);
Method parse_method(const std::string& s);
CoreKind parse_core_kind(const std::string& s);
Init parse_init(const std::string& s);
ConvPath parse_conv_path(const std::string& s);

/// Declares `name_` with a getter `name()` and a chainable setter `name(value)`, as TORCH_ARG.
#define FLORA_ARG(T, name)                                  \
 public:                                                    \
  auto name(const T& new_##name)->decltype(*this) {         \
    this->name##_ = new_##name;                             \
    return *this;                                           \
  }                                                         \
  const T& name() const noexcept { return this->name##_; } \
                                                            \
 private:                                                   \
  T name##_

/// How to build one adapter. Every field has a default; resolve_spec() validates.
struct AdapterOptions {
  AdapterOptions() = default;
  /// FLoRA (Tucker update) or LoRA (PEFT semantics).
  FLORA_ARG(Method, method) = Method::Flora;
  /// FLoRA: one rank per weight mode, in the weight's order; empty means `rank` for channel
  /// modes and `spatial_rank` for kernel modes. Entries of identity modes are ignored.
  FLORA_ARG(std::vector<int64_t>, ranks);
  /// LoRA rank r; FLoRA rank of every channel mode when `ranks` is empty.
  FLORA_ARG(int64_t, rank) = 8;
  /// FLoRA rank of every kernel (spatial) mode of a conv when `ranks` is empty.
  FLORA_ARG(int64_t, spatial_rank) = 2;
  /// FLoRA scale s (replaces LoRA's alpha / r). Must be finite.
  FLORA_ARG(double, scale) = 1.0;
  /// LoRA alpha: scaling = alpha / r (alpha / sqrt(r) with use_rslora).
  FLORA_ARG(double, alpha) = 8.0;
  /// LoRA: rank-stabilized scaling alpha / sqrt(r).
  FLORA_ARG(bool, use_rslora) = false;
  /// FLoRA: modes with no factor (core keeps full size there). Empty, or one flag per mode.
  FLORA_ARG(std::vector<bool>, identity_modes);
  /// FLoRA: core parameterization (Full, Diagonal = CP, Identity = LoRA).
  FLORA_ARG(CoreKind, core) = CoreKind::Full;
  /// Initialization scheme.
  FLORA_ARG(Init, init) = Init::Default;
  /// Dropout probability on the adapter's input, in [0, 1).
  FLORA_ARG(double, dropout) = 0.0;
  /// Conv forward path; Auto uses the cost model.
  FLORA_ARG(ConvPath, conv_path) = ConvPath::Auto;
  /// Clip ranks larger than their mode to the mode size (and record a note) instead of failing.
  FLORA_ARG(bool, clip_ranks) = false;
  /// Accept ranks above the mode size (FLoRA) or min(out, fan_in) (LoRA) as given: they cannot
  /// raise the update's rank, but saved adapters may have them (PEFT's grouped-conv layout
  /// repeats lora_A per group). Loading sets it.
  FLORA_ARG(bool, allow_redundant_ranks) = false;
};

/// The weight an adapter is built for.
struct TargetInfo {
  /// Name for messages, e.g. "layer1.0.conv1".
  std::string name = "<layer>";
  LayerKind kind = LayerKind::Parameter;
  /// The weight's shape in its own mode order (see file comment).
  std::vector<int64_t> shape;
  /// Conv groups (1 for everything else); shape[1] is already in/groups.
  int64_t groups = 1;
};

/// A validated adapter: everything needed to allocate, initialize and count it.
struct AdapterSpec {
  Method method = Method::Flora;
  TargetInfo target;
  std::vector<int64_t> ranks;    ///< r_n per mode; r_n == I_n on identity modes
  std::vector<bool> identity;    ///< per mode: no factor
  CoreKind core = CoreKind::Full;
  double scale = 1.0;            ///< the effective s (LoRA: alpha / r or alpha / sqrt(r))
  double alpha = 8.0;            ///< LoRA alpha, kept for export
  bool use_rslora = false;
  Init init = Init::Authors;     ///< never Default once resolved
  double dropout = 0.0;
  ConvPath conv_path = ConvPath::Auto;
  std::vector<std::string> notes;  ///< e.g. ranks clipped

  int64_t order() const { return static_cast<int64_t>(ranks.size()); }
  /// Shape of the stored core parameter ([R] for Diagonal, [] for Identity).
  std::vector<int64_t> core_param_shape() const;
  /// Shape of the full core tensor G.
  const std::vector<int64_t>& core_shape() const { return ranks; }
};

/// Validate options against a target and resolve every default. Throws flora::Error.
AdapterSpec resolve_spec(const AdapterOptions& options, const TargetInfo& target);

/// Check that a scale is usable (finite); throws naming `where`.
void check_scale(double scale, const std::string& where);

/// Trainable parameters of the adapter: prod(r_n) (or R, or 0) + sum over factored modes I_n r_n.
int64_t parameter_count(const AdapterSpec& spec);

/// Parameters PEFT's LoRA has for this weight at rank r: r * (I_0 + prod(I_1..)).
int64_t lora_parameter_count(const std::vector<int64_t>& shape, int64_t rank);

/// The order in which to apply mode products to G to build dW at the least cost.
struct ContractionPlan {
  std::vector<int64_t> order;  ///< factored modes, first applied first
  double macs = 0;             ///< cost of that order: sum over steps of written * (r_n + 16 (+4))
};
/// Exact dynamic program over subsets of factored modes (N <= 20). A step applying U_n [I_n, r_n]
/// to a tensor of E elements writes E / r_n * I_n elements and costs written * (r_n + 16): its
/// multiply-adds plus a memory term; + 4 per element for a middle mode (batched small GEMMs).
ContractionPlan plan_contraction(const std::vector<int64_t>& shape,
                                 const std::vector<int64_t>& ranks,
                                 const std::vector<bool>& identity);

/// Geometry of one conv call, enough for the cost model.
struct ConvCostInput {
  int64_t batch = 1;
  int64_t in_channels = 0, out_channels = 0, groups = 1;
  std::vector<int64_t> kernel;      ///< k_1..k_d
  std::vector<int64_t> in_spatial;  ///< input spatial size (after padding)
  std::vector<int64_t> out_spatial; ///< output spatial size
  bool training = true;             ///< gradients will be computed for the adapter
  bool input_requires_grad = true;  ///< the input gradient is needed too
  bool dropout = false;             ///< adapter dropout is active (merged path then needs its own conv)
  bool autocast = false;            ///< autocast is on (the hybrid path would run in float32)
  /// The factorized path would run as one fused node on the narrow GEMMs
  /// (functional::factorized_fuses_narrow): it then beats the hybrid path (see conv_path_costs).
  bool fused_narrow = false;
};
/// Estimated extra cost (in multiply-add equivalents) of each conv path over the frozen base.
struct ConvPathCosts {
  double base = 0;        ///< the frozen conv's forward (+ input gradient when training)
  double merged = 0;      ///< extra cost of the merged-weight path
  double factorized = 0;  ///< extra cost of the factorized path
  double separable = 0;   ///< extra cost of the separable path (infinite where it does not apply)
  double hybrid = 0;      ///< extra cost of the hybrid path (infinite where it does not apply or
                          ///< when not training, where it is the merged path)
  ConvPath choice = ConvPath::Merged;
};
/// The documented cost model (docs/DESIGN.md, "Choosing a conv path").
ConvPathCosts conv_path_costs(const AdapterSpec& spec, const ConvCostInput& in);

/// Whether the factorized conv branch folds U_in into its core conv: one conv of in/groups ->
/// r_0 channels per group, instead of a 1x1 (in -> r_1) and a core conv (r_1 -> r_0). It does
/// when that takes no more multiply-adds: p_out r_0 (in/groups) K <= p_in in r_1 + p_out r_0 r_1 K
/// (p: pixels per image, K: kernel elements). Always for 1x1 kernels at equal ranks; also for
/// kernels no larger than their stride, where the 1x1 would run at the full input resolution
/// (ConvNeXt's 2x2/2 downsampling and 4x4/4 stem), which makes the branch LoRA's shape.
bool fold_input_factor(int64_t in_channels, int64_t groups, int64_t r_in, int64_t r_out, int64_t kernel_elements,
                       double in_pixels, double out_pixels);

/// Whether the hybrid conv path folds U_in into its core kernel ([r_0, in, k...]), which makes
/// its backward LoRA's: no projection x U_in, no core input gradient, no 1x1 weight gradient of
/// U_in. It does where fold_input_factor does and the kernel, larger than 1x1, tiles the input
/// without overlap (out pixels x kernel elements <= in pixels: kernels no larger than their
/// stride, as ConvNeXt's 2x2/2 downsampling), so the folded kernel's passes read x no more often
/// than the projection did. Not for overlapping windows (ResNet's 7x7/2 stem measured slower on
/// a folded hybrid path than on the merged one) nor 1x1 convs (ResNet-18's 1x1/2 downsampling
/// convs measured slower on it than on merged or factorized, where the cost model sent them).
bool hybrid_folds_input(int64_t in_channels, int64_t r_in, int64_t r_out, int64_t kernel_elements, double in_pixels,
                        double out_pixels);

/// Whether the factorized path of a 2-d conv with groups 1 runs as one autograd node
/// (functional::fused_factorized_conv) rather than as its op chain: where its im2col matrix,
/// the batch's output pixels x kernel elements x the core conv's input channels (r_1, or `in`
/// where U_in is folded), has at most 2^17 elements (512 KiB of float32), or 2^18 with
/// narrow_kernels: the node's products on flora/detail/narrow_gemm.h's kernels (CPU float32,
/// ranks 8 to 32 wide, an AVX2 + FMA CPU), about 2.5x faster than OpenBLAS's there. Measured in
/// docs/PERFORMANCE.md, "Session 18" and "Session 19".
bool fuse_factorized_conv(double window_elements, bool narrow_kernels = false);

/// Whether the hybrid conv path's 1x1 steps run as the narrow GEMMs on the pixels' channel rows
/// rather than as oneDNN 1x1 convs, where those kernels apply (CPU float32, ranks 8 to 32, AVX2
/// + FMA): where the larger of the layer's (padded) input and output gradient has at most 2^20
/// elements (4 MiB of float32). Above that the steps on gy (gy U_out, U_out's gradient) stream
/// from memory and oneDNN's convs were faster (docs/PERFORMANCE.md, "Session 19"). x's two
/// (x U_in, U_in's gradient) run as one narrow pass over x from 2^18 elements of x at any size
/// where x is channels-last (session 21); below 2^18 they follow this line too. Where x and gy
/// are both contiguous (NCHW; NCL and NCDHW for Conv1d and Conv3d) the line does not apply: all
/// four steps run on the kernels as planes at every size, x's two in one pass (session 22).
bool narrow_hybrid_steps(double activation_elements);

/// True when ConvPath::Separable applies to the target: a 2-d conv ([out, in/groups, kh, kw])
/// with in/groups == 1 (depthwise, or a single input channel).
bool separable_applies(const TargetInfo& target);
/// True when ConvPath::Hybrid applies to the target: a conv with groups == 1.
bool hybrid_applies(const TargetInfo& target);
/// Throws flora::InvalidArgument naming the layer and its shape when `path` cannot run on
/// `target` with adapter dropout `dropout`: Separable on a layer that is not a 2-d conv with
/// in/groups == 1; Hybrid on a grouped conv, or on a conv with dropout > 0 (its one conv feeds
/// the base and the update the same input). Hybrid on a non-conv layer is accepted and unused.
void check_conv_path(const TargetInfo& target, ConvPath path, double dropout = 0.0);

/// "1,234,567": thousands separators, as PEFT prints counts.
std::string format_count(int64_t n);
/// "[512, 256, 3, 3]"
std::string format_shape(const std::vector<int64_t>& shape);

}  // namespace flora
