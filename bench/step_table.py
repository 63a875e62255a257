#!/usr/bin/env python3
"""The step-time and memory table of docs/PERFORMANCE.md: `flora bench step` for every model and
method, interleaved over rounds so that drifts in the machine's speed hit every method alike, and
reported as ratios to the frozen step measured in the same round (the median over rounds).

    /usr/bin/python3 bench/step_table.py [--models resnet18,resnet50,convnext_tiny,vit_s_16]
                                         [--rounds 2] [--steps 10] [--flora build/bin/flora]
                                         [--threads N] [--memory-format auto|channels-last|contiguous]

Methods: frozen (forward + input gradient), full, lora (rank 16), flora (ranks 16,16,2,2), and
flora through TorchScript (the same torchvision model scripted by PyTorch, adapters by the
weight-attribute mechanism). --cache-ab adds frozen and flora with flora's CPU block cache off
(FLORA_CPU_CACHE_MB=0: glibc's malloc), to measure what the cache gains in the same rounds. Adapters go on every conv (--targets all-conv) for the CNNs and on
every conv and linear but the head for the ViT. Prints a markdown table and writes the raw JSON
to --json-out.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time


def script_model(arch, path, image_size):
    import torch, torchvision
    # torchvision's ViT asserts its construction size, so the scripted one is built for the bench's
    # (flora's native ViT is built at 224 and resizes its position embeddings instead)
    if arch == "vit_s_16":
        m = torchvision.models.vision_transformer.VisionTransformer(
            image_size=image_size, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
    elif arch.startswith("vit"):
        m = getattr(torchvision.models, arch)(image_size=image_size)
    else:
        m = getattr(torchvision.models, arch)()
    torch.jit.script(m.eval()).save(path)


def bench(flora, model, method, extra, a, env=None):
    threads = ["--threads", str(a.threads)] if a.threads else []
    cmd = [flora] + threads + ["bench", "step", "--model", model, "--method", method, "--batch-size", str(a.batch_size),
                               "--image-size", str(a.image_size), "--steps", str(a.steps), "--warmup", "2",
                               "--memory-format", a.memory_format, "--json"] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, **(env or {}))).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,convnext_tiny,vit_s_16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--flora", default="build/bin/flora")
    ap.add_argument("--json-out", default="")
    ap.add_argument("--threads", type=int, default=0, help="flora --threads N (0: flora's default)")
    ap.add_argument("--memory-format", default="auto", help="bench step --memory-format")
    ap.add_argument("--cache-ab", action="store_true", help="add frozen and flora without the CPU block cache")
    a = ap.parse_args()
    t0 = time.time()
    tmp = tempfile.mkdtemp()
    rows = {}
    for arch in a.models.split(","):
        pt = os.path.join(tmp, arch + ".pt")
        script_model(arch, pt, a.image_size)
        targets = [] if arch.startswith("vit") else ["--targets", "all-conv"]
        variants = [("frozen", arch, "frozen", targets), ("full", arch, "full", targets),
                    ("lora r=16", arch, "lora", targets + ["--rank", "16"]),
                    ("flora [16,16,2,2]", arch, "flora", targets + ["--ranks", "16,16,2,2"]),
                    ("flora TorchScript", pt, "flora", targets + ["--ranks", "16,16,2,2"])]
        if a.cache_ab:
            variants += [("frozen, no CPU cache", arch, "frozen", targets),
                         ("flora, no CPU cache", arch, "flora", targets + ["--ranks", "16,16,2,2"])]
        off = {"FLORA_CPU_CACHE_MB": "0"}
        runs = {v[0]: [] for v in variants}
        for r in range(a.rounds):
            for name, model, method, extra in variants:
                runs[name].append(bench(a.flora, model, method, extra, a, off if "no CPU cache" in name else None))
                print(f"{arch} round {r + 1} {name}: {runs[name][-1]['median_step_s']:.4f} s", file=sys.stderr)
        rows[arch] = runs
        os.remove(pt)
    print(f"\nbatch {a.batch_size}, {a.image_size}x{a.image_size}, {a.steps} timed steps x {a.rounds} rounds, "
          f"{rows[next(iter(rows))]['frozen'][0]['threads']} threads, "
          f"{rows[next(iter(rows))]['frozen'][0]['memory_format']}; {time.time() - t0:.0f} s\n")
    print("| model | method | trainable | median step s | x frozen | peak RSS MB | x frozen | conv paths |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for arch, runs in rows.items():
        f_t = statistics.median(x["median_step_s"] for x in runs["frozen"])
        f_m = statistics.median(x["peak_rss_mb"] for x in runs["frozen"])
        for name, rs in runs.items():
            t = statistics.median(x["median_step_s"] for x in rs)
            m = statistics.median(x["peak_rss_mb"] for x in rs)
            # the time ratio is the median over rounds of (this round's step / this round's frozen
            # step): a slow spell of the machine that spans a round cancels out
            ratio = statistics.median(x["median_step_s"] / f["median_step_s"] for x, f in zip(rs, runs["frozen"]))
            paths = ", ".join(f"{n} {p}" for p, n in sorted(rs[0]["conv_paths"].items())) or "-"
            print(f"| {arch} | {name} | {rs[0]['trainable']:,} | {t:.4f} | {ratio:.2f} | {m:.0f} | {m / f_m:.2f} | {paths} |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
