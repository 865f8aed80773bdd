//! `hyserve worker`: one worker process of a cluster. Serves the cluster gRPC service
//! (assignment, steps, staging, peers' activation streams), registers in etcd under a
//! lease when given one, and loads its shard of the checkpoint when the coordinator
//! assigns it a rank and placement.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyserve_coordinator::membership::{EtcdMembership, WorkerInfo};
use hyserve_kernels::Precision;
use hyserve_kernels::cuda::CudaBackend;
use hyserve_model::{Checkpoint, ModelConfig};
use hyserve_proto::cluster::worker_server::WorkerServer;
use hyserve_worker::remote::{
    ClusterTls, MAX_MESSAGE_BYTES, NodeConfig, NodeDevice, WorkerNode, WorkerService,
    model_fingerprint,
};

use crate::load;

/// The cluster's mutual TLS: all three or none.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// The cluster CA (PEM); with it every cluster connection is mutual TLS.
    #[arg(long, env = "HYSERVE_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), signed by the cluster CA.
    #[arg(long, env = "HYSERVE_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, env = "HYSERVE_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn load(&self) -> anyhow::Result<Option<ClusterTls>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(
                ClusterTls::from_files(ca, cert, key).context("loading the cluster TLS files")?,
            )),
            (None, None, None) => Ok(None),
            _ => anyhow::bail!("--tls-ca, --tls-cert and --tls-key go together"),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (the same model as the coordinator's; default: the embedded one).
    #[arg(long, env = "HYSERVE_MODEL")]
    model: Option<PathBuf>,
    /// Draft model for the coordinator's draft speculation (default with the embedded
    /// model: its own draft).
    #[arg(long, env = "HYSERVE_DRAFT_MODEL")]
    draft_model: Option<PathBuf>,
    /// Address the cluster service listens on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address peers and the coordinator reach this worker at (default: the bound one).
    #[arg(long)]
    advertise: Option<String>,
    /// Name in the cluster (ranks follow names); default: derived from the address.
    #[arg(long)]
    name: Option<String>,
    /// etcd endpoint to register with (e.g. http://127.0.0.1:2379); without it the
    /// coordinator must be given this worker in `--peers`.
    #[arg(long, env = "HYSERVE_ETCD")]
    etcd: Option<String>,
    /// Cluster name: etcd keys live under /hyserve/<cluster>/.
    #[arg(long, env = "HYSERVE_CLUSTER", default_value = "default")]
    cluster: String,
    /// Memory offered for weights and KV, in GiB (default: 8 on a CPU, the GPU's memory
    /// on a GPU).
    #[arg(long)]
    memory_gib: Option<f64>,
    /// Where this worker computes: cpu, or cuda (GPU `--gpu`; activations over NCCL).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// GPU ordinal with `--device cuda`.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Make the weights from this seed instead of reading the checkpoint (benchmarks at
    /// real dimensions with `init-model --config-only`; every worker the same seed).
    #[arg(long)]
    random_weights: Option<u64>,
    /// Kernel threads of this worker (default: all cores).
    #[arg(long)]
    worker_threads: Option<usize>,
    #[arg(long, value_parser = ["f32", "bf16"])]
    dtype: Option<String>,
    /// Serve `/metrics` (this worker's step, expert-load and all-to-all metrics),
    /// `/health` and `/ready` (assigned a shard and loaded) over HTTP here.
    #[arg(long, env = "HYSERVE_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Seconds of etcd lease: a dead worker's registration expires after this.
    #[arg(long, default_value_t = 5)]
    lease_secs: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hyserve-worker-rt")
        .build()
        .context("starting the async runtime")?
        .block_on(serve(a))
}

async fn serve(a: Args) -> anyhow::Result<()> {
    let tls = a.tls.load()?;
    let dir = load::resolve_model_dir(a.model.as_deref())?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = match a.random_weights {
        Some(_) => None,
        None => {
            let ck = Checkpoint::open(&dir, &mut |p| {
                tracing::info!(file = %p.file, done = p.files_done, total = p.files_total, "checkpoint shard opened");
            })?;
            ck.validate(&cfg)?;
            Some(ck)
        }
    };
    let precision = match &ck {
        Some(ck) if a.device == "cpu" => load::precision_for(a.dtype.as_deref(), ck)?,
        _ => Precision::Bf16,
    };
    let device = if a.device == "cuda" {
        NodeDevice::Cuda(a.gpu)
    } else {
        NodeDevice::Cpu
    };
    if let NodeDevice::Cuda(_) = device {
        // A missing library is a clear error now, not a panic at the first step.
        hyserve_kernels::cuda::probe_libraries(&["cuda", "nvrtc", "cublas", "cublasLt", "nccl"])?;
    }
    let memory_gib = match (a.memory_gib, device) {
        (Some(g), _) => g,
        (None, NodeDevice::Cpu) => 8.0,
        (None, NodeDevice::Cuda(i)) => {
            let (b, _) = CudaBackend::new(i, Precision::Bf16)
                .map_err(|e| anyhow::anyhow!("GPU {i}: {e}"))?;
            b.mem_info().1 as f64 / (1u64 << 30) as f64
        }
    };
    anyhow::ensure!(
        memory_gib.is_finite() && memory_gib > 0.0 && memory_gib < 1e6,
        "--memory-gib {memory_gib} is not a sensible amount"
    );
    let fingerprint = model_fingerprint(&dir)?;
    let memory_bytes = (memory_gib * (1u64 << 30) as f64) as u64;
    let threads = a.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let draft_dir = match (&a.draft_model, &a.model) {
        (Some(d), _) => Some(d.clone()),
        (None, None) => load::default_draft_dir()?,
        (None, Some(_)) => None,
    };
    let draft = match &draft_dir {
        Some(d) => Some(super::serve::open_draft(d, &cfg)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("binding {}", a.listen))?;
    let bound = listener.local_addr()?;
    let advertise = a.advertise.clone().unwrap_or_else(|| bound.to_string());
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("worker-{}", advertise.replace([':', '.'], "-")));
    let registry = prometheus::Registry::new();
    let layers = cfg.layers.len();
    let experts = cfg.layers.iter().map(|l| l.n_experts).max().unwrap_or(0);
    let metrics = Arc::new(
        hyserve_telemetry::WorkerMetrics::new(
            &registry,
            std::slice::from_ref(&name),
            layers,
            experts,
        )
        .context("worker metrics")?,
    );
    crate::telemetry::register_build_info(&registry, &device.name())?;
    let mut node = WorkerNode::new(
        cfg,
        ck,
        fingerprint,
        NodeConfig {
            device,
            random_weights: a.random_weights,
            threads,
            precision,
            tls: tls.clone(),
            memory_bytes,
            metrics: Some((metrics, name.clone())),
        },
    );
    if let Some((dcfg, dck)) = draft {
        node = node.with_draft(dcfg, dck);
        tracing::info!(draft = ?draft_dir, "draft model loaded for speculation");
    }
    let node = Arc::new(node);
    if let Some(addr) = a.metrics_addr {
        let bound = crate::telemetry::serve_worker_http(addr, registry, Arc::clone(&node))
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        eprintln!("  metrics: http://{bound}/metrics");
    }
    let mut server = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        server = server.tls_config(t.server()).context("cluster TLS")?;
    }
    let svc = WorkerServer::new(WorkerService(node))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Small messages both ways every layer: Nagle's algorithm against delayed ACKs
    // would stall a step for 40 ms now and then.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = shutdown_signal();
    let server = tokio::spawn(
        server
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, shutdown),
    );
    eprintln!(
        "hyserve worker {name} listening on {bound} (advertised as {advertise}){}",
        if tls.is_some() { ", mutual TLS" } else { "" }
    );
    let _lease = match &a.etcd {
        Some(url) => {
            let m = EtcdMembership::new(url, &a.cluster);
            let info = WorkerInfo {
                name: name.clone(),
                addr: advertise.clone(),
                memory_bytes,
                device: device.name(),
            };
            Some(
                m.register(&info, Duration::from_secs(a.lease_secs))
                    .await
                    .context("registering in etcd")?,
            )
        }
        None => None,
    };
    server
        .await
        .context("the worker service task")?
        .context("the worker service")?;
    tracing::info!("worker stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
