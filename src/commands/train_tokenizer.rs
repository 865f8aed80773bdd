//! `hyserve train-tokenizer`: a byte-level BPE vocabulary trained on a text, written as a
//! Hunyuan tokenizer directory (`hy.tiktoken` ranks, then the 209 special tokens).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use hyserve_model::tokenizer::{self, Tokenizer};

#[derive(clap::Args)]
pub struct Args {
    /// UTF-8 text to train on.
    #[arg(long)]
    text: PathBuf,
    /// BPE ranks (256 single bytes plus merges); the special tokens follow them.
    #[arg(long, default_value_t = 4096)]
    ranks: usize,
    /// Output directory (created): `hy.tiktoken` and `tokenizer_config.json`.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.ranks > 256,
        "--ranks {}: needs more than the 256 bytes",
        a.ranks
    );
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("reading {}", a.text.display()))?;
    let t0 = Instant::now();
    eprintln!(
        "training {} merges on {} MB of text",
        a.ranks - 256,
        text.len() >> 20
    );
    let ranks = tokenizer::train_bpe(&text, a.ranks - 256);
    tokenizer::write_tiktoken_dir(&a.out, &ranks)?;
    // Read it back as serving will, and report how well it compresses the text.
    let tok = Tokenizer::from_dir(&a.out)?;
    let n_tokens = tok.encode(&text, false)?.len();
    eprintln!(
        "wrote {} ranks + specials ({} ids) to {} in {:.1}s: {:.2} bytes per token",
        ranks.len(),
        tok.vocab_size(),
        a.out.display(),
        t0.elapsed().as_secs_f64(),
        text.len() as f64 / n_tokens.max(1) as f64
    );
    Ok(())
}
