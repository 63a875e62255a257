#!/usr/bin/env python3
"""Data-parallel scaling on this machine (docs/DISTRIBUTED.md): the same training job as one
process with global batch 2B and all cores, and as `flora train --nproc 2` with batch B per
process and the cores split between them. Rounds alternate the two layouts so that drifts in the
machine's speed hit both alike. Reports training images/s (the median of the logged windows,
the first dropped as warm-up), the bytes all-reduced per step, and the ratio.

    /usr/bin/python3 bench/dp_scaling.py [--models smallcnn,resnet18] [--rounds 2] [--steps 40]
"""
import argparse, json, os, statistics, subprocess, tempfile, time


def run(flora, model, nproc, batch, a, out):
    cmd = [flora, "train", "--model", model, "--num-classes", "10", "--data", f"procedural:shapes:{a.images}",
           "--image-size", str(a.image_size), "--augment", "none", "--steps", str(a.steps), "--batch-size", str(batch),
           "--log-every", "5", "--workers", "1", "--method", "flora", "--out", out]
    if model != "smallcnn":
        cmd += ["--targets", "all-conv", "--ranks", "16,16,2,2"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    train = [l for l in lines if l["type"] == "train"]
    rates = [l["images_per_s"] for l in train][1:]
    return statistics.median(rates), train[-1].get("allreduce_bytes_per_step", 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smallcnn,resnet18")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16, help="per process in the 2-process layout")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2560)
    ap.add_argument("--flora", default="build/bin/flora")
    a = ap.parse_args()
    t0 = time.time()
    tmp = tempfile.mkdtemp()
    rows = []
    for model in a.models.split(","):
        one, two, nbytes = [], [], 0
        for r in range(a.rounds):
            order = [(1, 2 * a.batch_size), (2, a.batch_size)]
            for nproc, batch in (order if r % 2 == 0 else order[::-1]):
                rate, b = run(a.flora, model, nproc, batch, a, os.path.join(tmp, f"{model}-{nproc}-{r}"))
                (one if nproc == 1 else two).append(rate)
                nbytes = max(nbytes, b)
        rows.append((model, statistics.median(one), statistics.median(two), nbytes))
    print(f"| model | 1 process, batch {2 * a.batch_size} (img/s) | 2 processes, batch {a.batch_size} each (img/s) | "
          "2 / 1 | all-reduced per step |")
    print("|---|---|---|---|---|")
    for model, one, two, nbytes in rows:
        print(f"| {model} | {one:.1f} | {two:.1f} | {two / one:.2f} | {nbytes:,} bytes |")
    print(f"\n{a.rounds} rounds, {a.steps} steps at {a.image_size} px, FLoRA; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
