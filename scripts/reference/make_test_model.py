#!/usr/bin/env python3
"""Write a tiny random Hunyuan checkpoint (config.json + model.safetensors) for tests.

  python3 make_test_model.py --arch hunyuan        --out DIR --seed 0   # Hunyuan-Large (CLA)
  python3 make_test_model.py --arch hunyuan_v1_moe --out DIR --seed 0   # HF-native sibling

Real config field names and real tensor names (spec "Checkpoint"); for --arch hunyuan the
odd layers have no k_proj / v_proj (CLA, cla_share_factor 2). Weights are stored as bf16
by default (--dtype f32 for float32). Init scales are chosen so that every block moves
the residual stream by O(1) and the router has clear margins: a test model that is
nearly the identity would not catch engine bugs.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numpy_ref import write_safetensors  # noqa: E402


def hunyuan_config(a):
    return {
        "architectures": ["HunYuanForCausalLM"],
        "model_type": "hunyuan",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "vocab_size": a.vocab,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
        "num_experts": a.experts,
        "moe_topk": a.topk if a.topk is not None else 1,
        "num_shared_expert": 1,
        "use_mixed_mlp_moe": True,
        "use_cla": True,
        "cla_share_factor": 2,
        "use_qk_norm": True,
        "use_mla": False,
        "use_pack_kv": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "capacity_factor": 1.0,
        "moe_drop_tokens": False,
        "moe_random_routing_dropped_token": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16" if a.dtype == "bf16" else "float32",
        "transformers_version": "4.41.2",
    }


def v1_moe_config(a):
    """Field set of tencent/Hunyuan-A13B-Instruct's config.json, shrunk. transformers reads
    hidden_size, intermediate_size (width of EVERY expert and of the shared MLP),
    num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size,
    max_position_embeddings, rms_norm_eps, rope_theta + rope_scaling, num_experts (int),
    moe_topk (int or per-layer list), tie_word_embeddings, attention_bias; the other keys
    are ignored by it but kept for realism."""
    L = a.layers
    head_dim = a.hidden // a.heads
    return {
        "architectures": ["HunYuanMoEV1ForCausalLM"],
        "model_type": "hunyuan_v1_moe",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "moe_intermediate_size": [a.intermediate] * L,
        "num_hidden_layers": L,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": head_dim,
        "attention_head_dim": head_dim,
        "vocab_size": a.vocab,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "dynamic", "alpha": 1000.0, "factor": 1.0},
        "num_experts": a.experts,
        "moe_topk": [a.topk if a.topk is not None else 2] * L,
        "num_shared_expert": [1] * L,
        "use_mixed_mlp_moe": True,
        "use_cla": False,
        "cla_share_factor": 1,
        "use_qk_norm": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": not a.untied,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16" if a.dtype == "bf16" else "float32",
    }


def make_weights(cfg, rng):
    H = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // nh
    I = cfg["intermediate_size"]
    E = cfg["num_experts"]
    V = cfg["vocab_size"]
    cla = cfg.get("use_cla", False)
    f = cfg.get("cla_share_factor", 1) if cla else 1
    shared_w = I * (cfg["num_shared_expert"] if isinstance(cfg["num_shared_expert"], int) else 1)

    def lin(out_dim, in_dim, gain=1.0):
        return (rng.standard_normal((out_dim, in_dim)) * gain / np.sqrt(in_dim)).astype(np.float32)

    def norm_w(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((V, H))).astype(np.float32),
         "model.norm.weight": norm_w(H)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = lin(V, H, gain=2.0)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = norm_w(H)
        w[p + "post_attention_layernorm.weight"] = norm_w(H)
        w[p + "self_attn.q_proj.weight"] = lin(nh * D, H)
        if l % f == 0:  # CLA: only the first layer of each group owns K/V projections
            w[p + "self_attn.k_proj.weight"] = lin(nkv * D, H)
            w[p + "self_attn.v_proj.weight"] = lin(nkv * D, H)
        w[p + "self_attn.o_proj.weight"] = lin(H, nh * D)
        w[p + "self_attn.query_layernorm.weight"] = (1.5 * norm_w(D)).astype(np.float32)
        w[p + "self_attn.key_layernorm.weight"] = (1.5 * norm_w(D)).astype(np.float32)
        w[p + "mlp.gate.wg.weight"] = lin(E, H, gain=3.0)
        for name, I_ in [("shared_mlp", shared_w)] + [(f"experts.{e}", I) for e in range(E)]:
            w[f"{p}mlp.{name}.gate_proj.weight"] = lin(I_, H)
            w[f"{p}mlp.{name}.up_proj.weight"] = lin(I_, H)
            w[f"{p}mlp.{name}.down_proj.weight"] = lin(H, I_, gain=1.5)
    return w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["hunyuan", "hunyuan_v1_moe"], default="hunyuan")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=96)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=None, help="default 1 (hunyuan) / 2 (hunyuan_v1_moe)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--untied", action="store_true", help="hunyuan_v1_moe only: separate lm_head")
    a = ap.parse_args(argv)

    cfg = hunyuan_config(a) if a.arch == "hunyuan" else v1_moe_config(a)
    rng = np.random.default_rng(a.seed)
    w = make_weights(cfg, rng)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(os.path.join(a.out, "model.safetensors"), w, dtype=a.dtype,
                      metadata={"format": "pt"})
    n = sum(v.size for v in w.values())
    print(f"wrote {a.arch} test model to {a.out}: {len(w)} tensors, {n} parameters, {a.dtype}")


if __name__ == "__main__":
    main()
