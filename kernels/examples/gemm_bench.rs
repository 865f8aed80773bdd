//! GEMM micro-benchmark: our batch-invariant GEMM (bf16 and f32 weights) against the
//! `gemm` crate (f32, the best general-purpose Rust GEMM) on decode and prefill shapes.
//! This is the measurement behind writing our own kernel (see ARCHITECTURE.md).
//!
//! `cargo run --release -p hyserve-kernels --example gemm_bench`

use std::time::Instant;

use hyserve_kernels::DType;
use hyserve_kernels::cpu::gemm::matmul;
use hyserve_kernels::weight::HostMatrix;

fn best_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:>5} {:>6} {:>6} | {:>22} {:>22} {:>22}",
        "m", "n", "k", "hyserve bf16-W", "hyserve f32-W", "gemm crate f32"
    );
    for &(m, n, k) in &[
        (1, 65536, 1024),
        (1, 4096, 1024),
        (4, 4096, 1024),
        (64, 2048, 1024),
        (256, 2048, 1024),
        (512, 3072, 1024),
    ] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0)
            .collect();
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 17 % 89) as f32 - 44.0) / 89.0)
            .collect();
        let w16 = HostMatrix::from_f32(DType::BF16, n, k, &wv);
        let w32 = HostMatrix::from_f32(DType::F32, n, k, &wv);
        let mut y = vec![0f32; m * n];
        let reps = if m == 1 { 200 } else { 10 };
        let flop = 2.0 * (m * n * k) as f64;
        let ours16 = best_secs(reps, || matmul(&x, m, &w16, &mut y));
        let ours32 = best_secs(reps, || matmul(&x, m, &w32, &mut y));
        let theirs = best_secs(reps, || {
            // SAFETY: the pointers cover x (m x k, row stride k), W viewed as Wᵀ (k x n:
            // row stride 1, column stride k) and y (m x n, row stride n), all alive here.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    y.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    wv.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                )
            }
        });
        let fmt = |s: f64, wbytes: usize| {
            format!(
                "{:>7.1} GF/s {:>6.1} GB/s",
                flop / s / 1e9,
                (n * k * wbytes) as f64 / s / 1e9
            )
        };
        println!(
            "{m:>5} {n:>6} {k:>6} | {} {} {}",
            fmt(ours16, 2),
            fmt(ours32, 4),
            fmt(theirs, 4)
        );
    }
}
