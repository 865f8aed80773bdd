//! Helpers shared by the end-to-end tests: running the binary, reading `.npy` files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn hyserve() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hyserve"));
    c.env("HYSERVE_LOG", "warn").env("HYSERVE_THREADS", "2");
    c
}

/// Runs the binary with `args`; panics with its stderr if it fails.
pub fn run_ok(args: &[&str]) -> Output {
    let out = hyserve().args(args).output().expect("hyserve runs");
    assert!(
        out.status.success(),
        "hyserve {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the binary expecting failure; returns stderr. A panic is never an acceptable failure.
pub fn run_err(args: &[&str]) -> String {
    let out = hyserve().args(args).output().expect("hyserve runs");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "hyserve {args:?} unexpectedly succeeded"
    );
    assert!(
        !stderr.contains("panicked"),
        "hyserve {args:?} panicked:\n{stderr}"
    );
    stderr
}

/// Writes a seeded model with `init-model`.
pub fn init_model(dir: &Path, arch: &str, preset: &str, dtype: &str, seed: u64, extra: &[&str]) {
    let seed = seed.to_string();
    let mut args = vec![
        "init-model",
        "--arch",
        arch,
        "--preset",
        preset,
        "--dtype",
        dtype,
        "--seed",
        &seed,
        "--out",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_ok(&args);
}

/// A `.npy` float32 matrix: (rows, cols, data).
pub fn read_npy(path: &Path) -> (usize, usize, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let npy = npyz::NpyFile::new(&bytes[..]).expect("valid npy");
    let shape = npy.shape().to_vec();
    assert_eq!(shape.len(), 2, "{}: expected 2-D", path.display());
    let data: Vec<f32> = npy.into_vec().expect("float32 data");
    (shape[0] as usize, shape[1] as usize, data)
}

/// ‖a − b‖ / ‖b‖ over the first `rows` rows.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((*x - *y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Runs `generate` with `--json --logits-out` and returns (generated ids, logits).
pub fn generate_logits(
    model: &Path,
    prompt_ids: &[u32],
    max_tokens: usize,
    dtype: &str,
    tmp: &Path,
) -> (Vec<u32>, (usize, usize, Vec<f32>)) {
    let ids = prompt_ids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let npy: PathBuf = tmp.join(format!("logits-{dtype}-{}.npy", std::process::id()));
    let max = max_tokens.to_string();
    let out = run_ok(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &ids,
        "--max-tokens",
        &max,
        "--dtype",
        dtype,
        "--json",
        "--ignore-eos",
        "--logits-out",
        npy.to_str().unwrap(),
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    let generated = j["generated_ids"]
        .as_array()
        .expect("generated_ids")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (generated, read_npy(&npy))
}
