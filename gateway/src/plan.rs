//! From the sampling options of a request (HTTP or gRPC: the same rules for both) to the `n`
//! engine requests that serve it: range checks that name the offending field, the context
//! length check, stop tokens and per-choice seeds.

use hyserve_coordinator::api::{GenerateRequest, ModelInfo, ServeError, TokenStream};
use hyserve_kernels::sampling::SamplingParams;

use crate::server::State;

/// The largest number of alternatives per position a client may ask for.
pub(crate) const MAX_TOP_LOGPROBS: u64 = 20;
/// The most stop strings per request (as OpenAI).
pub(crate) const MAX_STOP_STRINGS: usize = 4;

/// How many tokens to generate when the request does not say.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DefaultMaxTokens {
    Fixed(usize),
    /// Whatever the context has left after the prompt (chat, as OpenAI).
    RestOfContext,
}

/// The request fields that shape generation, as the client sent them (unchecked).
#[derive(Debug, Default)]
pub(crate) struct Options {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub n: Option<u64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Alternatives per position; `None`: no logprobs at all.
    pub logprobs: Option<u64>,
    /// `"auto"` (or absent): the engine may speculate; `"off"`: it must not.
    pub speculation: Option<String>,
}

/// The names under which a protocol carries the fields whose name differs between
/// endpoints, so errors name what the client actually sent.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FieldNames {
    pub prompt: &'static str,
    pub max_tokens: &'static str,
    pub logprobs: &'static str,
}

/// A checked request: everything needed to submit its choices.
#[derive(Debug)]
pub(crate) struct Plan {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub n: usize,
    /// Choice `i` uses `seed + i`.
    pub seed: u64,
    pub stop: Vec<String>,
    /// Tokens that end a choice (the model's stop ids unless `ignore_eos`, plus the
    /// request's own); they are counted but not shown.
    pub stop_token_ids: Vec<u32>,
    pub logprobs: Option<usize>,
    pub speculate: bool,
}

fn check_range(
    field: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    default: f64,
) -> Result<f32, ServeError> {
    match v {
        None => Ok(default as f32),
        Some(x) if (lo..=hi).contains(&x) => Ok(x as f32),
        Some(_) => Err(ServeError::invalid(
            field,
            format!("`{field}` must be between {lo} and {hi}"),
        )),
    }
}

impl Plan {
    pub(crate) fn new(
        state: &State,
        prompt: Vec<u32>,
        opts: Options,
        names: FieldNames,
        default_max_tokens: DefaultMaxTokens,
    ) -> Result<Self, ServeError> {
        let info: &ModelInfo = &state.model;
        if prompt.is_empty() {
            return Err(ServeError::invalid(names.prompt, "the prompt is empty"));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= info.vocab_size) {
            return Err(ServeError::invalid(
                names.prompt,
                format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    info.vocab_size
                ),
            ));
        }
        if prompt.len() > state.cfg.max_prompt_tokens {
            return Err(ServeError::invalid(
                names.prompt,
                format!(
                    "the prompt has {} tokens; this server accepts at most {}",
                    prompt.len(),
                    state.cfg.max_prompt_tokens
                ),
            ));
        }
        if prompt.len() >= info.max_context {
            return Err(ServeError::invalid(
                names.prompt,
                format!(
                    "this model's maximum context length is {} tokens, and the prompt has {} \
                     (no room left to generate)",
                    info.max_context,
                    prompt.len()
                ),
            ));
        }
        let room = info.max_context - prompt.len();
        let max_tokens = match opts.max_tokens {
            Some(0) => {
                return Err(ServeError::invalid(
                    names.max_tokens,
                    format!("`{}` must be at least 1", names.max_tokens),
                ));
            }
            Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
            None => match default_max_tokens {
                DefaultMaxTokens::Fixed(m) => m,
                DefaultMaxTokens::RestOfContext => room,
            },
        };
        if max_tokens > room {
            return Err(ServeError::invalid(
                names.max_tokens,
                format!(
                    "this model's maximum context length is {} tokens; the prompt has {} and \
                     {max_tokens} more were requested",
                    info.max_context,
                    prompt.len()
                ),
            ));
        }

        let n = match opts.n {
            None => 1,
            Some(n) if n >= 1 && n <= state.cfg.max_n as u64 => n as usize,
            Some(_) => {
                return Err(ServeError::invalid(
                    "n",
                    format!("`n` must be between 1 and {}", state.cfg.max_n),
                ));
            }
        };

        let temperature = check_range("temperature", opts.temperature, 0.0, 2.0, 1.0)?;
        let top_p = match opts.top_p {
            Some(p) if p <= 0.0 => Err(ServeError::invalid("top_p", "`top_p` must be in (0, 1]")),
            p => check_range("top_p", p, 0.0, 1.0, 1.0),
        }?;
        let top_k = match opts.top_k {
            // -1 is the common spelling of "disabled" among OpenAI-compatible servers.
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(_) => {
                return Err(ServeError::invalid(
                    "top_k",
                    "`top_k` must be positive, or 0 or -1 to disable it",
                ));
            }
        };
        let min_p = check_range("min_p", opts.min_p, 0.0, 1.0, 0.0)?;
        let presence_penalty =
            check_range("presence_penalty", opts.presence_penalty, -2.0, 2.0, 0.0)?;
        let frequency_penalty =
            check_range("frequency_penalty", opts.frequency_penalty, -2.0, 2.0, 0.0)?;
        let repetition_penalty = match opts.repetition_penalty {
            None => 1.0,
            Some(r) if r > 0.0 && r.is_finite() && r <= f32::MAX as f64 => r as f32,
            Some(_) => {
                return Err(ServeError::invalid(
                    "repetition_penalty",
                    "`repetition_penalty` must be greater than 0",
                ));
            }
        };

        if opts.stop.len() > MAX_STOP_STRINGS {
            return Err(ServeError::invalid(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings are allowed"),
            ));
        }
        if opts.stop.iter().any(String::is_empty) {
            return Err(ServeError::invalid(
                "stop",
                "stop strings must not be empty",
            ));
        }
        if let Some(&bad) = opts
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= info.vocab_size)
        {
            return Err(ServeError::invalid(
                "stop_token_ids",
                format!("token id {bad} is outside the vocabulary"),
            ));
        }
        let logprobs = match opts.logprobs {
            None => None,
            Some(k) if k <= MAX_TOP_LOGPROBS => Some(k as usize),
            Some(_) => {
                return Err(ServeError::invalid(
                    names.logprobs,
                    format!(
                        "`{}` must be between 0 and {MAX_TOP_LOGPROBS}",
                        names.logprobs
                    ),
                ));
            }
        };

        let speculate = match opts.speculation.as_deref() {
            None | Some("") | Some("auto") => true,
            Some("off") => false,
            Some(_) => {
                return Err(ServeError::invalid(
                    "speculation",
                    "`speculation` must be \"auto\" or \"off\"",
                ));
            }
        };

        let mut stop_token_ids = if opts.ignore_eos {
            Vec::new()
        } else {
            state.tokenizer.stop_ids().to_vec()
        };
        for id in opts.stop_token_ids {
            if !stop_token_ids.contains(&id) {
                stop_token_ids.push(id);
            }
        }

        Ok(Plan {
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                presence_penalty,
                frequency_penalty,
                seed: None,
            },
            n,
            seed: opts.seed.unwrap_or_else(rand::random),
            stop: opts.stop,
            stop_token_ids,
            logprobs,
            speculate,
        })
    }

    /// Submits every choice. If one is refused, the ones already queued are dropped
    /// (which cancels them) and the refusal is the answer.
    pub(crate) fn submit(
        &self,
        state: &State,
        request_id: &str,
    ) -> Result<Vec<TokenStream>, ServeError> {
        if state.draining.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ServeError::Unavailable {
                message: "the server is draining before it stops; retry on another replica".into(),
            });
        }
        if state.cfg.log_prompts {
            // Lossy: the prompt may be token ids that are not whole characters.
            let text = String::from_utf8_lossy(&state.tokenizer.decode_bytes_lossy(&self.prompt))
                .into_owned();
            tracing::info!(request_id, prompt = %text, "prompt");
        }
        (0..self.n)
            .map(|i| {
                state.engine.submit(GenerateRequest {
                    request_id: format!("{request_id}-{i}"),
                    prompt: self.prompt.clone(),
                    sampling: SamplingParams {
                        seed: Some(self.seed.wrapping_add(i as u64)),
                        ..self.sampling.clone()
                    },
                    max_tokens: self.max_tokens,
                    stop_token_ids: self.stop_token_ids.clone(),
                    logprobs: self.logprobs,
                    speculate: self.speculate,
                })
            })
            .collect()
    }
}
