#!/usr/bin/env python3
"""Writes tests/data/golden.json: FLoRA layers computed by PyTorch itself, for tests/test_golden.cpp.

Run with Debian's PyTorch (python3-torch):  /usr/bin/python3 tests/golden/make_golden.py [OUT]
(OUT defaults to tests/data/golden.json; tests/golden/check_golden.sh regenerates and compares.)

Every case holds a frozen weight W0 (and bias), a FLoRA core G and factors U_n, an input, and
  delta  = dW = s * G x_0 U_0 x_1 U_1 ...   (torch.einsum over the weight's own mode order)
  output = the torch.nn.functional op (conv2d / linear / conv1d / embedding) with W0 + dW.

Bit-for-bit reproducible on any machine: every random tensor is N(0, 1) rounded to a multiple of
1/16 (and clamped to +-3.9375), so the einsum and the ops on W0 and G x U are sums of products of
short dyadic numbers and are exact in float64 whatever the BLAS, the CPU's vector width or the
summation order (exact() checks this against the same op on integers). The scale s enters last,
with one rounding: delta = s * T and output = op(x, W0, b) + s * op(x, T, no bias), T = dW / s,
which equals op(x, W0 + dW, b) up to rounding (checked below to 1e-12).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

GRID = 16  # random values are multiples of 1/GRID


def rand(*shape):
    t = torch.randn(*shape, dtype=torch.float64).clamp(-3.9375, 3.9375)
    return torch.round(t * GRID) / GRID


def dyadic_exponent(t):
    """The smallest e with t * 2^e integral (t is float64 and dyadic)."""
    for e in range(64):
        s = t * 2.0**e
        if torch.equal(s, torch.round(s)):
            return e
    raise AssertionError("not a short dyadic tensor")


def exact(op, factors, bias=None):
    """op(factors, bias) for an op linear in each factor; asserts that float64 did not round, by
    running the same op on the integers factor * 2^e (and bias * 2^(sum e))."""
    y = op(factors, bias)
    ints, k = [], 0
    for f in factors:
        e = dyadic_exponent(f)
        ints.append((f * 2.0**e).long())
        k += e
    bias_int = None
    if bias is not None:
        assert dyadic_exponent(bias) <= k
        bias_int = (bias * 2.0**k).long()
    yi = op(ints, bias_int)
    assert yi.abs().max().item() < 2**53, "too many bits for exact float64"
    assert torch.equal(y, yi.double() / 2.0**k), "float64 rounded: use a coarser GRID"
    return y


def tucker(core, factors):
    """sum G[a,b,...] U0[i,a] U1[j,b] ... as one einsum, e.g. 'abcd,ia,jb,kc,ld->ijkl'."""
    n = core.dim()
    r, i = "abcdefgh"[:n], "ijklmnop"[:n]
    eq = r + "," + ",".join(i[m] + r[m] for m in range(n)) + "->" + i
    return exact(lambda a, _: torch.einsum(eq, *a), [core] + factors)


def tensor(t):
    d = {"shape": list(t.shape), "data": t.flatten().tolist()}
    if not t.is_floating_point():
        d["dtype"] = "int64"
    return d


def adapter(w_shape, ranks, scale):
    core = rand(*ranks)
    factors = [rand(size, r) for size, r in zip(w_shape, ranks)]
    return core, factors, scale


def store(name, weight, bias, core, factors, scale, inp, delta, output, **extra):
    case = {"name": name, "weight": tensor(weight), "core": tensor(core), "ranks": list(core.shape),
            "factors": [tensor(u) for u in factors], "scale": scale, "input": tensor(inp),
            "delta": tensor(delta), "output": tensor(output)}
    if bias is not None:
        case["bias"] = tensor(bias)
    case.update(extra)
    return case


def conv_case(name, conv, dims, in_ch, out_ch, kernel, stride, padding, dilation, groups, padding_mode,
              ranks, scale, x_shape):
    w0 = rand(out_ch, in_ch // groups, *([kernel] * dims))
    b = rand(out_ch)
    core, factors, s = adapter(w0.shape, ranks, scale)
    x = rand(*x_shape)
    if padding_mode == "zeros":
        xp, pad = x, padding
    else:  # as torch.nn.ConvNd: pad with the mode, then convolve unpadded
        xp, pad = F.pad(x, (padding,) * (2 * dims), mode=padding_mode), 0

    def op(a, bias):
        return conv(a[0], a[1], bias, stride=stride, padding=pad, dilation=dilation, groups=groups)

    t = tucker(core, factors)
    delta = s * t
    output = exact(op, [xp, w0], b) + s * exact(op, [xp, t])
    assert torch.allclose(output, op([xp, w0 + delta], b), rtol=0, atol=1e-12)
    return store(name, w0, b, core, factors, s, x, delta, output, stride=stride, padding=padding,
                 dilation=dilation, groups=groups, padding_mode=padding_mode)


def linear_case():
    w0, b = rand(7, 10), rand(7)
    core, factors, s = adapter(w0.shape, [3, 4], 1.5)
    x = rand(5, 10)
    t = tucker(core, factors)  # = U0 G U1^T
    assert torch.equal(t, factors[0] @ core @ factors[1].T)
    delta = s * t
    op = lambda a, bias: F.linear(a[0], a[1], bias)
    output = exact(op, [x, w0], b) + s * exact(op, [x, t])
    assert torch.allclose(output, F.linear(x, w0 + delta, b), rtol=0, atol=1e-12)
    return store("linear", w0, b, core, factors, s, x, delta, output)


def embedding_case():
    w0 = rand(12, 5)
    w0[0] = 0  # as torch.nn.Embedding(padding_idx=0) initializes it
    core, factors, s = adapter(w0.shape, [3, 2], 0.5)
    factors[0][0] = 0  # flora keeps U_num[padding_idx] = 0
    idx = torch.tensor([[0, 3, 11], [5, 5, 1]], dtype=torch.long)
    t = tucker(core, factors)
    delta = s * t
    op = lambda a, _: F.embedding(idx, a[0], padding_idx=0)
    output = exact(op, [w0]) + s * exact(op, [t])
    assert torch.allclose(output, F.embedding(idx, w0 + delta, padding_idx=0), rtol=0, atol=1e-12)
    return store("embedding", w0, None, core, factors, s, idx, delta, output, padding_idx=0)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "data", "golden.json")
    torch.manual_seed(20240524)
    cases = [
        conv_case("conv2d", F.conv2d, 2, in_ch=6, out_ch=8, kernel=3, stride=2, padding=1, dilation=1,
                  groups=2, padding_mode="zeros", ranks=[4, 2, 2, 2], scale=0.7, x_shape=(2, 6, 7, 7)),
        linear_case(),
        conv_case("conv1d_depthwise", F.conv1d, 1, in_ch=4, out_ch=4, kernel=5, stride=1, padding=2,
                  dilation=1, groups=4, padding_mode="reflect", ranks=[2, 1, 3], scale=2.0, x_shape=(3, 4, 9)),
        embedding_case(),
    ]
    doc = {"generator": "tests/golden/make_golden.py", "torch_version": torch.__version__, "cases": cases}
    with open(out, "w") as f:
        json.dump(doc, f, sort_keys=True, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
