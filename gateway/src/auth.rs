//! API keys: loaded from a file, kept only as SHA-256 hashes (a memory dump or a debug print
//! never shows a usable key), and checked in constant time.

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

/// Why a key file was refused. Never contains a key.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeysError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("line {line}: {msg}")]
    Line { line: usize, msg: &'static str },
    #[error("no API keys (every line is blank or a comment)")]
    Empty,
}

/// The accepted API keys, as SHA-256 hashes.
#[derive(Clone)]
pub struct ApiKeys {
    hashes: Vec<[u8; 32]>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.hashes.len())
    }
}

const HASHED_PREFIX: &str = "sha256:";

fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// Reads a key file: one key per line; blank lines and lines starting with `#` are
    /// ignored; `sha256:<64 hex digits>` is a key given by its hash (so the file itself need
    /// not hold plain keys).
    pub fn from_file(path: &Path) -> Result<Self, ApiKeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| ApiKeysError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// [`ApiKeys::from_file`] on the file's contents.
    pub fn parse(text: &str) -> Result<Self, ApiKeysError> {
        let mut hashes = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let hash = match line.strip_prefix(HASHED_PREFIX) {
                Some(hex_digest) => {
                    let mut hash = [0u8; 32];
                    hex::decode_to_slice(hex_digest, &mut hash).map_err(|_| {
                        ApiKeysError::Line {
                            line: i + 1,
                            msg: "`sha256:` must be followed by 64 hex digits",
                        }
                    })?;
                    hash
                }
                None if line.chars().any(char::is_whitespace) => {
                    return Err(ApiKeysError::Line {
                        line: i + 1,
                        msg: "a key must not contain whitespace",
                    });
                }
                None => sha256(line),
            };
            hashes.push(hash);
        }
        if hashes.is_empty() {
            return Err(ApiKeysError::Empty);
        }
        Ok(Self { hashes })
    }

    /// Keys given directly (tests, embedding); hashed at once.
    pub fn from_keys<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            hashes: keys.into_iter().map(|k| sha256(k.as_ref())).collect(),
        }
    }

    /// The `sha256:<hex>` line that stands for `key` in a key file.
    pub fn hashed_line(key: &str) -> String {
        format!("{HASHED_PREFIX}{}", hex::encode(sha256(key)))
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `key` is one of the keys. Compares against every stored hash without an early
    /// exit, so the time taken says nothing about which key (or how much of one) matched.
    pub fn check(&self, key: &str) -> bool {
        let candidate = sha256(key);
        let found = self
            .hashes
            .iter()
            .fold(Choice::from(0), |acc, h| acc | h.ct_eq(&candidate));
        found.into()
    }

    /// Checks an `Authorization` header value (`Bearer <key>`, scheme case-insensitive).
    pub fn check_authorization(&self, header: Option<&str>) -> bool {
        header
            .and_then(bearer_token)
            .is_some_and(|key| self.check(key))
    }
}

/// The key of an `Authorization: Bearer <key>` value.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_are_hashed_and_checked() {
        let file = format!(
            "# operators\n\n  plain-key-1  \n{}\n",
            ApiKeys::hashed_line("hashed-key-2")
        );
        let keys = ApiKeys::parse(&file).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.check("plain-key-1"));
        assert!(keys.check("hashed-key-2"));
        assert!(!keys.check("plain-key"));
        assert!(!keys.check(""));
        assert!(keys.check_authorization(Some("Bearer plain-key-1")));
        assert!(keys.check_authorization(Some("bearer  hashed-key-2 ")));
        assert!(!keys.check_authorization(Some("Basic plain-key-1")));
        assert!(!keys.check_authorization(Some("Bearer")));
        assert!(!keys.check_authorization(None));
        // Only hashes are kept: neither the struct nor its debug form holds the key.
        assert!(!format!("{keys:?}").contains("plain-key-1"));
        let stored: Vec<u8> = keys.hashes.concat();
        assert!(!stored.windows(11).any(|w| w == b"plain-key-1"));
        assert!(keys.hashes.contains(&sha256("plain-key-1")));
    }

    #[test]
    fn bad_files_are_refused_without_echoing_keys() {
        let err = ApiKeys::parse("sha256:abcd\n").unwrap_err();
        assert!(matches!(err, ApiKeysError::Line { line: 1, .. }), "{err}");
        let err = ApiKeys::parse("ok\nsecret key\n").unwrap_err();
        assert!(matches!(err, ApiKeysError::Line { line: 2, .. }));
        assert!(!err.to_string().contains("secret"));
        assert!(matches!(
            ApiKeys::parse("# nothing\n\n").unwrap_err(),
            ApiKeysError::Empty
        ));
    }

    #[test]
    fn from_file_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "k1\n").unwrap();
        assert!(ApiKeys::from_file(&path).unwrap().check("k1"));
        assert!(matches!(
            ApiKeys::from_file(&dir.path().join("missing")).unwrap_err(),
            ApiKeysError::Io { .. }
        ));
    }
}
