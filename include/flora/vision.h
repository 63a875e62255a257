// flora/vision.h: torchvision's ResNet, ConvNeXt and VisionTransformer, built from flora::nn
// layers (every Conv2d and Linear can carry an adapter) with torchvision's state_dict keys, so a
// torchvision checkpoint loads as it is and a merged model saves back in torchvision's layout.
//
// Usage (normally through flora::open_model(name), which uses this registry):
//   1. auto m = flora::vision::make_model("convnext_tiny");   // 1000 classes, torchvision's init
//   2. m->load_state(torchvision_state_dict, /*strict=*/true);
//   3. m->inject(options); m->forward(images);               // images [N, 3, H, W], any H, W
//
// Architectures: resnet18, resnet34, resnet50 (BasicBlock / Bottleneck, stride on conv2),
// convnext_tiny, convnext_small, convnext_base (stochastic depth 0.1 / 0.4 / 0.5, "row" mode),
// vit_b_16, vit_s_16 (patch 16; vit_s_16 = 12 layers, 6 heads, width 384, MLP 1536: not in
// torchvision 0.14, but its VisionTransformer class with those arguments).
// ViT keys follow torch.nn.MultiheadAttention ("...self_attention.in_proj_weight"), while the
// adaptable layer is named "...self_attention.in_proj" (see docs/DESIGN.md, "Native models").
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "flora/model.h"

namespace flora {
namespace vision {

/// The architecture names, in table order.
std::vector<std::string> architectures();

/// Builds `arch` with a `num_classes`-way head, initialized as torchvision initializes it.
/// ViTs are built for 224x224 images (position embeddings [1, 197, D]); other sizes work, see
/// resize_position_embedding. Throws flora::InvalidArgument for an unknown name.
std::unique_ptr<Model> make_model(const std::string& arch, int64_t num_classes = 1000);

/// ViT position embeddings [1, 1 + g*g, D] (class token first, then a g x g patch grid) for a
/// grid_h x grid_w patch grid: the grid part resized bicubically with align_corners=True, as
/// torchvision.models.vision_transformer.interpolate_embeddings does; unchanged when the grid
/// already fits. Differentiable.
torch::Tensor resize_position_embedding(const torch::Tensor& pos, int64_t grid_h, int64_t grid_w);

}  // namespace vision
}  // namespace flora
