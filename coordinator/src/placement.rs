//! Expert placement: which worker holds which (layer, expert), how attention, the shared
//! expert and the embeddings are laid out (replicated on every worker, or sharded
//! tensor-parallel within a node), how many replicas hot experts get, and how much
//! memory each worker has left for KV blocks. Plain code: no actors, no I/O.
//!
//! The arithmetic for the real Hunyuan-Large in bf16: the dense part (attention 6.3B
//! parameters with the embeddings, plus the shared expert 22.5B) is 57.6 GB, so
//! replicating it on every 80 GB GPU leaves 22 GB for a sixteenth of the 720 GB of
//! routed experts (45 GB): it does not fit, and the planner shards the dense part over
//! tensor-parallel groups instead. In FP8 the dense part is 29 GB and the experts 360
//! GB, and data-parallel attention plus expert parallelism fits on 16 GPUs.

use std::fmt;

use hyserve_model::ModelConfig;

const GB: f64 = 1e9;

/// Weight storage of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    Bf16,
    Fp8,
}

impl WeightDtype {
    pub fn bytes(self) -> u64 {
        match self {
            WeightDtype::Bf16 => 2,
            WeightDtype::Fp8 => 1,
        }
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Fp8 => "fp8",
        })
    }
}

/// One worker (GPU) of the inventory.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSpec {
    pub kind: String,
    pub mem_bytes: u64,
    pub node: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("inventory `{0}`: {1}")]
    Inventory(String, String),
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
    #[error("expert load: {0}")]
    Load(String),
}

/// Parses an inventory such as `16xH100-80G` or `8xH100-80G,8xH20-96G` (memory in
/// decimal GB). Workers are numbered in order and grouped into nodes of
/// `gpus_per_node`; each comma-separated group starts a new node.
pub fn parse_inventory(spec: &str, gpus_per_node: usize) -> Result<Vec<WorkerSpec>, PlanError> {
    let bad = |why: &str| PlanError::Inventory(spec.to_string(), why.to_string());
    if gpus_per_node == 0 {
        return Err(bad("gpus per node must be at least 1"));
    }
    let mut out = Vec::new();
    let mut node = 0;
    for group in spec.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let (count, kind) = group
            .split_once(['x', 'X'])
            .ok_or_else(|| bad("expected COUNTxNAME-MEMG, e.g. 16xH100-80G"))?;
        let count: usize = count
            .parse()
            .map_err(|_| bad(&format!("`{count}` is not a count")))?;
        if count == 0 || count > 4096 {
            return Err(bad(&format!("count {count} is out of range 1..=4096")));
        }
        let mem = kind
            .rsplit_once('-')
            .and_then(|(_, m)| m.strip_suffix(['G', 'g']))
            .and_then(|m| m.parse::<u64>().ok())
            .filter(|&m| (1..=4096).contains(&m))
            .ok_or_else(|| bad(&format!("`{kind}` does not end in a memory size like -80G")))?;
        for i in 0..count {
            out.push(WorkerSpec {
                kind: kind.to_string(),
                mem_bytes: mem * 1_000_000_000,
                node: node + i / gpus_per_node,
            });
        }
        node += count.div_ceil(gpus_per_node);
    }
    if out.is_empty() {
        return Err(bad("no workers"));
    }
    Ok(out)
}

/// Bytes of every component of a model, in a weight dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSizes {
    /// Attention (q, k, v, o, norms) and router, all layers.
    pub attention: u64,
    /// The part of `attention` that stays whole under tensor parallelism (routers and
    /// norms); the q, k, v, o projections are sharded.
    pub attention_whole: u64,
    /// The shared expert, all layers.
    pub shared: u64,
    /// Embeddings and output head (kept in bf16).
    pub embeddings: u64,
    /// One routed expert of each layer: `[layer]` bytes per expert.
    pub expert: Vec<u64>,
    pub n_experts: Vec<usize>,
    /// KV cache bytes per token (bf16), over all cache layers and kv heads.
    pub kv_per_token: u64,
    pub n_kv_heads: usize,
}

impl ModelSizes {
    pub fn of(cfg: &ModelConfig, dtype: WeightDtype) -> Self {
        let b = dtype.bytes();
        let (h, d) = (cfg.hidden_size as u64, cfg.head_dim as u64);
        let (nh, nkv) = (cfg.n_heads as u64, cfg.n_kv_heads as u64);
        let mut s = ModelSizes {
            attention: 0,
            attention_whole: 0,
            shared: 0,
            embeddings: 2 * cfg.vocab_size as u64 * h * if cfg.tie_word_embeddings { 1 } else { 2 },
            expert: Vec::with_capacity(cfg.n_layers),
            n_experts: Vec::with_capacity(cfg.n_layers),
            kv_per_token: cfg.kv_bytes_per_token(2) as u64,
            n_kv_heads: cfg.n_kv_heads,
        };
        for l in &cfg.layers {
            let mut a = 2 * nh * d * h + l.n_experts as u64 * h;
            if l.has_kv {
                a += 2 * nkv * d * h;
            }
            s.attention += a * b + 4 * (2 * h + 2 * d);
            s.attention_whole += l.n_experts as u64 * h * b + 4 * (2 * h + 2 * d);
            s.shared += 3 * h * l.shared_width as u64 * b;
            s.expert.push(3 * h * l.expert_width as u64 * b);
            s.n_experts.push(l.n_experts);
        }
        s
    }

    /// Attention, shared expert and embeddings: the part that is replicated or
    /// tensor-parallel, never expert-parallel.
    pub fn dense(&self) -> u64 {
        self.attention + self.shared + self.embeddings
    }

    /// The dense bytes each worker of a tensor-parallel group of `group` holds: the
    /// projections of attention and the shared expert in `group` slices, embeddings,
    /// output head, routers and norms whole.
    pub fn dense_per_worker(&self, group: usize) -> u64 {
        let sharded = self.attention - self.attention_whole + self.shared;
        sharded.div_ceil(group as u64) + self.attention_whole + self.embeddings
    }

    pub fn experts_total(&self) -> u64 {
        self.expert
            .iter()
            .zip(&self.n_experts)
            .map(|(&e, &n)| e * n as u64)
            .sum()
    }
}

/// Tunables of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOptions {
    pub dtype: WeightDtype,
    /// Per worker: activations, workspaces, the CUDA context.
    pub overhead_bytes: u64,
    /// Per worker: the least KV cache a plan must leave.
    pub min_kv_bytes: u64,
    /// Most replicas (besides the primary) one hot expert gets.
    pub max_replicas: usize,
    /// Tensor-parallel group size the plan must use (the operator's choice), instead
    /// of the smallest that fits.
    pub tensor_parallel: Option<usize>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            dtype: WeightDtype::Bf16,
            overhead_bytes: 4_000_000_000,
            min_kv_bytes: 8_000_000_000,
            max_replicas: 3,
            tensor_parallel: None,
        }
    }
}

/// How the dense part is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseLayout {
    /// A full copy on every worker (data-parallel attention).
    Replicated,
    /// Sharded over groups of `group` workers of one node (tensor parallel).
    TensorParallel { group: usize },
}

/// One worker's share.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerPlan {
    pub spec: WorkerSpec,
    pub dense_bytes: u64,
    pub expert_bytes: u64,
    /// (layer, expert) held, primaries and replicas.
    pub experts: Vec<(usize, usize)>,
    pub overhead_bytes: u64,
    pub kv_bytes: u64,
    /// Tokens of KV this worker can hold (its share of the heads under tensor parallelism).
    pub kv_tokens: u64,
}

/// A placement.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub dtype: WeightDtype,
    pub dense: DenseLayout,
    /// `[layer][expert]`: the workers holding that expert, primary first.
    pub holders: Vec<Vec<Vec<usize>>>,
    pub workers: Vec<WorkerPlan>,
    /// Why the plan is what it is, in sentences.
    pub notes: Vec<String>,
}

impl Plan {
    pub fn replicas(&self) -> usize {
        self.holders
            .iter()
            .flatten()
            .map(|h| h.len().saturating_sub(1))
            .sum()
    }
}

/// Observed routed-token counts, `[layer][expert]`.
pub type ExpertLoad = Vec<Vec<u64>>;

/// Plans `cfg` onto `workers`. Prefers replicated dense weights (no all-reduce per
/// layer), then the smallest tensor-parallel group that fits; spreads each layer's
/// experts over as many workers as possible, by free memory; gives hot experts
/// replicas where memory allows; leaves the rest for KV.
pub fn plan(
    cfg: &ModelConfig,
    workers: &[WorkerSpec],
    opts: &PlanOptions,
    load: Option<&ExpertLoad>,
) -> Result<Plan, PlanError> {
    let sizes = ModelSizes::of(cfg, opts.dtype);
    if let Some(load) = load
        && (load.len() != sizes.expert.len()
            || load
                .iter()
                .zip(&sizes.n_experts)
                .any(|(l, &n)| l.len() != n))
    {
        return Err(PlanError::Load(format!(
            "expected {} layers of {} experts",
            sizes.expert.len(),
            sizes.n_experts.first().copied().unwrap_or(0)
        )));
    }
    let n = workers.len();
    let nodes = node_sizes(workers);
    // A group is consecutive workers of one node, the model's heads, widths and KV
    // heads split evenly.
    let usable = |g: usize| {
        nodes.iter().all(|n| n.is_multiple_of(g))
            && hyserve_model::graph::TpShard::check(cfg, g).is_ok()
    };
    let groups: Vec<usize> = match opts.tensor_parallel {
        Some(g) => {
            if !usable(g) {
                let why = hyserve_model::graph::TpShard::check(cfg, g)
                    .err()
                    .unwrap_or_else(|| {
                        format!("every node's worker count ({nodes:?}) must divide by {g}")
                    });
                return Err(PlanError::DoesNotFit(format!(
                    "tensor-parallel groups of {g} are impossible here: {why}"
                )));
            }
            vec![g]
        }
        None => [1usize, 2, 4, 8, 16]
            .into_iter()
            .filter(|&g| usable(g))
            .collect(),
    };
    let mut notes = Vec::new();
    let dense_gb = sizes.dense() as f64 / GB;
    let experts_gb = sizes.experts_total() as f64 / GB;
    notes.push(format!(
        "{}: attention {:.1} GB, shared expert {:.1} GB, embeddings {:.1} GB, routed experts {:.1} GB ({} x {:.2} GB)",
        opts.dtype,
        sizes.attention as f64 / GB,
        sizes.shared as f64 / GB,
        sizes.embeddings as f64 / GB,
        experts_gb,
        sizes.n_experts.iter().sum::<usize>(),
        sizes.expert.first().copied().unwrap_or(0) as f64 / GB
    ));
    let mut best_short: Option<(usize, f64)> = None;
    for &g in &groups {
        let dense_each = sizes.dense_per_worker(g);
        let caps: Vec<i64> = workers
            .iter()
            .map(|w| {
                w.mem_bytes as i64 - (opts.overhead_bytes + opts.min_kv_bytes + dense_each) as i64
            })
            .collect();
        match assign_experts(&sizes, &caps) {
            Ok(holders) => {
                let dense = if g == 1 {
                    notes.push(format!(
                        "dense part replicated on every worker ({dense_gb:.1} GB each): attention is data-parallel, no gathers"
                    ));
                    DenseLayout::Replicated
                } else {
                    let why = if opts.tensor_parallel.is_some() {
                        "as asked".to_string()
                    } else {
                        format!(
                            "({dense_gb:.1} GB) does not fit beside the experts when replicated;"
                        )
                    };
                    notes.push(format!(
                        "dense part {why} sharded tensor-parallel over groups of {g} workers of one node ({:.1} GB each: attention heads and shared expert in slices, embeddings and routers whole)",
                        dense_each as f64 / GB
                    ));
                    DenseLayout::TensorParallel { group: g }
                };
                let mut p = finish(&sizes, workers, opts, dense, dense_each, holders, g);
                if let Some(load) = load {
                    add_replicas(&mut p, &sizes, load, opts);
                }
                p.notes.splice(0..0, notes);
                return Ok(p);
            }
            Err(short) => {
                if best_short.is_none_or(|(_, s)| short < s) {
                    best_short = Some((g, short));
                }
            }
        }
    }
    let (g, short) = best_short.unwrap_or((1, 0.0));
    let total_mem: f64 = workers.iter().map(|w| w.mem_bytes as f64).sum::<f64>() / GB;
    Err(PlanError::DoesNotFit(format!(
        "{} workers with {total_mem:.0} GB in all cannot hold {experts_gb:.0} GB of routed experts plus the {dense_gb:.1} GB dense part (best: tensor-parallel groups of {g}) with {:.1} GB overhead and {:.1} GB of KV per worker: {short:.1} GB short ({:.1} GB per worker)",
        n,
        opts.overhead_bytes as f64 / GB,
        opts.min_kv_bytes as f64 / GB,
        short / n as f64,
    )))
}

fn node_sizes(workers: &[WorkerSpec]) -> Vec<usize> {
    let mut sizes: Vec<usize> = Vec::new();
    for w in workers {
        if sizes.len() <= w.node {
            sizes.resize(w.node + 1, 0);
        }
        sizes[w.node] += 1;
    }
    sizes.retain(|&s| s > 0);
    sizes
}

/// Places every (layer, expert) once: per layer, on the workers holding the fewest of
/// that layer's experts, the one with the most free memory (a layer's tokens spread
/// over many workers; memory fills evenly). `Err` gives the shortfall in GB.
fn assign_experts(sizes: &ModelSizes, caps: &[i64]) -> Result<Vec<Vec<Vec<usize>>>, f64> {
    let need = sizes.experts_total() as i64;
    let have: i64 = caps.iter().map(|&c| c.max(0)).sum();
    if need > have {
        return Err((need - have) as f64 / GB);
    }
    let mut free = caps.to_vec();
    let mut holders = Vec::with_capacity(sizes.expert.len());
    for (l, (&bytes, &count)) in sizes.expert.iter().zip(&sizes.n_experts).enumerate() {
        let mut in_layer = vec![0usize; free.len()];
        let mut layer = Vec::with_capacity(count);
        for _ in 0..count {
            let pick = (0..free.len())
                .filter(|&w| free[w] >= bytes as i64)
                .min_by_key(|&w| (in_layer[w], std::cmp::Reverse(free[w]), w));
            let Some(w) = pick else {
                let left: i64 = free.iter().map(|&f| f.max(0)).sum();
                let remaining = (sizes.expert.len() - l) as i64 * bytes as i64 * count as i64;
                return Err((remaining - left).max(bytes as i64) as f64 / GB);
            };
            free[w] -= bytes as i64;
            in_layer[w] += 1;
            layer.push(vec![w]);
        }
        holders.push(layer);
    }
    Ok(holders)
}

fn finish(
    sizes: &ModelSizes,
    workers: &[WorkerSpec],
    opts: &PlanOptions,
    dense: DenseLayout,
    dense_each: u64,
    holders: Vec<Vec<Vec<usize>>>,
    group: usize,
) -> Plan {
    let mut plans: Vec<WorkerPlan> = workers
        .iter()
        .map(|w| WorkerPlan {
            spec: w.clone(),
            dense_bytes: dense_each,
            expert_bytes: 0,
            experts: Vec::new(),
            overhead_bytes: opts.overhead_bytes,
            kv_bytes: 0,
            kv_tokens: 0,
        })
        .collect();
    for (l, layer) in holders.iter().enumerate() {
        for (e, hs) in layer.iter().enumerate() {
            for &w in hs {
                plans[w].expert_bytes += sizes.expert[l];
                plans[w].experts.push((l, e));
            }
        }
    }
    let mut p = Plan {
        dtype: opts.dtype,
        dense,
        holders,
        workers: plans,
        notes: Vec::new(),
    };
    update_kv(&mut p, sizes, group);
    let min_kv = p.workers.iter().map(|w| w.kv_bytes).min().unwrap_or(0);
    let min_tokens = p.workers.iter().map(|w| w.kv_tokens).min().unwrap_or(0);
    p.notes.push(format!(
        "routed experts spread over all {} workers; KV room at least {:.1} GB per worker ({} tokens)",
        p.workers.len(),
        min_kv as f64 / GB,
        min_tokens
    ));
    p
}

fn update_kv(p: &mut Plan, sizes: &ModelSizes, group: usize) {
    // Under tensor parallelism a worker holds 1/group of every token's KV heads.
    let per_token = sizes.kv_per_token.div_ceil(group as u64).max(1);
    for w in &mut p.workers {
        w.kv_bytes = w
            .spec
            .mem_bytes
            .saturating_sub(w.overhead_bytes + w.dense_bytes + w.expert_bytes);
        w.kv_tokens = w.kv_bytes / per_token;
    }
}

/// Gives experts whose load is well above their layer's mean extra replicas, on the
/// workers with the most free memory that do not hold them yet, while every worker
/// keeps its minimum KV room.
fn add_replicas(p: &mut Plan, sizes: &ModelSizes, load: &ExpertLoad, opts: &PlanOptions) {
    let group = match p.dense {
        DenseLayout::Replicated => 1,
        DenseLayout::TensorParallel { group } => group,
    };
    let mut added = 0;
    for (l, counts) in load.iter().enumerate() {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            continue;
        }
        let mean = total as f64 / counts.len() as f64;
        let mut hot: Vec<usize> = (0..counts.len())
            .filter(|&e| counts[e] as f64 > 1.5 * mean)
            .collect();
        hot.sort_by_key(|&e| std::cmp::Reverse(counts[e]));
        for e in hot {
            let want = ((counts[e] as f64 / mean).ceil() as usize)
                .saturating_sub(1)
                .min(opts.max_replicas);
            for _ in 0..want {
                let bytes = sizes.expert[l];
                let pick = (0..p.workers.len())
                    .filter(|&w| !p.holders[l][e].contains(&w))
                    .filter(|&w| p.workers[w].kv_bytes >= bytes + opts.min_kv_bytes)
                    .max_by_key(|&w| (p.workers[w].kv_bytes, std::cmp::Reverse(w)));
                let Some(w) = pick else { break };
                p.holders[l][e].push(w);
                p.workers[w].expert_bytes += bytes;
                p.workers[w].experts.push((l, e));
                p.workers[w].kv_bytes -= bytes;
                added += 1;
            }
        }
    }
    update_kv(p, sizes, group);
    p.notes.push(format!(
        "{added} replicas for experts above 1.5x their layer's mean load"
    ));
}

/// A table of the plan for people.
pub fn render(p: &Plan) -> String {
    let mut s = String::new();
    for n in &p.notes {
        s.push_str(&format!("- {n}\n"));
    }
    s.push_str(&format!(
        "\n{:>6} {:>5} {:<12} {:>9} {:>9} {:>8} {:>8} {:>10}\n",
        "worker", "node", "gpu", "dense GB", "experts", "exp GB", "KV GB", "KV tokens"
    ));
    for (i, w) in p.workers.iter().enumerate() {
        s.push_str(&format!(
            "{:>6} {:>5} {:<12} {:>9.1} {:>9} {:>8.1} {:>8.1} {:>10}\n",
            i,
            w.spec.node,
            w.spec.kind,
            w.dense_bytes as f64 / GB,
            w.experts.len(),
            w.expert_bytes as f64 / GB,
            w.kv_bytes as f64 / GB,
            w.kv_tokens
        ));
    }
    s
}

#[cfg(test)]
mod tests;
