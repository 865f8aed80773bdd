//! Checkpoint tensor names and shapes the configuration implies.
//!
//! Names follow the HF checkpoints (`[out, in]` row-major matrices). Odd layers of a
//! CLA pair have no `k_proj`/`v_proj`.

use crate::config::ModelConfig;

/// One expected tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub name: String,
    pub shape: Vec<usize>,
}

fn e(name: String, shape: &[usize]) -> Expected {
    Expected {
        name,
        shape: shape.to_vec(),
    }
}

/// Names that may appear in a checkpoint and are ignored: the tied output head (the
/// reference ignores it) and cached RoPE tables of some exports.
pub fn is_ignored(name: &str, cfg: &ModelConfig) -> bool {
    (cfg.tie_word_embeddings && name == "lm_head.weight") || name.ends_with(".rotary_emb.inv_freq")
}

/// Every tensor the model needs, in a stable order.
pub fn expected(cfg: &ModelConfig) -> Vec<Expected> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let (q_out, kv_out) = (cfg.n_heads * d, cfg.n_kv_heads * d);
    let mut v = vec![e("model.embed_tokens.weight".into(), &[cfg.vocab_size, h])];
    for (l, spec) in cfg.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        v.push(e(format!("{p}.input_layernorm.weight"), &[h]));
        v.push(e(format!("{p}.self_attn.q_proj.weight"), &[q_out, h]));
        if spec.has_kv {
            v.push(e(format!("{p}.self_attn.k_proj.weight"), &[kv_out, h]));
            v.push(e(format!("{p}.self_attn.v_proj.weight"), &[kv_out, h]));
        }
        v.push(e(format!("{p}.self_attn.o_proj.weight"), &[h, q_out]));
        if cfg.use_qk_norm {
            v.push(e(format!("{p}.self_attn.query_layernorm.weight"), &[d]));
            v.push(e(format!("{p}.self_attn.key_layernorm.weight"), &[d]));
        }
        v.push(e(format!("{p}.post_attention_layernorm.weight"), &[h]));
        v.push(e(format!("{p}.mlp.gate.wg.weight"), &[spec.n_experts, h]));
        if spec.shared_width > 0 {
            for (n, shape) in mlp_shapes(h, spec.shared_width) {
                v.push(e(format!("{p}.mlp.shared_mlp.{n}.weight"), &shape));
            }
        }
        for x in 0..spec.n_experts {
            for (n, shape) in mlp_shapes(h, spec.expert_width) {
                v.push(e(format!("{p}.mlp.experts.{x}.{n}.weight"), &shape));
            }
        }
    }
    v.push(e("model.norm.weight".into(), &[h]));
    if !cfg.tie_word_embeddings {
        v.push(e("lm_head.weight".into(), &[cfg.vocab_size, h]));
    }
    v
}

fn mlp_shapes(h: usize, w: usize) -> [(&'static str, [usize; 2]); 3] {
    [
        ("gate_proj", [w, h]),
        ("up_proj", [w, h]),
        ("down_proj", [h, w]),
    ]
}
