//! CUDA backend parity: every kernel, and whole multi-layer forwards, against the CPU
//! backend (the oracle) under bf16.
//!
//! Needs a GPU: run with `--features gpu-tests` on a GPU host (`scripts/gpu/run.sh`
//! does, and records the result). Without the feature the tests are listed as ignored.

use hyserve_kernels::cpu::CpuBackend;
use hyserve_kernels::cuda::{CudaBackend, MAX_RECORDINGS};
use hyserve_kernels::{
    AttnSeq, Backend, DType, HostMatrix, KvSpec, MlpRef, Precision, Routing, ScoreScale,
};
use hyserve_model::init::{InitOptions, WeightFormat, init_model};
use hyserve_model::{Arch, Checkpoint, Model, SeqChunk};

fn gpu() -> CudaBackend {
    CudaBackend::new(0, Precision::Bf16)
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

fn cpu() -> CpuBackend {
    CpuBackend::new(Precision::Bf16)
}

/// Deterministic values in [-scale, scale), already bf16 (both backends then start
/// from the same inputs).
fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            hyserve_kernels::numeric::round_bf16(
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale,
            )
        })
        .collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let num: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f32 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-30)).sqrt()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let e = rel_err(got, want);
    println!("{what}: relative error {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

fn mat(rows: usize, cols: usize, seed: u64, scale: f32) -> HostMatrix {
    HostMatrix::from_f32(DType::BF16, rows, cols, &rand_vec(rows * cols, seed, scale))
}

/// A tiny random model of `arch` (bf16 safetensors, from `seed`) in a temporary
/// directory, kept alive by the returned handle.
fn tiny_model(
    arch: Arch,
    seed: u64,
) -> (tempfile::TempDir, hyserve_model::ModelConfig, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions {
        arch,
        preset: "tiny".into(),
        seed,
        dtype: DType::BF16,
        format: WeightFormat::Safetensors,
        max_shard_bytes: 1 << 30,
    };
    let cfg = init_model(dir.path(), &opts, &mut |_, _| {}).unwrap();
    let ck = Checkpoint::open(dir.path(), &mut |_| {}).unwrap();
    (dir, cfg, ck)
}

/// Runs `f` on both backends with the same host inputs and compares the outputs.
macro_rules! both {
    (|$b:ident| $body:expr) => {{
        let g = gpu();
        let c = cpu();
        let got = {
            let $b = &g;
            $body
        };
        let want = {
            let $b = &c;
            $body
        };
        (got, want)
    }};
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn gemm_gemv_and_cublas_match() {
    for (m, n, k) in [
        (1, 96, 64),
        (5, 200, 136),
        (8, 64, 72),
        (37, 96, 64),
        (300, 130, 200),
        (3, 50, 60),
    ] {
        let (got, want) = both!(|b| {
            let w = b.load_matrix(&mat(n, k, 1, 0.2));
            let x = b.upload(m, k, &rand_vec(m * k, 2, 1.0));
            (
                b.download(&b.matmul(&x, &w)),
                b.download(&b.matmul_fp32(&x, &w)),
            )
        });
        assert_close(&format!("matmul {m}x{n}x{k}"), &got.0, &want.0, 1e-2);
        assert_close(&format!("matmul_fp32 {m}x{n}x{k}"), &got.1, &want.1, 1e-3);
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn elementwise_kernels_match() {
    let (rows, cols) = (7, 320);
    let (got, want) = both!(|b| {
        let x = b.upload(rows, cols, &rand_vec(rows * cols, 3, 2.0));
        let y = b.upload(rows, cols, &rand_vec(rows * cols, 4, 2.0));
        let w = b.load_vector(&rand_vec(cols, 5, 1.5));
        let wh = b.load_vector(&rand_vec(32, 6, 1.5));
        let norm = b.download(&b.rms_norm(&x, &w, 1e-5));
        let head_norm = b.download(&b.rms_norm(&x, &wh, 1e-5));
        let mut xa = b.upload(rows, cols, &b.download(&x));
        let fused = b.download(&b.add_rms_norm(&mut xa, &y, &w, 1e-5));
        let sum = b.download(&xa);
        let sw = b.download(&b.swiglu(&x, &y));
        let table = b.load_matrix(&mat(50, cols, 7, 1.0));
        let emb = b.download(&b.embed(&table, &[3, 0, 49, 3]));
        let g = b.download(&b.gather_rows(&x, &[6, 0, 2]));
        let mut dst = b.zeros(rows, cols);
        b.scatter_rows(&mut dst, &b.gather_rows(&y, &[1, 2]), &[5, 3]);
        let sc = b.download(&dst);
        // combine with k = 2
        let src = b.upload(2 * rows, cols, &rand_vec(2 * rows * cols, 8, 1.0));
        let mut out = b.upload(rows, cols, &b.download(&x));
        b.combine(&mut out, &src, &rand_vec(2 * rows, 9, 1.0), 2);
        let comb = b.download(&out);
        let mut logits = b.upload(3, 256, &rand_vec(3 * 256, 10, 4.0));
        b.rope(
            &mut logits,
            64,
            &[0, 17, 4000],
            &rand_vec(32, 11, 1.0)
                .iter()
                .map(|v| v.abs())
                .collect::<Vec<_>>(),
        );
        let rope = b.download(&logits);
        vec![norm, head_norm, fused, sum, sw, emb, g, sc, comb, rope]
    });
    let names = [
        "rms_norm",
        "per-head rms_norm",
        "add_rms_norm",
        "residual add",
        "swiglu",
        "embed",
        "gather",
        "scatter",
        "combine",
        "rope",
    ];
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        assert_close(name, g, w, 1e-2);
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn route_matches_exactly_in_choice() {
    for (k, renorm, round, fp32) in [
        (1, false, true, false),
        (2, true, false, true),
        (4, true, true, false),
    ] {
        let rows = 300;
        let (got, want) = both!(|b| {
            let h = b.upload(rows, 64, &rand_vec(rows * 64, 12, 1.0));
            let w = b.load_matrix(&mat(16, 64, 13, 0.3));
            let logits = if fp32 {
                b.matmul_fp32(&h, &w)
            } else {
                b.matmul(&h, &w)
            };
            b.route(&logits, k, renorm, round)
        });
        let agree = got.0.iter().zip(&want.0).filter(|(a, b)| a == b).count();
        println!("route k={k}: {agree}/{} choices agree", got.0.len());
        // Logits come from two GEMMs with different summation orders; a near-tie can flip.
        assert!(
            agree * 100 >= got.0.len() * 98,
            "route k={k}: only {agree}/{} agree",
            got.0.len()
        );
        assert_close(&format!("route weights k={k}"), &got.1, &want.1, 2e-2);
    }
}

#[allow(clippy::type_complexity)]
fn attention_case<B: Backend>(
    b: &B,
    (n_heads, n_kv, d): (usize, usize, usize),
    seqs_spec: &[(usize, usize)],
    key_norm: bool,
    scale: ScoreScale,
) -> Vec<f32> {
    let bs = 16;
    let spec = KvSpec {
        n_cache_layers: 2,
        n_kv_heads: n_kv,
        head_dim: d,
        block_size: bs,
        n_blocks: 512,
        dtype: DType::BF16,
    };
    let mut kv = b.alloc_kv(spec);
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / d as f32))
        .collect();
    // Prefill each sequence's context first (its "past"), then attend with the new rows.
    let mut next_block = 0usize;
    let mut seqs = Vec::new();
    let mut row = 0;
    let mut past_seqs = Vec::new();
    let mut past_row = 0;
    for (i, &(past, new)) in seqs_spec.iter().enumerate() {
        let ctx = past + new;
        let blocks: Vec<usize> = (0..ctx.div_ceil(bs))
            .map(|j| next_block + (j * 7 + i) % ctx.div_ceil(bs))
            .collect();
        next_block += blocks.len();
        let slots: Vec<usize> = (0..ctx).map(|p| blocks[p / bs] * bs + p % bs).collect();
        if past > 0 {
            past_seqs.push(AttnSeq {
                rows: past_row..past_row + past,
                first_pos: 0,
                slots: slots[..past].to_vec(),
            });
            past_row += past;
        }
        seqs.push(AttnSeq {
            rows: row..row + new,
            first_pos: past,
            slots,
        });
        row += new;
    }
    let qnorm = b.load_vector(&rand_vec(d, 20, 1.5));
    let knorm = b.load_vector(&rand_vec(d, 21, 1.5));
    let width = n_kv * d;
    if past_row > 0 {
        let batch = b.batch(past_seqs, &vec![0; past_row]);
        let mut q = b.upload(
            past_row,
            n_heads * d,
            &rand_vec(past_row * n_heads * d, 22, 1.0),
        );
        let k = b.upload(past_row, width, &rand_vec(past_row * width, 23, 1.0));
        let v = b.upload(past_row, width, &rand_vec(past_row * width, 24, 1.0));
        b.attn_prep(
            &mut q,
            Some((k, v)),
            &mut kv,
            1,
            d,
            &inv_freq,
            Some((&qnorm, 1e-5)),
            &batch,
        );
    }
    let batch = b.batch(seqs, &vec![0; row]);
    let mut q = b.upload(row, n_heads * d, &rand_vec(row * n_heads * d, 25, 1.0));
    let k = b.upload(row, width, &rand_vec(row * width, 26, 1.0));
    let v = b.upload(row, width, &rand_vec(row * width, 27, 1.0));
    b.attn_prep(
        &mut q,
        Some((k, v)),
        &mut kv,
        1,
        d,
        &inv_freq,
        Some((&qnorm, 1e-5)),
        &batch,
    );
    let mut out = b.download(&q);
    let kn = key_norm.then_some((&knorm, 1e-5));
    out.extend(b.download(&b.attention(&q, &kv, 1, n_heads, kn, scale, &batch)));
    out
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn attention_decode_and_prefill_match() {
    // (past tokens, new tokens) per sequence: decode over short and long (split) contexts,
    // variable-length prefill, and a chunked prefill on top of a cached past.
    let cases: [(&str, Vec<(usize, usize)>); 4] = [
        ("decode", vec![(5, 1), (3000, 1), (700, 1)]),
        ("prefill", vec![(0, 37), (0, 1), (0, 130)]),
        ("chunked prefill", vec![(200, 45), (17, 3)]),
        ("mixed", vec![(0, 20), (999, 1), (64, 64)]),
    ];
    // Hunyuan-Large's geometry (GQA 10 query heads per kv head, d = 80), and small
    // groups and heads (1 and 2 query heads per kv head, d = 16) as the tiny models use.
    for geom in [(10, 2, 80), (4, 2, 16), (2, 2, 16)] {
        for (name, spec) in &cases {
            for (kn, scale) in [(true, ScoreScale::DivSqrt), (false, ScoreScale::MulInvSqrt)] {
                let (got, want) = both!(|b| attention_case(b, geom, spec, kn, scale));
                assert_close(
                    &format!("attention {geom:?} {name} (key norm {kn})"),
                    &got,
                    &want,
                    2e-2,
                );
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn kv_copy_matches() {
    let (got, want) = both!(|b| {
        let spec = KvSpec {
            n_cache_layers: 2,
            n_kv_heads: 2,
            head_dim: 16,
            block_size: 4,
            n_blocks: 8,
            dtype: DType::BF16,
        };
        let mut kv = b.alloc_kv(spec);
        let slots: Vec<usize> = (0..6).collect();
        for layer in 0..2 {
            let k = b.upload(6, 32, &rand_vec(6 * 32, 30 + layer as u64, 1.0));
            let v = b.upload(6, 32, &rand_vec(6 * 32, 40 + layer as u64, 1.0));
            b.write_kv(&mut kv, layer, &k, &v, &slots);
        }
        b.copy_kv(&mut kv, &[0, 1, 5], &[20, 21, 31]);
        // Read the copies back through attention with one key each (output = V).
        let seq = AttnSeq {
            rows: 0..1,
            first_pos: 0,
            slots: vec![31],
        };
        let q = b.upload(1, 64, &rand_vec(64, 50, 1.0));
        let batch = b.batch(vec![seq], &[0]);
        let mut out = Vec::new();
        for layer in 0..2 {
            out.extend(b.download(&b.attention(
                &q,
                &kv,
                layer,
                4,
                None,
                ScoreScale::DivSqrt,
                &batch,
            )));
        }
        out
    });
    assert_close("copy_kv", &got, &want, 1e-6);
}

fn moe_case<B: Backend>(
    b: &B,
    tokens: usize,
    k: usize,
    with_shared: bool,
    hidden: usize,
) -> Vec<f32> {
    let (width, n_exp) = (96, 16);
    let load = |seed| b.load_matrix(&mat(width, hidden, seed, 0.2));
    let load_down = |seed| b.load_matrix(&mat(hidden, width, seed, 0.2));
    let ws: Vec<_> = (0..n_exp + 1)
        .map(|e| {
            (
                load(100 + 3 * e as u64),
                load(101 + 3 * e as u64),
                load_down(102 + 3 * e as u64),
            )
        })
        .collect();
    let mlps: Vec<MlpRef<'_, B::Weight>> = ws
        .iter()
        .map(|(g, u, d)| MlpRef {
            gate: g,
            up: u,
            down: d,
        })
        .collect();
    let router = b.load_matrix(&mat(n_exp, hidden, 99, 0.5));
    let h = b.upload(tokens, hidden, &rand_vec(tokens * hidden, 98, 1.0));
    let routing = Routing {
        top_k: k,
        renormalize: k > 1,
        round_weights: k == 1,
        fp32_logits: k > 1,
    };
    let shared = with_shared.then_some(mlps[n_exp]);
    b.download(&b.moe(&h, &router, routing, shared, &mlps[..n_exp]))
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn moe_block_matches_decode_and_prefill_paths() {
    // Up to 8 (token, choice) pairs per expert (128 here) take the fused GEMV path (the
    // shared expert joins it up to 8 tokens); more take cuBLAS per expert. Hidden 1024
    // with 17 active experts gives the down GEMV one warp per row; hidden 64 gives it
    // two (split K).
    for (tokens, k, shared, hidden) in [
        (1, 1, true, 64),
        (8, 1, true, 64),
        (5, 2, false, 64),
        (8, 2, true, 64),
        (8, 2, true, 1024),
        (20, 2, true, 64),
        (64, 1, true, 64),
        (128, 1, true, 1024),
        (200, 1, true, 64),
        (150, 2, true, 64),
    ] {
        let (got, want) = both!(|b| moe_case(b, tokens, k, shared, hidden));
        assert_close(
            &format!("moe tokens={tokens} k={k} shared={shared} hidden={hidden}"),
            &got,
            &want,
            2e-2,
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn argmax_matches_host() {
    // The device's arg-max is the host's `sampling::argmax` of the downloaded rows, to
    // the index: random rows, ties (lowest index), NaNs (never win; a row of them: its
    // last index), -inf (a row of them: its first), zeros of both signs, in groups, of
    // bf16 and fp32 activations.
    let g = gpu();
    let cols = 1000;
    let mut rows: Vec<Vec<f32>> = (0..3).map(|r| rand_vec(cols, 60 + r, 5.0)).collect();
    let mut tie = vec![-1.0f32; cols];
    for c in [999, 517, 33, 34] {
        tie[c] = 2.5;
    }
    rows.push(tie);
    let mut nans = rand_vec(cols, 70, 5.0);
    for c in (0..cols).step_by(3) {
        nans[c] = f32::NAN;
    }
    nans[0] = f32::NAN;
    nans[1] = 100.0;
    rows.push(nans);
    rows.push(vec![f32::NAN; cols]);
    rows.push(vec![f32::NEG_INFINITY; cols]);
    let mut inf_nan = vec![f32::NAN; cols];
    inf_nan[700] = f32::NEG_INFINITY;
    inf_nan[900] = f32::NEG_INFINITY;
    rows.push(inf_nan);
    let mut zeros = vec![-3.0f32; cols];
    zeros[640] = -0.0;
    zeros[641] = 0.0;
    rows.push(zeros);
    let n = rows.len();
    let flat: Vec<f32> = rows.concat();
    let groups = [2, 0, 3, 1, n - 6];
    for fp32 in [false, true] {
        let a = if fp32 {
            g.upload_fp32(n, cols, &flat)
        } else {
            g.upload(n, cols, &flat)
        };
        let back = g.download(&a);
        let want: Vec<u32> = back
            .chunks_exact(cols)
            .map(|r| hyserve_kernels::sampling::argmax(r) as u32)
            .collect();
        assert_eq!(&want[3..9], &[33, 1, 999, 0, 700, 640], "host argmax");
        let got = g.argmax_rows(&a, &groups);
        let mut at = 0;
        for (k, &m) in groups.iter().enumerate() {
            assert_eq!(got[k], want[at..at + m], "fp32 {fp32}, group {k}");
            at += m;
        }
        assert_eq!(g.argmax(&a), want, "fp32 {fp32}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn downloads_in_row_groups_come_back_whole() {
    let g = gpu();
    // Small, past the staging buffer's first size (2^16 elements), small again, larger:
    // the buffer is reused, replaced and reused again.
    for (rows, cols, groups) in [
        (6, 96, vec![1, 3, 0, 2]),
        (40, 4352, vec![5, 1, 30]),
        (3, 1000, vec![2]),
        (70, 4352, vec![1; 70]),
    ] {
        let data = rand_vec(rows * cols, rows as u64, 4.0);
        let got = g.download_rows(&g.upload(rows, cols, &data), &groups);
        let want = hyserve_kernels::backend::split_rows(&data, cols, &groups);
        assert_eq!(got, want, "bf16 {rows}x{cols} in groups {groups:?}");
        assert_eq!(g.download(&g.upload(rows, cols, &data)), data);
    }
    // fp32 activations (the logits' type) take the same route.
    let (m, n, k) = (33, 4352, 64);
    let groups = [4, 0, 1, 28];
    let (got, want) = both!(|b| {
        let w = b.load_matrix(&mat(n, k, 3, 0.2));
        let x = b.upload(m, k, &rand_vec(m * k, 4, 1.0));
        b.download_rows(&b.matmul_fp32(&x, &w), &groups)
    });
    assert_eq!(got.len(), groups.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), groups[i] * n);
        assert_close(&format!("fp32 group {i}"), g, w, 1e-3);
    }
}

/// Greedy generation on one backend: per step logits, and the tokens.
fn greedy<B: Backend>(
    b: &B,
    model: &Model<B>,
    prompt: &[u32],
    steps: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let spec = hyserve_worker::kv_spec(&model.cfg, Precision::Bf16, 16, 16);
    let mut kv = b.alloc_kv(spec);
    let mut logits_all = Vec::new();
    let mut tokens = prompt.to_vec();
    let mut first = 0;
    for _ in 0..steps {
        let ctx = tokens.len();
        let chunk = SeqChunk {
            tokens: tokens[first..].to_vec(),
            first_pos: first,
            slots: (0..ctx).collect(),
            all_logits: false,
            argmax_only: false,
        };
        let out = model.forward(b, &mut kv, &[chunk]).remove(0);
        let next = out
            .iter()
            .enumerate()
            .fold(0, |bi, (i, &v)| if v > out[bi] { i } else { bi }) as u32;
        logits_all.push(out);
        first = ctx;
        tokens.push(next);
    }
    (logits_all, tokens[prompt.len()..].to_vec())
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn whole_forward_matches_cpu_on_tiny_models() {
    for arch in [Arch::HunyuanLarge, Arch::HunyuanV1Moe] {
        let (_dir, cfg, ck) = tiny_model(arch, 5);
        let (g, c, c32) = (gpu(), cpu(), CpuBackend::new(Precision::F32));
        let mg = Model::load(&g, cfg.clone(), &ck, &mut |_| {});
        let mc = Model::load(&c, cfg.clone(), &ck, &mut |_| {});
        let m32 = Model::load(&c32, cfg, &ck, &mut |_| {});
        let prompt: Vec<u32> = (0..23).map(|i| 260 + i * 7).collect();
        let (lg, tg) = greedy(&g, &mg, &prompt, 24);
        let (lc, tc) = greedy(&c, &mc, &prompt, 24);
        let (l32, _) = greedy(&c32, &m32, &prompt, 24);
        let errs: Vec<f32> = lg.iter().zip(&lc).map(|(a, b)| rel_err(a, b)).collect();
        let worst = errs.iter().copied().fold(0f32, f32::max);
        // For scale: how far each bf16 path is from the fp32 CPU path.
        let far = |l: &[Vec<f32>]| {
            l.iter()
                .zip(&l32)
                .map(|(a, b)| rel_err(a, b))
                .fold(0f32, f32::max)
        };
        println!(
            "{arch:?}: worst step logits relative error vs CPU bf16 {worst:.2e} (per step {:?}); vs CPU fp32: GPU {:.2e}, CPU bf16 {:.2e}; tokens {tg:?}",
            errs.iter().map(|e| format!("{e:.1e}")).collect::<Vec<_>>(),
            far(&lg),
            far(&lc)
        );
        let mut sorted = errs.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted[sorted.len() / 2];
        assert!(
            median <= 2e-2,
            "{arch:?}: median logits relative error {median:.3e}"
        );
        // The GPU path is as far from fp32 as the CPU's bf16 emulation is, no further.
        assert!(
            far(&lg) <= 1.25 * far(&lc) + 1e-3,
            "{arch:?}: GPU is {:.3e} from fp32, CPU bf16 {:.3e}",
            far(&lg),
            far(&lc)
        );
        // Hunyuan-Large (top-1, bf16 router): every step within 2e-2. The tiny random
        // A13B-style model (top-2, fp32 router) is chaotic under bf16 (its bf16 logits
        // are ~100% away from its fp32 logits, on the CPU as on the GPU), so a routing
        // near-tie flipped by rounding order can move one step further; it is bounded
        // at 1e-1 and the greedy tokens must still agree.
        let bound = if arch == Arch::HunyuanLarge {
            2e-2
        } else {
            1e-1
        };
        assert!(
            worst <= bound,
            "{arch:?}: logits relative error {worst:.3e}"
        );
        assert_eq!(tg, tc, "{arch:?}: greedy tokens differ");
    }
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn recorded_decode_steps_match_direct_launches() {
    recorded_steps_match_direct_launches(0);
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn recorded_verification_steps_match_direct_launches() {
    // Speculative verification: every step carries the decode token and 3 proposed
    // tokens with logits for all 4 rows; the proposals are rejected, so the next step
    // writes over their cache positions (the rollback).
    recorded_steps_match_direct_launches(3);
}

fn recorded_steps_match_direct_launches(n_proposed: usize) {
    // Decode steps replayed from CUDA graphs against the same steps launched kernel by
    // kernel, for one sequence and for a batch of three of different lengths.
    let (_dir, cfg, ck) = tiny_model(Arch::HunyuanLarge, 9);
    let mut direct = gpu();
    direct.set_graphs(false);
    let mut graphs = gpu();
    graphs.set_graphs(true);
    let md = Model::load(&direct, cfg.clone(), &ck, &mut |_| {});
    let mg = Model::load(&graphs, cfg.clone(), &ck, &mut |_| {});
    let prompts: Vec<Vec<u32>> = vec![
        (0..9).map(|i| 300 + i).collect(),
        (0..30).map(|i| 500 + 3 * i).collect(),
        vec![77, 78],
    ];
    for n_seqs in [1, 3] {
        let run = |b: &CudaBackend, m: &Model<CudaBackend>| {
            let spec = hyserve_worker::kv_spec(&m.cfg, Precision::Bf16, 64, 16);
            let mut kv = b.alloc_kv(spec);
            let mut toks: Vec<Vec<u32>> = prompts[..n_seqs].to_vec();
            let base: Vec<usize> = (0..n_seqs).map(|i| i * 256).collect();
            let slots = |i: usize, n: usize| (base[i]..base[i] + n).collect::<Vec<_>>();
            // Prefill each sequence, then 20 batched decode steps.
            let mut all = Vec::new();
            let mut next: Vec<u32> = Vec::new();
            for (i, t) in toks.iter().enumerate() {
                let c = SeqChunk {
                    tokens: t.clone(),
                    first_pos: 0,
                    slots: slots(i, t.len()),
                    all_logits: false,
                    argmax_only: false,
                };
                let l = m.forward(b, &mut kv, &[c]).remove(0);
                next.push(
                    l.iter()
                        .enumerate()
                        .fold(0, |bi, (j, &v)| if v > l[bi] { j } else { bi })
                        as u32,
                );
            }
            for step in 0..20 {
                let chunks: Vec<SeqChunk> = toks
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let mut tokens = vec![next[i]];
                        tokens.extend((0..n_proposed as u32).map(|k| 400 + 7 * k + step));
                        SeqChunk {
                            first_pos: t.len(),
                            slots: slots(i, t.len() + tokens.len()),
                            all_logits: n_proposed > 0,
                            argmax_only: false,
                            tokens,
                        }
                    })
                    .collect();
                let out = m.forward(b, &mut kv, &chunks);
                for (i, l) in out.iter().enumerate() {
                    assert_eq!(l.len(), (1 + n_proposed) * m.cfg.vocab_size);
                    let l = &l[..m.cfg.vocab_size];
                    toks[i].push(next[i]);
                    next[i] = l
                        .iter()
                        .enumerate()
                        .fold(0, |bi, (j, &v)| if v > l[bi] { j } else { bi })
                        as u32;
                }
                all.extend(out);
            }
            (all, toks)
        };
        let (ld, td) = run(&direct, &md);
        let (lg, tg) = run(&graphs, &mg);
        assert_eq!(td, tg, "{n_seqs} sequences: tokens differ with graphs");
        let worst = ld
            .iter()
            .zip(&lg)
            .map(|(a, b)| rel_err(b, a))
            .fold(0f32, f32::max);
        println!("graphs, {n_seqs} sequences: worst step logits relative error {worst:.2e}");
        // Not bitwise: a recorded step sizes attention's key splits for its context
        // bound, a direct one for the actual context.
        assert!(
            worst <= 5e-3,
            "{n_seqs} sequences: graph replay differs by {worst:.3e}"
        );
    }
    assert!(
        graphs.recorded_graphs() >= 2,
        "no decode graph was recorded"
    );
    assert_eq!(direct.recorded_graphs(), 0);
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn recordings_past_the_cap_replace_the_least_recently_used() {
    // 112 verification shapes (1 to 7 sequences, 0 to 15 proposals each), every one
    // run four times over the same cache positions (each step rolls the last back):
    // more shapes than the backend keeps recordings of (96 here). Replays must keep matching
    // direct launches while old recordings are dropped for new ones, and the first
    // shapes, run again at the end, are recorded anew.
    let (_dir, cfg, ck) = tiny_model(Arch::HunyuanLarge, 5);
    let mut direct = gpu();
    direct.set_graphs(false);
    let mut graphs = gpu();
    const CAP: usize = 96;
    graphs.set_max_recordings(CAP);
    let md = Model::load(&direct, cfg.clone(), &ck, &mut |_| {});
    let mg = Model::load(&graphs, cfg.clone(), &ck, &mut |_| {});
    let spec = hyserve_worker::kv_spec(&cfg, Precision::Bf16, 128, 16);
    let (mut kd, mut kg) = (direct.alloc_kv(spec), graphs.alloc_kv(spec));
    let prompt = |i: usize| {
        (0..5 + 3 * i as u32)
            .map(|t| 100 + 11 * t + i as u32)
            .collect()
    };
    let chunk = |i: usize, tokens: Vec<u32>, first_pos: usize, all_logits: bool| SeqChunk {
        slots: (i * 256..i * 256 + first_pos + tokens.len()).collect(),
        tokens,
        first_pos,
        all_logits,
        argmax_only: false,
    };
    for i in 0..7 {
        let c = chunk(i, prompt(i), 0, false);
        md.forward(&direct, &mut kd, std::slice::from_ref(&c));
        mg.forward(&graphs, &mut kg, &[c]);
    }
    let mut shapes: Vec<(usize, usize)> =
        (1..=7).flat_map(|n| (0..16).map(move |k| (n, k))).collect();
    shapes.extend_from_slice(&shapes.clone()[..4]);
    let mut worst = 0f32;
    for (n_seqs, k) in shapes {
        let chunks: Vec<SeqChunk> = (0..n_seqs)
            .map(|i| {
                let tokens = (0..=k as u32).map(|t| 200 + 5 * t + i as u32).collect();
                chunk(i, tokens, 5 + 3 * i, k > 0)
            })
            .collect();
        for _ in 0..4 {
            let a = md.forward(&direct, &mut kd, &chunks);
            let b = mg.forward(&graphs, &mut kg, &chunks);
            for (a, b) in a.iter().zip(&b) {
                worst = worst.max(rel_err(b, a));
            }
        }
        assert!(graphs.recorded_graphs() <= CAP);
    }
    println!(
        "116 shapes: worst logits relative error {worst:.2e}, {} recordings kept",
        graphs.recorded_graphs()
    );
    assert!(worst <= 5e-3, "graph replay differs by {worst:.3e}");
    assert_eq!(graphs.recorded_graphs(), CAP, "the cap is reached and held");
}

/// Sequence `i` of an executor test's step: four blocks of its own.
fn seq_step(
    i: usize,
    tokens: Vec<u32>,
    first_pos: usize,
    all_logits: bool,
) -> hyserve_worker::SeqStep {
    hyserve_worker::SeqStep {
        seq_id: i as u64,
        request_id: "".into(),
        tokens,
        first_pos,
        blocks: (0..4).map(|b| (8 * i + b) as u32).collect(),
        all_logits,
        argmax_only: false,
        draft: None,
    }
}

/// Distinct prompts of 6, 7, ... tokens for `n` sequences.
fn step_prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| (0..6 + i as u32).map(|t| 40 + 13 * t + i as u32).collect())
        .collect()
}

/// `n` sequences' prefill (prompts of [`step_prompts`]), then 4 decode steps and 4
/// verifications of 3 proposals (each rolled back: the next writes the same positions).
fn prefill_then_decode_and_verify(n: usize) -> Vec<hyserve_worker::Step> {
    use hyserve_worker::Step;
    let prompts = step_prompts(n);
    let mut steps = vec![Step {
        seqs: (0..n)
            .map(|i| seq_step(i, prompts[i].clone(), 0, false))
            .collect(),
        ..Step::default()
    }];
    steps.extend((0..8u32).map(|k| {
        let rows = if k < 4 { 1 } else { 4 };
        Step {
            seqs: (0..n)
                .map(|i| {
                    let tokens = (0..rows).map(|r| 300 + 7 * k + r + i as u32).collect();
                    seq_step(i, tokens, prompts[i].len() + (k as usize).min(3), rows > 1)
                })
                .collect(),
            ..Step::default()
        }
    }));
    steps
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn steps_padded_for_recording_give_each_sequence_its_own_logits() {
    // The executor pads recorded steps with dummy sequences up to the backend's batch
    // sizes (5 decoding sequences run as 6, 7 as 8): every real sequence's logits
    // match the same steps run unpadded and unrecorded, over decode steps and
    // verifications of 3 proposals, while the dummies write only scratch slots.
    use hyserve_worker::{Executor, Step};
    let (_dir, cfg, ck) = tiny_model(Arch::HunyuanLarge, 11);
    let executor = |graphs: bool| {
        let mut b = gpu();
        b.set_graphs(graphs);
        let m = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
        Executor::new(b, m, 64, 16)
    };
    let (mut padded, mut plain) = (executor(true), executor(false));
    for n_seqs in [5, 7] {
        assert_eq!(
            padded.backend().padded_sequences(n_seqs, 1, 1, 16),
            n_seqs + 1
        );
        let mut worst = 0f32;
        let mut run = |step: &Step| {
            let a = padded.step(step).unwrap();
            let b = plain.step(step).unwrap();
            assert_eq!(a.logits.len(), n_seqs);
            for (a, b) in a.logits.iter().zip(&b.logits) {
                worst = worst.max(rel_err(a, b));
            }
        };
        for step in prefill_then_decode_and_verify(n_seqs) {
            run(&step);
        }
        println!("{n_seqs} sequences padded: worst logits relative error {worst:.2e}");
        assert!(worst <= 5e-3, "{n_seqs} sequences: {worst:.3e}");
    }
    assert!(padded.backend().recorded_graphs() >= 2);
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn greedy_steps_get_their_rows_arg_max_from_the_device() {
    // Each step of 5 sequences (prefill, recorded decode steps padded to 6 and
    // verifications of 3 proposals) runs three times over the same positions: with
    // rows; every sequence asking for only the arg-max tokens (taken on the device);
    // every other one asking (taken by the executor). The tokens are the host's
    // arg-max of the rows, exactly, and the sequences that asked get no rows.
    use hyserve_worker::Executor;
    let (_dir, cfg, ck) = tiny_model(Arch::HunyuanLarge, 11);
    let mut b = gpu();
    b.set_graphs(true);
    let m = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
    let mut e = Executor::new(b, m, 64, 16);
    let n = 5;
    for step in prefill_then_decode_and_verify(n) {
        let mut run = |only: &dyn Fn(usize) -> bool| {
            let mut s = step.clone();
            for (i, q) in s.seqs.iter_mut().enumerate() {
                q.argmax_only = only(i);
            }
            e.step(&s).unwrap()
        };
        let rows = run(&|_| false);
        let vocab = rows.vocab_size;
        let want: Vec<Vec<u32>> = rows
            .logits
            .iter()
            .map(|r| hyserve_kernels::backend::argmax_each(r, vocab))
            .collect();
        let all = run(&|_| true);
        assert_eq!(
            all.argmax,
            want,
            "{} rows a sequence",
            step.seqs[0].tokens.len()
        );
        assert!(all.logits.iter().all(Vec::is_empty));
        let mixed = run(&|i| i % 2 == 1);
        for (i, w) in want.iter().enumerate() {
            if i % 2 == 1 {
                assert_eq!(&mixed.argmax[i], w);
                assert!(mixed.logits[i].is_empty());
            } else {
                assert_eq!(mixed.logits[i], rows.logits[i]);
            }
        }
    }
    assert!(e.backend().recorded_graphs() >= 2);
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn a_warm_up_records_the_first_steps_shapes_before_they_come() {
    // An executor with a draft model, reporting metrics, warms up for 8 sequences and
    // verifications of up to 3 proposals: 6 padded batch sizes (1, 2, 3, 4, 6, 8) of
    // target decode steps, draft decode steps and 3 verification depths, at context
    // bounds 256 and 512: 60 shapes, each recorded. Then steps of 5 sequences (padded to
    // 6), decode steps and verifications of 3 proposals, replay from their first run (no
    // step warms up) and give the logits of an executor that records nothing; the
    // expert load the dummies routed was discarded, and the replayed steps count every
    // real token's (recorded counting, as the executor's steps do).
    use hyserve_telemetry::WorkerMetrics;
    use hyserve_worker::{Executor, Step, WarmUp};
    use std::sync::Arc;
    let (_dir, cfg, ck) = tiny_model(Arch::HunyuanLarge, 17);
    let n_moe_layers = cfg.layers.iter().filter(|l| l.n_experts > 0).count() as u64;
    let top_k = cfg.layers.iter().map(|l| l.top_k).max().unwrap() as u64;
    let registry = prometheus::Registry::new();
    let executor = |graphs: bool| {
        let mut b = gpu();
        b.set_graphs(graphs);
        let m = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
        let d = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
        let mut e = Executor::new(b, m, 64, 16);
        e.set_draft(d).unwrap();
        e
    };
    let (mut warm, mut plain) = (executor(true), executor(false));
    let experts = cfg.layers.iter().map(|l| l.n_experts).max().unwrap();
    warm.set_metrics(
        Arc::new(
            WorkerMetrics::new(&registry, &["0".to_string()], cfg.layers.len(), experts).unwrap(),
        ),
        "0".into(),
    );
    assert_eq!(warm.backend().recording_capacity(), MAX_RECORDINGS);
    assert_eq!(plain.backend().recording_capacity(), 0);
    let plan = WarmUp::new(8, 3, 2048);
    let done = warm.warm_up(&plan);
    println!("warm-up: {done:?}");
    assert_eq!(done.shapes, 60);
    assert_eq!(warm.backend().recorded_graphs(), 60);
    assert_eq!(plain.warm_up(&plan).shapes, 0, "nothing to record");
    let mut load = warm.model().expert_load_shape();
    assert!(warm.backend().take_expert_load(&mut load));
    assert!(
        load.iter().flatten().all(|&n| n == 0),
        "the dummies' routing is not counted"
    );
    let n_seqs = 5;
    let mut worst = 0f32;
    let mut tokens = 0u64;
    let mut run = |step: &Step, recorded: bool| {
        tokens += step.seqs.iter().map(|q| q.tokens.len() as u64).sum::<u64>();
        let a = warm.step(step).unwrap();
        let b = plain.step(step).unwrap();
        assert!(!a.warming, "a step of a warmed-up shape replays at once");
        assert_eq!(a.logits.len(), step.seqs.len());
        if recorded {
            for (a, b) in a.logits.iter().zip(&b.logits) {
                worst = worst.max(rel_err(a, b));
            }
        }
    };
    let steps = prefill_then_decode_and_verify(n_seqs);
    // The prefill is not recordable: its logits are not compared.
    for (i, step) in steps.iter().enumerate() {
        run(step, i > 0);
    }
    // The device's counters are read at most every 250 ms: one more (warmed-up) step
    // after that brings the rest back.
    std::thread::sleep(std::time::Duration::from_millis(300));
    run(
        &Step {
            seqs: vec![seq_step(
                0,
                vec![5],
                steps[0].seqs[0].tokens.len() + 3,
                false,
            )],
            ..Step::default()
        },
        true,
    );
    let routed: u64 = routed_per_expert(&registry).iter().sum();
    println!("warmed-up steps: worst logits relative error {worst:.2e}, {routed} routed pairs");
    assert_eq!(
        routed,
        tokens * top_k * n_moe_layers,
        "replays of warmed-up shapes count every real pair, and no dummy's"
    );
    assert!(worst <= 5e-3, "{worst:.3e}");
    assert_eq!(
        warm.backend().recorded_graphs(),
        60,
        "serving recorded nothing new"
    );
}

/// Routed tokens per expert from a registry's `hyserve_expert_routed_tokens_total`.
fn routed_per_expert(r: &prometheus::Registry) -> Vec<u64> {
    let mut out = vec![0u64; 16];
    for f in r.gather() {
        if f.name() != "hyserve_expert_routed_tokens_total" {
            continue;
        }
        for m in f.get_metric() {
            let e: usize = m.get_label()[0].value().parse().unwrap();
            out[e] = m.get_counter().get_value() as u64;
        }
    }
    out
}

#[test]
#[cfg_attr(
    not(feature = "gpu-tests"),
    ignore = "needs a GPU: run with --features gpu-tests on a GPU host"
)]
fn expert_load_counted_on_the_device_matches_the_host() {
    // The same steps (prefills, then decode steps of 5 sequences, which the GPU
    // executor pads to 6 and records) through a CPU and a GPU executor reporting to
    // metrics: the GPU counts on the device, leaves the padding out, and its totals are
    // the CPU's exactly (tokens x top-k x MoE layers); per expert they agree up to
    // routing near-ties under bf16.
    use hyserve_telemetry::WorkerMetrics;
    use hyserve_worker::{Executor, Step};
    use std::sync::Arc;
    let (_dir, cfg, ck) = tiny_model(Arch::HunyuanLarge, 13);
    let n_moe_layers = cfg.layers.iter().filter(|l| l.n_experts > 0).count() as u64;
    let top_k = cfg.layers.iter().map(|l| l.top_k).max().unwrap() as u64;
    let layers = cfg.layers.len();
    let experts = cfg.layers.iter().map(|l| l.n_experts).max().unwrap();
    assert_eq!(experts, 16);
    let registry = |_: ()| prometheus::Registry::new();
    let (rg, rc) = (registry(()), registry(()));
    let mut on_gpu = {
        let b = gpu();
        let m = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
        Executor::new(b, m, 64, 16)
    };
    let mut on_cpu = {
        let b = cpu();
        let m = Model::load(&b, cfg.clone(), &ck, &mut |_| {});
        Executor::new(b, m, 64, 16)
    };
    let wm = |r: &prometheus::Registry| {
        Arc::new(WorkerMetrics::new(r, &["0".to_string()], layers, experts).unwrap())
    };
    on_gpu.set_metrics(wm(&rg), "0".into());
    on_cpu.set_metrics(wm(&rc), "0".into());
    let n_seqs = 5;
    assert_eq!(
        on_gpu.backend().padded_sequences(n_seqs, 1, 1, 16),
        n_seqs + 1
    );
    let seq = |i: usize, tokens: Vec<u32>, first_pos: usize| seq_step(i, tokens, first_pos, false);
    let prompts = step_prompts(n_seqs);
    let mut steps = vec![Step {
        seqs: (0..n_seqs).map(|i| seq(i, prompts[i].clone(), 0)).collect(),
        ..Step::default()
    }];
    for k in 0..12u32 {
        steps.push(Step {
            seqs: (0..n_seqs)
                .map(|i| {
                    seq(
                        i,
                        vec![300 + 7 * k + i as u32],
                        prompts[i].len() + k as usize,
                    )
                })
                .collect(),
            ..Step::default()
        });
    }
    let mut tokens = 0u64;
    for s in &steps {
        tokens += s.seqs.iter().map(|q| q.tokens.len() as u64).sum::<u64>();
        on_gpu.step(s).unwrap();
        on_cpu.step(s).unwrap();
    }
    // The device's counters are read at most every 250 ms: one more step after that
    // brings the rest back.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let last = Step {
        seqs: vec![seq(0, vec![5], prompts[0].len() + 12)],
        ..Step::default()
    };
    tokens += 1;
    on_gpu.step(&last).unwrap();
    on_cpu.step(&last).unwrap();
    let (g, c) = (routed_per_expert(&rg), routed_per_expert(&rc));
    let want = tokens * top_k * n_moe_layers;
    println!("expert load: gpu {g:?}, cpu {c:?}, {want} pairs");
    assert_eq!(c.iter().sum::<u64>(), want, "the host counts every pair");
    assert_eq!(
        g.iter().sum::<u64>(),
        want,
        "the device counts every real pair, no padding"
    );
    // Per expert: a random tiny model's router is near uniform, so bf16 differences in
    // the hidden states flip near-ties (4% of the pairs on an H200); counters at the
    // wrong layer or expert would differ by far more.
    let l1: u64 = g.iter().zip(&c).map(|(a, b)| a.abs_diff(*b)).sum();
    assert!(l1 * 10 <= want, "per expert: gpu {g:?} against cpu {c:?}");
    assert!(
        on_gpu.backend().recorded_graphs() >= 1,
        "the decode steps were recorded"
    );
}

#[test]
fn missing_gpu_is_a_clear_error_not_a_panic() {
    // On a machine without the CUDA libraries or a GPU, starting the backend returns an
    // error that names what is missing; on a GPU host it starts.
    match CudaBackend::new(0, Precision::Bf16) {
        Ok((b, info)) => println!("started {} ({})", b.name(), info.arch),
        Err(e) => {
            let msg = e.to_string();
            println!("{msg}");
            assert!(msg.contains("CUDA"), "unclear error: {msg}");
        }
    }
    let err = CudaBackend::new(0, Precision::F32)
        .err()
        .expect("f32 is refused");
    assert!(err.to_string().contains("bf16"));
}
