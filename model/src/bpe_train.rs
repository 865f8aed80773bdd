//! Byte-level BPE training producing tiktoken-style ranks (used to build test vocabularies).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use unicode_normalization::UnicodeNormalization;

type Pair = (u32, u32);

/// A merge candidate in the priority queue: highest count first, then smallest
/// (left bytes, right bytes). Entries go stale when counts change; stale ones are skipped.
#[derive(PartialEq, Eq)]
struct Candidate {
    count: i64,
    left: Vec<u8>,
    right: Vec<u8>,
    pair: Pair,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count
            .cmp(&other.count)
            .then_with(|| (&other.left, &other.right).cmp(&(&self.left, &self.right)))
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn candidate(tokens: &[Vec<u8>], pair: Pair, count: i64) -> Candidate {
    Candidate {
        count,
        left: tokens[pair.0 as usize].clone(),
        right: tokens[pair.1 as usize].clone(),
        pair,
    }
}

fn add_word(list: &mut Vec<u32>, word: u32) {
    if list.last() != Some(&word) {
        list.push(word);
    }
}

/// Trains a byte-level BPE on `text` (NFC-normalised, split with the Hunyuan pre-tokenizer
/// regex) and returns the ranks: the 256 single bytes in byte order, then one token per merge
/// in merge order. Each step merges the most frequent adjacent pair (ties: smallest
/// (left bytes, right bytes)). A merge whose bytes already exist as a token reuses that token
/// and adds no rank. Stops early, returning fewer than `256 + n_merges` ranks, when no pair is
/// left. Deterministic.
///
/// Pairs are counted over unique pre-tokenized words weighted by frequency and updated
/// incrementally, touching only the words that contain the merged pair.
pub fn train_bpe(text: &str, n_merges: usize) -> Vec<Vec<u8>> {
    let text: String = text.nfc().collect();
    let mut word_counts: HashMap<&str, i64> = HashMap::new();
    for m in crate::tokenizer::hunyuan_regex()
        .find_iter(&text)
        .filter_map(Result::ok)
    {
        *word_counts.entry(m.as_str()).or_insert(0) += 1;
    }
    let mut words: Vec<(&str, i64)> = word_counts.into_iter().collect();
    words.sort_unstable();
    let freqs: Vec<i64> = words.iter().map(|w| w.1).collect();
    let mut syms: Vec<Vec<u32>> = words
        .iter()
        .map(|(w, _)| w.bytes().map(u32::from).collect())
        .collect();

    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut token_ids: HashMap<Vec<u8>, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();

    let mut pair_counts: HashMap<Pair, i64> = HashMap::new();
    let mut pair_words: HashMap<Pair, Vec<u32>> = HashMap::new();
    for (wi, word) in syms.iter().enumerate() {
        for p in word.windows(2) {
            let pair = (p[0], p[1]);
            *pair_counts.entry(pair).or_insert(0) += freqs[wi];
            add_word(pair_words.entry(pair).or_default(), wi as u32);
        }
    }
    let mut heap: BinaryHeap<Candidate> = pair_counts
        .iter()
        .map(|(&pair, &count)| candidate(&tokens, pair, count))
        .collect();

    let target = 256 + n_merges;
    let mut delta: HashMap<Pair, i64> = HashMap::new();
    while tokens.len() < target {
        let Some(best) = heap.pop() else { break };
        if pair_counts.get(&best.pair) != Some(&best.count) {
            continue; // stale
        }
        let (a, b) = best.pair;
        let mut merged = best.left;
        merged.extend_from_slice(&best.right);
        let new_id = match token_ids.get(&merged) {
            Some(&id) => id,
            None => {
                let id = tokens.len() as u32;
                tokens.push(merged.clone());
                token_ids.insert(merged, id);
                id
            }
        };

        delta.clear();
        for wi in pair_words.remove(&best.pair).unwrap_or_default() {
            let word = &mut syms[wi as usize];
            if !word.windows(2).any(|p| p[0] == a && p[1] == b) {
                continue; // already merged (duplicate or stale word entry)
            }
            let f = freqs[wi as usize];
            for p in word.windows(2) {
                *delta.entry((p[0], p[1])).or_insert(0) -= f;
            }
            let mut out = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    out.push(new_id);
                    i += 2;
                } else {
                    out.push(word[i]);
                    i += 1;
                }
            }
            for p in out.windows(2) {
                let pair = (p[0], p[1]);
                *delta.entry(pair).or_insert(0) += f;
                add_word(pair_words.entry(pair).or_default(), wi);
            }
            *word = out;
        }
        for (&pair, &d) in &delta {
            if d == 0 {
                continue;
            }
            let count = pair_counts.entry(pair).or_insert(0);
            *count += d;
            if *count > 0 {
                let c = *count;
                heap.push(candidate(&tokens, pair, c));
            } else {
                pair_counts.remove(&pair);
            }
        }
        debug_assert!(!pair_counts.contains_key(&best.pair));
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Deterministic pseudo-English text of about `len` bytes.
    fn synthetic_text(len: usize) -> String {
        const WORDS: &[&str] = &[
            "the",
            "of",
            "and",
            "to",
            "in",
            "is",
            "was",
            "for",
            "that",
            "with",
            "lighthouse",
            "harbour",
            "keeper",
            "boats",
            "weather",
            "morning",
            "island",
            "light",
            "lens",
            "it's",
            "they'd",
            "we'll",
            "Margaret",
            "December",
            "ships",
            "waves",
            "wind",
            "notebook",
            "engineer",
            "stairs",
            "crowd",
            "storm",
            "home",
            "safely",
            "water",
            "中文",
            "Привет",
            "café",
            "naïve",
            "2024",
            "3.14",
            "—",
            "!",
            "?",
            ",",
            ".",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut out = String::with_capacity(len + 16);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state.is_multiple_of(3) {
                // An invented word from syllables, so the vocabulary keeps growing.
                const SYL: &[&str] = &[
                    "ka", "lo", "min", "ter", "sa", "vel", "or", "quin", "ba", "ru", "de", "ash",
                    "pe", "tion", "ing", "ex", "ul", "zo", "gri", "fen",
                ];
                for k in 0..1 + (state >> 20) % 4 {
                    out.push_str(SYL[((state >> (8 * k + 3)) % SYL.len() as u64) as usize]);
                }
            } else {
                out.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
            }
            out.push(match (state >> 32) % 17 {
                0 => '\n',
                1 => '\t',
                _ => ' ',
            });
        }
        out
    }

    #[test]
    fn basic_properties() {
        let text = synthetic_text(20_000);
        let ranks = train_bpe(&text, 500);
        assert_eq!(ranks.len(), 756);
        for (b, t) in ranks.iter().take(256).enumerate() {
            assert_eq!(t, &[b as u8]);
        }
        let unique: HashSet<&Vec<u8>> = ranks.iter().collect();
        assert_eq!(unique.len(), ranks.len());
        // The first merges are the most frequent pairs, e.g. "th"/" t"/"he" style pairs.
        assert!(ranks[256..].iter().all(|t| t.len() >= 2));
        assert_eq!(train_bpe(&text, 500), ranks, "deterministic");
        // A prefix of merges is the same regardless of how many are requested.
        assert_eq!(train_bpe(&text, 100)[..], ranks[..356]);
    }

    #[test]
    fn simple_counts() {
        // "aaab" words: pair (a,a) most frequent, then ties broken by smallest bytes.
        let ranks = train_bpe("aaaa aaaa aaaa bc bc", 3);
        assert_eq!(ranks[256], b"aa");
        assert_eq!(ranks[257], b"aaaa");
        // Remaining pairs (" a"? no: " aaaa" -> (" ", "aaaa") x2, (" ", "b") x2, ("b","c") x2):
        // counts tie at 2; smallest (left, right) bytes wins: (" ", "aaaa").
        assert_eq!(ranks[258], b" aaaa");
        assert_eq!(train_bpe("", 10).len(), 256);
        assert_eq!(train_bpe("ab", 10).len(), 257);
    }

    #[test]
    fn fast_enough() {
        let text = synthetic_text(200_000);
        let start = std::time::Instant::now();
        let ranks = train_bpe(&text, 4000);
        let elapsed = start.elapsed();
        eprintln!("train_bpe: 200 KB, {} ranks in {elapsed:?}", ranks.len());
        if !cfg!(debug_assertions) {
            assert!(elapsed.as_secs_f64() < 2.0, "{elapsed:?}");
        }
    }
}
