//! `hyserve bench-gpu`: one Hunyuan-Large layer at its real dimensions on one GPU
//! (random bf16 weights made on the device), beside the ceilings measured in the same
//! run: device copy bandwidth (HBM) and cuBLAS bf16 GEMM throughput.
//!
//! Cases (names shared with `scripts/peers/torch_layer_bench.py`, so the two join):
//! - `moe_t{N}`: the MoE block (router, top-1, shared expert, routed experts, combine)
//!   on N token rows; memory-bound up to 256 rows (bytes = weights read), compute-bound
//!   at 2048 and 8192 (FLOPs of the shared and routed GEMMs).
//! - `attn_decode_b{B}_ctx{C}`: paged decode attention (key norm on read) of B sequences
//!   over C cached tokens each; bytes = the K and V read.
//! - `layer_decode_b1_ctx2048`: a whole decoder layer's decode step at batch 1 over 2048
//!   cached tokens; bytes = every weight read plus the KV read.
//! - `graph_churn_*`: one small launch-bound recorded step (a stack of 24 norm + GEMV
//!   blocks, like a tiny model's decode step) replayed before and after hundreds of other
//!   shapes are recorded and dropped (the cache's least recently used make room), on
//!   this backend and then on a second one (another stream): whether recording churn
//!   makes the replays that stay dearer.
//!
//! Each case is timed as the median of `--iters` calls, each between stream
//! synchronisations (launch overhead counts, as it does in serving).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use hyserve_kernels::cuda::{CudaAct, CudaBackend, CudaBatch, CudaWeight};
use hyserve_kernels::{
    AttnSeq, Backend, DType, KvSpec, MlpRef, Precision, RecordKey, Routing, ScoreScale,
};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Timed calls per case (median reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed calls before timing.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Comma-separated case-name prefixes to run (default: all).
    #[arg(long)]
    only: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

const HIDDEN: usize = 6400;
const HEADS: usize = 80;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 80;
const EXPERTS: usize = 16;
const WIDTH: usize = 18304;
const EPS: f32 = 1e-5;

struct Mlp {
    gate: CudaWeight,
    up: CudaWeight,
    down: CudaWeight,
}

impl Mlp {
    fn random(b: &CudaBackend, seed: u64) -> Self {
        let s = 0.02;
        Mlp {
            gate: b.random_weight(WIDTH, HIDDEN, seed, s),
            up: b.random_weight(WIDTH, HIDDEN, seed + 1, s),
            down: b.random_weight(HIDDEN, WIDTH, seed + 2, s),
        }
    }
    fn as_ref(&self) -> MlpRef<'_, CudaWeight> {
        MlpRef {
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }
}

fn median_ms(b: &CudaBackend, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    b.synchronize();
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            b.synchronize();
            let t0 = Instant::now();
            f();
            b.synchronize();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// The `graph_churn` cases' step: a stack of norm + GEMV blocks, launch-bound like a
/// tiny model's decode step, on one backend's weights.
struct ChurnStep {
    w: Vec<CudaWeight>,
    norm: hyserve_kernels::cuda::CudaVector,
    x0: CudaAct,
}

impl ChurnStep {
    const D: usize = 1024;
    const BLOCKS: usize = 24;

    fn new(b: &CudaBackend) -> Self {
        ChurnStep {
            w: (0..Self::BLOCKS)
                .map(|i| b.random_weight(Self::D, Self::D, 900 + i as u64, 0.02))
                .collect(),
            norm: b.load_vector(&vec![1.0; Self::D]),
            x0: b.random_act(1, Self::D, 899, 1.0),
        }
    }

    fn run(&self, b: &CudaBackend) -> CudaAct {
        let mut x = b.matmul(&self.x0, &self.w[0]);
        for wi in &self.w[1..] {
            let h = b.rms_norm(&x, &self.norm, EPS);
            let y = b.matmul(&h, wi);
            b.add_assign(&mut x, &y);
        }
        x
    }
}

/// The `graph_churn` cases: a step replayed before and after churn, here and on a
/// second backend; recorded as milliseconds per replay (wall, each between stream
/// synchronisations) with the device's time and the graph memory.
fn graph_churn(
    b: &CudaBackend,
    args: &Args,
    record: &mut impl FnMut(String, f64, f64, f64, serde_json::Value),
) -> anyhow::Result<()> {
    eprintln!("graph_churn ...");
    let seqs = vec![AttnSeq {
        rows: 0..1,
        first_pos: 0,
        slots: vec![0],
    }];
    let key = |ctx_bound: usize| RecordKey {
        rows: 1,
        seq_rows: RecordKey::layout([1]),
        ctx_bound,
        moe_pairs: 1,
        moe_experts: EXPERTS,
        buffers: 0,
    };
    // The bound sizes the step's slot table, not the work (which ignores it here).
    let hot = key(256);
    let here = ChurnStep::new(b);
    let iters = args.iters.max(200);
    let replay = || {
        let before = b.graph_stats();
        let ms = median_ms(b, 3, iters, || {
            let _ = b.forward_recorded(hot, seqs.clone(), &[0], &mut |_| here.run(b));
        });
        (ms, b.graph_stats().since(&before).replay_micros().1 * 1e-3)
    };
    // Churn: each shape run until it is recorded (and dropped in its turn), the hot
    // step replayed between them so that it stays.
    let churn = |on: &CudaBackend, work: &ChurnStep| {
        for i in 0..400 {
            for _ in 0..3 {
                let _ =
                    on.forward_recorded(key(257 + i), seqs.clone(), &[0], &mut |_| work.run(on));
            }
            let _ = b.forward_recorded(hot, seqs.clone(), &[0], &mut |_| here.run(b));
        }
        on.synchronize();
        b.synchronize();
    };
    let mut report = |name: &str, (ms, device_ms): (f64, f64), base: f64| {
        let (used, reserved) = b.graph_memory();
        eprintln!(
            "    {name}: {ms:.3} ms per replay ({:.2}x before), {device_ms:.3} ms on the device; graph memory {} MiB used, {} MiB reserved; {:?}",
            ms / base,
            used >> 20,
            reserved >> 20,
            b.graph_stats()
        );
        record(
            format!("graph_churn_{name}"),
            ms,
            0.0,
            0.0,
            json!({"vs_before": ms / base, "device_ms": device_ms,
                   "graph_memory_used": used, "graph_memory_reserved": reserved}),
        );
    };
    let before = replay();
    report("before", before, before.0);
    churn(b, &here);
    report("after_own", replay(), before.0);
    let (other, _) = CudaBackend::new(args.gpu, Precision::Bf16).context("a second backend")?;
    churn(&other, &ChurnStep::new(&other));
    report("after_other", replay(), before.0);
    Ok(())
}

const ROUTING: Routing = Routing {
    top_k: 1,
    renormalize: false,
    round_weights: true,
    fp32_logits: false,
};

pub fn run(args: Args) -> anyhow::Result<()> {
    let (b, info) =
        CudaBackend::new(args.gpu, Precision::Bf16).context("starting the CUDA backend")?;
    eprintln!(
        "{} ({}), kernels {} in {:.0} ms",
        b.name(),
        info.arch,
        if info.kernels_cached {
            "from cache"
        } else {
            "compiled"
        },
        info.compile_ms
    );
    let want = |name: &str| {
        args.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|p| name.starts_with(p)))
    };
    eprintln!("measuring ceilings ...");
    let hbm = b.copy_bandwidth_gbs(4 << 30, 10);
    let peak = b.gemm_tflops(8192, 8192, 8192, 10);
    eprintln!("  device copy {hbm:.0} GB/s (read+write), cuBLAS bf16 8192^3 {peak:.0} TFLOP/s");
    let mut cases = Vec::new();
    let mut record = |name: String, ms: f64, bytes: f64, flops: f64, extra: serde_json::Value| {
        let (ratio, bound) = if flops > 0.0 {
            (flops / (ms * 1e-3) / 1e12 / peak, "compute")
        } else if bytes > 0.0 {
            (bytes / (ms * 1e-3) / 1e9 / hbm, "memory")
        } else {
            // A case compared with itself (graph_churn), not with a ceiling.
            (0.0, "none")
        };
        if bound == "none" {
            eprintln!("  {name:<28} {ms:9.3} ms");
        } else {
            eprintln!(
                "  {name:<28} {ms:9.3} ms  {:5.1}% of the {bound} ceiling",
                100.0 * ratio
            );
        }
        let mut c = json!({"name": name, "ms": ms, "bytes": bytes, "flops": flops, "bound": bound, "ratio": ratio});
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        cases.push(c);
    };

    if want("graph_churn") {
        graph_churn(&b, &args, &mut record)?;
    }

    // Attention first, before the layer's 12 GB of weights.
    for &batch in &[1usize, 16, 64] {
        for &ctx in &[2048usize, 32768] {
            let name = format!("attn_decode_b{batch}_ctx{ctx}");
            if !want(&name) {
                continue;
            }
            eprintln!("{name} ...");
            let bs = 16;
            let spec = KvSpec {
                n_cache_layers: 1,
                n_kv_heads: KV_HEADS,
                head_dim: HEAD_DIM,
                block_size: bs,
                n_blocks: batch * ctx / bs,
                dtype: DType::BF16,
            };
            let mut kv = b.alloc_kv(spec);
            b.randomize_kv(&mut kv, 7);
            let seqs = (0..batch)
                .map(|s| AttnSeq {
                    rows: s..s + 1,
                    first_pos: ctx - 1,
                    slots: (s * ctx..(s + 1) * ctx).collect(),
                })
                .collect();
            let batch_d = b.batch(seqs, &vec![0; batch]);
            let q = b.random_act(batch, HEADS * HEAD_DIM, 8, 1.0);
            let knorm = b.load_vector(&vec![1.0; HEAD_DIM]);
            let ms = median_ms(&b, args.warmup, args.iters, || {
                let _ = b.attention(
                    &q,
                    &kv,
                    0,
                    HEADS,
                    Some((&knorm, EPS)),
                    ScoreScale::DivSqrt,
                    &batch_d,
                );
            });
            let bytes = (batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2) as f64;
            record(name, ms, bytes, 0.0, json!({}));
        }
    }

    // Prefill attention over a 32K-token prompt: flash style, so no score matrix (which
    // would be 32768² x 80 heads x 4 B = 344 GB) is ever stored.
    let name = "attn_prefill_ctx32768".to_string();
    if want(&name) {
        eprintln!("{name} ...");
        let ctx = 32768;
        let spec = KvSpec {
            n_cache_layers: 1,
            n_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            block_size: 16,
            n_blocks: ctx / 16,
            dtype: DType::BF16,
        };
        let mut kv = b.alloc_kv(spec);
        b.randomize_kv(&mut kv, 17);
        let batch_d = b.batch(
            vec![AttnSeq {
                rows: 0..ctx,
                first_pos: 0,
                slots: (0..ctx).collect(),
            }],
            &vec![0; ctx],
        );
        let q = b.random_act(ctx, HEADS * HEAD_DIM, 18, 1.0);
        let knorm = b.load_vector(&vec![1.0; HEAD_DIM]);
        let ms = median_ms(&b, 1, args.iters.min(3), || {
            let _ = b.attention(
                &q,
                &kv,
                0,
                HEADS,
                Some((&knorm, EPS)),
                ScoreScale::DivSqrt,
                &batch_d,
            );
        });
        // Causal: half the score matrix, 4 FLOPs per (query, key, dim) for QK and PV.
        let flops = 4.0 * (ctx as f64) * (ctx as f64 + 1.0) / 2.0 * (HEADS * HEAD_DIM) as f64;
        record(
            name,
            ms,
            0.0,
            flops,
            // Scratch: per (row, query head) one partial output of d floats plus two.
            json!({"scratch_mib": (ctx * HEADS * (HEAD_DIM + 2) * 4) >> 20}),
        );
    }

    eprintln!("making one layer's weights on the device (12 GB) ...");
    let experts: Vec<Mlp> = (0..EXPERTS)
        .map(|e| Mlp::random(&b, 100 + 3 * e as u64))
        .collect();
    let shared = Mlp::random(&b, 10);
    let router = b.random_weight(EXPERTS, HIDDEN, 11, 0.02);
    let refs: Vec<_> = experts.iter().map(Mlp::as_ref).collect();
    let expert_bytes = (3 * WIDTH * HIDDEN * 2) as f64;
    // The decode GEMV alone, on one expert's projections: the kernel's own bandwidth.
    for (name, w) in [("gemv_up_t1", &shared.up), ("gemv_down_t1", &shared.down)] {
        if !want(name) {
            continue;
        }
        let x = b.random_act(1, w.cols, 50, 1.0);
        let ms = median_ms(&b, args.warmup, args.iters, || {
            let _ = b.matmul(&x, w);
        });
        record(
            name.to_string(),
            ms,
            (w.rows * w.cols * 2) as f64,
            0.0,
            json!({}),
        );
    }
    for &n in &[1usize, 8, 64, 256, 2048, 8192] {
        let name = format!("moe_t{n}");
        if !want(&name) {
            continue;
        }
        eprintln!("{name} ...");
        let h = b.random_act(n, HIDDEN, 20 + n as u64, 1.0);
        let logits = b.matmul(&h, &router);
        let (chosen, _) = b.route(&logits, 1, false, true);
        let mut hit = chosen.clone();
        hit.sort_unstable();
        hit.dedup();
        let ms = median_ms(&b, args.warmup, args.iters, || {
            let _ = b.moe(&h, &router, ROUTING, Some(shared.as_ref()), &refs);
        });
        let bytes = (1 + hit.len()) as f64 * expert_bytes + (EXPERTS * HIDDEN * 2) as f64;
        let flops = if n >= 2048 {
            2.0 * 2.0 * (n * HIDDEN * WIDTH * 3) as f64
        } else {
            0.0
        };
        record(name, ms, bytes, flops, json!({"experts_hit": hit.len()}));
    }

    let name = "layer_decode_b1_ctx2048".to_string();
    if want(&name) {
        eprintln!("{name} ...");
        let ctx = 2048;
        let wq = b.random_weight(HEADS * HEAD_DIM, HIDDEN, 30, 0.02);
        let wk = b.random_weight(KV_HEADS * HEAD_DIM, HIDDEN, 31, 0.02);
        let wv = b.random_weight(KV_HEADS * HEAD_DIM, HIDDEN, 32, 0.02);
        let wo = b.random_weight(HIDDEN, HEADS * HEAD_DIM, 33, 0.02);
        let ones = |n| b.load_vector(&vec![1.0; n]);
        let (in_norm, post_norm, qn, kn) =
            (ones(HIDDEN), ones(HIDDEN), ones(HEAD_DIM), ones(HEAD_DIM));
        let spec = KvSpec {
            n_cache_layers: 1,
            n_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            block_size: 16,
            n_blocks: (ctx + 16) / 16,
            dtype: DType::BF16,
        };
        let mut kv = b.alloc_kv(spec);
        b.randomize_kv(&mut kv, 9);
        let seqs = vec![AttnSeq {
            rows: 0..1,
            first_pos: ctx,
            slots: (0..=ctx).collect(),
        }];
        let batch_d = b.batch(seqs.clone(), &[0]);
        let inv_freq: Vec<f32> = (0..HEAD_DIM / 2)
            .map(|i| (1e4f64 * 1000f64.powf(80.0 / 78.0)).powf(-2.0 * i as f64 / 80.0) as f32)
            .collect();
        let x0 = b.random_act(1, HIDDEN, 40, 1.0);
        let hit = 1;
        let buffers = b.record_id(&kv, &wq);
        let mut layer_step = |batch: &CudaBatch| -> CudaAct {
            let mut x = b.zeros(1, HIDDEN);
            b.add_assign(&mut x, &x0);
            let h = b.rms_norm(&x, &in_norm, EPS);
            let mut q = b.matmul(&h, &wq);
            let new_kv = Some((b.matmul(&h, &wk), b.matmul(&h, &wv)));
            b.attn_prep(
                &mut q,
                new_kv,
                &mut kv,
                0,
                HEAD_DIM,
                &inv_freq,
                Some((&qn, EPS)),
                batch,
            );
            let a = b.attention(
                &q,
                &kv,
                0,
                HEADS,
                Some((&kn, EPS)),
                ScoreScale::DivSqrt,
                batch,
            );
            let o = b.matmul(&a, &wo);
            let h2 = b.add_rms_norm(&mut x, &o, &post_norm, EPS);
            let y = b.moe(&h2, &router, ROUTING, Some(shared.as_ref()), &refs);
            b.add_assign(&mut x, &y);
            x
        };
        let ms = median_ms(&b, args.warmup, args.iters, || {
            let _ = layer_step(&batch_d);
        });
        // The same step recorded once as a CUDA graph and replayed (as serving's decode
        // steps are): launch overhead gone, the bytes roofline is what remains.
        let key = RecordKey {
            rows: 1,
            seq_rows: RecordKey::layout([1]),
            ctx_bound: 4096,
            moe_pairs: 1,
            moe_experts: refs.len(),
            buffers,
        };
        let ms_graph = median_ms(&b, args.warmup.max(2), args.iters, || {
            let _ = b.forward_recorded(key, seqs.clone(), &[0], &mut layer_step);
        });
        let attn_w = (2 * HEADS * HEAD_DIM * HIDDEN + 2 * KV_HEADS * HEAD_DIM * HIDDEN) * 2;
        let bytes = attn_w as f64
            + (1 + hit) as f64 * expert_bytes
            + (EXPERTS * HIDDEN * 2) as f64
            + ((ctx + 1) * KV_HEADS * HEAD_DIM * 2 * 2) as f64;
        let roofline_ms = bytes / (hbm * 1e9) * 1e3;
        record(
            format!("{name}_graph"),
            ms_graph,
            bytes,
            0.0,
            json!({"roofline_ms": roofline_ms}),
        );
        record(name, ms, bytes, 0.0, json!({"roofline_ms": roofline_ms}));
    }
    let (free, total) = b.mem_info();
    let out = json!({
        "device": info.device,
        "arch": info.arch,
        "hbm_copy_gbs": hbm,
        "gemm_bf16_tflops": peak,
        "mem_total": total,
        "mem_free_end": free,
        "cases": cases,
    });
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
