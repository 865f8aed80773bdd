//! A single-sequence driver: prefill in chunks, then decode token by token with a
//! sampler. Used by `hyserve generate` (the fidelity interface) and the benchmarks.

use std::time::{Duration, Instant};

use hyserve_kernels::sampling::{Sampler, SamplingParams};

use crate::blocks::{BlockAllocator, BlockTable};
use crate::executor::{ExecutorError, ExecutorHandle, SeqStep, Step};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these.
    pub stop_ids: Vec<u32>,
    /// Largest prefill chunk (tokens per forward pass).
    pub prefill_chunk: usize,
    /// Keep every row of logits (`[n_prompt + n_generated - 1, vocab]`).
    pub collect_logits: bool,
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub generated: Vec<u32>,
    /// Row `i`: next-token logits after consuming token `i` of prompt + generated.
    pub logits: Option<Vec<f32>>,
    pub vocab_size: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    /// "stop" (a stop id) or "length".
    pub finish_reason: &'static str,
}

/// Generates up to `opts.max_tokens` tokens after `prompt`.
pub fn generate(
    exec: &ExecutorHandle,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<GenerateOutput, ExecutorError> {
    let spec = exec.kv_spec();
    let cfg = exec.config();
    let bad = |reason: String| ExecutorError::BadStep { seq_id: 0, reason };
    if prompt.is_empty() {
        return Err(bad("the prompt is empty".into()));
    }
    let total = prompt.len() + opts.max_tokens;
    if total > cfg.max_position_embeddings {
        return Err(bad(format!(
            "prompt ({}) + max tokens ({}) exceeds the context length {}",
            prompt.len(),
            opts.max_tokens,
            cfg.max_position_embeddings
        )));
    }
    let mut alloc = BlockAllocator::new(spec.n_blocks, spec.block_size);
    let mut table = BlockTable::default();
    if !alloc.ensure(&mut table, total) {
        return Err(bad(format!(
            "{total} tokens do not fit the KV cache ({} tokens)",
            spec.capacity_tokens()
        )));
    }
    let vocab = cfg.vocab_size;
    let mut sampler = Sampler::new(opts.sampling.clone(), 0);
    let mut logits_rows: Option<Vec<f32>> = opts.collect_logits.then(Vec::new);
    let chunk = opts.prefill_chunk.max(1);

    let t0 = Instant::now();
    let mut last = Vec::new();
    let mut pos = 0;
    while pos < prompt.len() {
        let end = (pos + chunk).min(prompt.len());
        let out = exec.run(Step {
            seqs: vec![SeqStep {
                seq_id: 0,
                request_id: "".into(),
                tokens: prompt[pos..end].to_vec(),
                first_pos: pos,
                blocks: table.blocks.clone(),
                all_logits: opts.collect_logits,
                argmax_only: false,
                draft: None,
            }],
            ..Default::default()
        })?;
        let rows = out
            .logits
            .into_iter()
            .next()
            .expect("one sequence in, one out");
        last = rows[rows.len() - vocab..].to_vec();
        if let Some(l) = logits_rows.as_mut() {
            l.extend_from_slice(&rows);
        }
        pos = end;
    }
    let prefill_time = t0.elapsed();

    let t1 = Instant::now();
    let mut generated = Vec::with_capacity(opts.max_tokens);
    let mut finish_reason = "length";
    while generated.len() < opts.max_tokens {
        let next = sampler.sample(&last, prompt, &generated);
        generated.push(next);
        if opts.stop_ids.contains(&next) {
            finish_reason = "stop";
            break;
        }
        if generated.len() == opts.max_tokens {
            break;
        }
        let out = exec.run(Step {
            seqs: vec![SeqStep {
                seq_id: 0,
                request_id: "".into(),
                tokens: vec![next],
                first_pos: prompt.len() + generated.len() - 1,
                blocks: table.blocks.clone(),
                all_logits: false,
                argmax_only: false,
                draft: None,
            }],
            ..Default::default()
        })?;
        last = out
            .logits
            .into_iter()
            .next()
            .expect("one sequence in, one out");
        if let Some(l) = logits_rows.as_mut() {
            l.extend_from_slice(&last);
        }
    }
    let decode_time = t1.elapsed();
    alloc.release(&mut table);
    Ok(GenerateOutput {
        generated,
        logits: logits_rows,
        vocab_size: vocab,
        prefill_time,
        decode_time,
        finish_reason,
    })
}
