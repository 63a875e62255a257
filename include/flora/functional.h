// flora/functional.h: FLoRA's math as pure functions on tensors. No modules, no state, no I/O.
//
// Usage:
//   1. dW = tucker_delta(core, factors, s)      // factors[n] undefined = identity mode n
//   2. y  = base(x) + linear_branch(x, core, factors, s)          // never forms dW
//      y  = adapted_linear(x, W0, b, core, factors, s)  // the same, one node on the narrow kernels
//      y  = base(in.value()) + linear_branch(in, core, factors, s) // in: a RecomputableInput
//      y  = conv_nd(x, W0, b, geo) + conv_branch(x, core, factors, s, geo)
//      y  = conv_nd(x, W0, b, geo) + separable_branch(x, core, factors, s, geo)  // depthwise 2-d
//      y  = embedding(idx, W0) + embedding_branch(idx, core, factors, s, padding_idx)
//
// Shapes: core G [r_0, ..., r_{N-1}]; factors[n] U_n [I_n, r_n]; dW [I_0, ..., I_{N-1}].
// Linear [out, in]: factors {U_out, U_in}. Conv [out, in/groups, k...]: {U_out, U_in, U_k1, ...}.
// Embedding [num, dim]: {U_num, U_dim}. A mode whose factor is undefined has r_n == I_n.
#pragma once

#include <c10/util/Optional.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace flora {
namespace functional {

using torch::Tensor;

/// t x_mode u: the mode-`mode` product of t with u [I, r]; t.size(mode) must be r.
Tensor mode_product(const Tensor& t, const Tensor& u, int64_t mode);

/// The order-N super-diagonal tensor [R, ..., R] with `values` [R] on its diagonal.
Tensor superdiagonal(const Tensor& values, int64_t order);

/// dW = scale * core x_0 U_0 ... x_{N-1} U_{N-1}, contracted in the cheapest order
/// (flora::plan_contraction). Undefined factors are identity modes.
Tensor tucker_delta(const Tensor& core, const std::vector<Tensor>& factors, double scale);
/// The same dW laid out as `format` (ChannelsLast for an order-4 weight, ChannelsLast3d for
/// order 5, Contiguous, or Preserve: whatever is cheapest). A 2-d conv weight whose kernel modes
/// have factors, on the CPU in float or double with a small kernel (the kernel node's case), is
/// built in that layout directly and takes its gradient in it; others are converted. Training a
/// channels-last model, this saves a reorder of dW before its conv.
Tensor tucker_delta(const Tensor& core, const std::vector<Tensor>& factors, double scale, at::MemoryFormat format);

enum class PaddingMode { Zeros, Reflect, Replicate, Circular };
std::string to_string(PaddingMode m);
PaddingMode parse_padding_mode(const std::string& s);

/// A convolution's geometry, everything but its weight. Lengths equal the spatial rank d.
struct ConvGeometry {
  std::vector<int64_t> stride;
  std::vector<int64_t> padding;   ///< symmetric padding per spatial dim
  std::vector<int64_t> dilation;
  int64_t groups = 1;
  PaddingMode padding_mode = PaddingMode::Zeros;
  int64_t dims() const { return static_cast<int64_t>(stride.size()); }
  /// Output spatial size for an input spatial size and kernel.
  std::vector<int64_t> output_size(const std::vector<int64_t>& in, const std::vector<int64_t>& kernel) const;
};

/// conv{1,2,3}d(x, weight, bias) with the geometry, padding modes included (as torch.nn.ConvNd).
Tensor conv_nd(const Tensor& x, const Tensor& weight, const Tensor& bias, const ConvGeometry& geo);

/// The Linear branch s * x U_in G^T U_out^T (x [..., in] -> [..., out]); never forms [out, in].
Tensor linear_branch(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale);

/// A layer input x = f(sources) that backward recomputes instead of keeping. Training an input
/// factor (U_in, LoRA's A) needs the layer's input for its gradient, so an adapter keeps x alive
/// until backward. Where x is GELU(h), LayerNorm(h) or attention heads, the frozen network keeps
/// only f's own inputs (h, the attention weights and values), which f's backward needs anyway:
/// keeping x is then the adapters' whole activation overhead (ViT-S/16 at 224 px: +55 %).
/// A factory computes x with autograd as usual and remembers f and its sources; the
/// linear_branch overload below keeps the sources (shared, no copy) and recomputes x in backward.
/// The sources must not be modified in place afterwards (autograd checks their versions).
///   auto in = RecomputableInput::gelu(h);
///   y = torch::linear(in.value(), W0, b) + linear_branch(in, core, factors, s);
class RecomputableInput {
 public:
  enum class Op { Gelu, LayerNorm, AttentionHeads };
  /// x = gelu(h, approximate), approximate "none" or "tanh" (torch::gelu).
  static RecomputableInput gelu(const Tensor& h, const std::string& approximate = "none");
  /// x = layer_norm(h, normalized_shape, weight, bias, eps); weight and bias may be undefined.
  static RecomputableInput layer_norm(const Tensor& h, std::vector<int64_t> normalized_shape, const Tensor& weight,
                                      const Tensor& bias, double eps);
  /// x = attn @ v with the heads merged: attn [N, H, L, S], v [N, H, S, hd] -> [N, L, H * hd]
  /// (v is made contiguous first, as matmul would copy it anyway, so that the copy is shared).
  static RecomputableInput attention_heads(const Tensor& attn, const Tensor& v);

  /// x, with autograd to the sources.
  const Tensor& value() const { return value_; }
  /// x computed again from `sources` (the same tensors as sources() or saved copies of them).
  Tensor recompute(const std::vector<Tensor>& sources) const;
  const std::vector<Tensor>& sources() const { return sources_; }
  Op op() const { return op_; }
  const std::string& approximate() const { return approximate_; }
  const std::vector<int64_t>& normalized_shape() const { return shape_; }
  double eps() const { return eps_; }
  /// The same recipe with no sources or value: what backward rebuilds from its saved fields.
  static RecomputableInput recipe(Op op, std::string approximate, std::vector<int64_t> normalized_shape, double eps);

 private:
  RecomputableInput() = default;
  Op op_ = Op::Gelu;
  std::string approximate_ = "none";
  std::vector<int64_t> shape_;
  double eps_ = 0.0;
  std::vector<Tensor> sources_;
  Tensor value_;
};

/// linear_branch(x.value(), ...), equal in output and gradients, but x is recomputed in
/// backward (once, only when U_in or the core needs a gradient) rather than kept. Runs in the
/// dtype autocast would pick (the branch's own dtype without autocast), as the plain overload.
Tensor linear_branch(const RecomputableInput& x, const Tensor& core, const std::vector<Tensor>& factors, double scale);

/// torch::linear(x, W0, b) + linear_branch(x, core, factors, s), equal in output and in every
/// gradient (double backward included), as one autograd node where adapted_linear_fuses: the
/// base GEMM, then the branch's thin products on flora/detail/narrow_gemm.h's kernels, its
/// output added into the base's and its input gradient into the base's in place. Never forms
/// dW. Elsewhere it is that composition. Linear 768 -> 768 over 1,024 tokens: 1.10x the frozen
/// layer's step against 1.33x (docs/PERFORMANCE.md, session 22).
Tensor adapted_linear(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                      const std::vector<Tensor>& factors, double scale);

/// adapted_linear on a RecomputableInput: its node keeps in's sources instead of x, as
/// linear_branch(in, ...) does (double backward then unsupported, as there); elsewhere
/// torch::linear(in.value(), W0, b) + linear_branch(in, core, factors, s).
Tensor adapted_linear(const RecomputableInput& in, const Tensor& weight, const Tensor& bias, const Tensor& core,
                      const std::vector<Tensor>& factors, double scale);

/// Whether adapted_linear runs as its node: float32 on the CPU (x contiguous, not empty; the
/// weight, core and factors float32) on an AVX2 + FMA CPU, U_out present with a rank 8 to 32
/// wide (U_in may be an identity mode), CPU autocast off.
bool adapted_linear_fuses(const Tensor& x, const Tensor& weight, const Tensor& core, const std::vector<Tensor>& factors);

/// The factorized conv branch, equal to conv_nd(x, dW, {}, geo):
/// grouped 1x1 (in -> groups*r_1) -> grouped core conv with kernel s*G x_2 U_2 ... carrying
/// stride/padding/dilation (-> groups*r_0) -> grouped 1x1 (-> out). Identity modes skip a step.
Tensor conv_branch(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale,
                   const ConvGeometry& geo);

/// The separable branch of a 2-d conv with in/groups == 1 (depthwise), equal to
/// conv_nd(x, dW, {}, geo) for dW [out, 1, kh, kw]. With M = s * G x_0 U_0 x_1 U_1 [out, r_2, r_3],
/// dW[o] = sum_{b,d} M[o, b, d] U_2[:, b] U_3[:, d]^T: r_2 * r_3 rank-one spatial filters shared
/// by every channel. Each is applied as two dense banded matrices (T_2 [r_2 Ho, H] from U_2 with
/// the vertical stride/padding/dilation, T_3 [W, r_3 Wo] likewise), i.e. two GEMMs over all
/// channels and images at once, then mixed per output channel by M. Its backward is written by
/// hand (the same GEMMs transposed) and keeps only x: no depthwise weight gradient is computed. Non-zero padding modes pad x explicitly first.
/// Identity spatial modes use the identity matrix as their factor.
Tensor separable_branch(const Tensor& x, const Tensor& core, const std::vector<Tensor>& factors, double scale,
                        const ConvGeometry& geo);

/// The hybrid conv path (groups 1): y = conv_nd(x, W0 + dW, bias, geo), and the input gradient
/// through W0 + dW, as the merged path; the gradients of G and the factors from r-channel
/// projections of x and of the output gradient (x U_in, gy U_out and the core conv on them), as
/// the factorized branch computes them. Neither the merged path's full weight gradient nor the
/// factorized branch's full-size output add and input-gradient add is ever computed. W0 + dW is
/// built by one GEMM in W0's memory layout (channels-last too), in forward and again in backward
/// rather than kept in between. Runs in the weight's
/// dtype with autocast off (x, the bias, the core's kernel and U_out/U_in are cast to it, with
/// their gradients cast back). x is [N, in, ...] or unbatched [in, ...], as conv_nd takes it.
/// Gradients also flow to x, and to the weight and bias where they require them.
Tensor hybrid_conv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                   const std::vector<Tensor>& factors, double scale, const ConvGeometry& geo);

/// conv_nd(x, weight, bias, geo) + conv_branch(x, core, factors, scale, geo): the factorized
/// conv path with the base conv. Runs as fused_factorized_conv where that applies and the maps
/// are small (flora::fuse_factorized_conv), else as those two calls. The fused node has no
/// double backward (see below).
Tensor factorized_conv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                       const std::vector<Tensor>& factors, double scale, const ConvGeometry& geo);

/// factorized_conv as one autograd node for a 2-d conv with groups 1: the branch's 1x1s and core
/// conv as GEMMs on the pixels' channel rows (an im2col of the r_1-channel projection for the
/// core conv), added into the base conv's output in place; backward likewise, with the branch's
/// input gradient added into the base's. Equal to the op chain in output and gradients. No
/// double backward (create_graph), with respect to any input, x included, where the op chain
/// allows it for x: a model that needs second derivatives sets conv path merged. Throws where
/// fused_factorized_applies is false.
Tensor fused_factorized_conv(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& core,
                             const std::vector<Tensor>& factors, double scale, const ConvGeometry& geo);
/// fused_factorized_conv runs: a 2-d conv with groups 1 on a CPU input [N, C, H, W] or [C, H, W]
/// whose dtype (float or double) is the weight's and the core's, outside autocast. The bias and
/// factors are expected on the CPU in that dtype too (as the op chain expects them).
bool fused_factorized_applies(const Tensor& x, const Tensor& weight, const Tensor& core, const ConvGeometry& geo);
/// Whether factorized_conv, for an input of `input_shape` in the weight's dtype and device, runs
/// the fused node with its products on the narrow GEMMs (flora/detail/narrow_gemm.h): the cost
/// model's ConvCostInput::fused_narrow.
bool factorized_fuses_narrow(const std::vector<int64_t>& input_shape, const Tensor& weight, const Tensor& core,
                             const std::vector<Tensor>& factors, const ConvGeometry& geo);

/// The Embedding branch: rows of U_num gathered for `indices`, times s * G U_dim^T.
/// U_num's row padding_idx gets no gradient (as nn.Embedding's weight).
Tensor embedding_branch(const Tensor& indices, const Tensor& core, const std::vector<Tensor>& factors,
                        double scale, c10::optional<int64_t> padding_idx);

}  // namespace functional
}  // namespace flora
