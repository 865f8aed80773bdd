//! The CLI as a user meets it: init-model, generate, and precise errors for bad
//! models and inputs (never a panic).

use std::path::Path;

use crate::support::{generate_logits, init_model, run_err, run_ok};

const PROMPT: &[u32] = &[300, 301, 302, 303, 304, 305, 306];

#[test]
fn generate_text_json_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-large", "tiny", "bf16", 0, &[]);
    let out = run_ok(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "8",
        "--json",
        "--ignore-eos",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["prompt_ids"].as_array().unwrap().len() >= 3);
    assert_eq!(j["generated_ids"].as_array().unwrap().len(), 8);
    assert!(j["text"].is_string());
    // Chat template path: the prompt gains the Hunyuan markers.
    let out = run_ok(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "hi",
        "--chat",
        "--max-tokens",
        "2",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["prompt_ids"].as_array().unwrap().len() >= 3, "{j}");
}

#[test]
fn a13b_architecture_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-a13b", "tiny", "bf16", 0, &[]);
    let (ids, (rows, _, _)) = generate_logits(&m, PROMPT, 5, "bf16", tmp.path());
    assert_eq!(ids.len(), 5);
    assert_eq!(rows, PROMPT.len() + 4);
}

#[test]
fn sharded_safetensors_and_torch_bin_give_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let (st, bin) = (tmp.path().join("st"), tmp.path().join("bin"));
    init_model(
        &st,
        "hunyuan-large",
        "tiny",
        "f32",
        3,
        &["--max-shard-mb", "1"],
    );
    init_model(
        &bin,
        "hunyuan-large",
        "tiny",
        "f32",
        3,
        &["--format", "bin", "--max-shard-mb", "1"],
    );
    assert!(
        st.join("model.safetensors.index.json").exists(),
        "sharded safetensors"
    );
    assert!(
        bin.join("pytorch_model.bin.index.json").exists(),
        "sharded .bin"
    );
    let a = generate_logits(&st, PROMPT, 6, "f32", tmp.path());
    let b = generate_logits(&bin, PROMPT, 6, "f32", tmp.path());
    assert_eq!(a.0, b.0);
    assert_eq!(a.1.2, b.1.2, "bitwise identical logits");
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-large", "tiny", "bf16", 5, &[]);
    let ids: String = (0..40)
        .map(|i| (260 + i * 7).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let run = |chunk: &str, npy: &Path| {
        run_ok(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt-ids",
            &ids,
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--prefill-chunk",
            chunk,
            "--logits-out",
            npy.to_str().unwrap(),
        ]);
        std::fs::read(npy).unwrap()
    };
    let one = run("512", &tmp.path().join("a.npy"));
    let chunked = run("7", &tmp.path().join("b.npy"));
    assert_eq!(one, chunked, "chunked prefill changed the logits");
}

/// Copies a model directory so a test can damage it.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn gen_err(m: &Path) -> String {
    run_err(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "1",
    ])
}

#[test]
fn damaged_checkpoints_give_errors_naming_tensor_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    init_model(
        &good,
        "hunyuan-large",
        "tiny",
        "bf16",
        0,
        &["--max-shard-mb", "1"],
    );
    let shard = "model-00001-of-00003.safetensors";
    assert!(good.join(shard).exists(), "expected 3 shards");

    // Truncated shard.
    let m = tmp.path().join("truncated");
    copy_dir(&good, &m);
    let len = std::fs::metadata(m.join(shard)).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.join(shard))
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let e = gen_err(&m);
    assert!(e.contains(shard), "{e}");

    // Hostile header: a header length of 2^60 bytes.
    let m = tmp.path().join("hostile");
    copy_dir(&good, &m);
    let mut bytes = std::fs::read(m.join(shard)).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(m.join(shard), bytes).unwrap();
    let e = gen_err(&m);
    assert!(e.contains(shard) && e.contains("HeaderTooLarge"), "{e}");

    // A shard the index names is gone.
    let m = tmp.path().join("missing-shard");
    copy_dir(&good, &m);
    std::fs::remove_file(m.join("model-00002-of-00003.safetensors")).unwrap();
    let e = gen_err(&m);
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");

    // Config and weights disagree: 17 experts expected, the router has 16 rows.
    let m = tmp.path().join("misshaped");
    copy_dir(&good, &m);
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace("\"num_experts\": 16", "\"num_experts\": 17"),
    )
    .unwrap();
    let e = gen_err(&m);
    assert!(
        e.contains("model.layers.0.mlp.gate.wg.weight") && e.contains(".safetensors"),
        "{e}"
    );

    // An index pointing outside the model directory is refused.
    let m = tmp.path().join("traversal");
    copy_dir(&good, &m);
    let idx = std::fs::read_to_string(m.join("model.safetensors.index.json")).unwrap();
    let idx = idx.replacen(
        "\"model-00001-of-00003.safetensors\"",
        "\"../../etc/passwd\"",
        1,
    );
    std::fs::write(m.join("model.safetensors.index.json"), idx).unwrap();
    let e = gen_err(&m);
    assert!(e.contains("plain file name"), "{e}");

    // Bad config field.
    let m = tmp.path().join("badcfg");
    copy_dir(&good, &m);
    std::fs::write(
        m.join("config.json"),
        cfg.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    let e = gen_err(&m);
    assert!(e.contains("num_key_value_heads"), "{e}");
}

#[test]
fn bad_prompt_ids_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-large", "tiny", "bf16", 0, &[]);
    let e = run_err(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt-ids",
        "1,99999",
        "--max-tokens",
        "1",
    ]);
    assert!(e.contains("99999") && e.contains("vocabulary"), "{e}");
}

/// A checkpoint written by real `torch.save` (two shards, an index, and three tensors
/// stored as views of one storage; made by `scripts/reference/torch_bin_check.py`, which
/// also checked that `torch.load` reads what `init-model --format bin` writes) loads and
/// gives bitwise the logits of its safetensors twin.
#[test]
fn torch_save_checkpoint_loads() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch-save-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("st");
    init_model(&st, "hunyuan-large", "tiny", "bf16", 4, &[]);
    let a = generate_logits(&fixture, PROMPT, 4, "bf16", tmp.path());
    let b = generate_logits(&st, PROMPT, 4, "bf16", tmp.path());
    assert_eq!(a.0, b.0);
    assert_eq!(a.1.2, b.1.2, "bitwise identical logits");
}

/// `serve --device cuda` where there is no CUDA (as on CI machines): a clear error
/// naming what is missing and a non-zero exit, not a panic. (Where CUDA is present this
/// test is not meaningful; `HYSERVE_EXPECT_CUDA=1` skips it on GPU hosts.)
#[test]
fn serve_on_cuda_without_cuda_is_a_clear_error() {
    if std::env::var_os("HYSERVE_EXPECT_CUDA").is_some() {
        eprintln!(
            "HYSERVE_EXPECT_CUDA is set: this host has CUDA, the no-CUDA error is not checked"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    init_model(&m, "hunyuan-large", "tiny", "bf16", 0, &[]);
    let err = run_err(&[
        "serve",
        "--model",
        m.to_str().unwrap(),
        "--device",
        "cuda",
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    assert!(err.contains("CUDA libraries not found"), "{err}");
    assert!(err.contains("LD_LIBRARY_PATH"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A GPU worker process: the same clear error, NCCL included in what is looked for.
    let err = run_err(&["worker", "--model", m.to_str().unwrap(), "--device", "cuda"]);
    assert!(err.contains("CUDA libraries not found"), "{err}");
    assert!(err.contains("libnccl"), "{err}");
}

/// The large-4l preset writes the real dimensions' config without 50 GB of weights.
#[test]
fn config_only_preset_has_real_dimensions() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    run_ok(&[
        "init-model",
        "--arch",
        "hunyuan-large",
        "--preset",
        "large-4l",
        "--config-only",
        "--out",
        m.to_str().unwrap(),
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["hidden_size"], 6400);
    assert_eq!(cfg["num_attention_heads"], 80);
    assert_eq!(cfg["num_key_value_heads"], 8);
    assert_eq!(cfg["intermediate_size"], 18304);
    assert_eq!(cfg["num_experts"], 16);
    assert_eq!(cfg["cla_share_factor"], 2);
    assert!(!m.join("model.safetensors").exists());
}

/// `hyserve plan` on the real Hunyuan-Large config: refused on 8 x 80 GB in bf16 with the
/// shortfall and a non-zero exit; on 16 x 80 GB a plan with KV room for every worker.
#[test]
fn plan_real_hunyuan_large() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hunyuan-large-config");
    let m = model.to_str().unwrap();
    let err = run_err(&["plan", "--model", m, "--workers", "8xH100-80G"]);
    assert!(
        err.contains("does not fit") && err.contains("GB short"),
        "{err}"
    );
    let out = run_ok(&["plan", "--model", m, "--workers", "16xH100-80G"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("tensor-parallel over groups of 4"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("H100-80G")).count(),
        16,
        "{text}"
    );
    let out = run_ok(&[
        "plan",
        "--model",
        m,
        "--workers",
        "16xH100-80G",
        "--dtype",
        "fp8",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("data-parallel"), "{text}");
}
