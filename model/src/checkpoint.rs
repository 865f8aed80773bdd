//! Checkpoint loading: sharded safetensors (memory-mapped, zero-copy) and PyTorch
//! zip/pickle `.bin` shards, into named host tensors.
//!
//! Every failure names the tensor and the file: a missing, unexpected, mis-shaped or
//! wrongly typed tensor, a truncated shard, a hostile header or index. Nothing is
//! allocated from a size read out of a file before it is checked against the file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use hyserve_kernels::{DType, HostMatrix, SharedBytes, mmap};
use serde::Deserialize;

use crate::config::ModelConfig;
use crate::names;
use crate::torch_bin::{self, BinDType, BinLimits};

/// Largest index file we read (the real 80-shard index is ~100 KB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{dir}: no weights found (expected model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json or pytorch_model.bin)"
    )]
    NoWeights { dir: String },
    #[error("{path}: bad index: {reason}")]
    Index { path: String, reason: String },
    #[error("{path}: bad safetensors file: {reason}")]
    Safetensors { path: String, reason: String },
    #[error(transparent)]
    Bin(#[from] Box<torch_bin::TorchBinError>),
    #[error("tensor {name}: missing{}", match .file { Some(f) => format!(" (the index places it in {f})"), None => " from every shard".to_string() })]
    Missing { name: String, file: Option<String> },
    #[error("tensor {name} in {file}: not part of this model's architecture")]
    Unexpected { name: String, file: String },
    #[error("tensor {name} in {file}: shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        file: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} in {file}: dtype {dtype} is not supported (bf16, f16, f32)")]
    DType {
        name: String,
        file: String,
        dtype: String,
    },
    #[error("tensor {name}: appears in both {first} and {second}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
}

/// On-disk format of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    TorchBin,
}

/// One tensor in host memory (or mapped from disk).
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub file: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: SharedBytes,
}

/// Loading progress, reported per shard.
#[derive(Clone, Debug)]
pub struct Progress {
    pub file: String,
    pub files_done: usize,
    pub files_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// All tensors of a model directory.
#[derive(Debug)]
pub struct Checkpoint {
    pub format: Format,
    pub dir: PathBuf,
    tensors: HashMap<String, TensorEntry>,
    /// Where the index said each tensor lives (for "missing" errors).
    index: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    let len = std::fs::metadata(path).map_err(io_err(path))?.len();
    let bad = |reason: String| CheckpointError::Index {
        path: path.display().to_string(),
        reason,
    };
    if len > MAX_INDEX_BYTES {
        return Err(bad(format!(
            "{len} bytes exceeds the {MAX_INDEX_BYTES}-byte limit"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let idx: IndexFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    for (name, file) in &idx.weight_map {
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|f| f.to_str() == Some(file.as_str()));
        if !plain || file.starts_with('.') {
            return Err(bad(format!(
                "tensor {name}: shard name '{file}' must be a plain file name in the model directory"
            )));
        }
    }
    Ok(idx.weight_map)
}

fn dtype_of(name: &str, file: &str, d: safetensors::Dtype) -> Result<DType, CheckpointError> {
    match d {
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::F32 => Ok(DType::F32),
        other => Err(CheckpointError::DType {
            name: name.into(),
            file: file.into(),
            dtype: format!("{other:?}"),
        }),
    }
}

impl Checkpoint {
    /// Opens the weights of `dir`, reporting progress per shard.
    pub fn open(dir: &Path, progress: &mut dyn FnMut(&Progress)) -> Result<Self, CheckpointError> {
        let st_index = dir.join("model.safetensors.index.json");
        let st_single = dir.join("model.safetensors");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        let bin_single = dir.join("pytorch_model.bin");
        let (format, index, files) = if st_index.exists() {
            let idx = read_index(&st_index)?;
            let files = unique_files(&idx);
            (Format::Safetensors, idx, files)
        } else if st_single.exists() {
            (
                Format::Safetensors,
                BTreeMap::new(),
                vec!["model.safetensors".to_string()],
            )
        } else if bin_index.exists() {
            let idx = read_index(&bin_index)?;
            let files = unique_files(&idx);
            (Format::TorchBin, idx, files)
        } else if bin_single.exists() {
            (
                Format::TorchBin,
                BTreeMap::new(),
                vec!["pytorch_model.bin".to_string()],
            )
        } else {
            return Err(CheckpointError::NoWeights {
                dir: dir.display().to_string(),
            });
        };
        let sizes: Vec<u64> = files
            .iter()
            .map(|f| {
                let p = dir.join(f);
                std::fs::metadata(&p).map(|m| m.len()).map_err(io_err(&p))
            })
            .collect::<Result<_, _>>()?;
        let bytes_total = sizes.iter().sum();
        let mut ck = Checkpoint {
            format,
            dir: dir.to_path_buf(),
            tensors: HashMap::new(),
            index,
        };
        let mut bytes_done = 0;
        for (i, file) in files.iter().enumerate() {
            let path = dir.join(file);
            let entries = match format {
                Format::Safetensors => read_safetensors(&path, file)?,
                Format::TorchBin => read_bin(&path, file)?,
            };
            for (name, entry) in entries {
                if let Some(indexed) = ck.index.get(&name)
                    && indexed != file
                {
                    return Err(CheckpointError::Duplicate {
                        name,
                        first: indexed.clone(),
                        second: file.clone(),
                    });
                }
                if let Some(prev) = ck.tensors.get(&name) {
                    return Err(CheckpointError::Duplicate {
                        name,
                        first: prev.file.clone(),
                        second: file.clone(),
                    });
                }
                ck.tensors.insert(name, entry);
            }
            bytes_done += sizes[i];
            progress(&Progress {
                file: file.clone(),
                files_done: i + 1,
                files_total: files.len(),
                bytes_done,
                bytes_total,
            });
        }
        Ok(ck)
    }

    /// Checks the tensors against what `cfg` implies: none missing, none unexpected,
    /// every shape as expected.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), CheckpointError> {
        let expected = names::expected(cfg);
        let mut wanted = HashMap::with_capacity(expected.len());
        for e in &expected {
            wanted.insert(e.name.as_str(), &e.shape);
            match self.tensors.get(&e.name) {
                None => {
                    return Err(CheckpointError::Missing {
                        name: e.name.clone(),
                        file: self.index.get(&e.name).cloned(),
                    });
                }
                Some(t) if t.shape != e.shape => {
                    return Err(CheckpointError::Shape {
                        name: e.name.clone(),
                        file: t.file.clone(),
                        expected: e.shape.clone(),
                        found: t.shape.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        let mut extra: Vec<_> = self
            .tensors
            .iter()
            .filter(|(n, _)| !wanted.contains_key(n.as_str()) && !names::is_ignored(n, cfg))
            .collect();
        extra.sort_by(|a, b| a.0.cmp(b.0));
        if let Some((name, t)) = extra.first() {
            return Err(CheckpointError::Unexpected {
                name: (*name).clone(),
                file: t.file.clone(),
            });
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// A validated 2-D tensor as a host matrix. Panics if `validate` was not called.
    pub fn matrix(&self, name: &str) -> HostMatrix {
        let t = &self.tensors[name];
        HostMatrix::new(t.dtype, t.shape[0], t.shape[1], t.bytes.clone())
            .expect("validated shape matches the byte length")
    }

    /// A validated 1-D tensor decoded to f32.
    pub fn vector(&self, name: &str) -> Vec<f32> {
        let t = &self.tensors[name];
        let mut out = Vec::with_capacity(t.shape[0]);
        hyserve_kernels::numeric::decode_into(t.dtype, t.bytes.as_slice(), &mut out);
        out
    }

    /// The dtype most tensors are stored in.
    pub fn dominant_dtype(&self) -> Option<DType> {
        let mut bytes: HashMap<DType, usize> = HashMap::new();
        for t in self.tensors.values() {
            *bytes.entry(t.dtype).or_default() += t.bytes.len();
        }
        bytes.into_iter().max_by_key(|&(_, b)| b).map(|(d, _)| d)
    }
}

fn unique_files(index: &BTreeMap<String, String>) -> Vec<String> {
    let mut files: Vec<String> = index.values().cloned().collect();
    files.sort();
    files.dedup();
    files
}

fn read_safetensors(
    path: &Path,
    file: &str,
) -> Result<Vec<(String, TensorEntry)>, CheckpointError> {
    let bytes = mmap::map_file(path).map_err(io_err(path))?;
    let bad = |reason: String| CheckpointError::Safetensors {
        path: path.display().to_string(),
        reason,
    };
    // `read_metadata` checks the header length against the file and every tensor's
    // offsets against its shape, dtype and the data section (truncation included).
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes.as_slice())
        .map_err(|e| bad(format!("{e:?}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = dtype_of(&name, file, info.dtype)?;
        let (a, b) = info.data_offsets;
        let range = data_start + a..data_start + b;
        let window = bytes.sub(range).ok_or_else(|| {
            bad(format!(
                "tensor {name}: data offsets {a}..{b} outside the file"
            ))
        })?;
        out.push((
            name,
            TensorEntry {
                file: file.to_string(),
                dtype,
                shape: info.shape.clone(),
                bytes: window,
            },
        ));
    }
    Ok(out)
}

fn read_bin(path: &Path, file: &str) -> Result<Vec<(String, TensorEntry)>, CheckpointError> {
    let tensors = torch_bin::read_torch_bin(path, &BinLimits::default()).map_err(Box::new)?;
    Ok(tensors
        .into_iter()
        .map(|t| {
            let dtype = match t.dtype {
                BinDType::BF16 => DType::BF16,
                BinDType::F16 => DType::F16,
                BinDType::F32 => DType::F32,
            };
            (
                t.name,
                TensorEntry {
                    file: file.to_string(),
                    dtype,
                    shape: t.shape,
                    bytes: SharedBytes::from_vec(t.data),
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Arch;
    use crate::init::{InitOptions, WeightFormat, init_model};

    fn tiny(dir: &Path, format: WeightFormat) -> ModelConfig {
        let opts = InitOptions {
            arch: Arch::HunyuanLarge,
            preset: "tiny".into(),
            seed: 0,
            dtype: DType::BF16,
            format,
            max_shard_bytes: 1 << 30,
        };
        init_model(dir, &opts, &mut |_, _| {}).unwrap()
    }

    type Tensors = HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;
    type Edit = Box<dyn FnOnce(&mut Tensors)>;

    /// Rewrites `model.safetensors` through `edit` (name -> (dtype, shape, bytes)).
    fn rewrite(dir: &Path, edit: impl FnOnce(&mut Tensors)) {
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut map: HashMap<_, _> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        edit(&mut map);
        let views: Vec<_> = map
            .iter()
            .map(|(n, (d, s, b))| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }

    fn open_err(dir: &Path, cfg: &ModelConfig) -> String {
        match Checkpoint::open(dir, &mut |_| {}) {
            Err(e) => e.to_string(),
            Ok(ck) => ck.validate(cfg).unwrap_err().to_string(),
        }
    }

    #[test]
    fn valid_checkpoints_open_in_both_formats() {
        for format in [WeightFormat::Safetensors, WeightFormat::TorchBin] {
            let d = tempfile::tempdir().unwrap();
            let cfg = tiny(d.path(), format);
            let mut seen = 0;
            let ck = Checkpoint::open(d.path(), &mut |p| seen = p.files_done).unwrap();
            ck.validate(&cfg).unwrap();
            assert_eq!(seen, 1, "progress reported");
            assert_eq!(ck.len(), crate::names::expected(&cfg).len());
        }
    }

    #[test]
    fn missing_extra_misshaped_and_mistyped_tensors_are_named() {
        let cases: Vec<(&str, Edit, &str)> = vec![
            (
                "missing",
                Box::new(|m: &mut Tensors| {
                    m.remove("model.layers.2.self_attn.k_proj.weight");
                }),
                "tensor model.layers.2.self_attn.k_proj.weight: missing",
            ),
            (
                "extra",
                Box::new(|m: &mut Tensors| {
                    // An odd CLA layer must not carry its own k_proj.
                    let k = m["model.layers.0.self_attn.k_proj.weight"].clone();
                    m.insert("model.layers.1.self_attn.k_proj.weight".into(), k);
                }),
                "tensor model.layers.1.self_attn.k_proj.weight in model.safetensors: not part",
            ),
            (
                "shape",
                Box::new(
                    |m: &mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>| {
                        let t = m.get_mut("model.norm.weight").unwrap();
                        t.1 = vec![t.1[0] / 2, 2];
                    },
                ),
                "tensor model.norm.weight in model.safetensors: shape [32, 2], expected [64]",
            ),
            (
                "dtype",
                Box::new(
                    |m: &mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>| {
                        let t = m.get_mut("model.norm.weight").unwrap();
                        t.0 = safetensors::Dtype::I16;
                    },
                ),
                "tensor model.norm.weight in model.safetensors: dtype I16",
            ),
        ];
        for (what, edit, want) in cases {
            let d = tempfile::tempdir().unwrap();
            let cfg = tiny(d.path(), WeightFormat::Safetensors);
            rewrite(d.path(), edit);
            let e = open_err(d.path(), &cfg);
            assert!(e.contains(want), "{what}: {e}");
        }
    }

    #[test]
    fn truncated_and_hostile_files_error_without_panicking() {
        let d = tempfile::tempdir().unwrap();
        let cfg = tiny(d.path(), WeightFormat::Safetensors);
        let path = d.path().join("model.safetensors");
        let good = std::fs::read(&path).unwrap();
        // Cut at many points, including inside the header length and the header.
        for cut in [0, 3, 8, 20, 200, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let e = open_err(d.path(), &cfg);
            assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
        }
        // A header claiming offsets past the end of the data.
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(good[8..8 + n].to_vec()).unwrap();
        let bad = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[999999999,", 1);
        let mut bytes = (bad.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(bad.as_bytes());
        bytes.extend_from_slice(&good[8 + n..]);
        std::fs::write(&path, &bytes).unwrap();
        let e = open_err(d.path(), &cfg);
        assert!(e.contains("model.safetensors"), "{e}");
        // An index that is not JSON, and one over the size limit, are refused by name.
        std::fs::write(&path, &good).unwrap();
        let idx = d.path().join("model.safetensors.index.json");
        std::fs::write(&idx, "{not json").unwrap();
        assert!(open_err(d.path(), &cfg).contains("model.safetensors.index.json: bad index"));
    }
}
