//! Tokenizer for hyserve: Tencent Hunyuan `hy.tiktoken` vocabularies (tiktoken byte-level BPE)
//! and Hugging Face `tokenizer.json` files, plus chat-prompt rendering.
//!
//! # Hunyuan (`hy.tiktoken`)
//!
//! * File format: one `base64(token_bytes) rank` per line. Every rank must be unique, every token
//!   must be unique and all 256 single bytes must be present (tiktoken needs them to encode
//!   arbitrary bytes). Blank lines are ignored. Errors name the file and the 1-based line.
//! * Special tokens come from `tokenizer_config.json` `added_tokens_decoder` when that field is
//!   present; otherwise the Hunyuan list ([`hunyuan_special_tokens`]) is placed from
//!   id = max rank + 1 (= number of ranks for a contiguous file, 127,957 for the real one).
//! * Encoding: NFC normalisation, then tiktoken's algorithm (split with [`HUNYUAN_PATTERN`], then
//!   byte-pair merge by lowest rank), done by `tiktoken-rs`' `CoreBPE`.
//! * Stop ids: `<|eos|>` and `<|extra_5|>` (127960 and 127967 in the real vocabulary), looked up
//!   by name, plus the config's `eos_token` and any special token whose name marks an end of
//!   turn (see [`Tokenizer::stop_ids`]).
//! * BOS: the config's `bos_token`, else `<|bos|>` (as Tencent's `tokenization_hy.py`). Nothing
//!   is prepended by [`Tokenizer::encode`]; the built-in chat template starts every turn with
//!   `<|startoftext|>` itself.
//!
//! # Hugging Face (`tokenizer.json`)
//!
//! Loaded with the `tokenizers` crate (pure Rust build, `fancy-regex` instead of onig). The
//! tokenizer's own normalizer is used (no extra NFC, so results match the Python reference), and
//! no post-processor tokens (BOS etc.) are added: templated prompts carry their own.
//!
//! # Chat templates
//!
//! A Jinja `chat_template` from `tokenizer_config.json` is rendered with minijinja (+ Python
//! string/dict methods from `minijinja-contrib`'s `pycompat`) and HF's settings
//! (`trim_blocks`, `lstrip_blocks`). Without one, the built-in Hunyuan template is used; see
//! [`Tokenizer::apply_chat_template`].

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};
use unicode_normalization::{UnicodeNormalization, is_nfc};

pub use crate::bpe_train::train_bpe;

/// Hunyuan pre-tokenizer regex (single digits; trailing whitespace handled by `\s+(?!\S)`).
pub const HUNYUAN_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// File names looked up by [`Tokenizer::from_dir`].
pub const TIKTOKEN_FILE: &str = "hy.tiktoken";
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

const HY_STARTOFTEXT: &str = "<|startoftext|>";
const HY_BOS: &str = "<|bos|>";
const HY_EOS: &str = "<|eos|>";
const HY_PAD: &str = "<|pad|>";
/// Ends a user turn; the assistant's reply follows it.
const HY_USER_END: &str = "<|extra_0|>";
/// Separates the system prompt from the first user message.
const HY_SYSTEM_END: &str = "<|extra_4|>";
/// Second Hunyuan stop token (127967 in the real vocabulary).
const HY_EXTRA_STOP: &str = "<|extra_5|>";
const HY_NUM_EXTRA: usize = 204;

/// Special-token names (without `<|`, `|>`, `<`, `>`; lower case) treated as end-of-turn/eos stops.
const STOP_NAMES: &[&str] = &[
    "eos",
    "eot",
    "eot_id",
    "eom_id",
    "im_end",
    "end_of_turn",
    "endofturn",
    "end",
    "/s",
];

/// Hunyuan special token names in id order: `<|endoftext|>`, `<|startoftext|>`, `<|bos|>`,
/// `<|eos|>`, `<|pad|>`, `<|extra_0|>` .. `<|extra_203|>` (209 total).
pub fn hunyuan_special_tokens() -> Vec<String> {
    let mut v: Vec<String> = ["<|endoftext|>", HY_STARTOFTEXT, HY_BOS, HY_EOS, HY_PAD]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend((0..HY_NUM_EXTRA).map(|i| format!("<|extra_{i}|>")));
    v
}

/// The compiled [`HUNYUAN_PATTERN`] (shared by training and tests).
pub(crate) fn hunyuan_regex() -> &'static fancy_regex::Regex {
    static RE: LazyLock<fancy_regex::Regex> = LazyLock::new(|| {
        fancy_regex::Regex::new(HUNYUAN_PATTERN).expect("HUNYUAN_PATTERN is a valid regex")
    });
    &RE
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {msg}", .path.display())]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: field `{field}`: {msg}", .path.display())]
    Field {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error("{}: {msg}", .path.display())]
    File { path: PathBuf, msg: String },
    #[error(
        "no tokenizer in {}: expected `{TIKTOKEN_FILE}` or `{HF_TOKENIZER_FILE}`",
        .0.display()
    )]
    NotFound(PathBuf),
    #[error("unknown token id {0}")]
    UnknownId(u32),
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("chat message {index}: {msg}")]
    ChatMessage { index: usize, msg: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenizerError + '_ {
    move |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The fields of `tokenizer_config.json` that matter here.
#[derive(Default)]
struct TokenizerConfig {
    /// `added_tokens_decoder` as (id, content), sorted by id.
    added_tokens: Option<Vec<(u32, String)>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

impl TokenizerConfig {
    fn read(path: &Path) -> Result<Self, TokenizerError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let file_err = |msg: String| TokenizerError::File {
            path: path.to_path_buf(),
            msg,
        };
        let field_err = |field: &str, msg: String| TokenizerError::Field {
            path: path.to_path_buf(),
            field: field.to_string(),
            msg,
        };
        let value: Value =
            serde_json::from_str(&text).map_err(|e| file_err(format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| file_err("top level must be a JSON object".into()))?;

        let added_tokens = match obj.get("added_tokens_decoder") {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => {
                let mut list = Vec::with_capacity(map.len());
                for (key, entry) in map {
                    let field = format!("added_tokens_decoder.{key}");
                    let id: u32 = key
                        .parse()
                        .map_err(|_| field_err(&field, "key is not a token id".into()))?;
                    let content = entry
                        .get("content")
                        .and_then(Value::as_str)
                        .ok_or_else(|| field_err(&field, "missing string `content`".into()))?;
                    if content.is_empty() {
                        return Err(field_err(&field, "empty `content`".into()));
                    }
                    list.push((id, content.to_string()));
                }
                list.sort_unstable();
                Some(list)
            }
            Some(_) => {
                return Err(field_err(
                    "added_tokens_decoder",
                    "must be an object mapping ids to tokens".into(),
                ));
            }
        };

        let token_field = |name: &str| -> Result<Option<String>, TokenizerError> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(field_err(name, "object without string `content`".into())),
                },
                Some(_) => Err(field_err(
                    name,
                    "must be a string, an object or null".into(),
                )),
            }
        };
        let bos_token = token_field("bos_token")?;
        let eos_token = token_field("eos_token")?;

        let chat_template = match obj.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // HF allows a list of named templates; use the one named "default".
            Some(Value::Array(list)) => {
                let found = list.iter().find(|t| {
                    t.get("name").and_then(Value::as_str) == Some("default")
                        && t.get("template").is_some_and(Value::is_string)
                });
                match found
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                {
                    Some(s) => Some(s.to_string()),
                    None => {
                        return Err(field_err(
                            "chat_template",
                            "list has no template named \"default\"".into(),
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(field_err(
                    "chat_template",
                    "must be a string or a list of {name, template}".into(),
                ));
            }
        };

        Ok(Self {
            added_tokens,
            bos_token,
            eos_token,
            chat_template,
        })
    }
}

struct TiktokenBackend {
    bpe: tiktoken_rs::CoreBPE,
    /// Regular token bytes -> id (for [`Tokenizer::token_id`]).
    encoder: HashMap<Vec<u8>, u32>,
}

struct HfBackend {
    /// Matches added/special tokens in text.
    tok: tokenizers::Tokenizer,
    /// Same tokenizer with `encode_special_tokens` on: special strings are encoded as text.
    plain: tokenizers::Tokenizer,
    /// Added-token id -> content (decoded verbatim by `decode_bytes`).
    added: HashMap<u32, String>,
    /// GPT-2 byte-level char -> byte, when the decoder is `ByteLevel`.
    byte_level: Option<HashMap<char, u8>>,
}

enum Backend {
    Tiktoken(Box<TiktokenBackend>),
    Hf(Box<HfBackend>),
}

/// A loaded tokenizer. `Send + Sync`; share it behind an `Arc`.
pub struct Tokenizer {
    backend: Backend,
    /// Special token content -> id.
    specials: HashMap<String, u32>,
    vocab_size: usize,
    stop_ids: Vec<u32>,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat: Option<minijinja::Environment<'static>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.backend {
            Backend::Tiktoken(_) => "tiktoken",
            Backend::Hf(_) => "huggingface",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab_size)
            .field("num_specials", &self.specials.len())
            .field("stop_ids", &self.stop_ids)
            .field("bos_id", &self.bos_id)
            .field("jinja_chat_template", &self.chat.is_some())
            .finish()
    }
}

/// Parses `hy.tiktoken`. Returns token bytes -> rank and the largest rank.
fn parse_tiktoken(
    path: &Path,
    data: &[u8],
) -> Result<(HashMap<Vec<u8>, u32>, u32), TokenizerError> {
    let line_err = |line: usize, msg: String| TokenizerError::Line {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut encoder: HashMap<Vec<u8>, u32> = HashMap::with_capacity(data.len() / 12);
    // (rank, line); checked for duplicate ranks after the scan (cheaper than a second map).
    let mut rank_lines: Vec<(u32, usize)> = Vec::with_capacity(data.len() / 12);
    let mut max_rank = 0u32;
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let err = |msg: String| line_err(line_no, msg);
        let line = std::str::from_utf8(raw).map_err(|_| err("not valid UTF-8 text".into()))?;
        let mut fields = line.split_ascii_whitespace();
        let (Some(tok), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(err(format!(
                "expected `<base64 token> <rank>`, got {:?}",
                line.trim_end()
            )));
        };
        let bytes = BASE64
            .decode(tok)
            .map_err(|e| err(format!("bad base64 token {tok:?}: {e}")))?;
        if bytes.is_empty() {
            return Err(err("empty token".into()));
        }
        let rank: u32 = match rank.parse() {
            Ok(r) if r < (1 << 31) => r,
            _ => {
                return Err(err(format!(
                    "rank {rank:?} is not an integer in 0..2147483648"
                )));
            }
        };
        if let Some(prev_rank) = encoder.insert(bytes, rank) {
            let prev_line = rank_lines
                .iter()
                .find(|(r, _)| *r == prev_rank)
                .map_or(0, |(_, l)| *l);
            return Err(err(format!(
                "duplicate token {tok:?} (first given rank {prev_rank} on line {prev_line})"
            )));
        }
        rank_lines.push((rank, line_no));
        max_rank = max_rank.max(rank);
    }
    rank_lines.sort_unstable();
    if let Some(w) = rank_lines.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(line_err(
            w[1].1,
            format!("duplicate rank {} (first used on line {})", w[0].0, w[0].1),
        ));
    }
    for b in 0..=255u8 {
        if !encoder.contains_key(&[b][..]) {
            return Err(TokenizerError::File {
                path: path.to_path_buf(),
                msg: format!("missing single-byte token 0x{b:02x} (all 256 bytes need a rank)"),
            });
        }
    }
    Ok((encoder, max_rank))
}

/// GPT-2 byte-level alphabet: byte -> char.
fn gpt2_byte_chars() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
    }
    map
}

fn build_chat_env(
    source: String,
    config_path: &Path,
) -> Result<minijinja::Environment<'static>, TokenizerError> {
    let mut env = minijinja::Environment::new();
    // Same whitespace handling as transformers' chat template rendering.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template_owned("chat_template", source)
        .map_err(|e| TokenizerError::Field {
            path: config_path.to_path_buf(),
            field: "chat_template".into(),
            msg: format!("{e:#}"),
        })?;
    Ok(env)
}

/// Normalised special-token name for the end-of-turn heuristic: `<|im_end|>` -> `im_end`.
fn stop_name(content: &str) -> String {
    content
        .trim_start_matches('<')
        .trim_start_matches('|')
        .trim_end_matches('>')
        .trim_end_matches('|')
        .to_ascii_lowercase()
}

impl Tokenizer {
    /// Loads from a model directory: `hy.tiktoken` (+ optional `tokenizer_config.json`) if
    /// present, else `tokenizer.json` (HF) (+ optional `tokenizer_config.json`).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = dir.join(TOKENIZER_CONFIG_FILE);
        let config = config.is_file().then_some(config.as_path());
        let tiktoken = dir.join(TIKTOKEN_FILE);
        if tiktoken.is_file() {
            return Self::from_tiktoken_file(&tiktoken, config);
        }
        let hf = dir.join(HF_TOKENIZER_FILE);
        if hf.is_file() {
            return Self::from_hf_json(&hf, config);
        }
        Err(TokenizerError::NotFound(dir.to_path_buf()))
    }

    /// Loads a Hunyuan `hy.tiktoken` file; `config` is an optional `tokenizer_config.json`.
    pub fn from_tiktoken_file(path: &Path, config: Option<&Path>) -> Result<Self, TokenizerError> {
        let data = fs::read(path).map_err(io_err(path))?;
        let (encoder, max_rank) = parse_tiktoken(path, &data)?;
        drop(data);
        let cfg = match config {
            Some(p) => TokenizerConfig::read(p)?,
            None => TokenizerConfig::default(),
        };

        let base = max_rank + 1;
        let contiguous = encoder.len() == base as usize;
        let specials: Vec<(u32, String)> = match (&cfg.added_tokens, config) {
            (Some(list), Some(cfg_path)) => {
                let mut out = Vec::with_capacity(list.len());
                for (id, content) in list {
                    // An added token that is exactly a regular token is not special.
                    if encoder.get(content.as_bytes()) == Some(id) {
                        continue;
                    }
                    if *id <= max_rank && (contiguous || encoder.values().any(|r| r == id)) {
                        return Err(TokenizerError::Field {
                            path: cfg_path.to_path_buf(),
                            field: format!("added_tokens_decoder.{id}"),
                            msg: format!(
                                "id of {content:?} is already a rank in {}",
                                path.display()
                            ),
                        });
                    }
                    out.push((*id, content.clone()));
                }
                out
            }
            _ => hunyuan_special_tokens()
                .into_iter()
                .enumerate()
                .map(|(i, s)| (base + i as u32, s))
                .collect(),
        };
        let specials_err_path = config.unwrap_or(path);
        let mut special_map: HashMap<String, u32> = HashMap::with_capacity(specials.len());
        let mut special_ids: HashSet<u32> = HashSet::with_capacity(specials.len());
        for (id, content) in &specials {
            if !special_ids.insert(*id) || special_map.insert(content.clone(), *id).is_some() {
                return Err(TokenizerError::Field {
                    path: specials_err_path.to_path_buf(),
                    field: format!("added_tokens_decoder.{id}"),
                    msg: format!("duplicate special token id or content {content:?}"),
                });
            }
        }
        let vocab_size = special_ids
            .iter()
            .copied()
            .max()
            .map_or(base, |m| m.max(max_rank) + 1) as usize;

        let bpe = tiktoken_rs::CoreBPE::new(
            encoder.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            special_map.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            HUNYUAN_PATTERN,
        )
        .map_err(|e| TokenizerError::File {
            path: path.to_path_buf(),
            msg: format!("building BPE: {e}"),
        })?;

        let backend = Backend::Tiktoken(Box::new(TiktokenBackend { bpe, encoder }));
        Self::finish(backend, special_map, vocab_size, cfg, config)
    }

    /// Loads a Hugging Face `tokenizer.json`; `config` is an optional `tokenizer_config.json`.
    pub fn from_hf_json(path: &Path, config: Option<&Path>) -> Result<Self, TokenizerError> {
        if !path.is_file() {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::File {
            path: path.to_path_buf(),
            msg: format!("cannot load HF tokenizer: {e}"),
        })?;
        let cfg = match config {
            Some(p) => TokenizerConfig::read(p)?,
            None => TokenizerConfig::default(),
        };
        let mut plain = tok.clone();
        plain.set_encode_special_tokens(true);

        let mut added = HashMap::new();
        let mut specials = HashMap::new();
        for (id, t) in tok.get_added_tokens_decoder() {
            if t.special {
                specials.insert(t.content.clone(), id);
            }
            added.insert(id, t.content);
        }
        let vocab_size = tok
            .get_vocab(true)
            .values()
            .copied()
            .chain(added.keys().copied())
            .max()
            .map_or(0, |m| m as usize + 1);

        use tokenizers::decoders::DecoderWrapper;
        let is_byte_level = match tok.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            Some(DecoderWrapper::Sequence(seq)) => seq
                .get_decoders()
                .iter()
                .any(|d| matches!(d, DecoderWrapper::ByteLevel(_))),
            _ => false,
        };
        let byte_level = is_byte_level.then(|| {
            gpt2_byte_chars()
                .iter()
                .enumerate()
                .map(|(b, &c)| (c, b as u8))
                .collect()
        });

        let backend = Backend::Hf(Box::new(HfBackend {
            tok,
            plain,
            added,
            byte_level,
        }));
        Self::finish(backend, specials, vocab_size, cfg, config)
    }

    fn finish(
        backend: Backend,
        specials: HashMap<String, u32>,
        vocab_size: usize,
        cfg: TokenizerConfig,
        config_path: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let mut tk = Self {
            backend,
            specials,
            vocab_size,
            stop_ids: Vec::new(),
            bos_id: None,
            bos_token: None,
            eos_token: None,
            chat: None,
        };
        let cfg_path = config_path.unwrap_or(Path::new(TOKENIZER_CONFIG_FILE));
        let lookup = |tk: &Self, field: &str, token: &str| {
            tk.token_id(token).ok_or_else(|| TokenizerError::Field {
                path: cfg_path.to_path_buf(),
                field: field.to_string(),
                msg: format!("token {token:?} is not in the vocabulary"),
            })
        };

        // BOS: config first, else Hunyuan's `<|bos|>`.
        let (bos_token, bos_id) = match &cfg.bos_token {
            Some(t) => (Some(t.clone()), Some(lookup(&tk, "bos_token", t)?)),
            None => match tk.specials.get(HY_BOS) {
                Some(&id) => (Some(HY_BOS.to_string()), Some(id)),
                None => (None, None),
            },
        };

        // Stops: Hunyuan names, the config's eos, then end-of-turn-looking specials.
        let mut stops: Vec<u32> = Vec::new();
        let is_hunyuan = tk.specials.contains_key(HY_EOS) && tk.specials.contains_key(HY_USER_END);
        if is_hunyuan {
            stops.extend(
                [HY_EOS, HY_EXTRA_STOP]
                    .iter()
                    .filter_map(|n| tk.specials.get(*n)),
            );
        }
        let eos_token = match &cfg.eos_token {
            Some(t) => {
                stops.push(lookup(&tk, "eos_token", t)?);
                Some(t.clone())
            }
            None => tk.specials.contains_key(HY_EOS).then(|| HY_EOS.to_string()),
        };
        let mut by_name: Vec<u32> = tk
            .specials
            .iter()
            .filter(|(name, _)| STOP_NAMES.contains(&stop_name(name).as_str()))
            .map(|(_, &id)| id)
            .collect();
        by_name.sort_unstable();
        stops.extend(by_name);
        let mut seen = HashSet::new();
        stops.retain(|id| seen.insert(*id));

        tk.chat = match cfg.chat_template {
            Some(src) => Some(build_chat_env(src, cfg_path)?),
            None => None,
        };
        tk.stop_ids = stops;
        tk.bos_id = bos_id;
        tk.bos_token = bos_token;
        tk.eos_token = eos_token;
        Ok(tk)
    }

    /// Encodes `text`. Hunyuan: NFC first. With `allow_special`, special-token strings in the
    /// text become their ids; without it they are encoded as ordinary text. Never adds BOS/EOS.
    pub fn encode(&self, text: &str, allow_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::Tiktoken(t) => {
                let text: Cow<'_, str> = if is_nfc(text) {
                    Cow::Borrowed(text)
                } else {
                    Cow::Owned(text.nfc().collect())
                };
                let allowed = if allow_special {
                    t.bpe.special_tokens()
                } else {
                    HashSet::new()
                };
                t.bpe
                    .encode(&text, &allowed)
                    .map(|(ids, _)| ids)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))
            }
            Backend::Hf(h) => {
                let tok = if allow_special { &h.tok } else { &h.plain };
                tok.encode(text, false)
                    .map(|enc| enc.get_ids().to_vec())
                    .map_err(|e| TokenizerError::Encode(e.to_string()))
            }
        }
    }

    /// Decodes to a string (invalid UTF-8 is replaced with U+FFFD). Errors on unknown ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.backend {
            Backend::Tiktoken(_) => {
                Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
            }
            Backend::Hf(h) => {
                if let Some(&id) = ids.iter().find(|&&id| h.tok.id_to_token(id).is_none()) {
                    return Err(TokenizerError::UnknownId(id));
                }
                h.tok
                    .decode(ids, false)
                    .map_err(|e| TokenizerError::Decode(e.to_string()))
            }
        }
    }

    /// Decodes to raw bytes (may end inside a UTF-8 sequence), for incremental streaming.
    /// Special tokens decode to their text. For HF tokenizers without a byte-level decoder this
    /// is `decode(ids)` as bytes.
    /// Like [`Tokenizer::decode_bytes`], but ids the tokenizer does not know decode to
    /// nothing: model vocabularies are padded past the tokenizer's (Hunyuan-A52B-Instruct:
    /// 129,024 rows for 128,166 tokens), and a server must not fail a request because a
    /// model emitted a padding id.
    pub fn decode_bytes_lossy(&self, ids: &[u32]) -> Vec<u8> {
        match self.decode_bytes(ids) {
            Ok(b) => b,
            Err(_) => ids
                .iter()
                .flat_map(|&id| self.decode_bytes(&[id]).unwrap_or_default())
                .collect(),
        }
    }

    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        match &self.backend {
            Backend::Tiktoken(t) => t
                .bpe
                .decode_bytes(ids)
                .map_err(|e| TokenizerError::UnknownId(e.token)),
            Backend::Hf(h) => {
                let Some(char_bytes) = &h.byte_level else {
                    return self.decode(ids).map(String::into_bytes);
                };
                let mut out = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    if let Some(content) = h.added.get(&id) {
                        out.extend_from_slice(content.as_bytes());
                        continue;
                    }
                    let token = h.tok.id_to_token(id).ok_or(TokenizerError::UnknownId(id))?;
                    for c in token.chars() {
                        match char_bytes.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Number of ids including specials (max id + 1).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Id of a special token or a regular token (tiktoken: the token's UTF-8 bytes; HF: the
    /// vocabulary string, e.g. `Ġhello` for byte-level BPE).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        if let Some(&id) = self.specials.get(token) {
            return Some(id);
        }
        match &self.backend {
            Backend::Tiktoken(t) => t.encoder.get(token.as_bytes()).copied(),
            Backend::Hf(h) => h.tok.token_to_id(token),
        }
    }

    /// Ids that end generation. Hunyuan: `<|eos|>` then `<|extra_5|>` (by name). Then the
    /// config's `eos_token`, then any special token named like an end of turn
    /// (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, ...). Deduplicated.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The config's `bos_token`, else `<|bos|>` if present. Not added by `encode`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Renders a chat prompt (encode it with `allow_special = true`).
    ///
    /// With a Jinja `chat_template` in `tokenizer_config.json`, that template is rendered with
    /// `messages`, `add_generation_prompt`, `bos_token`, `eos_token` and `raise_exception`;
    /// roles are left to the template.
    ///
    /// Otherwise the built-in Hunyuan template: an optional first `system` message, then
    /// strictly alternating `user`/`assistant` messages starting with `user`:
    /// `<|startoftext|>{system}<|extra_4|>{user}<|extra_0|>{assistant}<|eos|><|startoftext|>{user}<|extra_0|>...`
    /// (no system: `<|startoftext|>{user}<|extra_0|>`). The assistant cue `<|extra_0|>` is part
    /// of each user turn, so `add_generation_prompt` changes nothing: a conversation ending with
    /// a user message is already a generation prompt, and one ending with an assistant message
    /// ends with `<|eos|>` either way. Other roles, a system message that is not first, two
    /// consecutive messages of the same speaker, or no user message are errors.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        match &self.chat {
            Some(env) => {
                let tmpl = env
                    .get_template("chat_template")
                    .map_err(|e| TokenizerError::ChatTemplate(format!("{e:#}")))?;
                tmpl.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.as_deref().unwrap_or(""),
                    eos_token => self.eos_token.as_deref().unwrap_or(""),
                })
                .map_err(|e| TokenizerError::ChatTemplate(format!("{e:#}")))
            }
            None => {
                let needed = [HY_STARTOFTEXT, HY_SYSTEM_END, HY_USER_END, HY_EOS];
                if let Some(missing) = needed.iter().find(|t| !self.specials.contains_key(**t)) {
                    return Err(TokenizerError::ChatTemplate(format!(
                        "no `chat_template` in {TOKENIZER_CONFIG_FILE} and the vocabulary lacks \
                         the Hunyuan special token {missing} needed by the built-in template"
                    )));
                }
                render_hunyuan_chat(messages)
            }
        }
    }
}

/// The built-in Hunyuan chat template (see [`Tokenizer::apply_chat_template`]).
fn render_hunyuan_chat(messages: &[ChatMessage]) -> Result<String, TokenizerError> {
    let msg_err = |index: usize, msg: String| TokenizerError::ChatMessage { index, msg };
    if messages.is_empty() {
        return Err(TokenizerError::ChatTemplate("no messages".into()));
    }
    let mut out = String::new();
    let mut system: Option<&str> = None;
    let mut expect_user = true;
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "system" => {
                if i != 0 {
                    return Err(msg_err(
                        i,
                        "a system message must be the first message".into(),
                    ));
                }
                system = Some(&m.content);
            }
            "user" => {
                if !expect_user {
                    return Err(msg_err(
                        i,
                        "two user messages in a row (expected an assistant message)".into(),
                    ));
                }
                out.push_str(HY_STARTOFTEXT);
                if let Some(sys) = system.take() {
                    out.push_str(sys);
                    out.push_str(HY_SYSTEM_END);
                }
                out.push_str(&m.content);
                out.push_str(HY_USER_END);
                expect_user = false;
            }
            "assistant" => {
                if expect_user {
                    return Err(msg_err(
                        i,
                        "an assistant message must follow a user message".into(),
                    ));
                }
                out.push_str(&m.content);
                out.push_str(HY_EOS);
                expect_user = true;
            }
            other => {
                return Err(msg_err(
                    i,
                    format!("unsupported role {other:?} (expected system, user or assistant)"),
                ));
            }
        }
    }
    if system.is_some() {
        return Err(msg_err(
            0,
            "a system message must be followed by a user message".into(),
        ));
    }
    Ok(out)
}

/// Writes `hy.tiktoken` (one `base64(token) rank` per line, rank = index in `ranks`) and a
/// `tokenizer_config.json` with the Hunyuan specials as `added_tokens_decoder` entries from
/// id `ranks.len()`, `bos_token`/`eos_token`/`pad_token` and no `chat_template`.
pub fn write_tiktoken_dir(dir: &Path, ranks: &[Vec<u8>]) -> Result<(), TokenizerError> {
    use std::fmt::Write as _;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut out = String::with_capacity(ranks.len() * 16);
    for (rank, tok) in ranks.iter().enumerate() {
        let _ = writeln!(out, "{} {rank}", BASE64.encode(tok));
    }
    let path = dir.join(TIKTOKEN_FILE);
    fs::write(&path, out).map_err(io_err(&path))?;

    let mut added = Map::new();
    for (i, name) in hunyuan_special_tokens().into_iter().enumerate() {
        added.insert(
            (ranks.len() + i).to_string(),
            json!({
                "content": name,
                "lstrip": false,
                "normalized": false,
                "rstrip": false,
                "single_word": false,
                "special": true,
            }),
        );
    }
    let config = json!({
        "added_tokens_decoder": added,
        "bos_token": HY_BOS,
        "eos_token": HY_EOS,
        "pad_token": HY_PAD,
    });
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).map_err(|e| TokenizerError::File {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    fs::write(&path, text).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tempfile::TempDir;

    const ENGLISH: &str = "\
The harbour town woke slowly. Fishing boats came back before sunrise, and the market filled \
with crates of silver fish, baskets of bread, and people arguing about the weather. It's the \
same every morning, they'd say, and yet nobody ever seemed tired of it.

On the hill above the harbour stood an old lighthouse. Its keeper, a patient woman named \
Margaret, had kept the lamp burning for thirty-one years. She wrote everything down: the wind \
direction, the height of the waves, the ships that passed, and the birds that rested on the \
railing. Her notebooks filled three shelves, and she'd never missed a single night.

\"We'll need a new lens,\" the engineer told her one autumn. \"The old one is cracked, and the \
light doesn't reach as far as it used to.\" Margaret nodded. She had noticed it too. The beam \
that once touched the far island now faded halfway across the bay.

The new lens arrived in December, packed in straw and wrapped in heavy cloth. Four men carried \
it up the winding stairs, counting each step: one hundred and twelve. When they finally set it \
in place and lit the lamp, the whole town came out to watch. The light swept across the water, \
brighter than anyone remembered, and reached the island with room to spare.

Years later, children in the town still told the story. They'd describe the crowd on the \
beach, the cheer that went up, and Margaret standing at the top of the tower, waving her lamp. \
Some of the details changed with each telling; the number of steps grew, the storm that night \
became fiercer, and the lens became larger. But the ending was always the same: the light \
reached the island, and the boats came home safely.

Numbers matter too: 3 boats, 12 crates, 1,024 fish, 2023-12-24, 7.5% of the catch, $19.99 a \
basket. Lists look like this:
- first item
- second item
- third item

    indented code block with    multiple   spaces
\tand a tab\r\nand windows line endings\r\n\
The end. THE END. the end? The End!
";

    fn trained_ranks() -> Vec<Vec<u8>> {
        train_bpe(ENGLISH, 300)
    }

    fn fixture() -> (TempDir, Tokenizer) {
        let dir = TempDir::new().unwrap();
        write_tiktoken_dir(dir.path(), &trained_ranks()).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    fn split(text: &str) -> Vec<&str> {
        hunyuan_regex()
            .find_iter(text)
            .map(|m| m.unwrap().as_str())
            .collect()
    }

    /// Straightforward tiktoken BPE: per regex piece, repeatedly merge the adjacent pair whose
    /// concatenation has the lowest rank (leftmost on ties).
    fn reference_encode(text: &str, ranks: &[Vec<u8>]) -> Vec<u32> {
        let map: HashMap<&[u8], u32> = ranks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_slice(), i as u32))
            .collect();
        let text: String = text.nfc().collect();
        let mut out = Vec::new();
        for piece in split(&text) {
            let mut parts: Vec<Vec<u8>> = piece.bytes().map(|b| vec![b]).collect();
            loop {
                let best = (0..parts.len().saturating_sub(1))
                    .filter_map(|i| {
                        let cat = [parts[i].as_slice(), parts[i + 1].as_slice()].concat();
                        map.get(cat.as_slice()).map(|&r| (r, i))
                    })
                    .min();
                let Some((_, i)) = best else { break };
                let right = parts.remove(i + 1);
                parts[i].extend(right);
            }
            out.extend(parts.iter().map(|p| map[p.as_slice()]));
        }
        out
    }

    const SAMPLES: &[&str] = &[
        "",
        "Hello, world!",
        "The lighthouse keeper's notebooks filled three shelves.",
        "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
        "中文字符测试，混元大模型。",
        "日本語のテキストと한국어 텍스트",
        "Привет, мир! Съешь же ещё этих мягких французских булок.",
        "control \u{0}\u{1}\u{7}\u{1b}[0m\u{7f} chars\t\r\n",
        "Ünïcödé naïve café résumé",
        "  leading and trailing   \n\n\n  ",
        "numbers 1234567890 and 3.14159 and 1e-9",
        "I'M HERE, you're there, WE'LL see, they'D go",
        "€𝄞 \u{10FFFF} \u{FFFD} \u{200B}zero width",
        "a<|eos|>b <|extra_0|> <|notaspecial|>",
        "mixed\r\nline\rendings\n",
    ];

    #[test]
    fn tokenizer_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        let (_d, tok) = fixture();
        let tok = Arc::new(tok);
        let t2 = Arc::clone(&tok);
        let h = std::thread::spawn(move || t2.encode("hello from a thread", false).unwrap());
        assert_eq!(
            h.join().unwrap(),
            tok.encode("hello from a thread", false).unwrap()
        );
    }

    #[test]
    fn hunyuan_special_token_list() {
        let s = hunyuan_special_tokens();
        assert_eq!(s.len(), 209);
        assert_eq!(
            &s[..6],
            [
                "<|endoftext|>",
                "<|startoftext|>",
                "<|bos|>",
                "<|eos|>",
                "<|pad|>",
                "<|extra_0|>"
            ]
        );
        assert_eq!(s[208], "<|extra_203|>");
        // Real layout: 127957 ranks, so <|extra_5|> = 127957 + 10 = 127967.
        assert_eq!(s.iter().position(|t| t == HY_EXTRA_STOP), Some(10));
        assert_eq!(s.iter().position(|t| t == HY_EOS), Some(3));
    }

    #[test]
    fn special_ids_and_stops() {
        let (_d, tok) = fixture();
        let n = trained_ranks().len() as u32;
        assert_eq!(n, 256 + 300);
        assert_eq!(tok.vocab_size(), n as usize + 209);
        for (i, name) in hunyuan_special_tokens().iter().enumerate() {
            assert_eq!(tok.token_id(name), Some(n + i as u32), "{name}");
        }
        assert_eq!(tok.stop_ids(), &[n + 3, n + 10]);
        assert_eq!(tok.bos_id(), Some(n + 2));
        assert_eq!(tok.token_id("a"), Some(b'a' as u32));
        assert_eq!(tok.token_id("<|nope|>"), None);
    }

    #[test]
    fn without_config_uses_default_specials() {
        let dir = TempDir::new().unwrap();
        let ranks = trained_ranks();
        write_tiktoken_dir(dir.path(), &ranks).unwrap();
        fs::remove_file(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let n = ranks.len() as u32;
        assert_eq!(tok.token_id("<|endoftext|>"), Some(n));
        assert_eq!(tok.token_id("<|extra_203|>"), Some(n + 208));
        assert_eq!(tok.stop_ids(), &[n + 3, n + 10]);
        assert_eq!(tok.bos_id(), Some(n + 2));
        let (_d, with_cfg) = fixture();
        for s in SAMPLES {
            assert_eq!(
                tok.encode(s, true).unwrap(),
                with_cfg.encode(s, true).unwrap()
            );
        }
    }

    #[test]
    fn special_tokens_only_with_allow_special() {
        let (_d, tok) = fixture();
        let eos = tok.token_id("<|eos|>").unwrap();
        let x0 = tok.token_id("<|extra_0|>").unwrap();
        assert_eq!(tok.encode("<|eos|>", true).unwrap(), vec![eos]);
        let ids = tok.encode("hi<|extra_0|>there<|eos|>", true).unwrap();
        assert!(ids.contains(&x0) && ids.ends_with(&[eos]), "{ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "hi<|extra_0|>there<|eos|>");

        let plain = tok.encode("hi<|extra_0|>there<|eos|>", false).unwrap();
        assert!(
            plain.iter().all(|&id| (id as usize) < 256 + 300),
            "{plain:?}"
        );
        assert_eq!(tok.decode(&plain).unwrap(), "hi<|extra_0|>there<|eos|>");
        // Unknown special-looking strings are plain text either way.
        assert_eq!(
            tok.encode("<|extra_999|>", true).unwrap(),
            tok.encode("<|extra_999|>", false).unwrap()
        );
    }

    #[test]
    fn regex_splits() {
        assert_eq!(split("I'M here"), ["I", "'M", " here"]);
        assert_eq!(
            split("HE'S we'LL they'd"),
            ["HE", "'S", " we", "'LL", " they", "'d"]
        );
        assert_eq!(split("abc 12345"), ["abc", " ", "1", "2", "3", "4", "5"]);
        assert_eq!(split("a\n\n\nb"), ["a", "\n\n\n", "b"]);
        assert_eq!(split("a  \n\n  b"), ["a", "  \n\n", " ", " b"]);
        assert_eq!(split("hello   "), ["hello", "   "]);
        assert_eq!(split("a   b"), ["a", "  ", " b"]);
        assert_eq!(split("Hi!!\n\nYo"), ["Hi", "!!\n\n", "Yo"]);
        assert_eq!(split("$100 (x)"), ["$", "1", "0", "0", " (", "x", ")"]);
        assert_eq!(split("你好世界"), ["你好世界"]);
        assert_eq!(split(" 3rd"), [" ", "3", "rd"]);
        // Long whitespace runs do not hit the backtracking limit.
        let long = format!("a{}b", " ".repeat(200_000));
        assert_eq!(split(&long).len(), 3);
    }

    #[test]
    fn matches_reference_bpe() {
        let (_d, tok) = fixture();
        let ranks = trained_ranks();
        let mut texts: Vec<String> = SAMPLES.iter().map(|s| s.to_string()).collect();
        texts.push(ENGLISH.to_string());
        texts.extend(ENGLISH.split_inclusive('.').map(str::to_string));
        for t in &texts {
            assert_eq!(
                tok.encode(t, false).unwrap(),
                reference_encode(t, &ranks),
                "{t:?}"
            );
        }
        // Merges actually happen on in-domain text.
        let ids = tok.encode(ENGLISH, false).unwrap();
        assert!(ids.len() * 2 < ENGLISH.len(), "{} ids", ids.len());
    }

    #[test]
    fn nfc_normalisation() {
        let (_d, tok) = fixture();
        assert_eq!(
            tok.encode("e\u{301}", false).unwrap(),
            tok.encode("\u{e9}", false).unwrap()
        );
        assert_eq!(
            tok.encode("cafe\u{301} re\u{301}sume\u{301}", true)
                .unwrap(),
            tok.encode("caf\u{e9} r\u{e9}sum\u{e9}", true).unwrap()
        );
        assert_eq!(
            tok.decode(&tok.encode("e\u{301}", false).unwrap()).unwrap(),
            "\u{e9}"
        );
    }

    #[test]
    fn round_trip() {
        let (_d, tok) = fixture();
        let mut all_bytes = String::new();
        for c in (0u32..0x250).filter_map(char::from_u32) {
            all_bytes.push(c);
        }
        let mut texts: Vec<String> = SAMPLES.iter().map(|s| s.to_string()).collect();
        texts.push(all_bytes);
        texts.push(ENGLISH.to_string());
        for t in &texts {
            let nfc: String = t.nfc().collect();
            for allow in [false, true] {
                let ids = tok.encode(t, allow).unwrap();
                assert_eq!(tok.decode(&ids).unwrap(), nfc, "{t:?}");
                assert_eq!(tok.decode_bytes(&ids).unwrap(), nfc.as_bytes());
            }
        }
        // Partial UTF-8 stays raw in decode_bytes, lossy in decode.
        let ids = tok.encode("😀", false).unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(tok.decode_bytes(&ids[..2]).unwrap(), &"😀".as_bytes()[..2]);
        assert_eq!(tok.decode(&ids[..2]).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn unknown_id_errors() {
        let (_d, tok) = fixture();
        let bad = tok.vocab_size() as u32;
        assert!(matches!(tok.decode(&[1, bad]), Err(TokenizerError::UnknownId(id)) if id == bad));
        assert!(matches!(
            tok.decode_bytes(&[u32::MAX]),
            Err(TokenizerError::UnknownId(_))
        ));
    }

    fn load_lines(lines: &[String]) -> Result<Tokenizer, TokenizerError> {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join(TIKTOKEN_FILE);
        fs::write(&path, lines.join("\n")).unwrap();
        Tokenizer::from_tiktoken_file(&path, None)
    }

    fn byte_lines() -> Vec<String> {
        (0..=255u8)
            .map(|b| format!("{} {b}", BASE64.encode([b])))
            .collect()
    }

    fn line_error(lines: &[String]) -> (usize, String) {
        match load_lines(lines) {
            Err(e @ TokenizerError::Line { line, .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(TIKTOKEN_FILE) && msg.contains(&format!(":{line}:")),
                    "{msg}"
                );
                (line, msg)
            }
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_tiktoken_files() {
        let ok = byte_lines();
        assert!(load_lines(&ok).is_ok());

        let mut bad = ok.clone();
        bad.push("!!notbase64!! 256".into());
        let (line, msg) = line_error(&bad);
        assert_eq!(line, 257);
        assert!(msg.contains("base64"), "{msg}");

        let mut bad = ok.clone();
        bad.insert(10, format!("{} 5", BASE64.encode(b"ab")));
        let (line, msg) = line_error(&bad);
        assert_eq!(line, 11);
        assert!(
            msg.contains("duplicate rank 5") && msg.contains("line 6"),
            "{msg}"
        );

        let mut bad = ok.clone();
        bad.push(format!("{} twelve", BASE64.encode(b"ab")));
        let (line, msg) = line_error(&bad);
        assert_eq!(line, 257);
        assert!(msg.contains("twelve"), "{msg}");

        let mut bad = ok.clone();
        bad.push(format!("{} -1", BASE64.encode(b"ab")));
        assert_eq!(line_error(&bad).0, 257);

        let mut bad = ok.clone();
        bad.push(format!("{} 256", BASE64.encode(b"a")));
        let (line, msg) = line_error(&bad);
        assert_eq!(line, 257);
        assert!(msg.contains("duplicate token"), "{msg}");

        let mut bad = ok.clone();
        bad.push(format!("{} 256 extra", BASE64.encode(b"ab")));
        assert_eq!(line_error(&bad).0, 257);

        let mut missing = ok.clone();
        missing.remove(0x41);
        let err = load_lines(&missing).unwrap_err().to_string();
        assert!(err.contains("0x41"), "{err}");

        // Bad config fields are named.
        let dir = TempDir::new().unwrap();
        write_tiktoken_dir(dir.path(), &trained_ranks()).unwrap();
        let cfg = dir.path().join(TOKENIZER_CONFIG_FILE);
        fs::write(
            &cfg,
            r#"{"added_tokens_decoder": {"x": {"content": "<|a|>"}}}"#,
        )
        .unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(TOKENIZER_CONFIG_FILE) && err.contains("added_tokens_decoder.x"),
            "{err}"
        );
        fs::write(
            &cfg,
            r#"{"added_tokens_decoder": {"3": {"content": "<|a|>"}}}"#,
        )
        .unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("added_tokens_decoder.3"), "{err}");
        fs::write(&cfg, r#"{"eos_token": "<|nope|>"}"#).unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("eos_token"), "{err}");
        fs::write(&cfg, "{not json").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");

        let empty = TempDir::new().unwrap();
        assert!(matches!(
            Tokenizer::from_dir(empty.path()),
            Err(TokenizerError::NotFound(_))
        ));
    }

    fn msgs(list: &[(&str, &str)]) -> Vec<ChatMessage> {
        list.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn hunyuan_chat_template() {
        let (_d, tok) = fixture();
        let single = msgs(&[("user", "Hello?")]);
        for gen_prompt in [true, false] {
            assert_eq!(
                tok.apply_chat_template(&single, gen_prompt).unwrap(),
                "<|startoftext|>Hello?<|extra_0|>"
            );
        }
        let with_system = msgs(&[("system", "Be brief."), ("user", "Hello?")]);
        assert_eq!(
            tok.apply_chat_template(&with_system, true).unwrap(),
            "<|startoftext|>Be brief.<|extra_4|>Hello?<|extra_0|>"
        );
        let multi = msgs(&[
            ("system", "S"),
            ("user", "U1"),
            ("assistant", "A1"),
            ("user", "U2"),
        ]);
        let prompt = tok.apply_chat_template(&multi, true).unwrap();
        assert_eq!(
            prompt,
            "<|startoftext|>S<|extra_4|>U1<|extra_0|>A1<|eos|><|startoftext|>U2<|extra_0|>"
        );
        let no_sys = msgs(&[("user", "U1"), ("assistant", "A1"), ("user", "U2")]);
        assert_eq!(
            tok.apply_chat_template(&no_sys, true).unwrap(),
            "<|startoftext|>U1<|extra_0|>A1<|eos|><|startoftext|>U2<|extra_0|>"
        );
        // The prompt's markers encode to special ids.
        let ids = tok.encode(&prompt, true).unwrap();
        let id = |t: &str| tok.token_id(t).unwrap();
        assert_eq!(ids[0], id("<|startoftext|>"));
        assert_eq!(*ids.last().unwrap(), id("<|extra_0|>"));
        assert_eq!(ids.iter().filter(|&&i| i == id("<|eos|>")).count(), 1);

        let err = |m: &[(&str, &str)]| tok.apply_chat_template(&msgs(m), true).unwrap_err();
        let e = err(&[("user", "a"), ("tool", "b")]);
        assert!(
            matches!(e, TokenizerError::ChatMessage { index: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("\"tool\""), "{e}");
        let e = err(&[("user", "a"), ("system", "b")]);
        assert!(
            e.to_string().contains("system message must be the first"),
            "{e}"
        );
        assert!(matches!(
            err(&[("assistant", "a")]),
            TokenizerError::ChatMessage { index: 0, .. }
        ));
        assert!(matches!(
            err(&[("user", "a"), ("user", "b")]),
            TokenizerError::ChatMessage { index: 1, .. }
        ));
        assert!(matches!(
            err(&[("system", "a")]),
            TokenizerError::ChatMessage { .. }
        ));
        assert!(matches!(err(&[]), TokenizerError::ChatTemplate(_)));
    }

    #[test]
    fn jinja_chat_template_from_config() {
        let dir = TempDir::new().unwrap();
        write_tiktoken_dir(dir.path(), &trained_ranks()).unwrap();
        let cfg_path = dir.path().join(TOKENIZER_CONFIG_FILE);
        let mut cfg: Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["chat_template"] = Value::String(
            "{% for m in messages %}\
             {% if m['role'] not in ['system', 'user', 'assistant'] %}\
             {{ raise_exception('bad role: ' + m['role']) }}\
             {% endif %}\
             {{ bos_token }}[{{ m.role.upper() }}] {{ m['content'].strip() }}\n\
             {% endfor %}\
             {% if add_generation_prompt %}[ASSISTANT]{% endif %}"
                .into(),
        );
        fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let m = msgs(&[("system", "  sys  "), ("user", "hi")]);
        assert_eq!(
            tok.apply_chat_template(&m, true).unwrap(),
            "<|bos|>[SYSTEM] sys\n<|bos|>[USER] hi\n[ASSISTANT]"
        );
        assert_eq!(
            tok.apply_chat_template(&m, false).unwrap(),
            "<|bos|>[SYSTEM] sys\n<|bos|>[USER] hi\n"
        );
        let e = tok
            .apply_chat_template(&msgs(&[("tool", "x")]), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad role: tool"), "{e}");

        cfg["chat_template"] = Value::String("{% for %}".into());
        fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chat_template"), "{e}");
    }

    #[test]
    fn real_size_vocab_loads_fast() {
        // Same layout as the real hy.tiktoken: 127,957 ranks, specials from 127957.
        let mut ranks: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        // Unique letter-only tokens "tok" + base-26 digits, so each is one pre-token.
        let word = |mut i: usize| {
            let mut w = b"tok".to_vec();
            loop {
                w.push(b'a' + (i % 26) as u8);
                i /= 26;
                if i == 0 {
                    break w;
                }
            }
        };
        ranks.extend((0..127_957 - 256).map(word));
        let dir = TempDir::new().unwrap();
        write_tiktoken_dir(dir.path(), &ranks).unwrap();
        fs::remove_file(dir.path().join(TOKENIZER_CONFIG_FILE)).unwrap();
        let start = std::time::Instant::now();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let elapsed = start.elapsed();
        eprintln!("loading 127957 ranks took {elapsed:?}");
        if !cfg!(debug_assertions) {
            assert!(elapsed.as_secs_f64() < 1.0, "{elapsed:?}");
        }
        assert_eq!(tok.vocab_size(), 128_166);
        assert_eq!(tok.token_id("<|endoftext|>"), Some(127_957));
        assert_eq!(tok.token_id("<|startoftext|>"), Some(127_958));
        assert_eq!(tok.token_id("<|eos|>"), Some(127_960));
        assert_eq!(tok.token_id("<|extra_0|>"), Some(127_962));
        assert_eq!(tok.token_id("<|extra_203|>"), Some(128_165));
        assert_eq!(tok.stop_ids(), &[127_960, 127_967]);
        let w = String::from_utf8(word(12345)).unwrap();
        assert_eq!(tok.encode(&w, false).unwrap(), vec![256 + 12345]);
    }

    /// A tiny byte-level BPE `tokenizer.json` (GPT-2 alphabet) with two added specials.
    fn write_hf_dir(dir: &Path, with_config: bool) {
        let chars = gpt2_byte_chars();
        let mut vocab = Map::new();
        for (b, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), json!(b));
        }
        let merges = ["h e", "l l", "he ll", "hell o"];
        for (i, m) in merges.iter().enumerate() {
            vocab.insert(m.replace(' ', ""), json!(256 + i));
        }
        let added = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let tj = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(260, "<|im_start|>"), added(261, "<|im_end|>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            }
        });
        fs::write(dir.join(HF_TOKENIZER_FILE), tj.to_string()).unwrap();
        if with_config {
            let cfg = json!({
                "bos_token": null,
                "eos_token": {"content": "<|im_end|>", "special": true},
                "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            });
            fs::write(dir.join(TOKENIZER_CONFIG_FILE), cfg.to_string()).unwrap();
        }
    }

    #[test]
    fn hf_tokenizer_json() {
        let dir = TempDir::new().unwrap();
        write_hf_dir(dir.path(), true);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.vocab_size(), 262);
        assert_eq!(tok.token_id("hello"), Some(259));
        assert_eq!(tok.token_id("<|im_end|>"), Some(261));
        assert_eq!(tok.stop_ids(), &[261]);
        assert_eq!(tok.bos_id(), None);
        let ids = tok.encode("hello hello", false).unwrap();
        assert_eq!(ids[0], 259);
        assert_eq!(ids.len(), 3); // "hello", "Ġ", "hello"

        for t in SAMPLES {
            let ids = tok.encode(t, false).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), *t, "{t:?}");
            assert_eq!(tok.decode_bytes(&ids).unwrap(), t.as_bytes(), "{t:?}");
        }
        let with = tok.encode("hi<|im_end|>", true).unwrap();
        assert_eq!(with.last(), Some(&261));
        let without = tok.encode("hi<|im_end|>", false).unwrap();
        assert!(!without.contains(&261) && without.len() > 3, "{without:?}");
        assert_eq!(tok.decode(&with).unwrap(), "hi<|im_end|>");
        assert_eq!(tok.decode(&without).unwrap(), "hi<|im_end|>");

        let emoji = tok.encode("😀", false).unwrap();
        assert_eq!(emoji.len(), 4);
        assert_eq!(
            tok.decode_bytes(&emoji[..3]).unwrap(),
            &"😀".as_bytes()[..3]
        );
        assert!(matches!(
            tok.decode(&[262]),
            Err(TokenizerError::UnknownId(262))
        ));
        assert!(matches!(
            tok.decode_bytes(&[5000]),
            Err(TokenizerError::UnknownId(5000))
        ));

        let m = msgs(&[("user", "hi"), ("tool", "result")]);
        assert_eq!(
            tok.apply_chat_template(&m, true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>tool\nresult<|im_end|>\n<|im_start|>assistant\n"
        );

        // Without a config there is no chat template and no Hunyuan specials: clear error.
        let bare = TempDir::new().unwrap();
        write_hf_dir(bare.path(), false);
        let tok = Tokenizer::from_dir(bare.path()).unwrap();
        assert_eq!(tok.stop_ids(), &[261]); // by name: im_end
        let e = tok
            .apply_chat_template(&msgs(&[("user", "x")]), true)
            .unwrap_err();
        assert!(matches!(e, TokenizerError::ChatTemplate(_)), "{e}");
    }

    #[test]
    fn hf_word_level() {
        let dir = TempDir::new().unwrap();
        let tj = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}
        });
        let path = dir.path().join(HF_TOKENIZER_FILE);
        fs::write(&path, tj.to_string()).unwrap();
        let tok = Tokenizer::from_hf_json(&path, None).unwrap();
        let ids = tok.encode("hello world", true).unwrap();
        assert_eq!(ids, [1, 2]);
        assert_eq!(tok.decode(&ids).unwrap(), "hello world");
        assert_eq!(tok.decode_bytes(&ids).unwrap(), b"hello world");
        assert_eq!(tok.encode("hello there", false).unwrap(), [1, 0]);
        assert_eq!(tok.vocab_size(), 3);

        fs::write(&path, "{\"model\": 5}").unwrap();
        let e = Tokenizer::from_hf_json(&path, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(HF_TOKENIZER_FILE), "{e}");
    }
}
