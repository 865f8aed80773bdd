#!/usr/bin/env python3
"""Cross-checks hyserve's PyTorch `.bin` support against real torch (run where torch is).

1. `torch.load(weights_only=True)` reads the `.bin` shards that `hyserve init-model --format bin`
   wrote, and every tensor equals the safetensors twin (same seed).
2. Writes the safetensors model's tensors with real `torch.save` into two HF-style shards plus
   `pytorch_model.bin.index.json` (with a few tensors sharing one storage as views, as
   `torch.save` of a sliced parameter does), for the e2e test `torch_save_checkpoint_loads`.

Usage: torch_bin_check.py --safetensors-dir ST --bin-dir BIN --out OUTDIR
"""

import argparse
import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--safetensors-dir", required=True)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    st = {}
    for f in sorted(glob.glob(os.path.join(a.safetensors_dir, "*.safetensors"))):
        st.update(load_file(f))
    ours = {}
    for f in sorted(glob.glob(os.path.join(a.bin_dir, "*.bin"))):
        ours.update(torch.load(f, weights_only=True, map_location="cpu"))
    assert set(st) == set(ours), f"name sets differ: {set(st) ^ set(ours)}"
    for k in st:
        assert st[k].dtype == ours[k].dtype and torch.equal(st[k], ours[k]), k
    print(f"torch {torch.__version__}: torch.load read {len(ours)} tensors written by hyserve, all equal")

    os.makedirs(a.out, exist_ok=True)
    for f in ("config.json", "hy.tiktoken", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.safetensors_dir, f), a.out)
    names = sorted(st)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    weight_map = {}
    for shard, members in shards.items():
        sd = {}
        for n in members:
            sd[n] = st[n].clone()
            weight_map[n] = shard
        # Views into one storage: the q/k/v projections of layer 0 saved as slices of a
        # single fused tensor, as a checkpoint written from fused weights would be.
        qkv = [n for n in members if n.startswith("model.layers.0.self_attn.") and n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]
        if len(qkv) == 3:
            fused = torch.cat([sd[n] for n in qkv], dim=0)
            row = 0
            for n in qkv:
                rows = sd[n].shape[0]
                sd[n] = fused[row:row + rows]
                row += rows
        torch.save(sd, os.path.join(a.out, shard))
    with open(os.path.join(a.out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in st.values())},
                   "weight_map": weight_map}, f, indent=2)
    print(f"wrote a torch.save checkpoint of {len(names)} tensors to {a.out}")


if __name__ == "__main__":
    main()
