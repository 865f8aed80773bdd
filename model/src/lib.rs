//! The Hunyuan model family: configuration, checkpoints, tokenizer and the layer graph.
//!
//! Knows nothing of actors, networks or placement: it turns a model directory into
//! weights on a [`hyserve_kernels::Backend`] and runs a batch of tokens through them.
//!
//! - [`config`]: `config.json` into a validated [`ModelConfig`].
//! - [`checkpoint`]: safetensors and PyTorch `.bin` shards into named host tensors,
//!   with the expected-name/shape check of [`names`]; [`torch_bin`] is the restricted
//!   reader (and writer) of `torch.save` zip files.
//! - [`tokenizer`]: `hy.tiktoken` and HF `tokenizer.json`, chat templates;
//!   [`bpe_train`] trains small byte-level BPE vocabularies for generated models.
//! - [`graph`]: the forward pass (attention with CLA, MoE) over a backend, whole or
//!   with the experts spread over workers through an [`exchange`].
//! - [`init`]: seeded random models of the real architectures in the real formats.

#![forbid(unsafe_code)]

pub mod bpe_train;
pub mod checkpoint;
pub mod config;
pub mod exchange;
pub mod graph;
pub mod init;
pub mod names;
pub mod tokenizer;
pub mod torch_bin;

pub use checkpoint::{Checkpoint, CheckpointError, Format};
pub use config::{Arch, ConfigError, LayerSpec, ModelConfig};
pub use exchange::{Exchange, ExchangeError, InProcess, Round, Rows};
pub use graph::{EpTiming, ExpertParallel, LoadProgress, Logits, Model, SeqChunk, expert_of};
