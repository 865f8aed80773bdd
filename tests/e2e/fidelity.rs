//! Fidelity against independent references: logits of `hyserve generate` compared
//! with fixtures produced by `scripts/reference/make_fixtures.sh`:
//! - Hunyuan-Large (CLA) against `scripts/reference/numpy_ref.py`, a NumPy
//!   implementation written from the spec;
//! - Hunyuan-A13B-style (`hunyuan_v1_moe`) against HF transformers' own implementation
//!   (`scripts/reference/hf_ref.py`).
//!
//! Each fixture records how its model was made (`init-model` arguments) and the
//! SHA-256 of the weight files, so a drifted generator fails loudly instead of
//! comparing against the wrong model.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::support::{generate_logits, init_model, read_npy, rel_err};

fn check_fixture(name: &str) {
    let fdir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fdir.join("meta.json"))
            .unwrap_or_else(|e| panic!("fixture {name}: meta.json: {e}")),
    )
    .expect("meta.json is JSON");
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_model(
        &model,
        meta["arch"].as_str().unwrap(),
        meta["preset"].as_str().unwrap(),
        meta["weights_dtype"].as_str().unwrap(),
        meta["seed"].as_u64().unwrap(),
        &[],
    );
    for (file, want) in meta["weights_sha256"].as_object().expect("weights_sha256") {
        let got = hex(&Sha256::digest(std::fs::read(model.join(file)).unwrap()));
        assert_eq!(
            &got,
            want.as_str().unwrap(),
            "fixture {name}: init-model no longer writes the fixture's weights ({file}); \
             regenerate with scripts/reference/make_fixtures.sh"
        );
    }
    let prompt: Vec<u32> = meta["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let ref_ids: Vec<u32> = meta["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let max_tokens = ref_ids.len();
    let compute = meta["compute_dtype"].as_str().unwrap();
    let tol = meta["tolerance"].as_f64().unwrap();
    let (ids, (rows, vocab, logits)) =
        generate_logits(&model, &prompt, max_tokens, compute, tmp.path());
    let (rrows, rvocab, reference) = read_npy(&fdir.join("logits.npy"));
    assert_eq!(
        (rows, vocab),
        (rrows, rvocab),
        "fixture {name}: logits shape"
    );
    // Rows after a divergence in the generated tokens condition on different inputs:
    // compare up to and including the row that produced the first differing token.
    let first_diff = ids.iter().zip(&ref_ids).position(|(a, b)| a != b);
    let n_rows = match first_diff {
        Some(i) => prompt.len() + i,
        None => rows,
    };
    let err = rel_err(&logits[..n_rows * vocab], &reference[..n_rows * vocab]);
    eprintln!(
        "fixture {name}: relative error {err:.3e} over {n_rows} rows (tolerance {tol:.0e}); first token difference: {first_diff:?}"
    );
    assert!(
        err <= tol,
        "fixture {name}: relative error {err:.3e} > {tol:.0e}"
    );
    if meta["require_identical_tokens"].as_bool().unwrap_or(false) {
        assert_eq!(ids, ref_ids, "fixture {name}: greedy continuation differs");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn hunyuan_large_f32_matches_numpy_reference() {
    check_fixture("large-tiny-f32");
}

#[test]
fn hunyuan_large_bf16_matches_numpy_reference() {
    check_fixture("large-tiny-bf16");
}

#[test]
fn hunyuan_a13b_f32_matches_transformers() {
    check_fixture("a13b-tiny-f32");
}

#[test]
fn hunyuan_a13b_bf16_matches_transformers() {
    check_fixture("a13b-tiny-bf16");
}
