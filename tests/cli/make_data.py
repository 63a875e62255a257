"""Writes tiny, learnable image data sets in the three formats `flora train` reads, for the
command-line tests: MNIST IDX files, CIFAR-10 binary batches and an ImageFolder of PNG files
(PNG encoded here with zlib, no imaging library). Class c is a square colored by c on a noisy
background, so a few training steps separate the classes.

usage: make_data.py OUT_DIR [N_PER_CLASS]"""
import os
import random
import struct
import sys
import zlib


def sample(c, size, rng, channels):
    """Class c: a square at a random place, colored by c (3 channels: red, green, blue, white;
    1 channel: brightness 80 + 45 c) on a dark noisy background."""
    img = [[[rng.randrange(0, 40) for _ in range(size)] for _ in range(size)] for _ in range(channels)]
    q = size // 2
    y0, x0 = rng.randrange(0, size - q), rng.randrange(0, size - q)
    for ch in range(channels):
        if channels == 1:
            value = 80 + 45 * c
        else:
            value = 230 if (c == 3 or ch == c) else 20
        for y in range(y0, y0 + q):
            for x in range(x0, x0 + q):
                img[ch][y][x] = min(255, value + rng.randrange(0, 20))
    return img


def png(path, img):
    h, w = len(img[0]), len(img[0][0])
    raw = b"".join(b"\x00" + bytes(v for x in range(w) for v in (img[0][y][x], img[1][y][x], img[2][y][x])) for y in range(h))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def main():
    out, per = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
    rng = random.Random(0)
    classes = 4
    # MNIST (1 channel, 28 px): train and t10k
    os.makedirs(os.path.join(out, "mnist"), exist_ok=True)
    for split, n in (("train", per), ("t10k", per // 2)):
        labels = [c for c in range(classes) for _ in range(n)]
        imgs = [sample(c, 28, rng, 1) for c in labels]
        with open(os.path.join(out, "mnist", f"{split}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, len(labels), 28, 28) + b"".join(bytes(v for row in im[0] for v in row) for im in imgs))
        with open(os.path.join(out, "mnist", f"{split}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, len(labels)) + bytes(labels))
    # CIFAR-10 binary (3 channels, 32 px): data_batch_1..5 and test_batch
    os.makedirs(os.path.join(out, "cifar"), exist_ok=True)
    for name, n in [(f"data_batch_{i}.bin", max(1, per // 5)) for i in range(1, 6)] + [("test_batch.bin", per // 2)]:
        with open(os.path.join(out, "cifar", name), "wb") as f:
            for c in range(classes):
                for _ in range(n):
                    im = sample(c, 32, rng, 3)
                    f.write(bytes([c]) + b"".join(bytes(v for row in ch for v in row) for ch in im))
    # ImageFolder (PNG, 20 px, resized by --image-size)
    for split, n in (("train", per), ("val", per // 2)):
        for c in range(classes):
            d = os.path.join(out, "folder", split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                png(os.path.join(d, f"{i:03d}.png"), sample(c, 20, rng, 3))


if __name__ == "__main__":
    main()
