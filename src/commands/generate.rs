//! `hyserve generate`: one prompt through a model, printing text or JSON and
//! optionally every row of logits as `.npy` (the fidelity interface; keep stable).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use hyserve_kernels::sampling::SamplingParams;
use hyserve_model::tokenizer::ChatMessage;
use hyserve_worker::{Executor, ExecutorHandle, GenerateOptions, generate};
use npyz::WriterBuilder;

use crate::load;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (default: the embedded default model, created on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt text in the model's chat template as a user turn.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Compute precision (default: f32 for f32 checkpoints, else bf16).
    #[arg(long, value_parser = ["f32", "bf16"])]
    dtype: Option<String>,
    /// Write next-token logits of every consumed token as float32 [n_prompt + N - 1, vocab].
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Print {"prompt_ids", "generated_ids", "text", ...} as JSON.
    #[arg(long)]
    json: bool,
    /// Keep generating past the tokenizer's stop ids.
    #[arg(long)]
    ignore_eos: bool,
    /// Largest prefill chunk in tokens.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = load::resolve_model_dir(a.model.as_deref())?;
    let loaded = load::load_cpu(&dir, a.dtype.as_deref())?;
    let tok = loaded.tokenizer.as_ref();
    let prompt_ids = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok =
                tok.context("--prompt needs a tokenizer in the model directory; use --prompt-ids")?;
            let text = if a.chat {
                tok.apply_chat_template(
                    &[ChatMessage {
                        role: "user".into(),
                        content: text.clone(),
                    }],
                    true,
                )?
            } else {
                text.clone()
            };
            tok.encode(&text, a.chat)?
        }
        (None, None) => unreachable!("clap requires one of them"),
    };
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
    let vocab = loaded.model.cfg.vocab_size;
    if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("--prompt-ids: token id {bad} is outside the vocabulary (size {vocab})");
    }
    let block_size = 16;
    let n_blocks = (prompt_ids.len() + a.max_tokens)
        .div_ceil(block_size)
        .max(1);
    let executor = Executor::new(loaded.backend, loaded.model, n_blocks, block_size);
    let handle = ExecutorHandle::spawn("executor-0", executor)?;
    let stop_ids = match (tok, a.ignore_eos) {
        (Some(t), false) => t.stop_ids().to_vec(),
        _ => Vec::new(),
    };
    let out = generate(
        &handle,
        &prompt_ids,
        &GenerateOptions {
            max_tokens: a.max_tokens,
            sampling: SamplingParams {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                min_p: a.min_p,
                repetition_penalty: a.repetition_penalty,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                seed: a.seed,
            },
            stop_ids,
            prefill_chunk: a.prefill_chunk,
            collect_logits: a.logits_out.is_some(),
        },
    )?;
    if let (Some(path), Some(logits)) = (&a.logits_out, &out.logits) {
        write_npy(path, logits, vocab)?;
    }
    let text = match tok {
        Some(t) => t.decode(&out.generated).unwrap_or_default(),
        None => String::new(),
    };
    let prefill_tps = prompt_ids.len() as f64 / out.prefill_time.as_secs_f64().max(1e-9);
    let decode_steps = out.generated.len().saturating_sub(1);
    let decode_tps = decode_steps as f64 / out.decode_time.as_secs_f64().max(1e-9);
    if a.json {
        let j = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": out.generated,
            "text": text,
            "finish_reason": out.finish_reason,
            "timing": {"prefill_tokens_per_s": prefill_tps, "decode_tokens_per_s": decode_tps},
        });
        println!("{j}");
    } else {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{text}")?;
        eprintln!(
            "{} prompt tokens ({prefill_tps:.1} tok/s), {} generated ({decode_tps:.1} tok/s), finish: {}",
            prompt_ids.len(),
            out.generated.len(),
            out.finish_reason
        );
    }
    Ok(())
}

/// Writes `[rows, vocab]` float32 logits as a `.npy` file.
fn write_npy(path: &std::path::Path, logits: &[f32], vocab: usize) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let rows = (logits.len() / vocab) as u64;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[rows, vocab as u64])
        .writer(std::io::BufWriter::new(file))
        .begin_nd()?;
    w.extend(logits.iter().copied())?;
    w.finish()?;
    Ok(())
}
