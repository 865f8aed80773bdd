//! The model configuration: HF `config.json` of `HunYuanForCausalLM` (model_type
//! `hunyuan`, Hunyuan-Large, with cross-layer attention) and `HunYuanMoEV1ForCausalLM`
//! (`hunyuan_v1_moe`, Hunyuan-A13B), parsed once and validated into [`ModelConfig`].
//!
//! Defaults follow the reference implementations: `head_dim = hidden / heads` when
//! absent, expert width = `intermediate_size` when `moe_intermediate_size` is absent,
//! top-k weights renormalised only when k > 1, RoPE base fixed by the NTK alpha.
//! Every error names the offending field.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

/// The two architectures of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `HunYuanForCausalLM`: Hunyuan-Large (CLA, top-1 routing, shared expert).
    HunyuanLarge,
    /// `HunYuanMoEV1ForCausalLM`: Hunyuan-A13B (no CLA, top-k routing).
    HunyuanV1Moe,
}

impl Arch {
    pub fn architecture_name(self) -> &'static str {
        match self {
            Arch::HunyuanLarge => "HunYuanForCausalLM",
            Arch::HunyuanV1Moe => "HunYuanMoEV1ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::HunyuanLarge => "hunyuan",
            Arch::HunyuanV1Moe => "hunyuan_v1_moe",
        }
    }
}

/// A configuration error, naming the field (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("config field `{field}`: {reason}")]
    Field { field: String, reason: String },
}

fn field_err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Per-layer shape of the MoE block and attention.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSpec {
    pub n_experts: usize,
    pub top_k: usize,
    pub expert_width: usize,
    /// Width of the shared MLP (0 when the layer has none).
    pub shared_width: usize,
    /// Whether this layer has its own k_proj/v_proj (false: it reuses its CLA pair's).
    pub has_kv: bool,
    /// KV cache slot this layer reads (and writes, if `has_kv`).
    pub cache_layer: usize,
}

/// The validated configuration the engine runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_alpha: Option<f64>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub use_qk_norm: bool,
    pub cla_share_factor: usize,
    /// Number of KV cache slots per token (layers / CLA share factor).
    pub n_cache_layers: usize,
    pub layers: Vec<LayerSpec>,
    /// The checkpoint's declared dtype (`torch_dtype`/`dtype`), if any.
    pub torch_dtype: Option<String>,
}

/// Raw `config.json` as written by HF: everything optional, validated later.
#[derive(Debug, Default, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<Value>,
    hidden_size: Option<Value>,
    intermediate_size: Option<Value>,
    moe_intermediate_size: Option<Value>,
    num_hidden_layers: Option<Value>,
    num_attention_heads: Option<Value>,
    num_key_value_heads: Option<Value>,
    head_dim: Option<Value>,
    attention_head_dim: Option<Value>,
    num_experts: Option<Value>,
    moe_topk: Option<Value>,
    num_shared_expert: Option<Value>,
    use_mixed_mlp_moe: Option<bool>,
    use_cla: Option<bool>,
    cla_share_factor: Option<Value>,
    use_qk_norm: Option<bool>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: Option<Value>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// Upper bounds that keep a hostile config from sizing huge allocations.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;
const MAX_EXPERTS: usize = 4096;
const MAX_VOCAB: usize = 1 << 24;

fn as_usize(field: &str, v: &Value) -> Result<usize, ConfigError> {
    v.as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| field_err(field, format!("expected a non-negative integer, found {v}")))
}

fn req_usize(field: &str, v: &Option<Value>, max: usize) -> Result<usize, ConfigError> {
    let v = v.as_ref().ok_or_else(|| field_err(field, "missing"))?;
    let x = as_usize(field, v)?;
    if x == 0 || x > max {
        return Err(field_err(field, format!("{x} is out of range 1..={max}")));
    }
    Ok(x)
}

/// An int, or a list with one int per layer.
fn per_layer(
    field: &str,
    v: &Option<Value>,
    n_layers: usize,
    default: Option<usize>,
    max: usize,
) -> Result<Vec<usize>, ConfigError> {
    let vals = match v {
        None | Some(Value::Null) => match default {
            Some(d) => vec![d; n_layers],
            None => return Err(field_err(field, "missing")),
        },
        Some(Value::Array(xs)) => {
            if xs.len() != n_layers {
                return Err(field_err(
                    field,
                    format!(
                        "has {} entries but num_hidden_layers is {n_layers}",
                        xs.len()
                    ),
                ));
            }
            xs.iter()
                .enumerate()
                .map(|(i, x)| as_usize(&format!("{field}[{i}]"), x))
                .collect::<Result<_, _>>()?
        }
        Some(x) => vec![as_usize(field, x)?; n_layers],
    };
    if let Some((i, x)) = vals.iter().enumerate().find(|&(_, &x)| x > max) {
        return Err(field_err(field, format!("entry {i} = {x} exceeds {max}")));
    }
    Ok(vals)
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ConfigError::Json { source, .. } => ConfigError::Json {
                path: path.display().to_string(),
                source,
            },
            e => e,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: "config.json".into(),
            source,
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let arch_name = raw.architectures.as_ref().and_then(|a| a.first().cloned());
        let arch = match (arch_name.as_deref(), raw.model_type.as_deref()) {
            (Some("HunYuanForCausalLM"), _) | (None, Some("hunyuan")) => Arch::HunyuanLarge,
            (Some("HunYuanMoEV1ForCausalLM"), _) | (None, Some("hunyuan_v1_moe")) => {
                Arch::HunyuanV1Moe
            }
            (Some(other), _) => {
                return Err(field_err(
                    "architectures",
                    format!(
                        "'{other}' is not supported (expected HunYuanForCausalLM or HunYuanMoEV1ForCausalLM)"
                    ),
                ));
            }
            (None, other) => {
                return Err(field_err(
                    "model_type",
                    format!(
                        "{other:?} is not supported and `architectures` is missing (expected hunyuan or hunyuan_v1_moe)"
                    ),
                ));
            }
        };
        if let Some(mt) = &raw.model_type
            && mt != arch.model_type()
        {
            return Err(field_err(
                "model_type",
                format!(
                    "'{mt}' contradicts architectures '{}'",
                    arch.architecture_name()
                ),
            ));
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(field_err(
                "hidden_act",
                format!("'{act}' is not supported (silu only)"),
            ));
        }
        if raw.attention_bias == Some(true) {
            return Err(field_err(
                "attention_bias",
                "true is not supported (the family has none)",
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err(field_err(
                "mlp_bias",
                "true is not supported (the family has none)",
            ));
        }

        let hidden = req_usize("hidden_size", &raw.hidden_size, MAX_DIM)?;
        let n_layers = req_usize("num_hidden_layers", &raw.num_hidden_layers, MAX_LAYERS)?;
        let n_heads = req_usize("num_attention_heads", &raw.num_attention_heads, MAX_DIM)?;
        let n_kv_heads = match &raw.num_key_value_heads {
            None | Some(Value::Null) => n_heads,
            v => req_usize("num_key_value_heads", v, MAX_DIM)?,
        };
        if n_heads % n_kv_heads != 0 {
            return Err(field_err(
                "num_key_value_heads",
                format!("{n_kv_heads} does not divide num_attention_heads ({n_heads})"),
            ));
        }
        let head_dim = match (&raw.head_dim, &raw.attention_head_dim) {
            (Some(v), _) if !v.is_null() => req_usize("head_dim", &Some(v.clone()), MAX_DIM)?,
            (_, Some(v)) if !v.is_null() => {
                req_usize("attention_head_dim", &Some(v.clone()), MAX_DIM)?
            }
            _ => {
                if hidden % n_heads != 0 {
                    return Err(field_err(
                        "head_dim",
                        format!(
                            "absent, and hidden_size ({hidden}) is not a multiple of num_attention_heads ({n_heads})"
                        ),
                    ));
                }
                hidden / n_heads
            }
        };
        if head_dim % 2 != 0 || head_dim < 4 {
            return Err(field_err(
                "head_dim",
                format!("{head_dim} must be even and >= 4 for RoPE"),
            ));
        }
        let vocab_size = req_usize("vocab_size", &raw.vocab_size, MAX_VOCAB)?;
        let intermediate = req_usize("intermediate_size", &raw.intermediate_size, MAX_DIM)?;
        let n_experts = per_layer("num_experts", &raw.num_experts, n_layers, None, MAX_EXPERTS)?;
        let top_k = per_layer("moe_topk", &raw.moe_topk, n_layers, Some(1), MAX_EXPERTS)?;
        let expert_width = per_layer(
            "moe_intermediate_size",
            &raw.moe_intermediate_size,
            n_layers,
            Some(intermediate),
            MAX_DIM,
        )?;
        let mixed = raw.use_mixed_mlp_moe.unwrap_or(arch == Arch::HunyuanV1Moe);
        let n_shared = if mixed {
            per_layer(
                "num_shared_expert",
                &raw.num_shared_expert,
                n_layers,
                Some(1),
                64,
            )?
        } else {
            vec![0; n_layers]
        };
        let use_cla = raw.use_cla.unwrap_or(false);
        if use_cla && arch == Arch::HunyuanV1Moe {
            return Err(field_err("use_cla", "true is not part of hunyuan_v1_moe"));
        }
        let cla_share_factor = if use_cla {
            match &raw.cla_share_factor {
                None | Some(Value::Null) => 2,
                v => req_usize("cla_share_factor", v, n_layers)?,
            }
        } else {
            1
        };
        let use_qk_norm = raw.use_qk_norm.unwrap_or(arch == Arch::HunyuanV1Moe);

        let (rope_alpha, factor) = match &raw.rope_scaling {
            None | Some(Value::Null) => (None, None),
            Some(Value::Object(m)) => {
                let ty = m
                    .get("type")
                    .or_else(|| m.get("rope_type"))
                    .and_then(Value::as_str)
                    .unwrap_or("dynamic");
                if ty != "dynamic" {
                    return Err(field_err(
                        "rope_scaling.type",
                        format!("'{ty}' is not supported (dynamic with alpha only)"),
                    ));
                }
                let alpha = match m.get("alpha") {
                    None | Some(Value::Null) => None,
                    Some(a) => Some(a.as_f64().filter(|a| *a > 0.0).ok_or_else(|| {
                        field_err(
                            "rope_scaling.alpha",
                            format!("{a} is not a positive number"),
                        )
                    })?),
                };
                (alpha, m.get("factor").and_then(Value::as_f64))
            }
            Some(v) => {
                return Err(field_err(
                    "rope_scaling",
                    format!("expected an object, found {v}"),
                ));
            }
        };
        if rope_alpha.is_none() && factor.is_some_and(|f| f != 1.0) {
            return Err(field_err(
                "rope_scaling.factor",
                "length-dependent dynamic NTK without alpha is not supported",
            ));
        }
        let rope_theta = raw.rope_theta.unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(field_err("rope_theta", format!("{rope_theta} must be > 1")));
        }
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-5);
        if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(field_err(
                "rms_norm_eps",
                format!("{rms_norm_eps} out of range (0, 1)"),
            ));
        }
        let max_position_embeddings = match &raw.max_position_embeddings {
            None | Some(Value::Null) => 4096,
            v => req_usize("max_position_embeddings", v, 1 << 24)?,
        };

        let mut layers = Vec::with_capacity(n_layers);
        for l in 0..n_layers {
            if top_k[l] == 0 || top_k[l] > n_experts[l] {
                return Err(field_err(
                    "moe_topk",
                    format!(
                        "layer {l}: {} is not in 1..={} (num_experts)",
                        top_k[l], n_experts[l]
                    ),
                ));
            }
            if n_experts[l] == 0 {
                return Err(field_err("num_experts", format!("layer {l}: must be >= 1")));
            }
            if expert_width[l] == 0 {
                return Err(field_err(
                    "moe_intermediate_size",
                    format!("layer {l}: must be >= 1"),
                ));
            }
            layers.push(LayerSpec {
                n_experts: n_experts[l],
                top_k: top_k[l],
                expert_width: expert_width[l],
                shared_width: intermediate * n_shared[l],
                has_kv: l % cla_share_factor == 0,
                cache_layer: l / cla_share_factor,
            });
        }
        Ok(Self {
            arch,
            vocab_size,
            hidden_size: hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            rope_alpha,
            max_position_embeddings,
            tie_word_embeddings: raw
                .tie_word_embeddings
                .unwrap_or(arch == Arch::HunyuanLarge),
            use_qk_norm,
            cla_share_factor,
            n_cache_layers: n_layers.div_ceil(cla_share_factor),
            layers,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// The fixed NTK-alpha RoPE base: `theta * alpha^(d / (d - 2))`.
    pub fn rope_base(&self) -> f64 {
        let d = self.head_dim as f64;
        match self.rope_alpha {
            Some(a) => self.rope_theta * a.powf(d / (d - 2.0)),
            None => self.rope_theta,
        }
    }

    /// `inv_freq[i] = 1 / base^(2i / d)`, computed in fp32 as the reference does.
    pub fn inv_freq(&self) -> Vec<f32> {
        let base = self.rope_base() as f32;
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / d as f32))
            .collect()
    }

    /// KV-cache bytes per token for element size `elem_bytes`: one K and V per cache
    /// layer (so CLA pairs are counted once).
    pub fn kv_bytes_per_token(&self, elem_bytes: usize) -> usize {
        2 * self.n_cache_layers * self.n_kv_heads * self.head_dim * elem_bytes
    }

    /// Whether the router renormalises the top-k weights of layer `l`.
    pub fn renormalize(&self, l: usize) -> bool {
        self.layers[l].top_k > 1
    }

    /// Total parameter count implied by the config.
    pub fn n_params(&self) -> u64 {
        let (h, d) = (self.hidden_size as u64, self.head_dim as u64);
        let (nh, nkv) = (self.n_heads as u64, self.n_kv_heads as u64);
        let mut n = self.vocab_size as u64 * h * if self.tie_word_embeddings { 1 } else { 2 } + h;
        for l in &self.layers {
            n += 2 * h + 2 * nh * d * h; // norms, q, o
            if l.has_kv {
                n += 2 * nkv * d * h;
            }
            if self.use_qk_norm {
                n += 2 * d;
            }
            n += l.n_experts as u64 * h; // router
            n += 3 * h * (l.n_experts * l.expert_width + l.shared_width) as u64;
        }
        n
    }

    /// Parameters used per token (attention, shared expert, top-k routed experts).
    pub fn n_active_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let mut n = self.n_params();
        for l in &self.layers {
            n -= 3 * h * ((l.n_experts - l.top_k) * l.expert_width) as u64;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real Hunyuan-A52B-Instruct config.json fields.
    pub(crate) const HUNYUAN_LARGE: &str = r#"{
        "architectures": ["HunYuanForCausalLM"], "model_type": "hunyuan",
        "hidden_size": 6400, "intermediate_size": 18304, "num_hidden_layers": 64,
        "num_attention_heads": 80, "num_key_value_heads": 8, "vocab_size": 129024,
        "max_position_embeddings": 131072, "rope_theta": 10000.0,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
        "num_experts": 16, "moe_topk": 1, "num_shared_expert": 1,
        "use_mixed_mlp_moe": true, "use_cla": true, "cla_share_factor": 2,
        "use_qk_norm": true, "rms_norm_eps": 1e-05, "hidden_act": "silu",
        "attention_bias": false, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "capacity_factor": 1.0, "moe_drop_tokens": false, "moe_random_routing_dropped_token": false,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    }"#;

    #[test]
    fn real_hunyuan_large_config() {
        let c = ModelConfig::from_json(HUNYUAN_LARGE).unwrap();
        assert_eq!(c.arch, Arch::HunyuanLarge);
        assert_eq!(c.head_dim, 80);
        assert_eq!(c.n_cache_layers, 32);
        assert!(c.layers[0].has_kv && !c.layers[1].has_kv);
        assert_eq!(c.layers[1].cache_layer, 0);
        assert_eq!(c.layers[3].cache_layer, 1);
        assert_eq!(c.layers[0].expert_width, 18304);
        assert!(!c.renormalize(0));
        // base = 1e4 * 1000^(80/78) ~ 1.1937766e7 (the spec's figure).
        assert!(
            (c.rope_base() / 1.1937766e7 - 1.0).abs() < 1e-6,
            "{}",
            c.rope_base()
        );
        // The CLA cache: 2 x 8 x 80 x 32 pairs x 2 bytes.
        assert_eq!(c.kv_bytes_per_token(2), 81_920);
        // 388.7B parameters, ~52B active.
        let p = c.n_params() as f64 / 1e9;
        assert!((p - 388.7).abs() < 1.0, "{p}");
        let a = c.n_active_params() as f64 / 1e9;
        assert!((a - 52.0).abs() < 1.5, "{a}");
    }

    #[test]
    fn a13b_style_config_with_lists() {
        let c = ModelConfig::from_json(
            r#"{"architectures": ["HunYuanMoEV1ForCausalLM"], "model_type": "hunyuan_v1_moe",
            "hidden_size": 4096, "intermediate_size": 3072, "num_hidden_layers": 2,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128167,
            "num_experts": 64, "moe_topk": [8, 8], "moe_intermediate_size": [3072, 3072],
            "num_shared_expert": [1, 1], "use_mixed_mlp_moe": true, "use_qk_norm": true,
            "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}}"#,
        )
        .unwrap();
        assert_eq!(c.arch, Arch::HunyuanV1Moe);
        assert_eq!(c.n_cache_layers, 2);
        assert!(c.renormalize(0));
        assert!(
            (c.rope_base() - 11158839.9251).abs() < 1.0,
            "{}",
            c.rope_base()
        );
        assert_eq!(c.kv_bytes_per_token(2), 2 * 2 * 8 * 128 * 2);
    }

    fn err_of(patch: &str) -> String {
        let mut v: Value = serde_json::from_str(HUNYUAN_LARGE).unwrap();
        let p: Value = serde_json::from_str(patch).unwrap();
        for (k, x) in p.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_field() {
        for (patch, field) in [
            (
                r#"{"architectures": ["LlamaForCausalLM"]}"#,
                "architectures",
            ),
            (r#"{"num_key_value_heads": 7}"#, "num_key_value_heads"),
            (r#"{"hidden_size": -1}"#, "hidden_size"),
            (r#"{"hidden_size": 1e30}"#, "hidden_size"),
            (r#"{"num_hidden_layers": 100000000}"#, "num_hidden_layers"),
            (r#"{"moe_topk": 17}"#, "moe_topk"),
            (r#"{"moe_topk": [1, 1]}"#, "moe_topk"),
            (r#"{"hidden_act": "gelu"}"#, "hidden_act"),
            (r#"{"rope_scaling": {"type": "yarn"}}"#, "rope_scaling.type"),
            (r#"{"model_type": "hunyuan_v1_moe"}"#, "model_type"),
            (r#"{"head_dim": 81}"#, "head_dim"),
            (r#"{"vocab_size": null}"#, "vocab_size"),
        ] {
            let e = err_of(patch);
            assert!(e.contains(&format!("`{field}`")), "{patch}: {e}");
        }
    }
}
