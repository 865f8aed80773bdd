//! The coordinator's side of a multi-process cluster: finds the workers (etcd or a
//! static list), plans the placement, assigns every worker its rank and shard, links
//! the engine's worker actors to the worker processes over gRPC, and rebalances the
//! experts from observed load by placement epochs.
//!
//! A rebalance never pauses serving: the new placement is staged on the workers (they
//! load their new experts beside the serving ones), then the engine's epoch is raised
//! and the next step, on every worker at once, switches to it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyserve_model::ModelConfig;
use hyserve_proto::cluster::worker_client::WorkerClient;
use hyserve_proto::cluster::{
    AssignRequest, NcclIdRequest, StageRequest, StatusRequest, StepRequest, StepResponse,
};
use hyserve_worker::remote::{
    ClusterTls, MAX_MESSAGE_BYTES, endpoint, f32_from_bytes, placement_to_pb, step_to_pb,
};
use hyserve_worker::{Holders, Step, StepOutput, StepTiming};
use tonic::transport::Channel;

use crate::engine::{EngineHandle, ExecutorFactory, Reply, WorkerLink};
use crate::membership::{EtcdMembership, MemberEvent, MembershipError, WorkerInfo};
use crate::placement::{self, DenseLayout, PlanOptions, WeightDtype, WorkerSpec};

/// How the coordinator finds its workers.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// Workers registered in etcd; waits for `expect` of them.
    Etcd {
        membership: EtcdMembership,
        expect: usize,
    },
    /// A fixed list of worker endpoints (`host:port`), ranks in list order.
    Static(Vec<String>),
}

/// Everything the cluster needs besides the model config.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub discovery: Discovery,
    pub join_timeout: Duration,
    pub tls: Option<ClusterTls>,
    pub model_fingerprint: String,
    pub dtype: WeightDtype,
    pub n_blocks: usize,
    pub block_size: usize,
    /// KV bytes per worker the plan must leave.
    pub kv_bytes: u64,
    pub exchange_timeout: Duration,
    /// Rows routed since the last rebalance below which no rebalance is tried.
    pub rebalance_min_rows: u64,
    /// Tensor-parallel group size to use (`None`: the planner's choice by memory).
    pub tensor_parallel: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("worker {worker} ({addr}): {message}")]
    Worker {
        worker: String,
        addr: String,
        message: String,
    },
    #[error("placement: {0}")]
    Plan(String),
}

/// The placement in force, as stored in etcd.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlacementRecord {
    pub epoch: u64,
    /// Worker names by rank.
    pub workers: Vec<String>,
    /// `[layer][expert]`: ranks holding it.
    pub holders: Holders,
    pub replicas: usize,
    pub notes: Vec<String>,
    /// Ranks per tensor-parallel group (1: attention data-parallel on every worker).
    #[serde(default = "one")]
    pub tensor_parallel: usize,
}

fn one() -> usize {
    1
}

struct State {
    record: PlacementRecord,
    assign: Vec<AssignRequest>,
    /// Rows routed per `[layer][expert]` since the last rebalance.
    window: Vec<u64>,
}

/// A running cluster: its workers and the placement in force.
pub struct Cluster {
    cfg: ModelConfig,
    opts: ClusterOptions,
    /// By rank; a worker that comes back at another address is updated in place.
    workers: Mutex<Vec<WorkerInfo>>,
    clients: Mutex<Vec<WorkerClient<Channel>>>,
    specs: Vec<WorkerSpec>,
    state: Mutex<State>,
    /// The engine stepping this cluster (paused while workers are reassigned).
    engine: std::sync::OnceLock<EngineHandle>,
    /// One recovery at a time.
    recovering: tokio::sync::Mutex<()>,
    /// GPU workers: activations over NCCL, one communicator for all ranks.
    gpu: bool,
    /// Ranks per tensor-parallel group; the engine sees one worker per group.
    tp: usize,
}

fn client_for(addr: &str, tls: Option<&ClusterTls>) -> Result<WorkerClient<Channel>, String> {
    let ch = endpoint(addr, tls)?.connect_lazy();
    Ok(WorkerClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn holders_u32(h: &[Vec<Vec<usize>>]) -> Holders {
    h.iter()
        .map(|l| {
            l.iter()
                .map(|e| e.iter().map(|&w| w as u32).collect())
                .collect()
        })
        .collect()
}

impl Cluster {
    /// Finds the workers, plans, stores the placement (etcd), and assigns every
    /// worker; returns once every shard is loaded.
    pub async fn start(cfg: ModelConfig, opts: ClusterOptions) -> Result<Arc<Self>, ClusterError> {
        let tls = opts.tls.as_ref();
        let workers = match &opts.discovery {
            Discovery::Etcd { membership, expect } => {
                tracing::info!(expect, "waiting for workers to register in etcd");
                membership.wait_for(*expect, opts.join_timeout).await?
            }
            Discovery::Static(addrs) => {
                let mut out = Vec::with_capacity(addrs.len());
                for (i, addr) in addrs.iter().enumerate() {
                    let werr = |message: String| ClusterError::Worker {
                        worker: format!("peer {i}"),
                        addr: addr.clone(),
                        message,
                    };
                    let mut c = client_for(addr, tls).map_err(werr)?;
                    let deadline = tokio::time::Instant::now() + opts.join_timeout;
                    let status = loop {
                        match c.status(StatusRequest {}).await {
                            Ok(s) => break s.into_inner(),
                            Err(e) if tokio::time::Instant::now() < deadline => {
                                tracing::debug!(addr = %addr, error = %e, "worker not up yet");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(e) => return Err(werr(e.message().to_string())),
                        }
                    };
                    out.push(WorkerInfo {
                        name: format!("peer-{i}"),
                        addr: addr.clone(),
                        memory_bytes: status.memory_bytes,
                        device: status.device,
                    });
                }
                out
            }
        };
        let n_gpu = workers
            .iter()
            .filter(|w| w.device.starts_with("cuda"))
            .count();
        if n_gpu != 0 && n_gpu != workers.len() {
            return Err(ClusterError::Plan(format!(
                "{n_gpu} of {} workers are GPUs: a cluster's workers are all CPUs or all GPUs",
                workers.len()
            )));
        }
        let gpu = n_gpu > 0;
        // Workers on one host are a node (tensor-parallel groups stay inside one);
        // ranks run host by host, so a group is consecutive ranks.
        let mut hosts: Vec<String> = Vec::new();
        let node_of = |addr: &str, hosts: &mut Vec<String>| {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_string();
            match hosts.iter().position(|h| *h == host) {
                Some(i) => i,
                None => {
                    hosts.push(host);
                    hosts.len() - 1
                }
            }
        };
        let mut ranked: Vec<(usize, WorkerInfo)> = workers
            .into_iter()
            .map(|w| (node_of(&w.addr, &mut hosts), w))
            .collect();
        ranked.sort_by_key(|(node, _)| *node);
        let specs: Vec<WorkerSpec> = ranked
            .iter()
            .map(|(node, w)| WorkerSpec {
                kind: w.device.clone(),
                mem_bytes: w.memory_bytes,
                node: *node,
            })
            .collect();
        let workers: Vec<WorkerInfo> = ranked.into_iter().map(|(_, w)| w).collect();
        let clients = workers
            .iter()
            .map(|w| {
                client_for(&w.addr, tls).map_err(|message| ClusterError::Worker {
                    worker: w.name.clone(),
                    addr: w.addr.clone(),
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let plan = placement::plan(
            &cfg,
            &specs,
            &plan_options(&opts, opts.tensor_parallel),
            None,
        )
        .map_err(|e| ClusterError::Plan(e.to_string()))?;
        let tp = match plan.dense {
            DenseLayout::Replicated => 1,
            DenseLayout::TensorParallel { group } => group,
        };
        // Epochs only grow, across coordinator restarts too.
        let last_epoch = match &opts.discovery {
            Discovery::Etcd { membership, .. } => membership
                .load_placement()
                .await?
                .and_then(|v| serde_json::from_str::<PlacementRecord>(&v).ok())
                .map_or(0, |r| r.epoch),
            Discovery::Static(_) => 0,
        };
        let record = PlacementRecord {
            epoch: last_epoch + 1,
            workers: workers.iter().map(|w| w.name.clone()).collect(),
            holders: holders_u32(&plan.holders),
            replicas: plan.replicas(),
            notes: plan.notes.clone(),
            tensor_parallel: tp,
        };
        for note in &plan.notes {
            tracing::info!(epoch = record.epoch, "placement: {note}");
        }
        let peers: Vec<String> = workers.iter().map(|w| w.addr.clone()).collect();
        let nccl_id = if gpu {
            fresh_nccl_id(&clients[0], &workers[0]).await?
        } else {
            Vec::new()
        };
        let assign: Vec<AssignRequest> = (0..workers.len())
            .map(|rank| AssignRequest {
                rank: rank as u32,
                peers: peers.clone(),
                placement: Some(placement_to_pb(record.epoch, &record.holders)),
                n_blocks: opts.n_blocks as u32,
                block_size: opts.block_size as u32,
                model_fingerprint: opts.model_fingerprint.clone(),
                exchange_timeout_ms: opts.exchange_timeout.as_millis() as u32,
                nccl_id: nccl_id.clone(),
                tp_size: tp as u32,
            })
            .collect();
        let n_cells = cfg.layers.iter().map(|l| l.n_experts).sum();
        let cluster = Arc::new(Self {
            cfg,
            opts,
            workers: Mutex::new(workers),
            clients: Mutex::new(clients),
            specs,
            engine: std::sync::OnceLock::new(),
            recovering: tokio::sync::Mutex::new(()),
            gpu,
            tp,
            state: Mutex::new(State {
                record: record.clone(),
                assign: assign.clone(),
                window: vec![0; n_cells],
            }),
        });
        cluster.store(&record).await?;
        let calls = (0..assign.len()).map(|rank| {
            let (c, req) = (cluster.clone(), assign[rank].clone());
            async move { c.assign(rank, req).await }
        });
        for r in futures::future::join_all(calls).await {
            r?;
        }
        Ok(cluster)
    }

    fn worker(&self, rank: usize) -> WorkerInfo {
        self.workers
            .lock()
            .map(|w| w[rank].clone())
            .expect("workers lock")
    }

    fn client(&self, rank: usize) -> WorkerClient<Channel> {
        self.clients
            .lock()
            .map(|c| c[rank].clone())
            .expect("clients lock")
    }

    async fn assign(&self, rank: usize, req: AssignRequest) -> Result<(), ClusterError> {
        let w = self.worker(rank);
        let t0 = std::time::Instant::now();
        let resp = self
            .client(rank)
            .assign(req)
            .await
            .map_err(|e| ClusterError::Worker {
                worker: w.name.clone(),
                addr: w.addr.clone(),
                message: e.message().to_string(),
            })?
            .into_inner();
        tracing::info!(
            worker = %w.name, rank, experts = resp.experts_held, weight_bytes = resp.weight_bytes,
            ms = t0.elapsed().as_millis() as u64, "worker assigned"
        );
        Ok(())
    }

    /// Assigns workers `ranks` again with the placement in force (they restarted, or
    /// a peer moved): pauses the engine so no step races the reassignment, assigns,
    /// and resumes with those workers' sequences requeued (their KV caches are new).
    pub async fn recover(&self, ranks: Vec<usize>) -> Result<(), ClusterError> {
        let _one = self.recovering.lock().await;
        if let Some(e) = self.engine.get() {
            e.pause().await;
        }
        // An NCCL communicator is all ranks or none: every rank joins a fresh one.
        let ranks = if self.gpu {
            let id = fresh_nccl_id(&self.client(0), &self.worker(0)).await;
            match id {
                Ok(id) => {
                    if let Ok(mut s) = self.state.lock() {
                        for a in &mut s.assign {
                            a.nccl_id = id.clone();
                        }
                    }
                }
                Err(e) => {
                    if let Some(en) = self.engine.get() {
                        en.resume(Vec::new());
                    }
                    return Err(e);
                }
            }
            (0..self.workers().len()).collect()
        } else {
            ranks
        };
        let reqs: Vec<(usize, AssignRequest)> = match self.state.lock() {
            Ok(s) => ranks.iter().map(|&r| (r, s.assign[r].clone())).collect(),
            Err(_) => Vec::new(),
        };
        let results =
            futures::future::join_all(reqs.into_iter().map(|(r, req)| self.assign(r, req))).await;
        if let Some(e) = self.engine.get() {
            // The engine's workers are the tensor-parallel groups.
            let mut groups: Vec<usize> = ranks.iter().map(|r| r / self.tp).collect();
            groups.dedup();
            e.resume(groups);
        }
        results.into_iter().collect()
    }

    /// The engine that steps this cluster: recoveries pause it.
    pub fn attach(&self, engine: EngineHandle) {
        let _ = self.engine.set(engine);
    }

    async fn store(&self, record: &PlacementRecord) -> Result<(), ClusterError> {
        if let Discovery::Etcd { membership, .. } = &self.opts.discovery {
            let json = serde_json::to_string(record).expect("record serializes");
            membership.store_placement(&json).await?;
        }
        Ok(())
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.workers.lock().map(|w| w.clone()).unwrap_or_default()
    }

    pub fn placement(&self) -> Option<PlacementRecord> {
        self.state.lock().ok().map(|s| s.record.clone())
    }

    /// Whether the workers are GPUs.
    pub fn gpu(&self) -> bool {
        self.gpu
    }

    /// How many workers the engine schedules: one per tensor-parallel group.
    pub fn engine_workers(&self) -> usize {
        self.workers().len() / self.tp
    }

    /// The engine's links to the worker processes: engine worker `i` is the
    /// tensor-parallel group of ranks `i * tp..(i + 1) * tp` (one rank without
    /// tensor parallelism).
    pub fn factory(self: &Arc<Self>) -> ExecutorFactory {
        let me = self.clone();
        Arc::new(move |i| {
            Ok(Box::new(RemoteGroup {
                ranks: (i * me.tp..(i + 1) * me.tp).collect(),
                cluster: me.clone(),
            }) as Box<dyn WorkerLink>)
        })
    }

    /// One rebalance attempt from the load seen since the last one: plans with the
    /// load, and when the placement changes, stages it on every worker and switches
    /// the engine to the new epoch. Returns the new epoch, if any.
    pub async fn rebalance(&self, engine: &EngineHandle) -> Result<Option<u64>, ClusterError> {
        // Not while a recovery reassigns workers (it would assign the old epoch).
        let _one = self.recovering.lock().await;
        let (load, current) = {
            let mut s = self
                .state
                .lock()
                .map_err(|_| ClusterError::Plan("poisoned".into()))?;
            for (w, l) in s.window.iter_mut().zip(engine.take_expert_load()) {
                *w += l;
            }
            if s.window.iter().sum::<u64>() < self.opts.rebalance_min_rows {
                return Ok(None);
            }
            let n = s.window.len();
            (
                std::mem::replace(&mut s.window, vec![0; n]),
                s.record.clone(),
            )
        };
        let mut load2d = Vec::with_capacity(self.cfg.n_layers);
        let mut at = 0;
        for l in &self.cfg.layers {
            load2d.push(load[at..at + l.n_experts].to_vec());
            at += l.n_experts;
        }
        // The dense layout stays; only the experts move.
        let plan = placement::plan(
            &self.cfg,
            &self.specs,
            &plan_options(&self.opts, Some(self.tp)),
            Some(&load2d),
        )
        .map_err(|e| ClusterError::Plan(e.to_string()))?;
        let holders = holders_u32(&plan.holders);
        if holders == current.holders {
            return Ok(None);
        }
        let record = PlacementRecord {
            epoch: current.epoch + 1,
            workers: current.workers.clone(),
            holders,
            replicas: plan.replicas(),
            notes: plan.notes.clone(),
            tensor_parallel: self.tp,
        };
        let pb = placement_to_pb(record.epoch, &record.holders);
        let t0 = std::time::Instant::now();
        let clients = self.clients.lock().map(|c| c.clone()).unwrap_or_default();
        let workers = self.workers();
        let calls = clients.into_iter().zip(workers).map(|(mut c, w)| {
            let pb = pb.clone();
            async move {
                c.stage(StageRequest {
                    placement: Some(pb),
                })
                .await
                .map(|r| r.into_inner().experts_loaded)
                .map_err(|e| ClusterError::Worker {
                    worker: w.name.clone(),
                    addr: w.addr.clone(),
                    message: format!("staging epoch failed: {}", e.message()),
                })
            }
        });
        let mut loaded = 0;
        for r in futures::future::join_all(calls).await {
            loaded += r?;
        }
        self.store(&record).await?;
        if let Ok(mut s) = self.state.lock() {
            for a in &mut s.assign {
                a.placement = Some(pb.clone());
            }
            s.record = record.clone();
        }
        engine.set_epoch(record.epoch);
        engine.record_rebalance(t0.elapsed().as_secs_f64());
        tracing::info!(
            epoch = record.epoch,
            replicas = record.replicas,
            experts_loaded = loaded,
            stage_ms = t0.elapsed().as_millis() as u64,
            "rebalanced: new placement staged, switching at the next step"
        );
        Ok(Some(record.epoch))
    }

    /// Rebalances every `every` for as long as the engine runs.
    pub fn spawn_rebalancer(self: &Arc<Self>, engine: EngineHandle, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = me.rebalance(&engine).await {
                    tracing::error!(error = %e, "rebalance failed; the current placement stays");
                }
            }
        });
    }

    /// Watches etcd membership: logs losses, and assigns a worker that registers again
    /// (it restarted) its rank and shard in the placement in force.
    pub fn spawn_watch(self: &Arc<Self>) {
        let Discovery::Etcd { membership, .. } = self.opts.discovery.clone() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let watcher = tokio::spawn(async move {
                if let Err(e) = membership.watch(|ev| drop(tx.send(ev))).await {
                    tracing::error!(error = %e, "etcd watch ended");
                }
            });
            while let Some(ev) = rx.recv().await {
                match ev {
                    MemberEvent::Lost(name) => {
                        tracing::warn!(worker = %name, "worker left the cluster (lease expired)")
                    }
                    MemberEvent::Joined(info) => {
                        let known = me.workers();
                        let Some(rank) = known.iter().position(|w| w.name == info.name) else {
                            tracing::info!(worker = %info.name, "a worker outside the placement registered; it stays idle");
                            continue;
                        };
                        let ranks = if known[rank].addr == info.addr {
                            vec![rank]
                        } else {
                            // It restarted elsewhere: every peer list changes.
                            if let Err(e) = me.move_worker(rank, &info.addr) {
                                tracing::error!(error = %e, "worker moved to an unusable address");
                                continue;
                            }
                            (0..known.len()).collect()
                        };
                        tracing::info!(worker = %info.name, rank, addr = %info.addr, "worker (re)joined; assigning shards again");
                        if let Err(e) = me.recover(ranks).await {
                            tracing::error!(error = %e, "reassigning failed");
                        }
                    }
                }
            }
            watcher.abort();
        });
    }
}

impl Cluster {
    /// Points rank `rank` at a new address (its process restarted elsewhere).
    fn move_worker(&self, rank: usize, addr: &str) -> Result<(), ClusterError> {
        let client =
            client_for(addr, self.opts.tls.as_ref()).map_err(|message| ClusterError::Worker {
                worker: format!("rank {rank}"),
                addr: addr.to_string(),
                message,
            })?;
        if let Ok(mut w) = self.workers.lock() {
            w[rank].addr = addr.to_string();
        }
        if let Ok(mut c) = self.clients.lock() {
            c[rank] = client;
        }
        if let Ok(mut s) = self.state.lock() {
            for a in &mut s.assign {
                a.peers[rank] = addr.to_string();
            }
        }
        Ok(())
    }
}

/// A new NCCL unique id, made by `w` (rank 0).
async fn fresh_nccl_id(c: &WorkerClient<Channel>, w: &WorkerInfo) -> Result<Vec<u8>, ClusterError> {
    c.clone()
        .nccl_id(NcclIdRequest {})
        .await
        .map(|r| r.into_inner().id)
        .map_err(|e| ClusterError::Worker {
            worker: w.name.clone(),
            addr: w.addr.clone(),
            message: format!("making an NCCL id: {}", e.message()),
        })
}

fn plan_options(opts: &ClusterOptions, tensor_parallel: Option<usize>) -> PlanOptions {
    PlanOptions {
        dtype: opts.dtype,
        overhead_bytes: 64 << 20,
        min_kv_bytes: opts.kv_bytes,
        max_replicas: 3,
        tensor_parallel,
    }
}

/// The engine's link to one tensor-parallel group of worker processes (one process
/// without tensor parallelism): every rank runs the same step; the first answers
/// with logits, all with the rows they routed.
struct RemoteGroup {
    ranks: Vec<usize>,
    cluster: Arc<Cluster>,
}

impl WorkerLink for RemoteGroup {
    fn submit(&self, step: Step, reply: Reply) -> Result<(), String> {
        let (cluster, ranks) = (self.cluster.clone(), self.ranks.clone());
        tokio::spawn(async move {
            let req = step_to_pb(&step);
            let runs = ranks.iter().map(|&rank| {
                run_on_rank(cluster.clone(), rank, &step, req.clone(), rank == ranks[0])
            });
            let mut outs = futures::future::join_all(runs).await.into_iter();
            let result = outs
                .next()
                .expect("a group has a rank")
                .and_then(|mut first| {
                    for o in outs {
                        let o = o?;
                        for (a, b) in first.expert_load.iter_mut().zip(o.expert_load) {
                            *a += b;
                        }
                    }
                    Ok(first)
                });
            reply(result);
        });
        Ok(())
    }

    fn is_alive(&self) -> bool {
        true
    }
}

/// `r` as the output of `step`, or `None` where it does not fit it. `logits`: whether
/// this rank answers with them (a group's first), the others' are empty.
///
/// Per sequence: rows (a multiple of the vocabulary) or, where it asked for only them,
/// arg-max tokens; from a group's other ranks, neither. A worker of a release before
/// `argmax_only` sends rows all the same (a rolling upgrade): their arg-max is taken here.
fn step_output(step: &Step, r: StepResponse, logits: bool) -> Option<StepOutput> {
    let vocab = r.vocab_size as usize;
    let n = step.seqs.len();
    let mut argmax: Vec<Vec<u32>> = r.argmax.into_iter().map(|l| l.tokens).collect();
    if r.logits.len() != n
        || !(argmax.is_empty() || argmax.len() == n)
        || !(r.proposals.is_empty() || r.proposals.len() == n)
    {
        return None;
    }
    argmax.resize(n, Vec::new());
    let rows: Vec<Vec<f32>> = r
        .logits
        .iter()
        .zip(step.seqs.iter().zip(argmax.iter_mut()))
        .map(|(b, (s, ids))| {
            let mut v = f32_from_bytes(b).filter(|v| vocab > 0 && v.len() % vocab == 0)?;
            let answered = if !logits {
                v.is_empty() && ids.is_empty()
            } else if !s.argmax_only {
                !v.is_empty() && ids.is_empty()
            } else if ids.is_empty() && !v.is_empty() {
                *ids = hyserve_kernels::backend::argmax_each(&std::mem::take(&mut v), vocab);
                true
            } else {
                v.is_empty() && !ids.is_empty()
            };
            answered.then_some(v)
        })
        .collect::<Option<_>>()?;
    let mut proposals: Vec<Vec<u32>> = r.proposals.into_iter().map(|p| p.tokens).collect();
    proposals.resize(n, Vec::new());
    Some(StepOutput {
        logits: rows,
        argmax,
        vocab_size: vocab,
        expert_load: r.expert_load,
        proposals,
        draft_seconds: r.draft_seconds,
        warming: r.warming,
        timing: StepTiming {
            queued_seconds: r.queued_seconds,
            worker_seconds: r.worker_seconds,
            forward_seconds: r.forward_seconds,
        },
    })
}

/// Runs `step` (`req` on the wire) on rank `rank`; `logits`: whether this rank answers
/// with them (a group's first), the others' are empty.
async fn run_on_rank(
    cluster: Arc<Cluster>,
    rank: usize,
    step: &Step,
    req: StepRequest,
    logits: bool,
) -> Result<StepOutput, String> {
    let mut client = cluster.client(rank);
    match client.run_step(req).await {
        Ok(resp) => step_output(step, resp.into_inner(), logits)
            .ok_or_else(|| format!("worker {rank} sent malformed logits")),
        Err(status) => {
            // Unassigned (it restarted), or it missed a placement epoch: assign it
            // again with the placement in force.
            if status.code() == tonic::Code::FailedPrecondition
                && (status.message().contains("no assignment")
                    || status.message().contains("placement epoch"))
            {
                tracing::warn!(
                    rank,
                    "worker lost its assignment (restarted); assigning again"
                );
                // After this step's failure is delivered: the recovery pauses the
                // engine, which waits for this very step.
                let c = cluster.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.recover(vec![rank]).await {
                        tracing::error!(rank, error = %e, "reassigning failed");
                    }
                });
            } else {
                // Do not spin on a worker that is down: the step is retried.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(format!("worker {rank}: {}", status.message()))
        }
    }
}

#[cfg(test)]
mod tests {
    use hyserve_proto::cluster::TokenList;
    use hyserve_worker::SeqStep;
    use hyserve_worker::remote::f32_bytes;

    use super::*;

    fn seq(id: u64, argmax_only: bool) -> SeqStep {
        SeqStep {
            seq_id: id,
            request_id: "".into(),
            tokens: vec![1],
            first_pos: 0,
            blocks: vec![0],
            all_logits: false,
            argmax_only,
            draft: None,
        }
    }

    fn response(logits: &[&[f32]], argmax: &[&[u32]]) -> StepResponse {
        StepResponse {
            logits: logits.iter().map(|l| f32_bytes(l)).collect(),
            vocab_size: 4,
            argmax: argmax
                .iter()
                .map(|t| TokenList { tokens: t.to_vec() })
                .collect(),
            ..StepResponse::default()
        }
    }

    /// A step's response is read per sequence: ids where a sequence asked for only them,
    /// rows otherwise; a worker from before `argmax_only` (rows for every sequence) is
    /// read too, its arg-max taken here; anything else is malformed.
    #[test]
    fn step_responses_are_read_per_sequence_and_from_older_workers_too() {
        let step = Step {
            seqs: vec![seq(1, true), seq(2, false)],
            ..Step::default()
        };
        let row: &[f32] = &[0.0, 3.0, 1.0, 3.0];
        let out = step_output(&step, response(&[&[], row], &[&[2], &[]]), true).unwrap();
        assert_eq!(out.argmax, [vec![2], vec![]]);
        assert_eq!(out.logits, [vec![], row.to_vec()]);
        // An older worker: rows for both (ties go to the lowest index).
        let out = step_output(&step, response(&[row, row], &[]), true).unwrap();
        assert_eq!(out.argmax, [vec![1], vec![]]);
        assert_eq!(out.logits, [vec![], row.to_vec()]);
        // A group's other ranks send neither.
        assert!(step_output(&step, response(&[&[], &[]], &[]), false).is_some());
        for (logits, argmax, first) in [
            // One list too long.
            (&[&[][..], row, &[]][..], &[&[2][..], &[], &[]][..], true),
            // Ids where rows were asked for.
            (&[&[], &[]], &[&[2], &[3]], true),
            // Neither for the first sequence.
            (&[&[], row], &[&[], &[]], true),
            // A row cut short.
            (&[&[], &row[..3]], &[&[2], &[]], true),
            // Ids from a rank that answers with none.
            (&[&[], &[]], &[&[2], &[]], false),
        ] {
            assert!(
                step_output(&step, response(logits, argmax), first).is_none(),
                "{logits:?} {argmax:?} {first}"
            );
        }
    }
}
