//! Runs the Python end-to-end suite (`tests/python`, the official `openai` client against
//! a real `hyserve serve`) as part of `cargo test`, with the binary under test.

use std::process::Command;

#[test]
fn openai_client_suite() {
    let root = env!("CARGO_MANIFEST_DIR");
    let probe = Command::new("python3")
        .args(["-c", "import openai, pytest, httpx"])
        .status();
    assert!(
        matches!(probe, Ok(s) if s.success()),
        "the Python test clients are missing: pip install -r tests/python/requirements.txt \
         (scripts/test.sh does this)"
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/python",
        ])
        .current_dir(root)
        .env("HYSERVE_BIN", env!("CARGO_BIN_EXE_hyserve"))
        .status()
        .expect("running pytest");
    assert!(
        status.success(),
        "the Python end-to-end suite failed (output above)"
    );
}
