//! Wire types of hyserve: the only crate that defines what crosses a process boundary.
//!
//! - [`v1`]: the public inference API (`hyserve/v1/inference.proto`, package `hyserve.v1`):
//!   prost messages plus the tonic client and server of the `Inference` service. The
//!   compatibility rules of the package are written at the top of the `.proto` file.
//!
//! - [`cluster`]: the coordinator-worker control protocol and the worker-worker
//!   activation stream (`hyserve/cluster/v1/cluster.proto`, package `hyserve.cluster.v1`).

#![forbid(unsafe_code)]

use std::fmt;

/// Version of the hyserve wire protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// `hyserve.v1`: the inference API.
pub mod v1 {
    // Generated code: its style is prost's, not ours.
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("hyserve.v1");
}

/// `hyserve.cluster.v1`: coordinator-worker control and worker-worker activations.
pub mod cluster {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("hyserve.cluster.v1");
}

// Prompts and generated text must never reach a log through `{:?}`, so the messages that
// carry them print sizes instead (see `REDACTED_DEBUG` in build.rs).

impl fmt::Debug for v1::GenerateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateRequest")
            .field("input", &self.input)
            .field("chat", &self.chat)
            .field("max_tokens", &self.max_tokens)
            .field("temperature", &self.temperature)
            .field("top_p", &self.top_p)
            .field("top_k", &self.top_k)
            .field("min_p", &self.min_p)
            .field("presence_penalty", &self.presence_penalty)
            .field("frequency_penalty", &self.frequency_penalty)
            .field("repetition_penalty", &self.repetition_penalty)
            .field("seed", &self.seed)
            .field("stop", &format_args!("[{} strings]", self.stop.len()))
            .field("stop_token_ids", &self.stop_token_ids)
            .field("ignore_eos", &self.ignore_eos)
            .field("logprobs", &self.logprobs)
            .field("top_logprobs", &self.top_logprobs)
            .field("model", &self.model)
            .field("speculation", &self.speculation)
            .finish()
    }
}

impl fmt::Debug for v1::generate_request::Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(t) => write!(f, "Text([{} bytes])", t.len()),
            Self::TokenIds(ids) => write!(f, "TokenIds([{} ids])", ids.ids.len()),
        }
    }
}

impl fmt::Debug for v1::GenerateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateResponse")
            .field("text", &format_args!("[{} bytes]", self.text.len()))
            .field("tokens", &format_args!("[{} tokens]", self.tokens.len()))
            .field("finish_reason", &self.finish_reason())
            .field("usage", &self.usage)
            .field("model", &self.model)
            .finish()
    }
}

impl fmt::Debug for v1::GenerateStreamResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateStreamResponse")
            .field("text", &format_args!("[{} bytes]", self.text.len()))
            .field("tokens", &format_args!("[{} tokens]", self.tokens.len()))
            .field("finish_reason", &self.finish_reason())
            .field("usage", &self.usage)
            .finish()
    }
}

impl fmt::Debug for v1::Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .field("logprob", &self.logprob)
            .field("top_logprobs", &self.top_logprobs)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for v1::TopLogprob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopLogprob")
            .field("id", &self.id)
            .field("logprob", &self.logprob)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::v1;

    #[test]
    fn debug_output_never_contains_text() {
        let req = v1::GenerateRequest {
            input: Some(v1::generate_request::Input::Text("secret prompt".into())),
            stop: vec!["secret stop".into()],
            ..Default::default()
        };
        let resp = v1::GenerateStreamResponse {
            text: "secret output".into(),
            tokens: vec![v1::Token {
                id: 1,
                text: "secret token".into(),
                logprob: -0.5,
                top_logprobs: vec![v1::TopLogprob {
                    id: 2,
                    text: "secret alternative".into(),
                    logprob: -1.0,
                }],
            }],
            ..Default::default()
        };
        let full = v1::GenerateResponse {
            text: "secret output".into(),
            ..Default::default()
        };
        for s in [format!("{req:?}"), format!("{resp:?}"), format!("{full:?}")] {
            assert!(!s.contains("secret"), "{s}");
        }
    }
}
