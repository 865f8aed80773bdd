//! Turning a growing list of token ids into text a client can be shown: incremental
//! detokenization (a character split over several tokens is released once, whole) and stop
//! strings (text that could still become a stop string is held back until decided).

use hyserve_model::tokenizer::Tokenizer;

/// Incremental detokenizer of one sequence.
///
/// Decodes a window of recent tokens rather than the whole sequence each time: the bytes of
/// tokens already released are the window's prefix, and only what follows them is new. The
/// window keeps one released span as left context, so decoders whose output depends on the
/// neighbouring token (sentencepiece-style leading spaces) still decode the same text as
/// whole-sequence decoding; for byte-level BPE the result is exactly that of decoding all
/// tokens so far.
#[derive(Debug, Default)]
pub(crate) struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window (tokens before it are never decoded again).
    prefix_offset: usize,
    /// Tokens before this index have been released as text.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds a token; returns the text it completes (empty while a character is incomplete).
    pub(crate) fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let (text, complete) = self.pending(tok);
        if complete {
            self.advance();
            text
        } else {
            String::new()
        }
    }

    /// Releases whatever is left at the end of the sequence (an incomplete character
    /// becomes U+FFFD).
    pub(crate) fn finish(&mut self, tok: &Tokenizer) -> String {
        let (text, _) = self.pending(tok);
        self.advance();
        text
    }

    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
    }

    /// The unreleased text, and whether it ends on a character boundary.
    fn pending(&self, tok: &Tokenizer) -> (String, bool) {
        let window = &self.ids[self.prefix_offset..];
        let released = tok.decode_bytes_lossy(&window[..self.read_offset - self.prefix_offset]);
        let all = tok.decode_bytes_lossy(window);
        complete_utf8(all.get(released.len()..).unwrap_or_default())
    }
}

/// `bytes` as text, and whether it ends on a character boundary. Invalid sequences in the
/// middle become U+FFFD (they can never complete); an incomplete sequence at the end makes
/// the result "not complete" (the next token may finish it).
fn complete_utf8(mut bytes: &[u8]) -> (String, bool) {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return (out, true);
            }
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes = rest.get(n..).unwrap_or_default();
                    }
                    None => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        return (out, false);
                    }
                }
            }
        }
    }
}

/// What [`StopStrings::push`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StopScan {
    /// Text that can be released (it cannot be part of a stop string).
    Release(String),
    /// A stop string matched: the text before it, the last text of the sequence.
    Stopped(String),
}

/// Stop-string matching over text released piecewise.
#[derive(Debug, Default)]
pub(crate) struct StopStrings {
    stops: Vec<String>,
    /// Text held back because it could be the start of a stop string.
    held: String,
}

impl StopStrings {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> StopScan {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            self.held.truncate(at);
            return StopScan::Stopped(std::mem::take(&mut self.held));
        }
        // Hold the longest tail of the text that a stop string starts with.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        StopScan::Release(std::mem::replace(&mut self.held, rest))
    }

    /// The held text, at the end of the sequence (it never became a stop string).
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest proper prefix of `stop` that `text` ends with.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .map(|(i, _)| i)
        .skip(1)
        .filter(|&len| text.ends_with(&stop[..len]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the 256 single bytes plus the Hunyuan specials: every multi-byte
    /// character is split over several tokens.
    fn byte_tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let ranks: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        hyserve_model::tokenizer::write_tiktoken_dir(dir.path(), &ranks).unwrap();
        Tokenizer::from_dir(dir.path()).unwrap()
    }

    #[test]
    fn multibyte_character_is_released_once_whole() {
        let tok = byte_tokenizer();
        let mut d = IncrementalDecoder::default();
        let ids = tok.encode("aé€b", false).unwrap();
        assert_eq!(ids.len(), 1 + 2 + 3 + 1);
        let out: Vec<String> = ids.iter().map(|&id| d.push(&tok, id)).collect();
        assert_eq!(out, ["a", "", "é", "", "", "€", "b"]);
        assert_eq!(d.finish(&tok), "");
    }

    #[test]
    fn truncated_character_is_replaced_at_the_end() {
        let tok = byte_tokenizer();
        let mut d = IncrementalDecoder::default();
        let ids = tok.encode("é", false).unwrap();
        assert_eq!(d.push(&tok, ids[0]), "");
        assert_eq!(d.finish(&tok), "\u{FFFD}");
    }

    #[test]
    fn invalid_bytes_do_not_stall_the_stream() {
        let tok = byte_tokenizer();
        let mut d = IncrementalDecoder::default();
        // A lone continuation byte can never become valid: released at once.
        assert_eq!(d.push(&tok, 0x80), "\u{FFFD}");
        assert_eq!(d.push(&tok, u32::from(b'x')), "x");
    }

    #[test]
    fn ids_past_the_tokenizer_decode_to_nothing() {
        let tok = byte_tokenizer();
        let mut d = IncrementalDecoder::default();
        assert_eq!(d.push(&tok, u32::from(b'a')), "a");
        // A padding row of the model's vocabulary: no text, no error.
        assert_eq!(d.push(&tok, 10_000_000), "");
        assert_eq!(d.push(&tok, u32::from(b'b')), "b");
    }

    #[test]
    fn stop_string_split_across_pushes_is_held_then_cut() {
        let mut s = StopStrings::new(vec!["STOP".into(), "\n\n".into()]);
        assert_eq!(s.push("hello S"), StopScan::Release("hello ".into()));
        assert_eq!(s.push("T"), StopScan::Release(String::new()));
        assert_eq!(s.push("OP and more"), StopScan::Stopped(String::new()));
        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("ab ST"), StopScan::Release("ab ".into()));
        // Not a stop after all: the held text comes out with what follows.
        assert_eq!(s.push("EP"), StopScan::Release("STEP".into()));
        assert_eq!(s.push("x\n"), StopScan::Release("x\n".into()));
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn stop_string_inside_one_push_truncates_and_earliest_wins() {
        let mut s = StopStrings::new(vec!["cd".into(), "b".into()]);
        assert_eq!(s.push("abcd"), StopScan::Stopped("a".into()));
        let mut s = StopStrings::new(vec!["ééx".into()]);
        assert_eq!(s.push("aé"), StopScan::Release("a".into()));
        assert_eq!(s.push("é"), StopScan::Release(String::new()));
        assert_eq!(s.flush(), "éé");
        let mut none = StopStrings::new(vec![]);
        assert_eq!(none.push("anything"), StopScan::Release("anything".into()));
    }
}
