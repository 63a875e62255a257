"""Reference models for tests/test_vision.cpp (VisionReference): torchvision's ResNet, ConvNeXt
and ViT with random weights, their state dicts and one input/output pair each.

Writes DIR/<arch>.safetensors (the state dict, buffers included) and DIR/<arch>_io.safetensors
("input", "output", eval mode). Weights are torchvision's initialization, then made to matter:
BatchNorm running statistics (measured on a random batch, then perturbed), norm gains and
every bias are randomized, ConvNeXt's layer_scale is
O(1) instead of 1e-6, and ViT's zero-initialized class token and head are random.

ViTs are built at 224 (pos_embedding [1, 197, D]) as flora builds them. vit_b_16 is run at 32x32:
the reference is torchvision's model built for 32 with the embeddings resized by
torchvision.models.vision_transformer.interpolate_embeddings, which the native model must
reproduce from the 224 weights. vit_s_16 runs at 224 (no resizing).

Usage: /usr/bin/python3 tests/vision/make_refs.py DIR [ARCH ...]
"""
import os
import sys

import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "interop"))
import st  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VIT = {"vit_b_16": dict(num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
       "vit_s_16": dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)}

# arch -> (image size, batch)
ROWS = {
    "resnet18": (64, 2), "resnet34": (64, 2), "resnet50": (64, 2),
    "convnext_tiny": (64, 2), "convnext_small": (64, 2), "convnext_base": (32, 2),
    "vit_b_16": (32, 2), "vit_s_16": (224, 1),
}


def build(arch, image_size=224):
    if arch in VIT:
        return VisionTransformer(image_size=image_size, patch_size=16, **VIT[arch])
    return getattr(torchvision.models, arch)(weights=None)


def fast_trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """torch.nn.init.trunc_normal_ for bounds far out in the tails (torchvision's: +-2 with std
    0.02, 100 sigma), where it equals a clamped normal; erfinv makes the original take ~5 s on
    convnext_base."""
    assert min(mean - a, b - mean) >= 6 * std, (mean, std, a, b)
    with torch.no_grad():
        return tensor.normal_(mean, std).clamp_(a, b)


torch.nn.init.trunc_normal_ = fast_trunc_normal_


@torch.no_grad()
def randomize(model, size):
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            m.weight.uniform_(0.5, 1.5)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.05)
        elif name.endswith("layer_scale"):
            p.uniform_(0.1, 0.5)
        elif name in ("class_token", "heads.head.weight"):
            p.normal_(0.0, 0.05)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if bns:
        # Running statistics from data (one batch, cumulative average), then moved off it so that
        # they matter, but not so far that activations blow up over the depth.
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        model(torch.randn(8, 3, size, size))
        for m in bns:
            m.running_mean.add_(torch.randn_like(m.running_mean) * 0.2 * m.running_var.sqrt())
            m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.7, 1.4))
            m.num_batches_tracked.fill_(7)
            m.momentum = 0.1


def main(out, archs):
    os.makedirs(out, exist_ok=True)
    for arch in archs:
        size, batch = ROWS[arch]
        torch.manual_seed(0)
        model = build(arch)
        randomize(model, size)
        model.eval()
        state = model.state_dict()
        x = torch.randn(batch, 3, size, size)
        ref = model
        if arch in VIT and size != 224:
            ref = build(arch, size).eval()
            ref.load_state_dict(interpolate_embeddings(size, 16, dict(state)))
        with torch.no_grad():
            y = ref(x)
        st.save(os.path.join(out, arch + ".safetensors"), state)
        st.save(os.path.join(out, arch + "_io.safetensors"), {"input": x, "output": y})
        print(f"{arch}: {sum(t.numel() for t in state.values()):,} values, output {list(y.shape)}, "
              f"|y| max {y.abs().max().item():.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(ROWS))
