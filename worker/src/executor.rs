//! The executor: runs one step (a batch of prefill chunks and decode tokens) through
//! the model, on a thread of its own so the async runtime never blocks on compute.

use std::sync::mpsc;
use std::thread::JoinHandle;

use hyserve_kernels::{Backend, KvSpec, Precision};
use hyserve_model::{Model, ModelConfig, SeqChunk};

/// The KV cache shape for `cfg`: one (K, V) per CLA cache layer.
pub fn kv_spec(
    cfg: &ModelConfig,
    precision: Precision,
    n_blocks: usize,
    block_size: usize,
) -> KvSpec {
    KvSpec {
        n_cache_layers: cfg.n_cache_layers,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        block_size,
        n_blocks,
        dtype: precision.storage_dtype(),
    }
}

/// One sequence's share of a step.
#[derive(Clone, Debug)]
pub struct SeqStep {
    pub seq_id: u64,
    /// New tokens at positions `first_pos..`.
    pub tokens: Vec<u32>,
    pub first_pos: usize,
    /// Blocks covering positions `0..first_pos + tokens.len()`.
    pub blocks: Vec<u32>,
    /// Logits for every new token (prompt scoring, verification) or only the last.
    pub all_logits: bool,
}

/// A batch for one forward pass.
#[derive(Clone, Debug, Default)]
pub struct Step {
    pub seqs: Vec<SeqStep>,
}

/// Logits per sequence, in step order: `[rows, vocab]` flattened.
#[derive(Clone, Debug)]
pub struct StepOutput {
    pub logits: Vec<Vec<f32>>,
    pub vocab_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("sequence {seq_id}: {reason}")]
    BadStep { seq_id: u64, reason: String },
    #[error("executor thread stopped")]
    Stopped,
}

/// Runs steps for the sequences and KV cache it owns.
pub struct Executor<B: Backend> {
    backend: B,
    model: Model<B>,
    kv: B::Kv,
    spec: KvSpec,
}

impl<B: Backend> Executor<B> {
    pub fn new(backend: B, model: Model<B>, n_blocks: usize, block_size: usize) -> Self {
        let spec = kv_spec(&model.cfg, backend.precision(), n_blocks, block_size);
        let kv = backend.alloc_kv(spec);
        Self {
            backend,
            model,
            kv,
            spec,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    pub fn kv_spec(&self) -> KvSpec {
        self.spec
    }

    pub fn model(&self) -> &Model<B> {
        &self.model
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Checks a step against the model and cache before any compute: a bad step is
    /// an error for that step, never a panic inside a kernel.
    fn validate(&self, step: &Step) -> Result<(), ExecutorError> {
        let cfg = &self.model.cfg;
        for s in &step.seqs {
            let bad = |reason: String| ExecutorError::BadStep {
                seq_id: s.seq_id,
                reason,
            };
            if s.tokens.is_empty() {
                return Err(bad("no tokens".into()));
            }
            if let Some(t) = s.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(bad(format!(
                    "token id {t} >= vocab size {}",
                    cfg.vocab_size
                )));
            }
            let ctx = s.first_pos + s.tokens.len();
            if ctx.div_ceil(self.spec.block_size) > s.blocks.len() {
                return Err(bad(format!(
                    "{} blocks cannot hold {ctx} tokens",
                    s.blocks.len()
                )));
            }
            if let Some(b) = s.blocks.iter().find(|&&b| b as usize >= self.spec.n_blocks) {
                return Err(bad(format!("block {b} >= {} blocks", self.spec.n_blocks)));
            }
        }
        Ok(())
    }

    /// Runs one forward pass over every sequence of `step`.
    pub fn step(&mut self, step: &Step) -> Result<StepOutput, ExecutorError> {
        self.validate(step)?;
        let bs = self.spec.block_size;
        let chunks: Vec<SeqChunk> = step
            .seqs
            .iter()
            .map(|s| {
                let ctx = s.first_pos + s.tokens.len();
                SeqChunk {
                    tokens: s.tokens.clone(),
                    first_pos: s.first_pos,
                    slots: (0..ctx)
                        .map(|p| s.blocks[p / bs] as usize * bs + p % bs)
                        .collect(),
                    all_logits: s.all_logits,
                }
            })
            .collect();
        let logits = self.model.forward(&self.backend, &mut self.kv, &chunks);
        Ok(StepOutput {
            logits,
            vocab_size: self.model.cfg.vocab_size,
        })
    }
}

type Job = (Step, mpsc::Sender<Result<StepOutput, ExecutorError>>);

/// An [`Executor`] on its own thread; steps are sent to it and answered by channel.
pub struct ExecutorHandle {
    tx: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    cfg: ModelConfig,
    spec: KvSpec,
}

impl ExecutorHandle {
    /// Moves `executor` to a new thread named `name`.
    pub fn spawn<B: Backend>(name: &str, mut executor: Executor<B>) -> std::io::Result<Self> {
        let cfg = executor.config().clone();
        let spec = executor.kv_spec();
        // One step in flight plus one queued: the caller waits for answers anyway.
        let (tx, rx) = mpsc::sync_channel::<Job>(1);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok((step, reply)) = rx.recv() {
                    let _ = reply.send(executor.step(&step));
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            cfg,
            spec,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn kv_spec(&self) -> KvSpec {
        self.spec
    }

    /// Submits a step; the answer arrives on the returned channel.
    pub fn submit(
        &self,
        step: Step,
    ) -> Result<mpsc::Receiver<Result<StepOutput, ExecutorError>>, ExecutorError> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or(ExecutorError::Stopped)?
            .send((step, reply))
            .map_err(|_| ExecutorError::Stopped)?;
        Ok(rx)
    }

    /// Submits a step and waits for its output.
    pub fn run(&self, step: Step) -> Result<StepOutput, ExecutorError> {
        self.submit(step)?
            .recv()
            .map_err(|_| ExecutorError::Stopped)?
    }
}

impl Drop for ExecutorHandle {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
