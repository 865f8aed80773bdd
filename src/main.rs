//! `hyserve`: one binary, roles as subcommands.
//!
//! - `train-tokenizer`: a byte-level BPE vocabulary trained on a text (Hunyuan layout).
//! - `init-model`: write a seeded random model of a real architecture in the real formats.
//! - `generate`: run one prompt through a model (the fidelity interface).
//! - `bench`: CPU decode/prefill throughput beside the machine's memory bandwidth.
//! - `bench-gpu`: one Hunyuan-Large layer at real dimensions on a GPU, against ceilings.
//! - `bench-spec`: speculative against plain decoding, per proposer, batch and workload.
//! - `bench-ep`: real-dimension layers over several GPUs with NCCL expert parallelism.
//! - `plan`: the expert placement of a model on an inventory of GPUs.
//! - `serve`: the whole system in one process (gateway, scheduler, workers).
//! - `coordinator`: gateway and scheduler of a cluster of `worker` processes.
//! - `worker`: one worker process of a cluster (expert-parallel shard).
//! - `cluster-certs`: a cluster CA and member certificates for mutual TLS.

#![forbid(unsafe_code)]

mod commands;
mod config;
#[cfg(feature = "embedded-model")]
mod embedded;
mod load;
mod telemetry;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hyserve",
    version,
    about = "Serving system for giant Mixture-of-Experts models"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "HYSERVE_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
    /// Worker threads for CPU kernels (default: all cores).
    #[arg(long, global = true, env = "HYSERVE_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Serve(commands::serve::Args),
    Coordinator(commands::serve::CoordinatorArgs),
    Worker(commands::worker::Args),
    ClusterCerts(commands::certs::Args),
    InitModel(commands::init_model::Args),
    TrainTokenizer(commands::train_tokenizer::Args),
    Generate(commands::generate::Args),
    Bench(commands::bench::Args),
    BenchGpu(commands::bench_gpu::Args),
    BenchEp(commands::bench_ep::Args),
    BenchSpec(commands::bench_spec::Args),
    Plan(commands::plan::Args),
    /// Drain the server on this host (stop taking requests, finish those in flight).
    Drain(commands::drain::Args),
    /// Print every metric hyserve exports (name, type, help, labels) as JSON.
    MetricsCatalogue(telemetry::CatalogueArgs),
    /// Write the Grafana dashboards generated from the metric catalogue.
    Dashboards(telemetry::DashboardArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("--threads {n}: {e}"))?;
    }
    match cli.command {
        Command::Serve(a) => commands::serve::run(a),
        Command::Coordinator(a) => commands::serve::run_coordinator(a),
        Command::Worker(a) => commands::worker::run(a),
        Command::ClusterCerts(a) => commands::certs::run(a),
        Command::InitModel(a) => commands::init_model::run(a),
        Command::TrainTokenizer(a) => commands::train_tokenizer::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::BenchGpu(a) => commands::bench_gpu::run(a),
        Command::BenchEp(a) => commands::bench_ep::run(a),
        Command::BenchSpec(a) => commands::bench_spec::run(a),
        Command::Plan(a) => commands::plan::run(a),
        Command::Drain(a) => commands::drain::run(a),
        Command::MetricsCatalogue(a) => telemetry::catalogue(a),
        Command::Dashboards(a) => telemetry::dashboards(a),
    }
}

fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HYSERVE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.compact().init();
    }
}
