//! A worker as a process of its own: the `hyserve.cluster.v1.Worker` gRPC service, the
//! gRPC activation exchange between worker processes, and the cluster's mutual TLS.
//!
//! The coordinator assigns the worker a rank, its peers and a placement; the worker loads
//! its shard (dense weights and its experts) from the checkpoint and runs lockstep steps,
//! streaming activation rows to and from its peers over one client stream per peer.
//! A placement change is staged in the background and switched to at the first step of
//! the new epoch.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyserve_kernels::Precision;
use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::cuda::{CudaBackend, NcclId};
use hyserve_model::exchange::{Mailbox, PHASES};
use hyserve_model::graph::TpShard;
use hyserve_model::{Checkpoint, Exchange, ExchangeError, Model, ModelConfig, Round, Rows};
use hyserve_proto::cluster::worker_client::WorkerClient;
use hyserve_proto::cluster::worker_server::Worker;
use hyserve_proto::cluster::{
    ActivationAck, ActivationFrame, AssignRequest, AssignResponse, Holders as PbHolders, Placement,
    SeqStep as PbSeqStep, StageRequest, StageResponse, StatusRequest, StatusResponse, StepRequest,
    StepResponse, TokenList,
};
use hyserve_proto::cluster::{NcclIdRequest, NcclIdResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::executor::{
    DraftRequest, Executor, ExecutorError, ExecutorHandle, HeldExperts, Holders, SeqStep,
    StageSlot, Staged, Step,
};
use crate::nccl::NcclExchange;

/// The name every cluster certificate carries and every client checks: cluster members
/// are authenticated by their CA, not by host names.
pub const CLUSTER_TLS_NAME: &str = "hyserve-cluster";

/// Largest gRPC message of the cluster protocol (a prefill's logits or a big batch of
/// activation rows).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// A cluster's mutual-TLS material: its CA, and this process's certificate and key.
#[derive(Clone)]
pub struct ClusterTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls { .. }")
    }
}

impl ClusterTls {
    /// Reads PEM files; the key never appears in errors or logs.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> std::io::Result<Self> {
        let read = |p: &Path| {
            std::fs::read(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let t = Self {
            ca: read(ca)?,
            cert: read(cert)?,
            key: read(key)?,
        };
        for (what, pem, tag) in [
            ("CA", &t.ca, "CERTIFICATE"),
            ("certificate", &t.cert, "CERTIFICATE"),
            ("key", &t.key, "PRIVATE KEY"),
        ] {
            if !String::from_utf8_lossy(pem).contains(&format!("{tag}-----")) {
                return Err(std::io::Error::other(format!(
                    "the cluster TLS {what} is not a PEM {tag}"
                )));
            }
        }
        Ok(t)
    }

    /// Servers ask every client for a certificate signed by the cluster CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// Clients present their certificate and accept only servers of the cluster CA.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(CLUSTER_TLS_NAME)
    }
}

/// A channel endpoint for a cluster peer at `addr` (`host:port`).
pub fn endpoint(addr: &str, tls: Option<&ClusterTls>) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(t) = tls {
        e = e
            .tls_config(t.client())
            .map_err(|e| format!("{addr}: {e}"))?;
    }
    Ok(e)
}

/// SHA-256 of a model's `config.json`: coordinator and workers must serve the same one.
pub fn model_fingerprint(dir: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(dir.join("config.json"))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A placement in its wire form.
pub fn placement_to_pb(epoch: u64, holders: &Holders) -> Placement {
    let n_experts = holders.first().map_or(0, Vec::len);
    Placement {
        epoch,
        n_layers: holders.len() as u32,
        n_experts: n_experts as u32,
        holders: holders
            .iter()
            .flatten()
            .map(|r| PbHolders { ranks: r.clone() })
            .collect(),
    }
}

/// A wire placement checked against the model and the group size.
pub fn placement_from_pb(
    p: &Placement,
    cfg: &ModelConfig,
    world: usize,
) -> Result<Holders, String> {
    let (nl, ne) = (p.n_layers as usize, p.n_experts as usize);
    if nl != cfg.n_layers || cfg.layers.iter().any(|l| l.n_experts != ne) {
        return Err(format!(
            "placement is for {nl} layers of {ne} experts; the model has {} layers of {} experts",
            cfg.n_layers,
            cfg.layers.first().map_or(0, |l| l.n_experts)
        ));
    }
    if p.holders.len() != nl * ne {
        return Err(format!(
            "placement has {} entries, not {}",
            p.holders.len(),
            nl * ne
        ));
    }
    let mut out = vec![Vec::with_capacity(ne); nl];
    for (i, h) in p.holders.iter().enumerate() {
        if h.ranks.is_empty() {
            return Err(format!(
                "expert {} of layer {} has no holder",
                i % ne,
                i / ne
            ));
        }
        if let Some(r) = h.ranks.iter().find(|&&r| r as usize >= world) {
            return Err(format!("rank {r} is outside a group of {world}"));
        }
        out[i / ne].push(h.ranks.clone());
    }
    Ok(out)
}

/// A step in its wire form.
pub fn step_to_pb(step: &Step) -> StepRequest {
    StepRequest {
        step: step.step_id,
        epoch: step.epoch,
        seqs: step
            .seqs
            .iter()
            .map(|s| {
                let d = s.draft.clone().unwrap_or_default();
                PbSeqStep {
                    seq_id: s.seq_id,
                    request_id: s.request_id.to_string(),
                    tokens: s.tokens.clone(),
                    first_pos: s.first_pos as u64,
                    blocks: s.blocks.clone(),
                    all_logits: s.all_logits,
                    argmax_only: s.argmax_only,
                    draft_depth: d.depth as u32,
                    draft_first_pos: d.first_pos as u64,
                    draft_context: d.context,
                }
            })
            .collect(),
    }
}

fn step_from_pb(r: StepRequest) -> Step {
    Step {
        step_id: r.step,
        epoch: r.epoch,
        seqs: r
            .seqs
            .into_iter()
            .map(|s| SeqStep {
                seq_id: s.seq_id,
                request_id: s.request_id.into(),
                tokens: s.tokens,
                first_pos: s.first_pos as usize,
                blocks: s.blocks,
                all_logits: s.all_logits,
                argmax_only: s.argmax_only,
                draft: (s.draft_depth > 0).then_some(DraftRequest {
                    depth: s.draft_depth as usize,
                    first_pos: s.draft_first_pos as usize,
                    context: s.draft_context,
                }),
            })
            .collect(),
    }
}

/// Little-endian f32 bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * v.len());
    hyserve_model::exchange::extend_f32_le(&mut out, v);
    out
}

/// f32 values of little-endian bytes; `None` when the length is not a multiple of 4.
pub fn f32_from_bytes(b: &[u8]) -> Option<Vec<f32>> {
    hyserve_model::exchange::f32_from_le(b)
}

type Incoming = (usize, Round, Rows);

/// The exchange between worker processes: one gRPC client stream to every peer for
/// what this rank sends, and the service's `Activations` handler filling the inbox with
/// what the peers send. Runs on the executor thread, blocking on the runtime `rt`.
pub struct GrpcExchange {
    rank: usize,
    peers: Vec<Option<Endpoint>>,
    streams: Vec<Option<mpsc::Sender<ActivationFrame>>>,
    inbox: mpsc::Receiver<Incoming>,
    mailbox: Mailbox,
    rt: tokio::runtime::Handle,
}

impl GrpcExchange {
    pub fn new(
        rank: usize,
        peers: Vec<Option<Endpoint>>,
        inbox: mpsc::Receiver<Incoming>,
        timeout: Duration,
        rt: tokio::runtime::Handle,
    ) -> Self {
        let world = peers.len();
        Self {
            rank,
            streams: vec![None; world],
            peers,
            inbox,
            mailbox: Mailbox::new(rank, world, timeout),
            rt,
        }
    }

    /// The open stream to `peer`, (re)connecting when there is none or it broke.
    fn stream(&mut self, peer: usize) -> Result<mpsc::Sender<ActivationFrame>, ExchangeError> {
        if let Some(tx) = &self.streams[peer]
            && !tx.is_closed()
        {
            return Ok(tx.clone());
        }
        let Some(ep) = self.peers[peer].clone() else {
            return Err(ExchangeError::PeerLost {
                peer,
                reason: "no endpoint".into(),
            });
        };
        let (tx, rx) = mpsc::channel::<ActivationFrame>(256);
        self.rt.spawn(async move {
            let result = async {
                let ch = ep.connect().await.map_err(|e| e.to_string())?;
                WorkerClient::new(ch)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
                    .activations(ReceiverStream::new(rx))
                    .await
                    .map_err(|e| e.message().to_string())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(peer, error = %e, "activation stream to a peer ended");
            }
        });
        self.streams[peer] = Some(tx.clone());
        Ok(tx)
    }
}

impl Exchange for GrpcExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.peers.len()
    }

    fn send_to(
        &mut self,
        round: Round,
        peers: &[usize],
        rows: Vec<Rows>,
    ) -> Result<(), ExchangeError> {
        for (peer, r) in rows.into_iter().enumerate() {
            if peer == self.rank || !peers.contains(&peer) {
                continue;
            }
            let frame = ActivationFrame {
                from: self.rank as u32,
                step: round.step,
                layer: round.layer,
                phase: round.phase as u32,
                block_experts: r.blocks.iter().map(|b| b.0).collect(),
                block_rows: r.blocks.iter().map(|b| b.1).collect(),
                data: f32_bytes(&r.data),
            };
            let tx = self.stream(peer)?;
            let timeout = self.mailbox.timeout();
            // A stalled peer fills its stream's window: give up after the exchange timeout.
            let sent = self
                .rt
                .block_on(async { tx.send_timeout(frame, timeout).await });
            if let Err(e) = sent {
                self.streams[peer] = None;
                return Err(ExchangeError::PeerLost {
                    peer,
                    reason: format!("its activation stream: {e}"),
                });
            }
        }
        Ok(())
    }

    fn recv_from(&mut self, round: Round, peers: &[usize]) -> Result<Vec<Rows>, ExchangeError> {
        let (inbox, rt) = (&mut self.inbox, &self.rt);
        self.mailbox.wait(
            round,
            peers,
            // The timer is made inside the runtime: this thread has no reactor.
            &mut |d| match rt.block_on(async { tokio::time::timeout(d, inbox.recv()).await }) {
                Ok(Some(m)) => Ok(Some(m)),
                Ok(None) => Err(ExchangeError::PeerLost {
                    peer: usize::MAX,
                    reason: "the worker service stopped".into(),
                }),
                Err(_) => Ok(None),
            },
        )
    }
}

/// Where a worker process computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeDevice {
    Cpu,
    /// The GPU of this ordinal; activations move over NCCL.
    Cuda(usize),
}

impl NodeDevice {
    pub fn name(self) -> String {
        match self {
            NodeDevice::Cpu => "cpu".into(),
            NodeDevice::Cuda(i) => format!("cuda:{i}"),
        }
    }
}

/// What a worker process is started with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub device: NodeDevice,
    /// Make the weights from this seed instead of reading the checkpoint (benchmarks
    /// at real dimensions; every rank must use the same seed).
    pub random_weights: Option<u64>,
    pub threads: usize,
    pub precision: Precision,
    pub tls: Option<ClusterTls>,
    /// Memory this worker offers the placement (weights and KV); also the largest KV
    /// cache an assignment may ask for.
    pub memory_bytes: u64,
    /// Where its steps are reported (its `/metrics`), and its `worker` label.
    pub metrics: Option<(Arc<hyserve_telemetry::WorkerMetrics>, String)>,
}

struct Assigned {
    rank: u32,
    world: usize,
    handle: Arc<ExecutorHandle>,
    staged: Stager,
    held: HeldExperts,
    /// The newest epoch assigned or staged.
    epoch: AtomicU64,
    steps: AtomicU64,
    weight_bytes: u64,
}

/// Where a worker stages its next placement's experts, for its executor to take at the
/// step that switches.
#[derive(Clone)]
enum Stager {
    Cpu(StageSlot<CpuBackend>),
    /// On GPU `ordinal`: the experts are loaded through a backend of their own (its own
    /// stream, so serving goes on) and handed over once that stream is idle.
    Cuda(StageSlot<CudaBackend>, usize),
}

impl Stager {
    fn pending(&self) -> Option<u64> {
        fn of<B: hyserve_kernels::Backend>(s: &StageSlot<B>) -> Option<u64> {
            s.lock().ok().and_then(|s| s.as_ref().map(|s| s.epoch))
        }
        match self {
            Stager::Cpu(s) => of(s),
            Stager::Cuda(s, _) => of(s),
        }
    }
}

/// Where a worker's weights come from.
enum Weights<'a> {
    Checkpoint(&'a Checkpoint),
    /// Made from this seed (`Model::random_shard`).
    Random(u64),
}

/// The worker service: one per process.
pub struct WorkerNode {
    cfg: ModelConfig,
    /// `None` with random weights.
    ck: Option<Arc<Checkpoint>>,
    fingerprint: String,
    node: NodeConfig,
    /// Where the `Activations` handler files peers' rows; replaced at each assignment.
    inbox: Mutex<mpsc::Sender<Incoming>>,
    state: tokio::sync::Mutex<Option<Arc<Assigned>>>,
    /// The draft model for speculation, loaded whole beside each assigned shard.
    draft: Option<(ModelConfig, Arc<Checkpoint>)>,
}

impl WorkerNode {
    /// Whether the coordinator has assigned this worker a shard and it is loaded.
    pub async fn is_assigned(&self) -> bool {
        self.state.lock().await.is_some()
    }

    pub fn new(
        cfg: ModelConfig,
        ck: Option<Checkpoint>,
        fingerprint: String,
        node: NodeConfig,
    ) -> Self {
        let (tx, _) = mpsc::channel(1);
        Self {
            cfg,
            ck: ck.map(Arc::new),
            fingerprint,
            node,
            inbox: Mutex::new(tx),
            state: tokio::sync::Mutex::new(None),
            draft: None,
        }
    }

    /// Gives every assignment a draft model (the executor checks it against the target
    /// when the shard loads).
    pub fn with_draft(mut self, cfg: ModelConfig, ck: Checkpoint) -> Self {
        self.draft = Some((cfg, Arc::new(ck)));
        self
    }

    /// The draft model on `backend`, if this worker has one.
    fn draft_model<B: hyserve_kernels::Backend>(&self, backend: &B) -> Option<Model<B>> {
        self.draft
            .as_ref()
            .map(|(cfg, ck)| Model::load(backend, cfg.clone(), ck, &mut |_| {}))
    }

    /// This worker's shard of the model on `backend`.
    fn model<B: hyserve_kernels::Backend>(
        &self,
        backend: &B,
        holds: &dyn Fn(usize, usize) -> bool,
        tp: TpShard,
    ) -> Result<Model<B>, String> {
        let cfg = self.cfg.clone();
        Ok(match self.weights()? {
            Weights::Checkpoint(ck) => Model::load_shard(backend, cfg, ck, holds, tp, &mut |_| {}),
            Weights::Random(seed) => {
                Model::random_shard(backend, cfg, seed, holds, tp, &mut |_| {})
            }
        })
    }

    fn weights(&self) -> Result<Weights<'_>, String> {
        match (&self.ck, self.node.random_weights) {
            (Some(ck), _) => Ok(Weights::Checkpoint(ck)),
            (None, Some(seed)) => Ok(Weights::Random(seed)),
            (None, None) => Err("no checkpoint and no random-weight seed".into()),
        }
    }

    /// Loads the experts of placement `holders` (epoch `epoch`) that this worker gains,
    /// on `backend`, beside the serving model, and files them in `slot`; `ready` runs
    /// before the slot is filled. Returns how many experts the slot holds.
    fn stage_into<B: hyserve_kernels::Backend>(
        &self,
        slot: &StageSlot<B>,
        backend: &B,
        a: &Assigned,
        holders: crate::Holders,
        epoch: u64,
        ready: &dyn Fn(&B),
    ) -> Result<u32, String> {
        let held = a.held.lock().map(|h| h.clone()).unwrap_or_default();
        // Experts an earlier, never switched-to stage already loaded are reused.
        let mut reuse = slot
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .map(|s| s.experts)
            .unwrap_or_default();
        let mine: Vec<(usize, usize)> = holders
            .iter()
            .enumerate()
            .flat_map(|(l, es)| {
                es.iter()
                    .enumerate()
                    .filter(|(_, r)| r.contains(&a.rank))
                    .map(move |(x, _)| (l, x))
            })
            .filter(|k| !held.contains(k))
            .collect();
        reuse.retain(|(k, _)| mine.contains(k));
        let need: Vec<(usize, usize)> = mine
            .iter()
            .copied()
            .filter(|k| !reuse.iter().any(|(r, _)| r == k))
            .collect();
        let mut experts = match self.weights()? {
            Weights::Checkpoint(ck) => Model::load_experts(backend, ck, &need),
            Weights::Random(seed) => Model::random_experts(backend, &self.cfg, seed, &need),
        };
        experts.extend(reuse);
        ready(backend);
        let n = experts.len() as u32;
        if let Ok(mut s) = slot.lock() {
            *s = Some(Staged {
                epoch,
                holders,
                experts,
            });
        }
        a.epoch.store(epoch, Ordering::Release);
        tracing::info!(
            rank = a.rank,
            epoch,
            loaded = need.len(),
            "placement staged"
        );
        Ok(n)
    }

    async fn assigned(&self) -> Result<Arc<Assigned>, Status> {
        self.state
            .lock()
            .await
            .clone()
            .ok_or_else(|| Status::failed_precondition("this worker has no assignment yet"))
    }
}

/// The gRPC face of a [`WorkerNode`] (cheap to clone).
#[derive(Clone)]
pub struct WorkerService(pub Arc<WorkerNode>);

impl std::ops::Deref for WorkerService {
    type Target = WorkerNode;
    fn deref(&self) -> &WorkerNode {
        &self.0
    }
}

fn exec_status(e: ExecutorError) -> Status {
    match e {
        ExecutorError::BadStep { .. } => Status::invalid_argument(e.to_string()),
        ExecutorError::Epoch { .. } => Status::failed_precondition(e.to_string()),
        ExecutorError::Exchange(_) => Status::unavailable(e.to_string()),
        ExecutorError::Stopped => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn assign(
        &self,
        req: Request<AssignRequest>,
    ) -> Result<Response<AssignResponse>, Status> {
        let req = req.into_inner();
        if req.model_fingerprint != self.fingerprint {
            return Err(Status::failed_precondition(format!(
                "the coordinator serves a model with config fingerprint {}, this worker {}",
                req.model_fingerprint, self.fingerprint
            )));
        }
        let world = req.peers.len();
        let rank = req.rank as usize;
        if rank >= world {
            return Err(Status::invalid_argument(format!(
                "rank {rank} of a group of {world}"
            )));
        }
        let placement = req
            .placement
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("placement is missing"))?;
        let holders =
            placement_from_pb(placement, &self.cfg, world).map_err(Status::invalid_argument)?;
        let tp_size = (req.tp_size as usize).max(1);
        if !world.is_multiple_of(tp_size) {
            return Err(Status::invalid_argument(format!(
                "{world} ranks do not split into tensor-parallel groups of {tp_size}"
            )));
        }
        TpShard::check(&self.cfg, tp_size).map_err(Status::invalid_argument)?;
        let tp = TpShard {
            index: rank % tp_size,
            size: tp_size,
        };
        let spec = crate::kv_spec(
            &self.cfg,
            self.node.precision,
            1,
            req.block_size.max(1) as usize,
        );
        let kv_bytes = (spec.bytes_per_token() as u64)
            .saturating_mul(u64::from(req.block_size))
            .saturating_mul(u64::from(req.n_blocks));
        if req.block_size == 0 || req.n_blocks < 2 || kv_bytes > self.node.memory_bytes {
            return Err(Status::invalid_argument(format!(
                "a KV cache of {} blocks of {} tokens ({kv_bytes} bytes) is outside 2 blocks..{} bytes",
                req.n_blocks, req.block_size, self.node.memory_bytes
            )));
        }
        let tls = self.node.tls.clone();
        let mut peers = Vec::with_capacity(world);
        for (i, p) in req.peers.iter().enumerate() {
            peers.push(if i == rank {
                None
            } else {
                Some(endpoint(p, tls.as_ref()).map_err(Status::invalid_argument)?)
            });
        }
        // Drop the previous assignment (its executor thread ends) before loading anew.
        let mut state = self.state.lock().await;
        if let Some(old) = state.take() {
            let _ = tokio::task::spawn_blocking(move || drop(old)).await;
        }
        let (inbox_tx, inbox_rx) = mpsc::channel(4096);
        if let Ok(mut i) = self.inbox.lock() {
            *i = inbox_tx;
        }
        let node = self.clone();
        let rt = tokio::runtime::Handle::current();
        let timeout = Duration::from_millis(u64::from(req.exchange_timeout_ms.max(100)));
        let epoch = placement.epoch;
        let nccl_id = req.nccl_id.clone();
        let (n_blocks, block_size) = (req.n_blocks as usize, req.block_size as usize);
        let assigned = tokio::task::spawn_blocking(move || -> Result<Assigned, String> {
            let holds = |l: usize, x: usize| holders[l][x].contains(&(rank as u32));
            let t0 = std::time::Instant::now();
            let (handle, staged, held, weight_bytes) = match node.node.device {
                NodeDevice::Cpu => {
                    let backend = CpuBackend::new(node.node.precision);
                    let model = node.model(&backend, &holds, tp)?;
                    let weight_bytes = model.weight_bytes(&backend) as u64;
                    let draft = node.draft_model(&backend);
                    let mut exec = Executor::with_threads(
                        backend,
                        model,
                        n_blocks,
                        block_size,
                        node.node.threads,
                    );
                    if let Some(d) = draft {
                        exec.set_draft(d)?;
                    }
                    if let Some((m, name)) = &node.node.metrics {
                        exec.set_metrics(m.clone(), name.clone());
                    }
                    let exchange = GrpcExchange::new(rank, peers, inbox_rx, timeout, rt);
                    let (slot, held) =
                        exec.expert_parallel(Box::new(exchange), epoch, holders.clone());
                    let staged = Stager::Cpu(slot);
                    let handle = ExecutorHandle::spawn(&format!("executor-rank{rank}"), exec)
                        .map_err(|e| e.to_string())?;
                    (handle, staged, held, weight_bytes)
                }
                NodeDevice::Cuda(ordinal) => {
                    let id: [core::ffi::c_char; 128] = nccl_id
                        .iter()
                        .map(|&b| b as core::ffi::c_char)
                        .collect::<Vec<_>>()
                        .try_into()
                        .map_err(|_| {
                            format!(
                                "a GPU worker needs the 128-byte NCCL id from the coordinator (got {} bytes)",
                                nccl_id.len()
                            )
                        })?;
                    let (backend, _) = CudaBackend::new(ordinal, Precision::Bf16)
                        .map_err(|e| format!("GPU {ordinal}: {e}"))?;
                    let model = node.model(&backend, &holds, tp)?;
                    backend.synchronize();
                    let weight_bytes = model.weight_bytes(&backend) as u64;
                    // Every rank joins here, concurrently (the coordinator assigns all
                    // ranks at once).
                    let comm = backend.nccl_comm(rank, world, &NcclId(id))?;
                    let draft = node.draft_model(&backend);
                    let mut exec = Executor::with_threads(backend, model, n_blocks, block_size, 1);
                    if let Some(d) = draft {
                        exec.set_draft(d)?;
                    }
                    if let Some((m, name)) = &node.node.metrics {
                        exec.set_metrics(m.clone(), name.clone());
                    }
                    let (slot, held) = exec.expert_parallel(
                        Box::new(NcclExchange::new(comm)),
                        epoch,
                        holders.clone(),
                    );
                    let handle = ExecutorHandle::spawn(&format!("executor-gpu{ordinal}"), exec)
                        .map_err(|e| e.to_string())?;
                    (handle, Stager::Cuda(slot, ordinal), held, weight_bytes)
                }
            };
            let experts = held.lock().map(|h| h.len()).unwrap_or(0);
            tracing::info!(
                rank,
                world,
                epoch,
                experts,
                weight_bytes,
                device = %node.node.device.name(),
                load_ms = t0.elapsed().as_millis() as u64,
                "assigned; shard loaded"
            );
            Ok(Assigned {
                rank: rank as u32,
                world,
                handle: Arc::new(handle),
                staged,
                held,
                epoch: AtomicU64::new(epoch),
                steps: AtomicU64::new(0),
                weight_bytes,
            })
        })
        .await
        .map_err(|e| Status::internal(format!("loading the shard: {e}")))?
        .map_err(|e| Status::internal(format!("starting the shard: {e}")))?;
        let experts_held = assigned.held.lock().map(|h| h.len() as u32).unwrap_or(0);
        let weight_bytes = assigned.weight_bytes;
        *state = Some(Arc::new(assigned));
        Ok(Response::new(AssignResponse {
            weight_bytes,
            experts_held,
        }))
    }

    async fn stage(&self, req: Request<StageRequest>) -> Result<Response<StageResponse>, Status> {
        let a = self.assigned().await?;
        let placement = req
            .into_inner()
            .placement
            .ok_or_else(|| Status::invalid_argument("placement is missing"))?;
        let holders =
            placement_from_pb(&placement, &self.cfg, a.world).map_err(Status::invalid_argument)?;
        let epoch = placement.epoch;
        // The newest epoch this worker knows; a retry of the same epoch (a stage that
        // failed elsewhere) replaces what was staged.
        let known = a.epoch.load(Ordering::Acquire);
        let pending = a.staged.pending();
        if epoch < known || (epoch == known && pending != Some(epoch)) {
            return Err(Status::failed_precondition(format!(
                "epoch {epoch} is not newer than {known}"
            )));
        }
        if let Some(p) = pending.filter(|&p| p < epoch) {
            return Err(Status::failed_precondition(format!(
                "epoch {p} is staged and not switched to yet; stage {epoch} after it"
            )));
        }
        let node = self.clone();
        let a2 = a.clone();
        let loaded = tokio::task::spawn_blocking(move || match a2.staged.clone() {
            Stager::Cpu(slot) => {
                let backend = CpuBackend::new(node.node.precision);
                node.stage_into(&slot, &backend, &a2, holders, epoch, &|_| {})
            }
            Stager::Cuda(slot, ordinal) => {
                let (backend, _) = CudaBackend::new(ordinal, Precision::Bf16)
                    .map_err(|e| format!("GPU {ordinal}: {e}"))?;
                // The executor's stream reads these weights only after this one is idle.
                node.stage_into(&slot, &backend, &a2, holders, epoch, &|b| b.synchronize())
            }
        })
        .await
        .map_err(|e| Status::internal(format!("staging: {e}")))?
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(StageResponse {
            experts_loaded: loaded,
        }))
    }

    async fn run_step(&self, req: Request<StepRequest>) -> Result<Response<StepResponse>, Status> {
        let a = self.assigned().await?;
        let step = step_from_pb(req.into_inner());
        let handle = a.handle.clone();
        let (t0, rows) = (
            std::time::Instant::now(),
            step.seqs.iter().map(|s| s.tokens.len()).sum::<usize>(),
        );
        let out = tokio::task::spawn_blocking(move || handle.run(step))
            .await
            .map_err(|e| Status::internal(format!("step: {e}")))?;
        let out = match out {
            Ok(o) => o,
            Err(e @ ExecutorError::Exchange(_)) if matches!(a.staged, Stager::Cuda(..)) => {
                // A GPU rank whose NCCL exchange failed may be out of step with its
                // peers for good: forget the assignment, so the coordinator rebuilds the
                // whole communicator.
                let mut st = self.state.lock().await;
                if st.as_ref().is_some_and(|s| Arc::ptr_eq(s, &a)) {
                    st.take();
                }
                tracing::error!(error = %e, "the NCCL exchange failed; waiting to be assigned again");
                return Err(Status::failed_precondition(format!(
                    "this worker has no assignment yet ({e})"
                )));
            }
            Err(ExecutorError::Stopped) => {
                // The executor died: forget the assignment, so the coordinator's next
                // step finds this worker unassigned and assigns it afresh.
                let mut st = self.state.lock().await;
                if st.as_ref().is_some_and(|s| Arc::ptr_eq(s, &a)) {
                    st.take();
                }
                tracing::error!("the executor stopped; waiting to be assigned again");
                return Err(Status::failed_precondition(
                    "this worker has no assignment yet (its executor stopped)",
                ));
            }
            Err(e) => return Err(exec_status(e)),
        };
        a.steps.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(rows, ms = t0.elapsed().as_secs_f64() * 1e3, "step");
        Ok(Response::new(StepResponse {
            logits: out.logits.iter().map(|l| f32_bytes(l)).collect(),
            argmax: out
                .argmax
                .into_iter()
                .map(|tokens| TokenList { tokens })
                .collect(),
            vocab_size: out.vocab_size as u32,
            expert_load: out.expert_load,
            proposals: out
                .proposals
                .into_iter()
                .map(|tokens| TokenList { tokens })
                .collect(),
            draft_seconds: out.draft_seconds,
            warming: out.warming,
            queued_seconds: out.timing.queued_seconds,
            worker_seconds: out.timing.worker_seconds,
            forward_seconds: out.timing.forward_seconds,
        }))
    }

    async fn activations(
        &self,
        req: Request<Streaming<ActivationFrame>>,
    ) -> Result<Response<ActivationAck>, Status> {
        let tx = self
            .inbox
            .lock()
            .map(|t| t.clone())
            .map_err(|_| Status::internal("inbox poisoned"))?;
        let mut stream = req.into_inner();
        while let Some(f) = stream.message().await? {
            if f.block_experts.len() != f.block_rows.len() || f.phase >= u32::from(PHASES) {
                return Err(Status::invalid_argument("malformed activation frame"));
            }
            let data = f32_from_bytes(&f.data)
                .ok_or_else(|| Status::invalid_argument("activation data is not f32"))?;
            let rows = Rows {
                blocks: f.block_experts.into_iter().zip(f.block_rows).collect(),
                data,
            };
            let round = Round {
                step: f.step,
                layer: f.layer,
                phase: f.phase as u8,
            };
            if tx.send((f.from as usize, round, rows)).await.is_err() {
                // Reassigned: this stream belongs to the old group.
                return Err(Status::aborted("the worker was reassigned"));
            }
        }
        Ok(Response::new(ActivationAck {}))
    }

    async fn nccl_id(
        &self,
        _req: Request<NcclIdRequest>,
    ) -> Result<Response<NcclIdResponse>, Status> {
        let id = NcclId::new().map_err(Status::unavailable)?;
        Ok(Response::new(NcclIdResponse {
            id: id.0.iter().map(|&c| c as u8).collect(),
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.state.lock().await.clone();
        let (memory_bytes, device) = (self.node.memory_bytes, self.node.device.name());
        Ok(Response::new(match s {
            None => StatusResponse {
                memory_bytes,
                device,
                ..Default::default()
            },
            Some(a) => StatusResponse {
                memory_bytes,
                device,
                assigned: true,
                rank: a.rank,
                epoch: a.epoch.load(Ordering::Acquire),
                steps: a.steps.load(Ordering::Relaxed),
                weight_bytes: a.weight_bytes,
                experts_held: a.held.lock().map(|h| h.len() as u32).unwrap_or(0),
            },
        }))
    }
}
