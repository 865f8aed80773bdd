#!/usr/bin/env python3
"""Convert a hyserve-generated Hunyuan-A13B-style checkpoint (HF layout) to GGUF
for llama.cpp's "hunyuan-moe" architecture.

Why not llama.cpp's own convert_hf_to_gguf.py?  Its HunYuanMoEModel.set_vocab
loads the tokenizer with AutoTokenizer(trust_remote_code=True), which needs
Tencent's tokenization_hy.py (not shipped by `hyserve init-model`), and it
hard-codes bos id 127959 (the real A13B vocab), which is out of range for the
small test vocab.  Everything else here mirrors that converter:

  * hparams: the TextModel base keys plus HunYuanMoEModel.set_gguf_parameters
    (NTK-alpha RoPE folded into rope.freq_base = theta * alpha**(d/(d-2)),
    scaling type none, 256k context), uniform-list asserts.
  * tensors: experts stacked per layer into 3-D ffn_{gate,up,down}_exps,
    shared expert as *_shexp, q/k norms, router ffn_gate_inp and all 1-D
    tensors in F32, every other weight kept BF16 (bit-exact copy of the
    checkpoint), tied output (no output.weight).
  * vocab: gpt2-style BPE built from hy.tiktoken the way QwenModel/HunYuan
    do it (byte-level unicode strings, merges recovered from ranks), specials
    from tokenizer_config.json's added_tokens_decoder as CONTROL, padded to
    config.vocab_size with [PADn] UNUSED entries, pre-tokenizer "hunyuan".

Requires: numpy, gguf (pip install gguf).  Does not need torch/transformers.

Usage: to_gguf.py --model DIR --out FILE.gguf
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import sys

import numpy as np
import gguf

ARCH = "hunyuan-moe"


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2 byte-level mapping (same as transformers.convert_slow_tokenizer.bytes_to_unicode)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


BYTE_ENC = bytes_to_unicode()


def token_bytes_to_string(b: bytes) -> str:
    return "".join(BYTE_ENC[x] for x in b)


def bpe(mergeable_ranks: dict[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    # copy of llama.cpp's QwenModel.bpe
    parts = [bytes([b]) for b in token]
    while True:
        min_idx = None
        min_rank = None
        for i, pair in enumerate(zip(parts[:-1], parts[1:])):
            rank = mergeable_ranks.get(pair[0] + pair[1])
            if rank is not None and (min_rank is None or rank < min_rank):
                min_idx = i
                min_rank = rank
        if min_rank is None or (max_rank is not None and min_rank >= max_rank):
            break
        assert min_idx is not None
        parts = parts[:min_idx] + [parts[min_idx] + parts[min_idx + 1]] + parts[min_idx + 2:]
    return parts


def load_tiktoken(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


class SafeTensors:
    """Minimal zero-copy safetensors reader (numpy cannot hold bf16, so BF16 is read as uint16)."""

    DT = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}

    def __init__(self, model_dir: str):
        idx = os.path.join(model_dir, "model.safetensors.index.json")
        files = [os.path.join(model_dir, "model.safetensors")]
        if os.path.exists(idx):
            wm = json.load(open(idx))["weight_map"]
            files = sorted({os.path.join(model_dir, v) for v in wm.values()})
        self.entries: dict[str, tuple[str, dict, int]] = {}
        self.maps: dict[str, np.memmap] = {}
        for fn in files:
            with open(fn, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                hdr = json.loads(f.read(n))
            self.maps[fn] = np.memmap(fn, dtype=np.uint8, mode="r")
            for k, v in hdr.items():
                if k != "__metadata__":
                    self.entries[k] = (fn, v, 8 + n)

    def dtype(self, name: str) -> str:
        return self.entries[name][1]["dtype"]

    def get(self, name: str) -> np.ndarray:
        fn, v, base = self.entries[name]
        s, e = v["data_offsets"]
        raw = self.maps[fn][base + s: base + e]
        return raw.view(self.DT[v["dtype"]]).reshape(v["shape"])

    def names(self):
        return self.entries.keys()


def to_f32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    d = args.model
    cfg = json.load(open(os.path.join(d, "config.json")))
    tcfg = json.load(open(os.path.join(d, "tokenizer_config.json")))
    assert cfg["architectures"][0] == "HunYuanMoEV1ForCausalLM", cfg["architectures"]

    n_layer = cfg["num_hidden_layers"]
    n_embd = cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim", n_embd // n_head)
    n_expert = cfg["num_experts"]
    vocab_size = cfg["vocab_size"]

    def uniform(key):
        v = cfg[key]
        if isinstance(v, list):
            assert all(x == v[0] for x in v), f"{key} must be uniform: {v}"
            return v[0]
        return v

    n_ff_exp = uniform("moe_intermediate_size")
    topk = uniform("moe_topk")
    n_shared = uniform("num_shared_expert")
    assert n_shared == 1, "llama.cpp hunyuan-moe has exactly one shared expert MLP"
    assert cfg.get("use_qk_norm", True) and not cfg.get("use_cla", False) and not cfg.get("attention_bias", False)
    assert cfg.get("use_mixed_mlp_moe", True)

    w = gguf.GGUFWriter(args.out, ARCH)
    w.add_name(os.path.basename(os.path.abspath(d)))
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(n_expert)
    w.add_expert_used_count(topk)
    w.add_expert_feed_forward_length(n_ff_exp)
    w.add_expert_shared_feed_forward_length(cfg["intermediate_size"])
    w.add_expert_shared_count(n_shared)

    rs = cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", 10000.0)
    if rs.get("type", rs.get("rope_type")) == "dynamic" and rs.get("alpha"):
        alpha = rs["alpha"]
        # HunYuan NTK-alpha: static base stretch (transformers: compute_ntk_alpha_rope_parameters)
        w.add_rope_freq_base(theta * (alpha ** (head_dim / (head_dim - 2))))
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_factor(1)
        w.add_rope_scaling_orig_ctx_len(256 * 1024)
        w.add_context_length(256 * 1024)
    else:
        w.add_rope_freq_base(theta)
        w.add_context_length(cfg["max_position_embeddings"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    # ---------------- vocab ----------------
    ranks = load_tiktoken(os.path.join(d, "hy.tiktoken"))
    specials = {v["content"]: int(k) for k, v in tcfg.get("added_tokens_decoder", {}).items()}
    vocab: dict[int, str] = {}
    merges: list[str] = []
    for tok, rank in ranks.items():
        vocab[rank] = token_bytes_to_string(tok)
        if len(tok) == 1:
            continue
        merged = bpe(ranks, tok, max_rank=rank)
        if len(merged) == 2:
            merges.append(" ".join(map(token_bytes_to_string, merged)))
    special_ids = set(specials.values())
    for s, i in specials.items():
        assert i not in vocab, f"special {s} collides with rank {i}"
        vocab[i] = s
    assert max(vocab) < vocab_size
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(vocab[i])
            toktypes.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("hunyuan")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)

    def special_id(cfg_key, tcfg_key):
        if cfg.get(cfg_key) is not None:
            return int(cfg[cfg_key])
        name = tcfg.get(tcfg_key)
        if isinstance(name, dict):
            name = name.get("content")
        return specials.get(name)

    bos, eos, pad = special_id("bos_token_id", "bos_token"), special_id("eos_token_id", "eos_token"), special_id("pad_token_id", "pad_token")
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if pad is not None:
        w.add_pad_token_id(pad)
    w.add_add_bos_token(False)
    print(f"vocab: {len(ranks)} ranks, {len(merges)} merges, {len(specials)} specials, padded to {vocab_size}; bos={bos} eos={eos} pad={pad}")

    # ---------------- tensors ----------------
    st = SafeTensors(d)
    used: set[str] = set()

    def add(gname: str, hname_or_arr, force_f32: bool = False):
        if isinstance(hname_or_arr, str):
            used.add(hname_or_arr)
            arr, sdt = st.get(hname_or_arr), st.dtype(hname_or_arr)
        else:
            arr, sdt = hname_or_arr
        if force_f32 or arr.ndim == 1:
            w.add_tensor(gname, np.ascontiguousarray(to_f32(arr, sdt)))
        elif sdt == "BF16":
            w.add_tensor(gname, np.ascontiguousarray(arr), raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif sdt == "F16":
            w.add_tensor(gname, np.ascontiguousarray(arr))
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))

    add("token_embd.weight", "model.embed_tokens.weight")
    add("output_norm.weight", "model.norm.weight")
    if not cfg.get("tie_word_embeddings", False) and "lm_head.weight" in st.names():
        add("output.weight", "lm_head.weight")
    elif "lm_head.weight" in st.names():
        used.add("lm_head.weight")

    for i in range(n_layer):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight")
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight")
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight")
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight")
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight")
        add(b + "attn_q_norm.weight", p + "self_attn.query_layernorm.weight")
        add(b + "attn_k_norm.weight", p + "self_attn.key_layernorm.weight")
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight")
        add(b + "ffn_gate_inp.weight", p + "mlp.gate.wg.weight", force_f32=True)
        for hf, gg in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            names = [f"{p}mlp.experts.{x}.{hf}.weight" for x in range(n_expert)]
            used.update(names)
            dts = {st.dtype(n) for n in names}
            assert len(dts) == 1
            stacked = np.stack([st.get(n) for n in names], axis=0)
            add(f"{b}ffn_{gg}_exps.weight", (stacked, dts.pop()))
            add(f"{b}ffn_{gg}_shexp.weight", f"{p}mlp.shared_mlp.{hf}.weight")

    left = sorted(set(st.names()) - used)
    if left:
        print("ERROR: unconverted tensors:", left[:10], file=sys.stderr)
        return 1

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
