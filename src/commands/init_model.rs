//! `hyserve init-model`: a seeded random model in the real checkpoint formats.

use std::path::PathBuf;

use hyserve_kernels::DType;
use hyserve_model::Arch;
use hyserve_model::init::{InitOptions, WeightFormat, init_model};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args)]
pub struct Args {
    /// Architecture to instantiate.
    #[arg(long, value_parser = ["hunyuan-large", "hunyuan-a13b"])]
    arch: String,
    /// Size preset: tiny (~1.5M params), small (~60M), medium (~0.5B), large-4l (real
    /// Hunyuan-Large dimensions, 4 layers: use with --config-only).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight dtype.
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    dtype: String,
    /// Weight file format.
    #[arg(long, default_value = "safetensors", value_parser = ["safetensors", "bin"])]
    format: String,
    /// Largest shard in MiB (several shards get an index file).
    #[arg(long, default_value_t = 2048)]
    max_shard_mb: u64,
    /// Write only the config and tokenizer (serve such a directory with
    /// `--random-weights`; the `large-4l` preset is meant for this).
    #[arg(long)]
    config_only: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let arch = match a.arch.as_str() {
        "hunyuan-large" => Arch::HunyuanLarge,
        _ => Arch::HunyuanV1Moe,
    };
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        _ => DType::BF16,
    };
    let format = if a.format == "bin" {
        WeightFormat::TorchBin
    } else {
        WeightFormat::Safetensors
    };
    if a.config_only {
        let cfg = hyserve_model::init::init_config(&a.out, arch, &a.preset, dtype)?;
        eprintln!(
            "wrote the config and tokenizer of {} ({} layers, {:.1}B parameters) to {}",
            cfg.arch.architecture_name(),
            cfg.n_layers,
            cfg.n_params() as f64 / 1e9,
            a.out.display()
        );
        return Ok(());
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("    init [{bar:40}] {pos}/{len} tensors")
            .expect("valid template"),
    );
    let cfg = init_model(
        &a.out,
        &InitOptions {
            arch,
            preset: a.preset,
            seed: a.seed,
            dtype,
            format,
            max_shard_bytes: a.max_shard_mb.max(1) << 20,
        },
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} layers, {:.1}M parameters, {dtype}) to {}",
        cfg.arch.architecture_name(),
        cfg.n_layers,
        cfg.n_params() as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}
