//! Loading a model directory for the CLI: config, checkpoint (with a progress bar),
//! tokenizer, and the embedded default model made on first use.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::{DType, Precision};
use hyserve_model::init::{InitOptions, WeightFormat, init_model};
use hyserve_model::tokenizer::Tokenizer;
use hyserve_model::{Arch, Checkpoint, Model, ModelConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// Preset of the embedded default model.
pub const DEFAULT_PRESET: &str = "small";

/// Where the embedded default model lives: `$HYSERVE_HOME/default-small`, or the
/// user cache directory.
pub fn default_model_dir() -> PathBuf {
    let home = std::env::var_os("HYSERVE_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("hyserve")))
        .unwrap_or_else(|| PathBuf::from(".hyserve"));
    home.join(format!("default-{DEFAULT_PRESET}"))
}

/// Returns `model`, or the embedded default (created on first use).
pub fn resolve_model_dir(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(m) = model {
        return Ok(m.to_path_buf());
    }
    let dir = default_model_dir();
    if !dir.join("config.json").exists() {
        tracing::info!(dir = %dir.display(), "creating the embedded default model (first run)");
        // Per process: several processes (a cluster's workers) may start at once.
        let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let bar = bar("init");
        init_model(
            &tmp,
            &InitOptions {
                arch: Arch::HunyuanLarge,
                preset: DEFAULT_PRESET.into(),
                seed: 0,
                dtype: DType::BF16,
                format: WeightFormat::Safetensors,
                max_shard_bytes: 64 << 20,
            },
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )?;
        bar.finish_and_clear();
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another process finished first: use its (identical, same seed) model.
            if !dir.join("config.json").exists() {
                return Err(e).with_context(|| format!("moving {} into place", tmp.display()));
            }
        }
    }
    Ok(dir)
}

/// The embedded default model's draft model (for speculation), if it has one.
pub fn default_draft_dir() -> anyhow::Result<Option<PathBuf>> {
    Ok(None)
}

fn bar(prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub model: Model<CpuBackend>,
    pub backend: CpuBackend,
    pub tokenizer: Option<Tokenizer>,
}

/// Picks the compute precision: explicit, or f32 for f32 checkpoints and bf16 otherwise.
pub fn precision_for(dtype: Option<&str>, ck: &Checkpoint) -> anyhow::Result<Precision> {
    Ok(match dtype {
        Some("f32") => Precision::F32,
        Some("bf16") => Precision::Bf16,
        Some(other) => anyhow::bail!("--dtype {other}: expected f32 or bf16"),
        None if ck.dominant_dtype() == Some(DType::F32) => Precision::F32,
        None => Precision::Bf16,
    })
}

/// Loads config, checkpoint and tokenizer of `dir` onto the CPU backend.
pub fn load_cpu(dir: &Path, dtype: Option<&str>) -> anyhow::Result<Loaded> {
    let t0 = Instant::now();
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let bar = bar("load");
    let ck = Checkpoint::open(dir, &mut |p| {
        bar.set_length(p.bytes_total >> 20);
        bar.set_position(p.bytes_done >> 20);
        bar.set_message(format!("MiB, shard {}/{}", p.files_done, p.files_total));
        tracing::debug!(file = %p.file, done = p.files_done, total = p.files_total, "shard opened");
    })?;
    ck.validate(&cfg)?;
    let precision = precision_for(dtype, &ck)?;
    let backend = CpuBackend::new(precision);
    let model = Model::load(&backend, cfg, &ck, &mut |p| {
        bar.set_length(p.tensors_total as u64);
        bar.set_position(p.tensors_done as u64);
        bar.set_message("tensors");
    });
    bar.finish_and_clear();
    let tokenizer = match Tokenizer::from_dir(dir) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no usable tokenizer: token ids only");
            None
        }
    };
    tracing::info!(
        dir = %dir.display(),
        params = model.cfg.n_params(),
        weight_mib = model.weight_bytes(&backend) >> 20,
        precision = ?precision,
        secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
        "model loaded"
    );
    Ok(Loaded {
        model,
        backend,
        tokenizer,
    })
}
