//! `hyserve init-model`: seeded random models of the real architectures, written in
//! the real formats (HF `config.json`, sharded safetensors or PyTorch `.bin`, and a
//! `hy.tiktoken` tokenizer trained on a small embedded text).
//!
//! Weights come from a fixed-algorithm generator (splitmix64) seeded per tensor from
//! the model seed and the tensor name, so the bytes of a preset never change with the
//! shard layout or a dependency upgrade; fidelity fixtures rely on that.

use std::path::Path;

use hyserve_kernels::DType;
use hyserve_kernels::numeric;
use serde_json::{Value, json};

use crate::config::{Arch, ModelConfig};
use crate::names;
use crate::tokenizer;
use crate::torch_bin::{self, BinDType, BinTensor};

/// Text the embedded tokenizer is trained on.
const CORPUS: &str = include_str!("init_corpus.txt");

/// Number of Hunyuan special tokens placed after the ranks.
const N_SPECIAL: usize = 209;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("unknown preset '{0}' (tiny, small, medium)")]
    Preset(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("generated config is invalid: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("writing the tokenizer: {0}")]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error("writing safetensors {path}: {reason}")]
    Safetensors { path: String, reason: String },
}

/// On-disk format for the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    TorchBin,
}

#[derive(Clone, Debug)]
pub struct InitOptions {
    pub arch: Arch,
    pub preset: String,
    pub seed: u64,
    pub dtype: DType,
    pub format: WeightFormat,
    /// Shards are cut when they would exceed this many bytes.
    pub max_shard_bytes: u64,
}

struct Dims {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    layers: usize,
    inter: usize,
    experts: usize,
    top_k: usize,
    vocab: usize,
}

fn dims(arch: Arch, preset: &str) -> Result<Dims, InitError> {
    let top_k = if arch == Arch::HunyuanLarge { 1 } else { 2 };
    let d = match preset {
        // ~1.5M parameters: unit and fidelity tests.
        "tiny" => Dims {
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            layers: 4,
            inter: 96,
            experts: 16,
            top_k,
            vocab: 1024,
        },
        // ~60M parameters: the embedded default and load tests.
        "small" => Dims {
            hidden: 256,
            heads: 8,
            kv_heads: 2,
            layers: 8,
            inter: 512,
            experts: 16,
            top_k,
            vocab: 4096,
        },
        // ~0.5B parameters: does not fit in CPU caches (the CPU benchmark).
        // (Hunyuan-A13B-style: head_dim 128 as in the real A13B, which llama.cpp's converter requires.)
        "medium" if arch == Arch::HunyuanV1Moe => Dims {
            hidden: 1024,
            heads: 8,
            kv_heads: 2,
            layers: 8,
            inter: 1024,
            experts: 16,
            top_k,
            vocab: 16384,
        },
        "medium" => Dims {
            hidden: 1024,
            heads: 16,
            kv_heads: 4,
            layers: 8,
            inter: 1024,
            experts: 16,
            top_k,
            vocab: 16384,
        },
        // Hunyuan-Large's real dimensions with 4 layers (~24B parameters, 48 GB in bf16):
        // the GPU end-to-end benchmark, with weights made on the device
        // (`init-model --config-only`, then `serve --random-weights`).
        "large-4l" => Dims {
            hidden: 6400,
            heads: 80,
            kv_heads: 8,
            layers: 4,
            inter: 18304,
            experts: 16,
            top_k,
            vocab: 129024,
        },
        other => return Err(InitError::Preset(other.to_string())),
    };
    Ok(d)
}

/// The `config.json` of a preset whose tokenizer has `n_ranks` BPE ranks (the
/// special tokens follow them).
pub fn preset_config(
    arch: Arch,
    preset: &str,
    dtype: DType,
    n_ranks: usize,
) -> Result<Value, InitError> {
    let d = dims(arch, preset)?;
    let torch_dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F32 => "float32",
    };
    let specials = tokenizer::hunyuan_special_tokens();
    let id_of = |name: &str| n_ranks + specials.iter().position(|s| s == name).unwrap_or(0);
    let mut c = json!({
        "architectures": [arch.architecture_name()],
        "model_type": arch.model_type(),
        "hidden_size": d.hidden,
        "intermediate_size": d.inter,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "vocab_size": d.vocab,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
        "num_experts": d.experts,
        "num_shared_expert": if arch == Arch::HunyuanLarge { json!(1) } else { json!(vec![1; d.layers]) },
        "use_mixed_mlp_moe": true,
        "use_qk_norm": true,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": false,
        "tie_word_embeddings": true,
        "torch_dtype": torch_dtype,
        "bos_token_id": id_of("<|bos|>"),
        "eos_token_id": id_of("<|eos|>"),
        "pad_token_id": id_of("<|pad|>"),
        "initializer_range": 0.02,
        "hyserve_init": {"preset": preset},
    });
    match arch {
        Arch::HunyuanLarge => {
            c["moe_topk"] = json!(d.top_k);
            c["use_cla"] = json!(true);
            c["cla_share_factor"] = json!(2);
        }
        Arch::HunyuanV1Moe => {
            c["moe_topk"] = json!(vec![d.top_k; d.layers]);
            c["moe_intermediate_size"] = json!(vec![d.inter; d.layers]);
            c["head_dim"] = json!(d.hidden / d.heads);
            c["use_cla"] = json!(false);
        }
    }
    Ok(c)
}

/// splitmix64: a fixed, tiny generator, so presets never change bytes.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Values of one tensor: norms near 1, matrices with variance ~1/fan_in (routers
/// wider, so routing decisions are not near ties), embeddings in [-1, 1).
fn tensor_values(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed ^ fnv1a(name));
    let n: usize = shape.iter().product();
    if shape.len() == 1 {
        return (0..n).map(|_| 1.0 + 0.1 * rng.uniform()).collect();
    }
    let fan_in = shape[1] as f32;
    let scale = if name.contains("embed_tokens") {
        1.0
    } else if name.ends_with("gate.wg.weight") {
        4.0 * (3.0 / fan_in).sqrt()
    } else {
        (3.0 / fan_in).sqrt()
    };
    (0..n).map(|_| scale * rng.uniform()).collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes a model directory's tokenizer and `config.json`, without weights (for
/// benchmarks whose weights are generated on the device).
pub fn init_config(
    dir: &Path,
    arch: Arch,
    preset: &str,
    dtype: DType,
) -> Result<ModelConfig, InitError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // Tokenizer: byte-level BPE ranks (as many merges as the corpus yields, up to the
    // vocabulary less the specials), then the 209 specials.
    let vocab = dims(arch, preset)?.vocab;
    let ranks = tokenizer::train_bpe(CORPUS, (vocab - N_SPECIAL).saturating_sub(256));
    tokenizer::write_tiktoken_dir(dir, &ranks)?;

    let config = preset_config(arch, preset, dtype, ranks.len())?;
    let text = serde_json::to_string_pretty(&config).expect("json values serialize");
    let cfg = ModelConfig::from_json(&text)?;
    let cpath = dir.join("config.json");
    std::fs::write(&cpath, text + "\n").map_err(io(&cpath))?;
    Ok(cfg)
}

/// Writes a complete model directory. `progress(done, total)` counts tensors.
pub fn init_model(
    dir: &Path,
    opts: &InitOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ModelConfig, InitError> {
    let cfg = init_config(dir, opts.arch, &opts.preset, opts.dtype)?;

    // Weights, grouped into shards of at most `max_shard_bytes`.
    let expected = names::expected(&cfg);
    let es = opts.dtype.size_bytes() as u64;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for (i, e) in expected.iter().enumerate() {
        let b = e.shape.iter().product::<usize>() as u64 * es;
        if shard_bytes > 0 && shard_bytes + b > opts.max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shards.last_mut().expect("non-empty").push(i);
        shard_bytes += b;
    }
    let n = shards.len();
    let (stem, ext, index_name) = match opts.format {
        WeightFormat::Safetensors => ("model", "safetensors", "model.safetensors.index.json"),
        WeightFormat::TorchBin => ("pytorch_model", "bin", "pytorch_model.bin.index.json"),
    };
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    let mut total_size = 0u64;
    for (s, members) in shards.iter().enumerate() {
        let file = if n == 1 {
            format!("{stem}.{ext}")
        } else {
            format!("{stem}-{:05}-of-{n:05}.{ext}", s + 1)
        };
        let mut tensors = Vec::with_capacity(members.len());
        for &i in members {
            let e = &expected[i];
            let values = tensor_values(&e.name, &e.shape, opts.seed);
            let bytes = numeric::encode(opts.dtype, &values);
            total_size += bytes.len() as u64;
            weight_map.insert(e.name.clone(), Value::String(file.clone()));
            tensors.push((e.name.clone(), e.shape.clone(), bytes));
            done += 1;
            progress(done, expected.len());
        }
        let path = dir.join(&file);
        match opts.format {
            WeightFormat::Safetensors => write_safetensors(&path, opts.dtype, &tensors)?,
            WeightFormat::TorchBin => {
                let dtype = match opts.dtype {
                    DType::BF16 => BinDType::BF16,
                    DType::F16 => BinDType::F16,
                    DType::F32 => BinDType::F32,
                };
                let bins: Vec<BinTensor> = tensors
                    .into_iter()
                    .map(|(name, shape, data)| BinTensor {
                        name,
                        dtype,
                        shape,
                        data,
                    })
                    .collect();
                torch_bin::write_torch_bin(&path, &bins).map_err(io(&path))?;
            }
        }
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        let ipath = dir.join(index_name);
        std::fs::write(
            &ipath,
            serde_json::to_string_pretty(&index).expect("json") + "\n",
        )
        .map_err(io(&ipath))?;
    }
    Ok(cfg)
}

fn write_safetensors(
    path: &Path,
    dtype: DType,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<(), InitError> {
    let st_dtype = match dtype {
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        DType::F32 => safetensors::Dtype::F32,
    };
    let bad = |reason: String| InitError::Safetensors {
        path: path.display().to_string(),
        reason,
    };
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(format!("{name}: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| bad(format!("{e:?}")))
}
