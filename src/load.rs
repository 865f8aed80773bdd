//! Loading a model directory for the CLI: config, checkpoint (with a progress bar),
//! tokenizer, and the embedded default model written out on first use.

use std::path::{Path, PathBuf};
use std::time::Instant;

#[cfg(feature = "embedded-model")]
use anyhow::Context;
use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::{DType, Precision};
use hyserve_model::tokenizer::Tokenizer;
use hyserve_model::{Checkpoint, Model, ModelConfig};
use indicatif::{ProgressBar, ProgressStyle};

/// Where hyserve keeps what it writes for itself: `$HYSERVE_HOME`, or the user cache
/// directory.
fn home() -> PathBuf {
    std::env::var_os("HYSERVE_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("hyserve")))
        .unwrap_or_else(|| PathBuf::from(".hyserve"))
}

/// A scratch directory for generated benchmark models, beside the default model.
pub fn bench_model_dir(name: &str) -> PathBuf {
    home().join(name)
}

/// The name clients use for the embedded default model.
pub const DEFAULT_MODEL_NAME: &str = "hunyuan-tiny";

/// Returns `model`, or the embedded default model (written out on first use).
pub fn resolve_model_dir(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(m) => Ok(m.to_path_buf()),
        None => embedded_dir(DEFAULT_MODEL_NAME, Embedded::Tiny),
    }
}

/// The embedded default model's draft model (for speculation).
pub fn default_draft_dir() -> anyhow::Result<Option<PathBuf>> {
    Ok(Some(embedded_dir("hunyuan-tiny-draft", Embedded::Draft)?))
}

/// The embedded default model's held-out passages (the speculation benchmark's workload).
pub fn default_workload_path() -> anyhow::Result<Option<PathBuf>> {
    Ok(Some(
        embedded_dir("hunyuan-tiny", Embedded::Tiny)?.join("heldout.jsonl"),
    ))
}

#[derive(Clone, Copy)]
enum Embedded {
    Tiny,
    Draft,
}

#[cfg(feature = "embedded-model")]
fn embedded_dir(name: &str, which: Embedded) -> anyhow::Result<PathBuf> {
    let files = match which {
        Embedded::Tiny => crate::embedded::TINY,
        Embedded::Draft => crate::embedded::DRAFT,
    };
    let dir = home().join(format!("{name}-{}", crate::embedded::fingerprint(files)));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    tracing::info!(dir = %dir.display(), "writing the embedded default model (first run)");
    // Per process: several processes (a cluster's workers) may start at once.
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let bar = bar("unpack");
    bar.set_length(files.iter().map(|f| f.1.len() as u64).sum::<u64>() >> 20);
    for (file, bytes) in files {
        let path = tmp.join(file);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        bar.inc(bytes.len() as u64 >> 20);
    }
    bar.finish_and_clear();
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process finished first: use its (identical) copy.
        if !dir.join("config.json").exists() {
            return Err(e).with_context(|| format!("moving {} into place", tmp.display()));
        }
    }
    Ok(dir)
}

#[cfg(not(feature = "embedded-model"))]
fn embedded_dir(name: &str, _which: Embedded) -> anyhow::Result<PathBuf> {
    anyhow::bail!(
        "this hyserve was built without the embedded default model (feature \
         `embedded-model`): pass --model DIR (the repository's model/assets/{name})"
    )
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
