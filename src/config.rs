//! The `serve` configuration: one typed struct, resolved once from defaults, an optional
//! TOML file, environment variables and flags (in that order of precedence, lowest
//! first), then validated. Every environment variable is named here.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variables `serve` reads (flags of the same meaning override them).
pub mod env {
    pub const MODEL: &str = "HYSERVE_MODEL";
    pub const HTTP_ADDR: &str = "HYSERVE_HTTP_ADDR";
    pub const GRPC_ADDR: &str = "HYSERVE_GRPC_ADDR";
    pub const WORKERS: &str = "HYSERVE_WORKERS";
    pub const API_KEY_FILE: &str = "HYSERVE_API_KEY_FILE";
    pub const CONFIG: &str = "HYSERVE_CONFIG";
    pub const LOG_PROMPTS: &str = "HYSERVE_LOG_PROMPTS";
    pub const DEVICE: &str = "HYSERVE_DEVICE";
    pub const SPECULATION: &str = "HYSERVE_SPECULATION";
    pub const DRAFT_MODEL: &str = "HYSERVE_DRAFT_MODEL";
}

/// Everything `hyserve serve` needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Model directory; `None` is the embedded default model.
    pub model: Option<PathBuf>,
    /// Name clients use in `"model"`; default: the directory name.
    pub model_name: Option<String>,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// In-process worker actors (each an executor thread with its own KV cache).
    pub workers: usize,
    /// Kernel threads per worker; default: the cores divided among the workers.
    pub threads_per_worker: Option<usize>,
    /// Compute precision (`f32` or `bf16`); default: the checkpoint's.
    pub dtype: Option<String>,
    /// KV cache per worker, in MiB.
    pub kv_cache_mib: usize,
    pub block_size: usize,
    /// Token budget of one step per worker.
    pub max_batch_tokens: usize,
    /// Sequences running at once per worker.
    pub max_running: usize,
    /// Requests queued beyond the running ones before new ones get 429.
    pub max_waiting: usize,
    /// Largest prompt chunk one sequence prefills per step.
    pub prefill_chunk: usize,
    pub prefix_cache: bool,
    pub api_key_file: Option<PathBuf>,
    pub max_body_bytes: usize,
    /// Longest prompt accepted, in tokens; default: the model's context.
    pub max_prompt_tokens: Option<usize>,
    /// Largest `n` per request.
    pub max_n: usize,
    /// Write prompts and outputs to the logs (off by default).
    pub log_prompts: bool,
    /// A step slower than this marks the server not ready.
    pub step_timeout_secs: u64,
    /// Where workers compute: `cpu`, or `cuda` (worker i on GPU i).
    pub device: String,
    /// Seed of random weights made on the device instead of loading the checkpoint
    /// (throughput benchmarks at real dimensions; the directory needs only its config
    /// and tokenizer).
    pub random_weights: Option<u64>,
    /// Speculative decoding: `auto` (the draft model named by `draft_model`, else prompt
    /// lookup), `draft`, `ngram` or `off`.
    pub speculation: String,
    /// Draft model directory for `draft` speculation; default: the embedded default
    /// model's draft, when serving the embedded default.
    pub draft_model: Option<PathBuf>,
    /// Most tokens proposed per sequence and step (1..=15).
    pub spec_max_depth: usize,
    /// Propose exactly this many tokens wherever possible instead of adapting the depth
    /// to acceptance and load (benchmarks).
    pub spec_depth: Option<usize>,
    /// One depth for every sequence of a speculating step: `on`, `off`, or `auto` (on
    /// where steps are recorded as CUDA graphs, which replay only shapes seen before).
    pub spec_uniform: String,
    /// Step shapes (batch size, verification depth, context bound) a GPU worker records
    /// before serving, so that the first requests replay them (0: none; at most the
    /// 96 recordings a worker keeps). Off by default until the warm-up's GPU test and
    /// benchmark have run on a GPU host; 64 is the intended default.
    pub warm_up_shapes: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model: None,
            model_name: None,
            http_addr: "127.0.0.1:8000".parse().expect("valid"),
            grpc_addr: "127.0.0.1:50051".parse().expect("valid"),
            workers: 1,
            threads_per_worker: None,
            dtype: None,
            kv_cache_mib: 512,
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 256,
            prefill_chunk: 256,
            prefix_cache: true,
            api_key_file: None,
            max_body_bytes: 4 << 20,
            max_prompt_tokens: None,
            max_n: 16,
            log_prompts: false,
            step_timeout_secs: 30,
            device: "cpu".into(),
            random_weights: None,
            speculation: "auto".into(),
            draft_model: None,
            spec_max_depth: 6,
            spec_depth: None,
            spec_uniform: "auto".into(),
            warm_up_shapes: 0,
        }
    }
}

/// A configuration error naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("config `{field}`: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

impl ServeConfig {
    /// Reads a TOML file (unknown keys are errors).
    pub fn from_toml_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Checks ranges and relations once, so the rest of the program can trust them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workers == 0 || self.workers > 64 {
            return Err(bad(
                "workers",
                format!("{} is out of range 1..=64", self.workers),
            ));
        }
        if self.device != "cpu" && self.device != "cuda" {
            return Err(bad(
                "device",
                format!("'{}' is not cpu or cuda", self.device),
            ));
        }
        if self.device == "cuda" && self.dtype.as_deref() == Some("f32") {
            return Err(bad("dtype", "the CUDA backend computes in bf16"));
        }
        if self.threads_per_worker == Some(0) {
            return Err(bad("threads_per_worker", "must be >= 1"));
        }
        if let Some(d) = &self.dtype
            && d != "f32"
            && d != "bf16"
        {
            return Err(bad("dtype", format!("'{d}' is not f32 or bf16")));
        }
        if !(1..=1024).contains(&self.block_size) {
            return Err(bad(
                "block_size",
                format!("{} is out of range 1..=1024", self.block_size),
            ));
        }
        if self.kv_cache_mib == 0 {
            return Err(bad("kv_cache_mib", "must be >= 1"));
        }
        if self.max_batch_tokens == 0 {
            return Err(bad("max_batch_tokens", "must be >= 1"));
        }
        if self.max_running == 0 || self.max_running > self.max_batch_tokens {
            return Err(bad(
                "max_running",
                format!(
                    "{} must be in 1..=max_batch_tokens ({})",
                    self.max_running, self.max_batch_tokens
                ),
            ));
        }
        if self.prefill_chunk == 0 {
            return Err(bad("prefill_chunk", "must be >= 1"));
        }
        if self.max_n == 0 || self.max_n > 128 {
            return Err(bad(
                "max_n",
                format!("{} is out of range 1..=128", self.max_n),
            ));
        }
        if self.http_addr == self.grpc_addr && self.http_addr.port() != 0 {
            return Err(bad("grpc_addr", "must differ from http_addr"));
        }
        if self.step_timeout_secs == 0 {
            return Err(bad("step_timeout_secs", "must be >= 1"));
        }
        if !["auto", "draft", "ngram", "off"].contains(&self.speculation.as_str()) {
            return Err(bad(
                "speculation",
                format!("'{}' is not auto, draft, ngram or off", self.speculation),
            ));
        }
        if !(1..=15).contains(&self.spec_max_depth) {
            return Err(bad(
                "spec_max_depth",
                format!("{} is out of range 1..=15", self.spec_max_depth),
            ));
        }
        if !["auto", "on", "off"].contains(&self.spec_uniform.as_str()) {
            return Err(bad(
                "spec_uniform",
                format!("'{}' is not auto, on or off", self.spec_uniform),
            ));
        }
        let kept = hyserve_kernels::cuda::MAX_RECORDINGS;
        if self.warm_up_shapes > kept {
            return Err(bad(
                "warm_up_shapes",
                format!(
                    "{} is above {kept}, the recordings a worker keeps",
                    self.warm_up_shapes
                ),
            ));
        }
        if let Some(d) = self.spec_depth
            && !(1..=self.spec_max_depth).contains(&d)
        {
            return Err(bad(
                "spec_depth",
                format!(
                    "{d} is out of range 1..=spec_max_depth ({})",
                    self.spec_max_depth
                ),
            ));
        }
        Ok(())
    }
}

/// Whether speculating steps have one depth for every sequence
/// ([`SpecConfig::uniform`](hyserve_coordinator::scheduler::spec::SpecConfig)) under
/// the `spec_uniform` setting `on`, `off`, or `auto`: on for CUDA devices, whose steps
/// replay recorded graphs.
pub fn uniform_steps(setting: &str, device: &str) -> bool {
    match setting {
        "on" => true,
        "off" => false,
        _ => device == "cuda",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_toml_round_trips() {
        let c = ServeConfig::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<ServeConfig>(&text).unwrap(), c);
    }

    #[test]
    fn errors_name_the_setting() {
        for (toml_text, field) in [
            ("workers = 0", "workers"),
            ("dtype = \"f16\"", "dtype"),
            ("max_running = 1000", "max_running"),
            ("block_size = 0", "block_size"),
            ("speculation = \"eagle\"", "speculation"),
            ("spec_max_depth = 16", "spec_max_depth"),
            ("warm_up_shapes = 97", "warm_up_shapes"),
            ("spec_depth = 7", "spec_depth"),
            ("spec_uniform = \"yes\"", "spec_uniform"),
            (
                "http_addr = \"127.0.0.1:9000\"\ngrpc_addr = \"127.0.0.1:9000\"",
                "grpc_addr",
            ),
        ] {
            let c: ServeConfig = toml::from_str(toml_text).unwrap();
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field, "{toml_text}");
        }
        assert!(
            toml::from_str::<ServeConfig>("wrokers = 2").is_err(),
            "unknown keys are errors"
        );
    }
}
