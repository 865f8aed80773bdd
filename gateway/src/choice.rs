//! One choice of a request as the client sees it: engine token events in, released text with
//! the tokens behind it out, ending with a finish reason and usage. Shared by the HTTP and
//! gRPC fronts so both detokenize, stop and count the same way.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::Stream;
use hyserve_coordinator::api::{FinishReason, ServeError, TokenEvent, TokenStream};
use hyserve_model::tokenizer::Tokenizer;

use crate::detok::{IncrementalDecoder, StopScan, StopStrings};
use crate::plan::Plan;
use crate::request::Tracker;

/// A token or an alternative to it, with its text.
#[derive(Clone, Debug)]
pub(crate) struct TokenText {
    pub id: u32,
    /// The token's own bytes (may be part of a character).
    pub bytes: Vec<u8>,
    /// `bytes` as text, with U+FFFD for a partial character.
    pub text: String,
    pub logprob: f32,
}

/// A generated token, with its alternatives when logprobs were requested.
#[derive(Clone, Debug)]
pub(crate) struct TokenOut {
    pub token: TokenText,
    pub top: Vec<TokenText>,
}

#[derive(Debug)]
pub(crate) enum ChoiceEvent {
    /// Text that is now final, and the tokens released with it.
    Delta {
        text: String,
        tokens: Vec<TokenOut>,
    },
    Finished {
        reason: FinishReason,
        completion_tokens: usize,
        cached_tokens: usize,
    },
    Failed(ServeError),
}

/// Drives one engine sequence.
pub(crate) struct Choice {
    pub index: usize,
    /// `None` once finished; dropping it cancels the engine sequence.
    stream: Option<TokenStream>,
    tokenizer: Arc<Tokenizer>,
    tracker: Arc<Tracker>,
    decoder: IncrementalDecoder,
    stops: StopStrings,
    stop_token_ids: Vec<u32>,
    /// Tokens whose text is still held back.
    held_tokens: Vec<TokenOut>,
    completion_tokens: usize,
    outbox: VecDeque<ChoiceEvent>,
    /// The output so far, kept only to be logged, and only when prompts may be logged.
    log: Option<String>,
}

impl Choice {
    /// One `Choice` per submitted stream, in choice order.
    pub(crate) fn for_streams(
        streams: Vec<TokenStream>,
        plan: &Plan,
        tokenizer: &Arc<Tokenizer>,
        tracker: &Arc<Tracker>,
        log_output: bool,
    ) -> Vec<Choice> {
        streams
            .into_iter()
            .enumerate()
            .map(|(index, stream)| Choice {
                index,
                stream: Some(stream),
                tokenizer: Arc::clone(tokenizer),
                tracker: Arc::clone(tracker),
                decoder: IncrementalDecoder::default(),
                stops: StopStrings::new(plan.stop.clone()),
                stop_token_ids: plan.stop_token_ids.clone(),
                held_tokens: Vec::new(),
                completion_tokens: 0,
                outbox: VecDeque::new(),
                log: log_output.then(String::new),
            })
            .collect()
    }

    /// The next event; `None` after `Finished` or `Failed`.
    pub(crate) async fn next(&mut self) -> Option<ChoiceEvent> {
        loop {
            if let Some(ev) = self.outbox.pop_front() {
                return Some(ev);
            }
            let stream = self.stream.as_mut()?;
            let event = stream.events.recv().await;
            match event {
                Some(TokenEvent::Token { id, logprob, top }) => self.on_token(id, logprob, &top),
                Some(TokenEvent::Finished { reason, usage }) => {
                    let stopped = self.flush();
                    self.finish(
                        if stopped { FinishReason::Stop } else { reason },
                        usage.completion_tokens.max(self.completion_tokens),
                        usage.cached_tokens,
                    )
                }
                Some(TokenEvent::Failed(e)) => self.fail(e),
                None => self.fail(ServeError::Internal {
                    message: "the engine ended the sequence without finishing it".into(),
                }),
            }
        }
    }

    /// This choice as a stream of events (consumes it; dropping the stream cancels).
    pub(crate) fn into_stream(self) -> impl Stream<Item = (usize, ChoiceEvent)> + Send {
        futures::stream::unfold(self, |mut c| async move {
            let ev = c.next().await?;
            Some(((c.index, ev), c))
        })
    }

    fn on_token(
        &mut self,
        id: u32,
        logprob: Option<f32>,
        top: &[hyserve_coordinator::api::TokenLogprob],
    ) {
        self.completion_tokens += 1;
        self.tracker.token_arrived();
        // The stop token ends the choice; like OpenAI, its text is not part of the output.
        if self.stop_token_ids.contains(&id) {
            return;
        }
        let text = self.decoder.push(&self.tokenizer, id);
        self.held_tokens.push(TokenOut {
            token: self.token_text(id, logprob.unwrap_or(f32::NAN)),
            top: top
                .iter()
                .map(|t| self.token_text(t.id, t.logprob))
                .collect(),
        });
        match self.stops.push(&text) {
            StopScan::Release(text) => {
                if !text.is_empty() {
                    self.release(text);
                }
            }
            StopScan::Stopped(text) => {
                self.release(text);
                // `finish` drops the engine stream, which cancels the sequence. The engine's
                // usage (with the cached-token count) never comes for it, hence 0.
                self.finish(FinishReason::Stop, self.completion_tokens, 0);
            }
        }
    }

    /// End of the sequence: the decoder's and the stop matcher's held text is final.
    /// Returns whether that last text completed a stop string.
    fn flush(&mut self) -> bool {
        let tail = self.decoder.finish(&self.tokenizer);
        let (text, stopped) = match self.stops.push(&tail) {
            StopScan::Release(t) => (t + &self.stops.flush(), false),
            StopScan::Stopped(t) => (t, true),
        };
        if !text.is_empty() || !self.held_tokens.is_empty() {
            self.release(text);
        }
        stopped
    }

    fn release(&mut self, text: String) {
        if let Some(out) = &mut self.log {
            out.push_str(&text);
        }
        let tokens = std::mem::take(&mut self.held_tokens);
        self.outbox.push_back(ChoiceEvent::Delta { text, tokens });
    }

    fn finish(&mut self, reason: FinishReason, completion_tokens: usize, cached_tokens: usize) {
        self.stream = None;
        if let Some(out) = self.log.take() {
            tracing::info!(
                request_id = %self.tracker.request_id,
                choice = self.index,
                output = %out,
                "generated"
            );
        }
        self.outbox.push_back(ChoiceEvent::Finished {
            reason,
            completion_tokens,
            cached_tokens,
        });
    }

    fn fail(&mut self, e: ServeError) {
        self.stream = None;
        self.outbox.clear();
        self.outbox.push_back(ChoiceEvent::Failed(e));
    }

    fn token_text(&self, id: u32, logprob: f32) -> TokenText {
        // An id the tokenizer cannot decode is shown as empty text; the decoder reports it.
        let bytes = self.tokenizer.decode_bytes(&[id]).unwrap_or_default();
        TokenText {
            id,
            text: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
        }
    }
}
