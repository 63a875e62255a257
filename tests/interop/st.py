"""A minimal safetensors reader/writer for the interop tests (F32, F64, I64), written from the
format's specification so the C++ reader and writer are checked against an independent one."""
import json
import struct

import torch

_DTYPES = {"F32": (torch.float32, 4), "F64": (torch.float64, 8), "I64": (torch.int64, 8)}
_NAMES = {v[0]: k for k, v in _DTYPES.items()}


def save(path, tensors):
    """Writes tensor by tensor (no copy of the whole file in memory: state dicts of ~350 MB)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().numpy().tobytes())


def load(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        dtype, size = _DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        buf = bytearray(raw[8 + n + b:8 + n + e])
        out[name] = torch.frombuffer(buf, dtype=dtype).reshape(info["shape"]) if e > b else torch.zeros(info["shape"], dtype=dtype)
    return out
