//! `hyserve serve`: the whole system in one process: gateway (HTTP + gRPC), scheduler
//! actor and N in-process worker actors, on the embedded default model unless told
//! otherwise.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hyserve_coordinator::api::ModelInfo;
use hyserve_coordinator::cluster::{Cluster, ClusterOptions, Discovery};
use hyserve_coordinator::engine::{EngineConfig, EngineHandle, ExecutorFactory};
use hyserve_coordinator::membership::EtcdMembership;
use hyserve_coordinator::placement::WeightDtype;
use hyserve_coordinator::scheduler::SchedulerConfig;
use hyserve_coordinator::scheduler::spec::{ProposerKind, SpecConfig};
use hyserve_gateway::{ApiKeys, Gateway, GatewayConfig};
use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::cuda::CudaBackend;
use hyserve_kernels::{Backend, Precision};
use hyserve_model::tokenizer::Tokenizer;
use hyserve_model::{Checkpoint, Model, ModelConfig};
use hyserve_worker::remote::model_fingerprint;
use hyserve_worker::{Executor, ExecutorHandle, WarmUp, kv_spec};

use crate::config::{ServeConfig, env};
use crate::load;

/// Where workers' weights come from: the checkpoint, or random values from a seed; and
/// the draft model's, when workers speculate with one.
pub(crate) struct WeightSource {
    pub(crate) ck: Option<Checkpoint>,
    pub(crate) random_seed: Option<u64>,
    pub(crate) cfg: ModelConfig,
    pub(crate) draft: Option<(ModelConfig, Checkpoint)>,
    /// Where in-process workers report their steps (labelled by their index).
    pub(crate) metrics: Option<Arc<hyserve_telemetry::WorkerMetrics>>,
    /// The step shapes in-process workers record before serving (a backend that
    /// records nothing skips it).
    pub(crate) warm_up: Option<WarmUp>,
}

impl WeightSource {
    /// An executor over `model`, with the draft model beside it if there is one, its
    /// step shapes recorded per `warm_up`.
    fn executor<B: Backend>(
        &self,
        worker: usize,
        backend: B,
        model: Model<B>,
        n_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> std::io::Result<Executor<B>> {
        let draft = self
            .draft
            .as_ref()
            .map(|(cfg, ck)| Model::load(&backend, cfg.clone(), ck, &mut |_| {}));
        let mut exec = Executor::with_threads(backend, model, n_blocks, block_size, threads);
        if let Some(d) = draft {
            exec.set_draft(d).map_err(std::io::Error::other)?;
        }
        if let Some(m) = &self.metrics {
            exec.set_metrics(Arc::clone(m), worker.to_string());
        }
        if let Some(plan) = &self.warm_up {
            // The executor logs what it recorded ("step shapes recorded").
            exec.warm_up(plan);
        }
        Ok(exec)
    }

    fn model<B: Backend>(&self, backend: &B) -> Model<B> {
        match (&self.ck, self.random_seed) {
            (Some(ck), _) => Model::load(backend, self.cfg.clone(), ck, &mut |_| {}),
            (None, seed) => {
                let mut last = 0;
                Model::random(backend, self.cfg.clone(), seed.unwrap_or(0), &mut |p| {
                    let pct = 100 * p.bytes_done / p.bytes_total.max(1);
                    if pct >= last + 10 {
                        last = pct;
                        tracing::info!(percent = pct, "making random weights");
                    }
                })
            }
        }
    }
}

/// Fails early, with the backend's own message, if CUDA cannot start at all.
fn start_cuda_check() -> anyhow::Result<()> {
    hyserve_kernels::cuda::probe_libraries(&["cuda", "nvrtc", "cublas", "cublasLt"])?;
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file with any of the settings below (flags and env vars override it).
    #[arg(long, env = env::CONFIG)]
    config: Option<PathBuf>,
    /// Model directory (default: the embedded default model, created on first use).
    #[arg(long, env = env::MODEL)]
    model: Option<PathBuf>,
    /// Model name clients pass as "model".
    #[arg(long)]
    model_name: Option<String>,
    #[arg(long, env = env::HTTP_ADDR)]
    http_addr: Option<SocketAddr>,
    #[arg(long, env = env::GRPC_ADDR)]
    grpc_addr: Option<SocketAddr>,
    /// In-process worker actors.
    #[arg(long, env = env::WORKERS)]
    workers: Option<usize>,
    #[arg(long)]
    threads_per_worker: Option<usize>,
    #[arg(long, value_parser = ["f32", "bf16"])]
    dtype: Option<String>,
    /// KV cache per worker in MiB.
    #[arg(long)]
    kv_cache_mib: Option<usize>,
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    #[arg(long)]
    max_running: Option<usize>,
    #[arg(long)]
    max_waiting: Option<usize>,
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Disable prefix caching.
    #[arg(long)]
    no_prefix_cache: bool,
    /// File of API keys (one per line, or `sha256:<hex>`); requests must then carry one.
    #[arg(long, env = env::API_KEY_FILE)]
    api_key_file: Option<PathBuf>,
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Log prompts and outputs (off by default).
    #[arg(long, env = env::LOG_PROMPTS)]
    log_prompts: bool,
    #[arg(long)]
    step_timeout_secs: Option<u64>,
    /// Where workers compute: cpu, or cuda (worker i on GPU i).
    #[arg(long, env = env::DEVICE, value_parser = ["cpu", "cuda"])]
    device: Option<String>,
    /// Make random weights from this seed on the device instead of loading the
    /// checkpoint (benchmarks; see `init-model --config-only`).
    #[arg(long)]
    random_weights: Option<u64>,
    /// Speculative decoding: auto (the draft model named by --draft-model, else
    /// prompt lookup), draft (default: the embedded model's own draft), ngram or off.
    #[arg(long, env = env::SPECULATION, value_parser = ["auto", "draft", "ngram", "off"])]
    speculation: Option<String>,
    /// Draft model for `--speculation draft` (default with the embedded default model:
    /// its own draft).
    #[arg(long, env = env::DRAFT_MODEL)]
    draft_model: Option<PathBuf>,
    /// Most tokens proposed per sequence and step.
    #[arg(long)]
    spec_max_depth: Option<usize>,
    /// Propose this many tokens wherever possible (no adaptation; benchmarks).
    #[arg(long)]
    spec_depth: Option<usize>,
    /// One depth for every sequence of a speculating step (auto: on with --device cuda,
    /// whose recorded steps replay only shapes seen before).
    #[arg(long, value_parser = ["auto", "on", "off"])]
    spec_uniform: Option<String>,
    /// Step shapes a GPU worker records before serving (0, the default: none; 64
    /// suggested).
    #[arg(long)]
    warm_up_shapes: Option<usize>,
}

/// Defaults, then the TOML file, then env vars and flags.
pub fn resolve(a: Args) -> anyhow::Result<ServeConfig> {
    let mut c = match &a.config {
        Some(p) => ServeConfig::from_toml_file(p)?,
        None => ServeConfig::default(),
    };
    // Flags (and their env vars) override the file, field by field.
    macro_rules! over {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { c.$f = v; } )* };
    }
    macro_rules! over_opt {
        ($($f:ident),*) => { $( if a.$f.is_some() { c.$f = a.$f; } )* };
    }
    over!(
        http_addr,
        grpc_addr,
        workers,
        kv_cache_mib,
        max_batch_tokens,
        max_running,
        max_waiting,
        prefill_chunk,
        step_timeout_secs,
        device,
        speculation,
        spec_max_depth,
        spec_uniform,
        warm_up_shapes
    );
    over_opt!(
        random_weights,
        model,
        model_name,
        threads_per_worker,
        dtype,
        api_key_file,
        max_prompt_tokens,
        draft_model,
        spec_depth
    );
    if a.no_prefix_cache {
        c.prefix_cache = false;
    }
    if a.log_prompts {
        c.log_prompts = true;
    }
    c.validate()?;
    Ok(c)
}

/// `hyserve coordinator`: the gateway and scheduler of a cluster of worker processes.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// etcd endpoint where the workers register (e.g. http://127.0.0.1:2379).
    #[arg(
        long,
        env = "HYSERVE_ETCD",
        required_unless_present = "peers",
        conflicts_with = "peers"
    )]
    etcd: Option<String>,
    /// Cluster name: etcd keys live under /hyserve/<cluster>/.
    #[arg(long, env = "HYSERVE_CLUSTER", default_value = "default")]
    cluster: String,
    /// With etcd: how many workers to wait for.
    #[arg(long, default_value_t = 1)]
    expect_workers: usize,
    /// Without etcd: the workers' endpoints (host:port), comma-separated, in rank order.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Seconds to wait for the workers to appear.
    #[arg(long, default_value_t = 120)]
    join_timeout_secs: u64,
    /// Re-plan the experts from observed load every this many seconds (0: never).
    #[arg(long, default_value_t = 60.0)]
    rebalance_secs: f64,
    /// Routed rows needed since the last rebalance before another is tried.
    #[arg(long, default_value_t = 256)]
    rebalance_min_rows: u64,
    /// Milliseconds a worker waits for a peer's activations before failing the step.
    #[arg(long, default_value_t = 10_000)]
    exchange_timeout_ms: u64,
    /// Shard attention and the shared expert over groups of this many workers of one
    /// host (tensor parallelism; they then run the same sequences). Default: the
    /// planner's choice, replicated when it fits.
    #[arg(long)]
    tensor_parallel: Option<usize>,
    #[command(flatten)]
    tls: super::worker::TlsArgs,
}

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    serve: Args,
    #[command(flatten)]
    cluster: ClusterArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = resolve(a)?;
    runtime()?.block_on(serve(cfg, None))
}

pub fn run_coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let cfg = resolve(a.serve)?;
    let c = &a.cluster;
    anyhow::ensure!(
        c.rebalance_secs.is_finite() && c.rebalance_secs >= 0.0,
        "--rebalance-secs must be >= 0"
    );
    anyhow::ensure!(
        c.etcd.is_some() || !c.peers.is_empty(),
        "give --etcd (with --expect-workers) or --peers"
    );
    anyhow::ensure!(c.expect_workers >= 1, "--expect-workers must be >= 1");
    anyhow::ensure!(
        c.tensor_parallel.is_none_or(|g| g >= 1),
        "--tensor-parallel must be >= 1"
    );
    runtime()?.block_on(serve(cfg, Some(a.cluster)))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hyserve-rt")
        .build()
        .context("starting the async runtime")
}

/// The proposer `cfg.speculation` asks for, and the draft model directory it needs. A
/// coordinator's draft model runs on its workers (`hyserve worker --draft-model`), so it
/// needs none itself for `draft`. `auto` is prompt lookup unless a draft model is named
/// (`--draft-model`): with the embedded default model, prompt lookup measured faster than
/// its draft on both the CPU and a GPU (BENCHMARKS.md), and `draft` still takes the
/// embedded draft.
fn speculation_of(
    cfg: &ServeConfig,
    default_draft: Option<PathBuf>,
    coordinator: bool,
) -> anyhow::Result<(ProposerKind, Option<PathBuf>)> {
    Ok(match cfg.speculation.as_str() {
        "off" => (ProposerKind::Off, None),
        "ngram" => (ProposerKind::Ngram, None),
        "draft" => match cfg.draft_model.clone().or(default_draft) {
            Some(d) => (ProposerKind::Draft, Some(d)),
            None if coordinator => (ProposerKind::Draft, None),
            None => anyhow::bail!(
                "--speculation draft needs a draft model (--draft-model DIR); the embedded \
                 default model has one"
            ),
        },
        _ => match &cfg.draft_model {
            Some(d) => (ProposerKind::Draft, Some(d.clone())),
            None => (ProposerKind::Ngram, None),
        },
    })
}

/// The draft model at `dir`, checked against the target it proposes for.
pub(crate) fn open_draft(
    dir: &std::path::Path,
    target: &ModelConfig,
) -> anyhow::Result<(ModelConfig, Checkpoint)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("draft model {}", dir.display()))?;
    anyhow::ensure!(
        cfg.vocab_size == target.vocab_size,
        "the draft model {} has a vocabulary of {}, the target {}",
        dir.display(),
        cfg.vocab_size,
        target.vocab_size
    );
    let ck = Checkpoint::open(dir, &mut |_| {})?;
    ck.validate(&cfg)?;
    Ok((cfg, ck))
}

async fn serve(mut cfg: ServeConfig, cluster: Option<ClusterArgs>) -> anyhow::Result<()> {
    let dir = load::resolve_model_dir(cfg.model.as_deref())?;
    let default_draft = match cfg.model {
        None => load::default_draft_dir()?,
        Some(_) => None,
    };
    let model_cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let (proposer, draft_dir) = speculation_of(&cfg, default_draft, cluster.is_some())?;
    // The draft runs on the workers: in-process here, or each worker process loads its own.
    let draft = match (&draft_dir, &cluster) {
        (Some(d), None) => Some(open_draft(d, &model_cfg)?),
        _ => None,
    };
    let ck = match cfg.random_weights {
        // The coordinator of a cluster needs the config and tokenizer only.
        _ if cluster.is_some() => None,
        Some(_) => None,
        None => {
            let ck = Checkpoint::open(&dir, &mut |p| {
                tracing::info!(file = %p.file, done = p.files_done, total = p.files_total, "checkpoint shard opened");
            })?;
            ck.validate(&model_cfg)?;
            Some(ck)
        }
    };
    let precision = match &ck {
        Some(ck) if cfg.device == "cpu" => load::precision_for(cfg.dtype.as_deref(), ck)?,
        _ if cfg.dtype.as_deref() == Some("f32") => Precision::F32,
        _ => Precision::Bf16,
    };
    let tokenizer = Arc::new(
        Tokenizer::from_dir(&dir)
            .with_context(|| format!("{}: serving needs a tokenizer", dir.display()))?,
    );
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = cfg
        .threads_per_worker
        .unwrap_or((cores / cfg.workers).max(1));
    let bytes_per_token = kv_spec(&model_cfg, precision, 1, cfg.block_size).bytes_per_token();
    let n_blocks = (cfg.kv_cache_mib << 20) / (bytes_per_token * cfg.block_size);
    anyhow::ensure!(
        n_blocks >= 2,
        "kv_cache_mib {} holds fewer than 2 blocks",
        cfg.kv_cache_mib
    );
    let max_context = model_cfg
        .max_position_embeddings
        .min(n_blocks * cfg.block_size);

    // The process's metrics: the build, and in-process workers' steps.
    let registry = prometheus::Registry::new();
    let device_name = match &cluster {
        Some(_) => "cluster".to_string(),
        None => cfg.device.clone(),
    };
    crate::telemetry::register_build_info(&registry, &device_name)?;
    crate::telemetry::register_constant(
        &registry,
        &hyserve_telemetry::catalogue::KV_CACHE_BYTES_PER_TOKEN,
        bytes_per_token as f64,
    )?;
    let worker_metrics = match &cluster {
        Some(_) => None,
        None => {
            let names: Vec<String> = (0..cfg.workers).map(|i| i.to_string()).collect();
            let experts = model_cfg
                .layers
                .iter()
                .map(|l| l.n_experts)
                .max()
                .unwrap_or(0);
            Some(Arc::new(hyserve_telemetry::WorkerMetrics::new(
                &registry,
                &names,
                model_cfg.layers.len(),
                experts,
            )?))
        }
    };
    // One checkpoint, memory-mapped once: every worker's weights borrow the same pages.
    let source = Arc::new(WeightSource {
        ck,
        random_seed: cfg.random_weights,
        cfg: model_cfg.clone(),
        draft,
        metrics: worker_metrics,
        warm_up: warm_up_plan(
            cfg.warm_up_shapes,
            cfg.max_running,
            (proposer != ProposerKind::Off
                && crate::config::uniform_steps(&cfg.spec_uniform, &cfg.device))
            .then(|| cfg.spec_depth.unwrap_or(cfg.spec_max_depth)),
            max_context,
        ),
    });
    let block_size = cfg.block_size;
    let mut running_cluster = None;
    let factory: ExecutorFactory = if let Some(c) = &cluster {
        let discovery = match &c.etcd {
            Some(url) => Discovery::Etcd {
                membership: EtcdMembership::new(url, &c.cluster),
                expect: c.expect_workers,
            },
            None => Discovery::Static(c.peers.clone()),
        };
        let opts = ClusterOptions {
            discovery,
            join_timeout: Duration::from_secs(c.join_timeout_secs),
            tls: c.tls.load()?,
            model_fingerprint: model_fingerprint(&dir)?,
            dtype: WeightDtype::Bf16,
            n_blocks,
            block_size,
            kv_bytes: (n_blocks * block_size * bytes_per_token) as u64,
            exchange_timeout: Duration::from_millis(c.exchange_timeout_ms),
            rebalance_min_rows: c.rebalance_min_rows,
            tensor_parallel: c.tensor_parallel,
        };
        let cl = Cluster::start(model_cfg.clone(), opts).await?;
        cfg.workers = cl.engine_workers();
        let f = cl.factory();
        running_cluster = Some(cl);
        f
    } else {
        local_factory(
            &cfg.device,
            precision,
            source,
            n_blocks,
            block_size,
            threads,
        )?
    };
    let model_name = cfg.model_name.clone().unwrap_or_else(|| {
        if cfg.model.is_none() {
            // The embedded default, whatever fingerprint its directory carries.
            return load::DEFAULT_MODEL_NAME.to_string();
        }
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "hyserve".into())
    });
    let engine = EngineHandle::start(
        EngineConfig {
            scheduler: SchedulerConfig {
                n_workers: cfg.workers,
                n_blocks_per_worker: n_blocks,
                block_size: cfg.block_size,
                max_batch_tokens: cfg.max_batch_tokens,
                max_running: cfg.max_running,
                max_waiting: cfg.max_waiting,
                prefill_chunk: cfg.prefill_chunk,
                max_context,
                enable_prefix_cache: cfg.prefix_cache,
                speculation: SpecConfig {
                    max_depth: cfg.spec_max_depth,
                    fixed_depth: cfg.spec_depth,
                    // Where the steps run: a cluster's workers, or this process.
                    uniform: crate::config::uniform_steps(
                        &cfg.spec_uniform,
                        match &running_cluster {
                            Some(cl) if cl.gpu() => "cuda",
                            Some(_) => "cpu",
                            None => &cfg.device,
                        },
                    ),
                    ..SpecConfig::new(proposer)
                },
            },
            model: ModelInfo {
                id: model_name.clone(),
                max_context,
                vocab_size: model_cfg.vocab_size,
                created_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            },
            step_timeout: Duration::from_secs(cfg.step_timeout_secs),
            lockstep: cluster.is_some(),
        },
        factory,
    )
    .await?;
    if let (Some(cl), Some(c)) = (&running_cluster, &cluster) {
        cl.attach(engine.clone());
        cl.spawn_watch();
        if c.rebalance_secs > 0.0 {
            cl.spawn_rebalancer(engine.clone(), Duration::from_secs_f64(c.rebalance_secs));
        }
        if let Some(p) = cl.placement() {
            engine.set_epoch(p.epoch);
        }
    }
    tracing::info!(
        model = %dir.display(),
        workers = cfg.workers,
        threads_per_worker = threads,
        kv_blocks_per_worker = n_blocks,
        kv_bytes_per_token = bytes_per_token,
        max_context,
        speculation = proposer.name(),
        draft = ?draft_dir,
        "engine started"
    );
    let api_keys = match &cfg.api_key_file {
        Some(p) => Some(ApiKeys::from_file(p)?),
        None => None,
    };
    let gateway = Gateway::new(
        GatewayConfig {
            http_addr: cfg.http_addr,
            grpc_addr: cfg.grpc_addr,
            model_name: model_name.clone(),
            api_keys,
            max_body_bytes: cfg.max_body_bytes,
            max_prompt_tokens: cfg.max_prompt_tokens.unwrap_or(max_context),
            max_n: cfg.max_n,
            log_prompts: cfg.log_prompts,
            metrics_registry: Some(registry),
        },
        Arc::new(engine.clone()),
        tokenizer,
    );
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
    };
    let name = model_name.clone();
    gateway
        .serve(shutdown, move |http, grpc| {
            eprintln!("hyserve is serving model \"{name}\"");
            eprintln!("  OpenAI HTTP API: http://{http}/v1  (metrics: http://{http}/metrics)");
            eprintln!("  gRPC API:        {grpc}  (service hyserve.v1.Inference)");
            eprintln!("try:");
            eprintln!(
                "  curl -s http://{http}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{name}\", \"max_tokens\": 60, \"temperature\": 0, \"messages\": [{{\"role\": \"user\", \"content\": \"Put this into modern English:\\nAnd God spake unto Noah, saying, Go forth of the ark, thou, and thy wife.\"}}]}}'"
            );
        })
        .await?;
    engine.stop();
    Ok(())
}

/// At most `shapes` step shapes an in-process worker records before serving: every
/// batch size up to `max_batch`, and verifications up to `verified` proposals where
/// speculating steps of one depth repeat them (none when `shapes` is 0).
pub(crate) fn warm_up_plan(
    shapes: usize,
    max_batch: usize,
    verified: Option<usize>,
    max_context: usize,
) -> Option<WarmUp> {
    (shapes > 0).then(|| WarmUp {
        max_shapes: shapes,
        ..WarmUp::new(max_batch, verified.unwrap_or(0), max_context)
    })
}

/// Executors in this process: worker *i* on GPU *i* (`device` cuda) or on the CPU.
pub(crate) fn local_factory(
    device: &str,
    precision: Precision,
    source: Arc<WeightSource>,
    n_blocks: usize,
    block_size: usize,
    threads: usize,
) -> anyhow::Result<ExecutorFactory> {
    Ok(if device == "cuda" {
        start_cuda_check()?;
        Arc::new(move |i| {
            let (backend, info) = CudaBackend::new(i, precision)
                .map_err(|e| std::io::Error::other(format!("GPU {i}: {e}")))?;
            tracing::info!(gpu = i, device = %info.device, arch = %info.arch, cached = info.kernels_cached, compile_ms = info.compile_ms, "CUDA worker starting");
            let model = source.model(&backend);
            backend.synchronize();
            let (free, total) = backend.mem_info();
            tracing::info!(
                gpu = i,
                weight_mib = model.weight_bytes(&backend) >> 20,
                free_mib = free >> 20,
                total_mib = total >> 20,
                "weights on the GPU"
            );
            let exec = source.executor(i, backend, model, n_blocks, block_size, 1)?;
            Ok(Box::new(ExecutorHandle::spawn(&format!("executor-{i}"), exec)?) as _)
        })
    } else {
        Arc::new(move |i| {
            let backend = CpuBackend::new(precision);
            let model = source.model(&backend);
            let exec = source.executor(i, backend, model, n_blocks, block_size, threads)?;
            Ok(Box::new(ExecutorHandle::spawn(&format!("executor-{i}"), exec)?) as _)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_speculation_is_prompt_lookup_unless_a_draft_is_named() {
        let embedded = Some(PathBuf::from("embedded-draft"));
        let pick = |speculation: &str, named: Option<&str>, coordinator: bool| {
            let cfg = ServeConfig {
                speculation: speculation.into(),
                draft_model: named.map(PathBuf::from),
                ..ServeConfig::default()
            };
            speculation_of(&cfg, embedded.clone(), coordinator)
        };
        let draft = |d: &str| (ProposerKind::Draft, Some(PathBuf::from(d)));
        assert_eq!(
            pick("auto", None, false).unwrap(),
            (ProposerKind::Ngram, None)
        );
        assert_eq!(pick("auto", Some("mine"), false).unwrap(), draft("mine"));
        assert_eq!(pick("draft", None, false).unwrap(), draft("embedded-draft"));
        assert_eq!(pick("draft", Some("mine"), false).unwrap(), draft("mine"));
        assert_eq!(
            pick("ngram", Some("mine"), false).unwrap(),
            (ProposerKind::Ngram, None)
        );
        assert_eq!(pick("off", None, false).unwrap(), (ProposerKind::Off, None));
        // Without any draft: an error here, the workers' own on a coordinator.
        let cfg = ServeConfig {
            speculation: "draft".into(),
            ..ServeConfig::default()
        };
        let err = speculation_of(&cfg, None, false).unwrap_err().to_string();
        assert!(err.contains("--draft-model"), "{err}");
        assert_eq!(
            speculation_of(&cfg, None, true).unwrap(),
            (ProposerKind::Draft, None)
        );
    }
}
