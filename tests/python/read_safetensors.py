"""Reads safetensors files with the Python `safetensors` package, the way
most of the ML world would, and prints one JSON object per tensor: file,
name, dtype, shape and the tensor's bytes (hex, little endian).

numpy has no bfloat16: a file holding BF16 tensors cannot go through
`safetensors.numpy.load_file` (it raises), so BF16 tensors are read through
`safetensors.deserialize` as raw bytes, viewed as uint16 and widened to
float32 (a bf16 is the top half of an f32). Files without BF16 must load
with `load_file`.

usage: read_safetensors.py FILE...
"""

import json
import sys

import numpy as np
import safetensors
from safetensors.numpy import load_file


def bf16_to_f32(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def main() -> None:
    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            blob = f.read()
        # Every tensor, raw, with its declared dtype and shape.
        raw = {name: t for name, t in safetensors.deserialize(blob)}
        has_bf16 = any(t["dtype"] == "BF16" for t in raw.values())
        if has_bf16:
            arrays = {}
            with safetensors.safe_open(path, framework="np") as st:
                for name in st.keys():
                    if raw[name]["dtype"] != "BF16":
                        arrays[name] = st.get_tensor(name)
        else:
            arrays = load_file(path)
        for name, t in sorted(raw.items()):
            if t["dtype"] == "BF16":
                values = bf16_to_f32(bytes(t["data"])).reshape(t["shape"])
                out = {
                    "dtype": "BF16",
                    "shape": list(values.shape),
                    "hex": bytes(t["data"]).hex(),
                    "as_f32_first": float(values.flat[0]) if values.size else None,
                }
            else:
                a = arrays[name]
                out = {
                    "dtype": t["dtype"],
                    "numpy": str(a.dtype),
                    "shape": list(a.shape),
                    "hex": a.astype(a.dtype.newbyteorder("<")).tobytes().hex(),
                }
            print(json.dumps({"file": path, "name": name, "load_file": not has_bf16, **out}))


if __name__ == "__main__":
    main()
