"""Checks, in PyTorch, what the C++ side wrote for one TorchScript model:
  merged.pt              loads with torch.jit.load and reproduces the adapted output
  merged.safetensors     loaded into the original model reproduces it too
  peft/                  the exported PEFT LoRA, applied by PEFT's formula to the original
                         weights, reproduces it
  locon.safetensors      the exported LyCORIS LoCon, merged by LyCORIS's formula, reproduces it
The adapted output (`adapted` in expected.safetensors) comes from the C++ forward pass.

usage: check_merged.py MODEL.pt DIR   (exit 0 when everything agrees to 1e-5)"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

TOL = 1e-5


def peft_delta(a, b, scaling, weight, groups, embedding):
    """PEFT's LoRA delta in the weight's shape (Linear, ConvNd with groups, Embedding)."""
    if embedding:
        return (b @ a).T * scaling
    if weight.dim() == 2:
        return b @ a * scaling
    # Conv: lora_A is a conv (in -> r) with the base's kernel and groups, lora_B a 1x1 conv
    # (r -> out) with the same groups; their composition in weight space, group by group.
    r = a.shape[0]
    out = weight.shape[0]
    b2 = b.reshape(out, r // groups)
    a2 = a.reshape(r, -1)
    blocks = []
    for g in range(groups):
        bg = b2[g * out // groups:(g + 1) * out // groups]
        ag = a2[g * r // groups:(g + 1) * r // groups]
        blocks.append(bg @ ag)
    return torch.cat(blocks).reshape(weight.shape) * scaling


def locon_delta(down, up, mid, alpha, weight):
    """LyCORIS LoCon's merged delta (its rebuild_tucker for a mid tensor)."""
    r = down.shape[0]
    scale = alpha / r
    if mid is None:
        return (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(weight.shape) * scale
    d = torch.einsum("i j ..., j r, i p -> p r ...", mid, down.reshape(r, -1), up.reshape(up.shape[0], -1).T)
    return d.reshape(weight.shape) * scale


def max_diff(a, b):
    return (a - b).abs().max().item()


def main():
    model_path, d = sys.argv[1], sys.argv[2]
    x = st.load(os.path.join(os.path.dirname(model_path), "io.safetensors"))["input"]
    want = st.load(os.path.join(d, "expected.safetensors"))["adapted"]
    failures = []

    def check(what, got):
        diff = max_diff(got, want)
        print(f"{what}: max |diff| = {diff:.3g}")
        if not diff <= TOL:
            failures.append(what)

    with torch.no_grad():
        merged = torch.jit.load(os.path.join(d, "merged.pt"))
        merged.eval()
        check("merged.pt", merged(x))

        base = torch.jit.load(model_path)
        base.eval()
        state = st.load(os.path.join(d, "merged.safetensors"))
        own = dict(base.state_dict())
        missing = set(own) - set(state)
        if missing:
            failures.append(f"merged.safetensors lacks {sorted(missing)}")
        base.load_state_dict(state)
        check("merged.safetensors", base(x))

        if os.path.isdir(os.path.join(d, "peft")):
            base = torch.jit.load(model_path)
            base.eval()
            config = json.load(open(os.path.join(d, "peft", "adapter_config.json")))
            tensors = st.load(os.path.join(d, "peft", "adapter_model.safetensors"))
            params = dict(base.named_parameters())
            modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
            for m in sorted(modules):
                name = m[len("base_model.model."):]
                r = config["rank_pattern"].get(name, config["r"])
                alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
                scaling = alpha / (r ** 0.5 if config["use_rslora"] else r)
                emb = m + ".lora_embedding_A" in tensors
                a = tensors[m + (".lora_embedding_A" if emb else ".lora_A.weight")]
                b = tensors[m + (".lora_embedding_B" if emb else ".lora_B.weight")]
                assert a.shape[0] == r, (name, a.shape, r)
                w = params[name + ".weight"]
                groups = config["layers"].get(name, {}).get("groups", 1)
                w.add_(peft_delta(a, b, scaling, w, groups, emb))
            check("peft-lora export", base(x))

        if os.path.exists(os.path.join(d, "locon.safetensors")):
            base = torch.jit.load(model_path)
            base.eval()
            tensors = st.load(os.path.join(d, "locon.safetensors"))
            params = dict(base.named_parameters())
            by_lycoris = {("lycoris_" + n[:-len(".weight")].replace(".", "_")): n for n in params if n.endswith(".weight")}
            for key in sorted({k.split(".")[0] for k in tensors}):
                w = params[by_lycoris[key]]
                mid = tensors.get(key + ".lora_mid.weight")
                w.add_(locon_delta(tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"], mid,
                                   tensors[key + ".alpha"].item(), w))
            check("lycoris export", base(x))

    if failures:
        print("FAILED:", ", ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
