#!/usr/bin/env python3
"""The reference point of docs/PERFORMANCE.md: a ResNet-18 step with FLoRA as the authors' released
code computes it (FLORA.md section 1): every forward builds the dense dW from the core and the
factors and runs a second full convolution with it, beside the frozen base convolution. Prints the
median step time of the frozen base (forward + input gradient), full fine-tuning and that FLoRA,
and their ratios, as one JSON object. Run with Debian's python3-torch / python3-torchvision:

    /usr/bin/python3 bench/authors_style.py --batch-size 16 --image-size 64 --steps 10

This re-implements the described computation (ranks [16, 16, 2, 2] on every conv, core zero,
factors Kaiming-normal); it is not the authors' file, which is not vendored here.
"""
import argparse, json, os, statistics, time

import torch
import torchvision


class DenseDeltaConv(torch.nn.Module):
    """conv(x, W0) + conv(x, s * G x_1 U_1 ... x_4 U_4), dW rebuilt on every call."""

    def __init__(self, base, ranks, scale):
        super().__init__()
        self.base = base
        out, _, kh, kw = base.weight.shape
        dims = [out, base.in_channels, kh, kw]  # as the released code: [out, in, k, k], groups ignored
        r = [min(a, b) for a, b in zip(ranks, dims)]
        self.core = torch.nn.Parameter(torch.zeros(r))
        self.factors = torch.nn.ParameterList()
        for d, rr in zip(dims, r):
            f = torch.empty(d, rr)
            torch.nn.init.kaiming_normal_(f, a=3 ** 0.5)
            self.factors.append(torch.nn.Parameter(f))
        self.scale = scale

    def forward(self, x):
        u0, u1, u2, u3 = self.factors
        dw = torch.einsum("abcd,ia,jb,kc,ld->ijkl", self.core, u0, u1, u2, u3) * self.scale
        b = self.base
        return b(x) + torch.nn.functional.conv2d(x, dw, None, b.stride, b.padding, b.dilation, b.groups)


def adapt(model, ranks, scale):
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, torch.nn.Conv2d):
                setattr(m, child_name, DenseDeltaConv(child, ranks, scale))
    return model


def median_step(model, method, x, y, steps, warmup):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # frozen statistics, as flora's default
    times = []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        inp = x.detach().requires_grad_(True) if method == "frozen" else x
        loss = torch.nn.functional.cross_entropy(model(inp), y)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads or os.cpu_count())  # Debian's torch starts with 1, as flora's LibTorch
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size)
    y = torch.randint(0, 1000, (a.batch_size,))
    out = {"model": a.model, "batch_size": a.batch_size, "image_size": a.image_size, "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    for method in ("frozen", "full", "authors_flora"):
        model = getattr(torchvision.models, a.model)()
        for p in model.parameters():
            p.requires_grad_(method == "full")
        if method == "authors_flora":
            adapt(model, [16, 16, 2, 2], 4.0)
        try:
            out[method + "_step_s"] = median_step(model, method, x, y, a.steps, a.warmup)
        except RuntimeError as e:  # grouped / depthwise convs: dW has the wrong shape
            out[method] = "fails on the first forward: " + str(e).splitlines()[0]
    if "authors_flora_step_s" in out:
        out["authors_flora_vs_frozen"] = out["authors_flora_step_s"] / out["frozen_step_s"]
        out["authors_flora_vs_full"] = out["authors_flora_step_s"] / out["full_step_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
