//! `hyserve bench-ep`: real-dimension Hunyuan-Large layers spread over the GPUs of one
//! host with NCCL expert parallelism, against one GPU running the same layers.
//!
//! Every GPU holds the dense part (attention, shared expert, embeddings) and 1/N of
//! each layer's routed experts; a batch's sequences are spread over the GPUs
//! (data-parallel attention) and every MoE block exchanges rows over NCCL. Reported per
//! GPU count and batch: decode step time and tokens/s (median of `--steps` steps, no
//! fences), then, in a second pass with a device fence after every phase, the per-layer
//! split into attention (and the rest of the layer), routing, dispatch, expert compute
//! and combine, and the exchange's bytes against the device-to-device all-to-all
//! bandwidth NCCL gives on the same GPUs (`all_to_all_probe`, 32 MiB per peer).
//! `--gpus 1` is the single-GPU baseline on the fused MoE path with CUDA graphs.
//! `--tp 2` (or a list) adds cases where groups of that many GPUs also shard attention
//! and the shared expert (tensor parallelism, joined by gathers over the same NCCL
//! communicator) and run the same sequences.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use hyserve_kernels::cuda::{CudaBackend, NcclId};
use hyserve_kernels::{Backend, KvSpec, Precision};
use hyserve_model::graph::TpShard;
use hyserve_model::{EpTiming, ExpertParallel, Model, ModelConfig, SeqChunk};
use hyserve_worker::nccl::NcclExchange;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory; only config.json is read (weights are random, made on the GPUs).
    #[arg(long)]
    model: PathBuf,
    /// GPU counts to spread the layers over; 1 is the single-GPU baseline.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    gpus: Vec<usize>,
    /// Tensor-parallel group sizes to run for every GPU count they divide (1: none).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    tp: Vec<usize>,
    /// Total sequences decoding together (spread over the GPUs).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batches: Vec<usize>,
    /// Cached tokens per sequence.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Timed steps per case (median reported).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

const BLOCK: usize = 16;
const SEED: u64 = 7;

/// One GPU's results over the batches, and its all-to-all probes (GB/s at 32 MiB
/// per peer, seconds for 64 KiB per peer).
type RankResult = (Vec<RankCase>, (f64, f64));

/// One GPU's result for one batch.
#[derive(Clone, Debug, Default)]
struct RankCase {
    step_ms: f64,
    fenced_step_ms: f64,
    timing: EpTiming,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The decode chunks of this GPU's sequences (`mine`), each at position `ctx - 1`.
fn chunks(mine: &[usize], ctx: usize, step: usize, vocab: usize) -> Vec<SeqChunk> {
    let per_seq = ctx.div_ceil(BLOCK) * BLOCK;
    mine.iter()
        .enumerate()
        .map(|(j, &i)| SeqChunk {
            tokens: vec![((i * 7919 + step * 31) % vocab) as u32],
            first_pos: ctx - 1,
            slots: (0..ctx).map(|p| j * per_seq + p).collect(),
            all_logits: false,
            argmax_only: false,
        })
        .collect()
}

fn kv_spec(cfg: &ModelConfig, seqs: usize, ctx: usize, tp: usize) -> KvSpec {
    KvSpec {
        n_cache_layers: cfg.n_cache_layers,
        n_kv_heads: cfg.n_kv_heads / tp,
        head_dim: cfg.head_dim,
        block_size: BLOCK,
        n_blocks: (seqs.max(1) * ctx.div_ceil(BLOCK)).max(2),
        dtype: Precision::Bf16.storage_dtype(),
    }
}

/// The single-GPU baseline: every expert local, the fused MoE path, CUDA graphs.
fn baseline(cfg: &ModelConfig, a: &Args) -> anyhow::Result<Vec<f64>> {
    let (b, _) = CudaBackend::new(0, Precision::Bf16).context("GPU 0")?;
    eprintln!("1 GPU: making random weights for {} layers", cfg.n_layers);
    let model = Model::random(&b, cfg.clone(), SEED, &mut |_| {});
    let mut out = Vec::new();
    for &batch in &a.batches {
        let mine: Vec<usize> = (0..batch).collect();
        let mut kv = b.alloc_kv(kv_spec(cfg, batch, a.ctx, 1));
        b.randomize_kv(&mut kv, 3);
        let mut t = Vec::new();
        for s in 0..a.warmup + a.steps {
            let c = chunks(&mine, a.ctx, s, cfg.vocab_size);
            b.synchronize();
            let t0 = Instant::now();
            model.forward(&b, &mut kv, &c);
            if s >= a.warmup {
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(t);
        eprintln!(
            "1 GPU   batch {batch:>3}: step {ms:>8.2} ms  {:>8.1} tok/s",
            batch as f64 / ms * 1e3
        );
        out.push(ms);
    }
    Ok(out)
}

/// One GPU of an expert-parallel group: its shard, its sequences, every batch.
fn rank_run(
    rank: usize,
    world: usize,
    tp: usize,
    id: &NcclId,
    cfg: &ModelConfig,
    a: &Args,
) -> anyhow::Result<RankResult> {
    let (b, _) = CudaBackend::new(rank, Precision::Bf16).with_context(|| format!("GPU {rank}"))?;
    let holders: Vec<Vec<Vec<u32>>> = cfg
        .layers
        .iter()
        .map(|l| (0..l.n_experts).map(|e| vec![(e % world) as u32]).collect())
        .collect();
    let holds = |l: usize, e: usize| holders[l][e].contains(&(rank as u32));
    let shard = TpShard {
        index: rank % tp,
        size: tp,
    };
    let model = Model::random_shard(&b, cfg.clone(), SEED, &holds, shard, &mut |_| {});
    b.synchronize();
    let comm = b.nccl_comm(rank, world, id).map_err(anyhow::Error::msg)?;
    let probe = comm
        .all_to_all_probe(32 << 20, 5)
        .map_err(anyhow::Error::msg)?;
    // Small messages (a decode step's size): the latency floor of one all-to-all, in s.
    let small_bytes = 64usize << 10;
    let small_gbs = comm
        .all_to_all_probe(small_bytes, 50)
        .map_err(anyhow::Error::msg)?;
    let small_s = (small_bytes * (world - 1)) as f64 / (small_gbs * 1e9);
    let mut ex = NcclExchange::new(comm);
    let mut load: Vec<Vec<u64>> = cfg.layers.iter().map(|l| vec![0; l.n_experts]).collect();
    let mut step_id = 0u64;
    let mut out = Vec::new();
    let fence = || b.synchronize();
    for &batch in &a.batches {
        // Sequences are spread over the groups (one GPU each without tensor parallelism).
        let groups = world / tp;
        let mine: Vec<usize> = (0..batch).filter(|i| i % groups == rank / tp).collect();
        let mut kv = b.alloc_kv(kv_spec(cfg, mine.len(), a.ctx, tp));
        b.randomize_kv(&mut kv, 3 + rank as u64);
        let mut case = RankCase::default();
        for fenced in [false, true] {
            let mut t = Vec::new();
            let mut timing = EpTiming::default();
            for s in 0..a.warmup + a.steps {
                step_id += 1;
                let c = chunks(&mine, a.ctx, s, cfg.vocab_size);
                let timed = s >= a.warmup;
                let mut ep = ExpertParallel {
                    exchange: &mut ex,
                    holders: &holders,
                    step: step_id,
                    load: &mut load,
                    timing: (fenced && timed).then_some(&mut timing),
                    fence: fenced.then_some(&fence as &(dyn Fn() + Sync)),
                };
                b.synchronize();
                let t0 = Instant::now();
                model
                    .forward_ep(&b, &mut kv, &c, &mut ep)
                    .map_err(|e| anyhow::anyhow!("GPU {rank}: {e}"))?;
                b.synchronize();
                if timed {
                    t.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            if fenced {
                case.fenced_step_ms = median(t);
                case.timing = timing;
            } else {
                case.step_ms = median(t);
            }
        }
        out.push(case);
    }
    Ok((out, (probe, small_s)))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = ModelConfig::from_file(&a.model.join("config.json"))?;
    anyhow::ensure!(a.ctx >= 1 && a.steps >= 1, "--ctx and --steps must be >= 1");
    let layers = cfg.n_layers as f64;
    let mut rows = Vec::new();
    let mut base: Option<Vec<f64>> = None;
    for &world in &a.gpus {
        if world == 1 {
            let ms = baseline(&cfg, &a)?;
            for (&batch, &ms) in a.batches.iter().zip(&ms) {
                rows.push(json!({
                    "gpus": 1, "batch": batch, "step_ms": ms,
                    "tokens_per_s": batch as f64 / ms * 1e3,
                    "path": "fused MoE, CUDA graphs",
                }));
            }
            base = Some(ms);
            continue;
        }
        for &tp in &a.tp {
            if tp == 0 || !world.is_multiple_of(tp) {
                continue;
            }
            TpShard::check(&cfg, tp).map_err(anyhow::Error::msg)?;
            let label = if tp > 1 {
                format!("{world} GPUs tp{tp}")
            } else {
                format!("{world} GPUs")
            };
            let id = NcclId::new().map_err(anyhow::Error::msg)?;
            eprintln!("{label}: making random shards, joining NCCL");
            let results: Vec<anyhow::Result<RankResult>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..world)
                    .map(|rank| {
                        let (id, cfg, a) = (&id, &cfg, &a);
                        s.spawn(move || rank_run(rank, world, tp, id, cfg, a))
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("a GPU thread panicked")))
                    })
                    .collect()
            });
            let results: Vec<RankResult> = results.into_iter().collect::<Result<_, _>>()?;
            let probe = results.iter().map(|r| r.1.0).fold(f64::MAX, f64::min);
            let small_us = results.iter().map(|r| r.1.1).fold(0.0, f64::max) * 1e6;
            for (bi, &batch) in a.batches.iter().enumerate() {
                // A step ends when the slowest GPU's does; the split is the slowest GPU's.
                let slowest = (0..world)
                    .max_by(|&x, &y| {
                        results[x].0[bi]
                            .fenced_step_ms
                            .total_cmp(&results[y].0[bi].fenced_step_ms)
                    })
                    .unwrap_or(0);
                let step_ms = results.iter().map(|r| r.0[bi].step_ms).fold(0.0, f64::max);
                let c = &results[slowest].0[bi];
                let n = a.steps as f64;
                let per_layer = |s: f64| s / n / layers * 1e3;
                let t = c.timing;
                let moe = t.route_s + t.dispatch_s + t.expert_s + t.combine_s + t.gather_s;
                let attn_ms = (c.fenced_step_ms - moe / n * 1e3).max(0.0) / layers;
                let exchange_s = t.dispatch_s + t.combine_s;
                let bytes = t.bytes_sent as f64 / n;
                let gbs = t.bytes_sent as f64 / exchange_s.max(1e-12) / 1e9;
                // Two all-to-all rounds per layer.
                let round_us = exchange_s / n / layers / 2.0 * 1e6;
                let speedup = base.as_ref().map(|b| b[bi] / step_ms);
                eprintln!(
                    "{label} batch {batch:>3}: step {step_ms:>8.2} ms  {:>8.1} tok/s{}  | per layer: attention+rest {attn_ms:.3}, route {:.3}, dispatch {:.3}, experts {:.3}, combine {:.3}, tp gathers {:.3} ms | {:.0} KB sent/step at {gbs:.2} GB/s (NCCL all-to-all {probe:.1} GB/s) | {round_us:.0} us per exchange round (NCCL 64 KiB all-to-all {small_us:.0} us)",
                    batch as f64 / step_ms * 1e3,
                    speedup
                        .map(|s| format!(" ({s:.2}x of 1 GPU)"))
                        .unwrap_or_default(),
                    per_layer(t.route_s),
                    per_layer(t.dispatch_s),
                    per_layer(t.expert_s),
                    per_layer(t.combine_s),
                    per_layer(t.gather_s),
                    bytes / 1e3,
                );
                rows.push(json!({
                    "gpus": world, "tp": tp, "batch": batch, "step_ms": step_ms,
                    "tokens_per_s": batch as f64 / step_ms * 1e3,
                    "vs_one_gpu": speedup,
                    "fenced_step_ms": c.fenced_step_ms,
                    "per_layer_ms": {
                        "attention_and_rest": attn_ms,
                        "route": per_layer(t.route_s),
                        "dispatch": per_layer(t.dispatch_s),
                        "experts": per_layer(t.expert_s),
                        "combine": per_layer(t.combine_s),
                        "tp_gathers": per_layer(t.gather_s),
                    },
                    "exchange_bytes_per_step": bytes,
                    "exchange_gbs": gbs,
                    "nccl_all_to_all_gbs": probe,
                    "exchange_round_us": round_us,
                    "nccl_all_to_all_64k_us": small_us,
                    "path": "host-staged NCCL exchange",
                }));
            }
        }
    }
    let out = json!({
        "model_layers": cfg.n_layers,
        "ctx": a.ctx,
        "steps": a.steps,
        "cases": rows,
    });
    if let Some(p) = &a.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
