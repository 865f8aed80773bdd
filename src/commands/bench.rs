//! `hyserve bench`: CPU decode and prefill throughput of one model, beside the
//! machine's memory read bandwidth measured in the same run, reported as a ratio.
//!
//! Decode is memory-bound: each token reads the attention weights, the router, the
//! shared expert, the routed experts it picks, and the output head. The achieved
//! weight-streaming bandwidth is those bytes times tokens per second.

use std::path::PathBuf;
use std::time::Instant;

use hyserve_kernels::Backend;
use hyserve_kernels::sampling::SamplingParams;
use hyserve_model::Arch;
use hyserve_model::init::{InitOptions, WeightFormat, init_model};
use hyserve_worker::{Executor, ExecutorHandle, GenerateOptions, generate};
use rayon::prelude::*;

use crate::load;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory; default: a `medium` (~0.5B, bf16) Hunyuan-Large-architecture
    /// model created under $HYSERVE_HOME on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens decoded for the decode measurement.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Bytes of the bandwidth probe buffer in MiB.
    #[arg(long, default_value_t = 1024)]
    probe_mib: usize,
    /// Write the results as JSON here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

/// Best-of-`reps` read bandwidth (GB/s) over a buffer much larger than the caches,
/// with the same thread pool the kernels use.
fn read_bandwidth(mib: usize, reps: usize) -> f64 {
    let n = (mib << 20) / 4;
    let buf: Vec<f32> = (0..n).map(|i| (i % 251) as f32).collect();
    let mut best = f64::MAX;
    for _ in 0..reps.max(2) {
        let t = Instant::now();
        let s: f32 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut lanes = [0f32; 16];
                for block in c.chunks_exact(16) {
                    for l in 0..16 {
                        lanes[l] += block[l];
                    }
                }
                lanes.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = match a.model {
        Some(d) => d,
        None => {
            let d = load::bench_model_dir("bench-medium");
            if !d.join("config.json").exists() {
                eprintln!(
                    "creating the benchmark model (medium, bf16) in {}",
                    d.display()
                );
                init_model(
                    &d,
                    &InitOptions {
                        arch: Arch::HunyuanLarge,
                        preset: "medium".into(),
                        seed: 1,
                        dtype: hyserve_kernels::DType::BF16,
                        format: WeightFormat::Safetensors,
                        max_shard_bytes: 2 << 30,
                    },
                    &mut |done, total| {
                        if done % 64 == 0 || done == total {
                            eprint!("\r  init {done}/{total} tensors");
                        }
                    },
                )?;
                eprintln!();
            }
            d
        }
    };
    let loaded = load::load_cpu(&dir, None)?;
    let cfg = loaded.model.cfg.clone();
    let threads = rayon::current_num_threads();

    // Weight bytes one decode token reads.
    let es = match loaded.backend.precision() {
        hyserve_kernels::Precision::F32 => 4u64,
        hyserve_kernels::Precision::Bf16 => 2,
    };
    let (h, d) = (cfg.hidden_size as u64, cfg.head_dim as u64);
    let mut per_token = cfg.vocab_size as u64 * h * es; // output head
    for l in &cfg.layers {
        let mut p = 2 * cfg.n_heads as u64 * d * h; // q, o
        if l.has_kv {
            p += 2 * cfg.n_kv_heads as u64 * d * h;
        }
        p += l.n_experts as u64 * h; // router
        p += 3 * h * (l.shared_width + l.top_k * l.expert_width) as u64;
        per_token += p * es;
    }

    eprintln!(
        "measuring memory read bandwidth ({} MiB, {threads} threads)",
        a.probe_mib
    );
    let bw_before = read_bandwidth(a.probe_mib, 3);

    let block_size = 16;
    let n_blocks = (a.prompt_tokens + a.decode_tokens).div_ceil(block_size) + 1;
    let executor = Executor::new(loaded.backend, loaded.model, n_blocks, block_size);
    let handle = ExecutorHandle::spawn("executor-0", executor)?;
    let prompt: Vec<u32> = (0..a.prompt_tokens as u32)
        .map(|i| 300 + (i * 7919) % 500)
        .collect();
    let mut best_prefill = f64::MAX;
    let mut best_decode = f64::MAX;
    for r in 0..a.repeat.max(1) {
        let out = generate(
            &handle,
            &prompt,
            &GenerateOptions {
                max_tokens: a.decode_tokens + 1,
                sampling: SamplingParams::greedy(),
                stop_ids: vec![],
                prefill_chunk: a.prompt_tokens,
                collect_logits: false,
            },
        )?;
        let p = out.prefill_time.as_secs_f64();
        let dsec = out.decode_time.as_secs_f64() / a.decode_tokens as f64;
        eprintln!(
            "  run {}/{}: prefill {:.1} tok/s, decode {:.2} tok/s",
            r + 1,
            a.repeat,
            a.prompt_tokens as f64 / p,
            1.0 / dsec
        );
        best_prefill = best_prefill.min(p);
        best_decode = best_decode.min(dsec);
    }
    let bw_after = read_bandwidth(a.probe_mib, 3);
    let ceiling = bw_before.max(bw_after);
    let decode_tps = 1.0 / best_decode;
    let prefill_tps = a.prompt_tokens as f64 / best_prefill;
    let achieved = per_token as f64 * decode_tps / 1e9;
    // Prefill FLOPs: 2 per weight used per token (active weights), attention ignored.
    let active_flops = 2.0 * (per_token / es) as f64;
    let results = serde_json::json!({
        "model": dir.display().to_string(),
        "params": cfg.n_params(),
        "active_params": cfg.n_active_params(),
        "threads": threads,
        "precision": if es == 2 { "bf16" } else { "f32" },
        "memory_read_gb_s": ceiling,
        "decode_tokens_per_s": decode_tps,
        "decode_weight_bytes_per_token": per_token,
        "decode_weight_stream_gb_s": achieved,
        "decode_bandwidth_ratio": achieved / ceiling,
        "prefill_tokens": a.prompt_tokens,
        "prefill_tokens_per_s": prefill_tps,
        "prefill_gflop_s": active_flops * prefill_tps / 1e9,
    });
    println!("{}", serde_json::to_string_pretty(&results)?);
    if let Some(p) = a.json_out {
        std::fs::write(&p, serde_json::to_string_pretty(&results)? + "\n")?;
    }
    Ok(())
}
