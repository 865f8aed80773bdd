//! `hyserve plan`: the expert placement of a model on an inventory of GPUs, with the
//! memory of every worker, or a refusal that says what is short (non-zero exit).

use std::path::PathBuf;

use anyhow::Context;
use hyserve_coordinator::placement::{
    ExpertLoad, PlanOptions, WeightDtype, parse_inventory, plan, render,
};
use hyserve_model::ModelConfig;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (its config.json is read; weights are not needed).
    #[arg(long)]
    model: PathBuf,
    /// GPUs, e.g. 16xH100-80G or 8xH100-80G,8xH20-96G (memory in decimal GB).
    #[arg(long)]
    workers: String,
    /// Weight dtype; default: the checkpoint's (`torch_dtype`).
    #[arg(long, value_parser = ["bf16", "fp8"])]
    dtype: Option<String>,
    /// GPUs per node (tensor-parallel groups never cross a node).
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Observed per-expert load, a JSON array of per-layer arrays of routed-token counts;
    /// hot experts get replicas.
    #[arg(long)]
    load: Option<PathBuf>,
    /// Shard attention and the shared expert over groups of this many GPUs of a node
    /// (default: the smallest group that fits, none when replicating fits).
    #[arg(long)]
    tensor_parallel: Option<usize>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = ModelConfig::from_file(&a.model.join("config.json"))?;
    let dtype = match a.dtype.as_deref() {
        Some("fp8") => WeightDtype::Fp8,
        Some(_) => WeightDtype::Bf16,
        None => match cfg.torch_dtype.as_deref() {
            Some(t) if t.contains("float8") || t.contains("fp8") => WeightDtype::Fp8,
            _ => WeightDtype::Bf16,
        },
    };
    let workers = parse_inventory(&a.workers, a.gpus_per_node)?;
    let load: Option<ExpertLoad> = match &a.load {
        Some(p) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{}: expected [[count, ...], ...]", p.display()))?,
        ),
        None => None,
    };
    let opts = PlanOptions {
        dtype,
        tensor_parallel: a.tensor_parallel,
        ..PlanOptions::default()
    };
    let p = plan(&cfg, &workers, &opts, load.as_ref())?;
    print!("{}", render(&p));
    Ok(())
}
