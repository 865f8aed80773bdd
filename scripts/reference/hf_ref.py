#!/usr/bin/env python3
"""HuggingFace transformers oracle: greedy generation with the NATIVE hunyuan_v1_moe model.

  python3 hf_ref.py --model DIR --prompt-ids 1,2,3 --max-tokens N \
      --out-logits L.npy --out-json G.json [--dtype float32|bfloat16] [--device cuda|cpu]

Same outputs as numpy_ref.py: L.npy float32 [n_prompt + N - 1, vocab] (row i = raw
next-token logits after consuming token i; prefill rows from the pass over the prompt,
then one row per decode step, each step a full forward without KV cache), G.json =
{"prompt_ids", "generated_ids"}. Argmax ties -> lowest id. No network: local files only.

Written for torch 2.11 / transformers 5.x (it also handles 4.5x where it can). It only
runs model_type "hunyuan_v1_moe" (HunYuanMoEV1ForCausalLM); transformers has no native
Hunyuan-Large ("hunyuan", CLA) implementation.

What transformers' hunyuan_v1_moe does (read from modular/modeling_hunyuan_v1_moe.py and
configuration_hunyuan_v1_moe.py, transformers 5.x):
  * Attention: q/k/v/o_proj (bias = attention_bias); RoPE, THEN query_layernorm /
    key_layernorm (per-head RMSNorm over head_dim); eager: softmax(q k^T * d^-0.5) in
    fp32; GQA repeat_kv (query head h uses kv head h // (heads / kv_heads)). No CLA: every
    layer has k_proj / v_proj. (Older 4.5x versions applied the QK-norm BEFORE RoPE.)
  * RoPE: rope_scaling {"type": "dynamic", "alpha": A, "factor": 1.0} gives a fixed
    base = rope_theta * A ** (head_dim / (head_dim - 2)); cos/sin computed in fp32 and cast
    to the activation dtype. Needs seq_len <= max_position_embeddings (beyond that the
    "dynamic" update path does not know about alpha).
  * MoE: router mlp.gate.wg ([num_experts, hidden], created as fp32 and still fp32 after
    from_pretrained(dtype=bfloat16): the router runs in fp32), p = softmax(fp32),
    top-k = moe_topk[layer], weights p_topk / sum(p_topk) ALWAYS (so top-1 weight == 1.0,
    unlike Hunyuan-Large), no token dropping; shared_mlp ALWAYS present; output =
    routed + shared_mlp(x), routed = bf16(sum_k w_k * expert_k(x)) with fp32 w_k.
    Every expert AND the shared MLP have width intermediate_size.
  * Tied lm_head when tie_word_embeddings (then lm_head.weight may be absent).
  * Checkpoint names: the per-expert model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight
    are fused at load time (conversion mapping "hunyuan_v1_moe" = qwen2_moe's) into
    experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I]. This script
    re-reads the safetensors and verifies every loaded parameter against them.

config.json fields transformers 5.x reads for hunyuan_v1_moe (HunYuanMoEV1Config):
  vocab_size: int              hidden_size: int            intermediate_size: int (ONE int;
  num_hidden_layers: int       num_attention_heads: int     every expert + shared MLP)
  num_key_value_heads: int     head_dim: int (SET IT: the alpha-RoPE path reads
  hidden_act: "silu"             config.head_dim directly and breaks on null;
  max_position_embeddings: int   this script fills it in as hidden/heads if absent)
  rms_norm_eps: float          rope_theta: float           rope_scaling: {"type": "dynamic",
  num_experts: int (ONE int; per-layer lists are not accepted by the v5 typed config)
  moe_topk: int or list[int] (per layer)                   "alpha": float, "factor": 1.0}
  tie_word_embeddings: bool    attention_bias: bool        attention_dropout: float
  pad/bos/eos/eod/sep_token_id: int                        initializer_range: float
  (aliases: num_experts_per_tok -> moe_topk, num_local_experts -> num_experts).
  Ignored by transformers (present in Tencent's A13B config.json, harmless to include):
  moe_intermediate_size (list), num_shared_expert (list), use_mixed_mlp_moe, use_qk_norm,
  use_cla, cla_share_factor, attention_head_dim, ...
"""

import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch


def parse_ids(s):
    return [int(t) for t in s.replace(" ", "").split(",") if t != ""]


def expected_inv_freq(config):
    """inv_freq the model should hold (fixed NTK-alpha base), computed like transformers."""
    d = int(config.head_dim)
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rtype = rp.get("rope_type", rp.get("type", "default"))
    base = float(theta)
    if rtype == "dynamic" and rp.get("alpha"):
        base = float(theta) * float(rp["alpha"]) ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2).float() / d))


def load_ckpt_tensors(model_dir):
    from safetensors.torch import load_file
    idx = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(p for p in os.listdir(model_dir) if p.endswith(".safetensors"))
    out = {}
    for fn in files:
        out.update(load_file(os.path.join(model_dir, fn)))
    return out


def verify_weights(model, ckpt):
    """Check every checkpoint tensor landed where we think (incl. fused experts), so a
    silently random-initialised parameter cannot pass as the oracle."""
    sd = model.state_dict()
    checked, bad = 0, []
    expert_re = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for name, t in ckpt.items():
        m = expert_re.match(name)
        if name in sd:
            got = sd[name].detach().cpu()
            # compare in the parameter's own dtype (the fp32 router stays fp32)
            ok = got.shape == t.shape and torch.equal(got, t.to(got.dtype))
        elif m and (m.group(1) + ".gate_up_proj") in sd:
            prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
            ref = t
            if kind == "down_proj":
                fused = sd[prefix + ".down_proj"][e].detach().cpu()
                cands = [fused, fused.t()]
            else:
                fused = sd[prefix + ".gate_up_proj"][e].detach().cpu()
                I = ref.shape[0]
                if fused.shape[0] == 2 * I:    # [2I, H], gate rows first
                    cands = [fused[:I] if kind == "gate_proj" else fused[I:]]
                else:                          # [H, 2I] layout
                    cands = [(fused[:, :I] if kind == "gate_proj" else fused[:, I:]).t()]
            ok = any(c.shape == ref.shape and torch.equal(c, ref.to(c.dtype)) for c in cands)
        elif name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue  # ignored: tied to embed_tokens
        else:
            bad.append(f"{name}: no matching model parameter")
            continue
        checked += 1
        if not ok:
            bad.append(f"{name}: value/shape mismatch")
    if getattr(model.config, "tie_word_embeddings", False):
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        if not torch.equal(emb.detach().cpu(), head.detach().cpu()):
            bad.append("tie_word_embeddings but lm_head != embed_tokens")
    return checked, bad


def main(argv=None):
    ap = argparse.ArgumentParser(description="transformers hunyuan_v1_moe greedy oracle")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out-logits", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="eager", help="attn_implementation: eager (default) | sdpa")
    ap.add_argument("--skip-verify", action="store_true", help="skip the weight/RoPE verification")
    args = ap.parse_args(argv)

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    # exact arithmetic settings: no TF32, fp32 accumulation for bf16 GEMMs
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    if config.model_type != "hunyuan_v1_moe":
        sys.exit(f"model_type {config.model_type!r}: only hunyuan_v1_moe has a native transformers implementation")
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads

    kwargs = dict(config=config, local_files_only=True, attn_implementation=args.attn)
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    kwargs["dtype" if major_minor >= (4, 56) else "torch_dtype"] = dtype
    try:
        model, info = AutoModelForCausalLM.from_pretrained(args.model, output_loading_info=True, **kwargs)
    except TypeError:
        model, info = AutoModelForCausalLM.from_pretrained(args.model, **kwargs), {}
    model = model.to(args.device).eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{type(model).__name__}, dtype {args.dtype}, device {args.device}, attn {args.attn}")
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        v = info.get(k) if isinstance(info, dict) else None
        if v:
            print(f"loading info {k}: {sorted(v)[:20]}")
    missing = [k for k in (info.get("missing_keys") or []) if k != "lm_head.weight"] if isinstance(info, dict) else []
    if missing:
        sys.exit(f"missing weights (would be random): {missing[:10]}")

    if not args.skip_verify:
        checked, bad = verify_weights(model, load_ckpt_tensors(args.model))
        if bad:
            sys.exit(f"weight verification failed ({len(bad)}): {bad[:10]}")
        print(f"verified {checked} checkpoint tensors against the loaded model")
        rot = model.model.rotary_emb
        got = rot.inv_freq.detach().float().cpu()
        exp = expected_inv_freq(model.config)
        rel = float(((got - exp).abs() / exp.abs()).max())
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        print(f"RoPE inv_freq max rel diff vs NTK-alpha formula: {rel:.2e}; attention_scaling {scaling}")
        if rel > 1e-5 or abs(scaling - 1.0) > 0:
            sys.exit("RoPE of the loaded model is not the fixed NTK-alpha RoPE the spec describes")
        wg = model.model.layers[0].mlp.gate.wg.weight
        print(f"router wg dtype: {wg.dtype}")

    prompt = parse_ids(args.prompt_ids)
    seq = list(prompt)
    rows, gen = [], []

    @torch.no_grad()
    def run(ids):
        x = torch.tensor([ids], dtype=torch.long, device=args.device)
        return model(input_ids=x, use_cache=False).logits[0].float().cpu().numpy()

    rows.append(run(seq))  # prefill rows
    for step in range(args.max_tokens):
        nxt = int(np.argmax(rows[-1][-1]))  # first max -> lowest id
        gen.append(nxt)
        seq.append(nxt)
        if step + 1 < args.max_tokens:
            rows.append(run(seq)[-1:])
    logits = np.concatenate(rows, axis=0).astype(np.float32)
    np.save(args.out_logits, logits)
    with open(args.out_json, "w") as f:
        json.dump({"prompt_ids": prompt, "generated_ids": gen}, f)
    print(f"prompt {len(prompt)} tokens, generated {gen}, logits {logits.shape}")


if __name__ == "__main__":
    main()
