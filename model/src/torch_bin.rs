//! Reader and writer for PyTorch `torch.save` checkpoints in the zip format
//! (the format of Hugging Face `pytorch_model-0000X-of-0000N.bin` shards).
//!
//! A checkpoint is a zip archive whose entries all live under one folder
//! (`archive/` when written by recent torch, the file stem for some older
//! writers):
//!
//! * `<prefix>/data.pkl` — a pickle describing the object graph; tensors refer
//!   to their bytes through pickle *persistent ids*
//!   `('storage', torch.<X>Storage, '<key>', '<location>', numel)`;
//! * `<prefix>/data/<key>` — the raw little-endian bytes of each storage;
//! * `<prefix>/version`, `<prefix>/byteorder` — small metadata records.
//!
//! The reader never runs arbitrary pickle code: it has its own small pickle
//! machine that knows a fixed allow-list of globals (`collections.OrderedDict`,
//! the `torch._utils._rebuild_*` tensor constructors, the torch storage classes
//! and dtypes) and refuses everything else. Every length read from the file is
//! checked against the bytes that are really there before anything is
//! allocated, and the machine's stack, memo, nesting depth and the number and
//! rank of tensors are bounded by [`BinLimits`].
//!
//! The writer emits what `torch.save` emits (pickle protocol 2, one storage
//! per tensor, stored entries aligned to 64 bytes), which
//! `torch.load(path, weights_only=True)` accepts.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use zip::result::ZipError;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

/// Element types the reader returns and the writer accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinDType {
    BF16,
    F16,
    F32,
}

impl BinDType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            BinDType::BF16 | BinDType::F16 => 2,
            BinDType::F32 => 4,
        }
    }

    /// The legacy typed-storage class `torch.save` names in persistent ids.
    fn storage_class(self) -> &'static str {
        match self {
            BinDType::BF16 => "BFloat16Storage",
            BinDType::F16 => "HalfStorage",
            BinDType::F32 => "FloatStorage",
        }
    }
}

/// One named tensor: contiguous row-major little-endian bytes.
#[derive(Debug, Clone)]
pub struct BinTensor {
    pub name: String,
    pub dtype: BinDType,
    pub shape: Vec<usize>,
    /// `shape.iter().product::<usize>() * dtype.size_bytes()` bytes.
    pub data: Vec<u8>,
}

/// Bounds applied while reading an untrusted checkpoint.
#[derive(Debug, Clone)]
pub struct BinLimits {
    /// Largest checkpoint file accepted, in bytes.
    pub max_file_bytes: u64,
    /// Largest `data.pkl` entry accepted, in bytes.
    pub max_pickle_bytes: u64,
    /// Most tensors in one checkpoint.
    pub max_tensors: usize,
    /// Highest tensor rank.
    pub max_rank: usize,
    /// Most values on the pickle stack (and, separately, most open MARKs).
    pub max_stack_depth: usize,
    /// Most pickle memo entries.
    pub max_memo: usize,
}

impl Default for BinLimits {
    fn default() -> Self {
        BinLimits {
            max_file_bytes: 256 << 30,
            max_pickle_bytes: 64 << 20,
            max_tensors: 1_000_000,
            max_rank: 8,
            // Enough for one SETITEMS of a million name/tensor pairs.
            max_stack_depth: 2_500_000,
            // torch.save memoizes about seven objects per tensor.
            max_memo: 10_000_000,
        }
    }
}

/// How deeply containers may nest inside each other in `data.pkl`.
/// A state dict needs about four levels; the bound keeps recursive drops and
/// depth bookkeeping cheap whatever the file says.
const MAX_NESTING: usize = 128;

/// Longest module or name line accepted for the GLOBAL opcode.
const MAX_GLOBAL_LINE: usize = 256;

/// Every error names the checkpoint path, and the tensor where one is known.
#[derive(Debug, thiserror::Error)]
pub enum TorchBinError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: file is {size} bytes, over the limit of {limit}")]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path}: not a readable zip archive (torch.save zip format expected): {source}")]
    Zip {
        path: PathBuf,
        #[source]
        source: ZipError,
    },
    #[error("{path}: zip entry {entry}: {source}")]
    ZipEntry {
        path: PathBuf,
        entry: String,
        #[source]
        source: ZipError,
    },
    #[error("{path}: no '<prefix>/data.pkl' entry in the archive")]
    MissingDataPkl { path: PathBuf },
    #[error("{path}: several data.pkl entries in the archive: {entries:?}")]
    AmbiguousDataPkl { path: PathBuf, entries: Vec<String> },
    #[error("{path}: zip entry {entry} declares {size} bytes, over the limit of {limit}")]
    EntryTooLarge {
        path: PathBuf,
        entry: String,
        size: u64,
        limit: u64,
    },
    #[error(
        "{path}: zip entry {entry} is compressed ({method}); only stored (uncompressed) entries are supported"
    )]
    UnsupportedCompression {
        path: PathBuf,
        entry: String,
        method: String,
    },
    #[error("{path}: zip entry {entry} holds {actual} bytes but its header declares {declared}")]
    EntrySizeMismatch {
        path: PathBuf,
        entry: String,
        declared: u64,
        actual: u64,
    },
    #[error(
        "{path}: byteorder record says {found:?}; only little-endian checkpoints are supported"
    )]
    ByteOrder { path: PathBuf, found: String },
    #[error("{path}: data.pkl offset {offset}: {msg}")]
    Pickle {
        path: PathBuf,
        offset: usize,
        msg: String,
    },
    #[error("{path}: data.pkl offset {offset}: unsupported pickle opcode 0x{opcode:02x}")]
    UnsupportedOpcode {
        path: PathBuf,
        offset: usize,
        opcode: u8,
    },
    #[error("{path}: data.pkl offset {offset}: unsupported pickle global '{module} {name}'")]
    UnsupportedGlobal {
        path: PathBuf,
        offset: usize,
        module: String,
        name: String,
    },
    #[error("{path}: data.pkl offset {offset}: {what} exceeds the limit of {limit}")]
    LimitExceeded {
        path: PathBuf,
        offset: usize,
        what: &'static str,
        limit: u64,
    },
    #[error("{path}: top-level object is {found}, expected a dict mapping names to tensors")]
    NotAStateDict { path: PathBuf, found: &'static str },
    #[error("{path}: entry {key}: {msg}")]
    BadEntry {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: tensor {tensor}: duplicate tensor name")]
    DuplicateTensor { path: PathBuf, tensor: String },
    #[error("{path}: {count} tensors, over the limit of {limit}")]
    TooManyTensors {
        path: PathBuf,
        count: usize,
        limit: usize,
    },
    #[error(
        "{path}: tensor {tensor}: unsupported dtype {dtype} (only bfloat16, float16 and float32 are supported)"
    )]
    UnsupportedDType {
        path: PathBuf,
        tensor: String,
        dtype: &'static str,
    },
    #[error("{path}: tensor {tensor}: rank {rank} exceeds the limit of {limit}")]
    RankTooLarge {
        path: PathBuf,
        tensor: String,
        rank: usize,
        limit: usize,
    },
    #[error("{path}: tensor {tensor}: {msg}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error(
        "{path}: tensor {tensor}: shape {shape:?} with stride {stride:?} is not contiguous row-major"
    )]
    NonContiguous {
        path: PathBuf,
        tensor: String,
        shape: Vec<i64>,
        stride: Vec<i64>,
    },
    #[error("{path}: tensor {tensor}: storage {key} has no zip entry {entry}")]
    MissingStorage {
        path: PathBuf,
        tensor: String,
        key: String,
        entry: String,
    },
    #[error(
        "{path}: tensor {tensor}: storage {key} holds {n} bytes but shape {shape:?} at storage offset {offset} needs {m}"
    )]
    StorageTooSmall {
        path: PathBuf,
        tensor: String,
        key: String,
        n: u64,
        shape: Vec<usize>,
        offset: u64,
        m: u64,
    },
    #[error(
        "{path}: tensor {tensor}: storage {key} is declared as {declared} bytes but its zip entry holds {actual}"
    )]
    StorageSizeMismatch {
        path: PathBuf,
        tensor: String,
        key: String,
        declared: u64,
        actual: u64,
    },
}

// ---------------------------------------------------------------------------
// Element types known to torch (storage classes and dtype globals).
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct ElemType {
    /// torch dtype name, e.g. "bfloat16".
    dtype: &'static str,
    /// Legacy typed-storage class, e.g. "BFloat16Storage".
    storage: Option<&'static str>,
    size: u64,
    bin: Option<BinDType>,
}

const fn elem(
    dtype: &'static str,
    storage: Option<&'static str>,
    size: u64,
    bin: Option<BinDType>,
) -> ElemType {
    ElemType {
        dtype,
        storage,
        size,
        bin,
    }
}

static ELEM_TYPES: &[ElemType] = &[
    elem("float32", Some("FloatStorage"), 4, Some(BinDType::F32)),
    elem("float16", Some("HalfStorage"), 2, Some(BinDType::F16)),
    elem("bfloat16", Some("BFloat16Storage"), 2, Some(BinDType::BF16)),
    elem("float64", Some("DoubleStorage"), 8, None),
    elem("int64", Some("LongStorage"), 8, None),
    elem("int32", Some("IntStorage"), 4, None),
    elem("int16", Some("ShortStorage"), 2, None),
    elem("int8", Some("CharStorage"), 1, None),
    // `UntypedStorage` is handled as bytes, see `untyped()`.
    elem("uint8", Some("ByteStorage"), 1, None),
    elem("bool", Some("BoolStorage"), 1, None),
    elem("complex64", Some("ComplexFloatStorage"), 8, None),
    elem("complex128", Some("ComplexDoubleStorage"), 16, None),
    elem("qint8", Some("QInt8Storage"), 1, None),
    elem("quint8", Some("QUInt8Storage"), 1, None),
    elem("qint32", Some("QInt32Storage"), 4, None),
    elem("quint4x2", Some("QUInt4x2Storage"), 1, None),
    elem("quint2x4", Some("QUInt2x4Storage"), 1, None),
    elem("uint16", None, 2, None),
    elem("uint32", None, 4, None),
    elem("uint64", None, 8, None),
    elem("float8_e4m3fn", None, 1, None),
    elem("float8_e5m2", None, 1, None),
    elem("float8_e4m3fnuz", None, 1, None),
    elem("float8_e5m2fnuz", None, 1, None),
];

fn elem_by_dtype(name: &str) -> Option<&'static ElemType> {
    let canonical = match name {
        "float" => "float32",
        "half" => "float16",
        "double" => "float64",
        "long" => "int64",
        "int" => "int32",
        "short" => "int16",
        "cfloat" => "complex64",
        "cdouble" => "complex128",
        other => other,
    };
    ELEM_TYPES.iter().find(|e| e.dtype == canonical)
}

fn elem_by_storage(name: &str) -> Option<&'static ElemType> {
    if name == "UntypedStorage" {
        return elem_by_dtype("uint8");
    }
    ELEM_TYPES.iter().find(|e| e.storage == Some(name))
}

// ---------------------------------------------------------------------------
// Restricted pickle machine.
// ---------------------------------------------------------------------------

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    // protocol 2
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    // protocol 3
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    // protocol 4
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// The callables and classes the machine knows.
#[derive(Debug, Clone, Copy)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildParameter,
    /// `torch.<X>Storage`; `UntypedStorage` maps to the uint8 entry.
    StorageClass(&'static ElemType),
    /// `torch.<dtype>` (only an argument of `_rebuild_tensor_v3`).
    DType(&'static ElemType),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor_v3") => Some(Global::RebuildTensorV3),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", n) => elem_by_storage(n)
            .map(Global::StorageClass)
            .or_else(|| elem_by_dtype(n).map(Global::DType)),
        _ => None,
    }
}

#[derive(Debug)]
struct TupleObj {
    items: Vec<Value>,
    depth: usize,
}

/// A mutable container (list or dict). Once it has been put inside another
/// container it is sealed: later mutation would be a recursive structure,
/// which torch checkpoints never contain, and refusing it rules out cycles.
#[derive(Debug)]
struct Container<T> {
    items: Vec<T>,
    depth: usize,
    sealed: bool,
}

impl<T> Container<T> {
    /// An empty container: one level deep, still mutable.
    fn empty() -> Self {
        Container {
            items: Vec::new(),
            depth: 1,
            sealed: false,
        }
    }
}

type ListObj = Container<Value>;
type DictObj = Container<(Value, Value)>;

#[derive(Debug)]
struct StorageRef {
    key: Rc<str>,
    elem: &'static ElemType,
    /// Elements of `elem` (bytes for `UntypedStorage`).
    numel: u64,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
    elem: &'static ElemType,
}

#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// Floats and byte strings are never needed by a state dict; only their
    /// presence is kept.
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(Rc<TupleObj>),
    List(Rc<RefCell<ListObj>>),
    Dict(Rc<RefCell<DictObj>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn new_dict() -> Value {
        Value::Dict(Rc::new(RefCell::new(DictObj::empty())))
    }
}

const RECURSIVE: &str = "recursive container structure is not supported";

fn depth_of(v: &Value) -> Result<usize, String> {
    Ok(match v {
        Value::Tuple(t) => t.depth,
        Value::List(l) => l.try_borrow().map_err(|_| RECURSIVE)?.depth,
        Value::Dict(d) => d.try_borrow().map_err(|_| RECURSIVE)?.depth,
        _ => 0,
    })
}

fn same_container(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::List(x), Value::List(y)) => Rc::ptr_eq(x, y),
        (Value::Dict(x), Value::Dict(y)) => Rc::ptr_eq(x, y),
        _ => false,
    }
}

/// Prepares `child` for insertion into `parent`: refuses self-insertion,
/// seals mutable children and returns the child's nesting depth.
fn adopt(child: &Value, parent: Option<&Value>) -> Result<usize, String> {
    if parent.is_some_and(|p| same_container(p, child)) {
        return Err(RECURSIVE.into());
    }
    let depth = depth_of(child)?;
    match child {
        Value::List(l) => l.try_borrow_mut().map_err(|_| RECURSIVE)?.sealed = true,
        Value::Dict(d) => d.try_borrow_mut().map_err(|_| RECURSIVE)?.sealed = true,
        _ => {}
    }
    Ok(depth)
}

fn nested_depth(child_depth: usize) -> Result<usize, String> {
    let d = child_depth + 1;
    if d > MAX_NESTING {
        Err(format!("containers nest deeper than {MAX_NESTING} levels"))
    } else {
        Ok(d)
    }
}

fn make_tuple(items: Vec<Value>) -> Result<Value, String> {
    let mut max = 0;
    for it in &items {
        max = max.max(adopt(it, None)?);
    }
    let depth = nested_depth(max)?;
    Ok(Value::Tuple(Rc::new(TupleObj { items, depth })))
}

fn make_list(items: Vec<Value>) -> Result<Value, String> {
    let list = Value::List(Rc::new(RefCell::new(ListObj::empty())));
    list_extend(&list, items)?;
    Ok(list)
}

fn list_extend(list: &Value, items: Vec<Value>) -> Result<(), String> {
    let Value::List(l) = list else {
        return Err(format!(
            "APPEND target is a {}, expected a list",
            list.type_name()
        ));
    };
    let mut max = 0;
    for it in &items {
        max = max.max(adopt(it, Some(list))?);
    }
    let depth = nested_depth(max)?;
    let mut l = l.try_borrow_mut().map_err(|_| RECURSIVE)?;
    if l.sealed {
        return Err(RECURSIVE.into());
    }
    l.depth = l.depth.max(depth);
    l.items.extend(items);
    Ok(())
}

fn check_key(k: &Value) -> Result<(), String> {
    match k {
        Value::None
        | Value::Bool(_)
        | Value::Int(_)
        | Value::Float
        | Value::Str(_)
        | Value::Bytes
        | Value::Tuple(_) => Ok(()),
        other => Err(format!(
            "unsupported dict key of type {}",
            other.type_name()
        )),
    }
}

fn dict_set_items(dict: &Value, flat: Vec<Value>) -> Result<(), String> {
    let Value::Dict(d) = dict else {
        return Err(format!(
            "SETITEM target is a {}, expected a dict",
            dict.type_name()
        ));
    };
    if !flat.len().is_multiple_of(2) {
        return Err("SETITEMS with an odd number of stack items".into());
    }
    let mut max = 0;
    for (i, it) in flat.iter().enumerate() {
        if i % 2 == 0 {
            check_key(it)?;
        }
        max = max.max(adopt(it, Some(dict))?);
    }
    let depth = nested_depth(max)?;
    let mut d = d.try_borrow_mut().map_err(|_| RECURSIVE)?;
    if d.sealed {
        return Err(RECURSIVE.into());
    }
    d.depth = d.depth.max(depth);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.items.push((k, v));
    }
    Ok(())
}

fn as_int(v: &Value, what: &str) -> Result<i64, String> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(i64::from(*b)),
        other => Err(format!(
            "{what} is a {}, expected an int",
            other.type_name()
        )),
    }
}

fn int_seq(v: &Value, what: &str) -> Result<Vec<i64>, String> {
    let conv = |items: &[Value]| items.iter().map(|x| as_int(x, what)).collect();
    match v {
        Value::Tuple(t) => conv(&t.items),
        Value::List(l) => conv(&l.try_borrow().map_err(|_| RECURSIVE)?.items),
        other => Err(format!(
            "{what} is a {}, expected a tuple of ints",
            other.type_name()
        )),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
/// backward_hooks[, metadata])` or `_rebuild_tensor_v3(..., backward_hooks,
/// dtype[, metadata])`.
fn rebuild_tensor(args: &[Value], v3: bool) -> Result<Value, String> {
    let (fname, lo, hi) = if v3 {
        ("_rebuild_tensor_v3", 7, 8)
    } else {
        ("_rebuild_tensor_v2", 6, 7)
    };
    if args.len() < lo || args.len() > hi {
        return Err(format!(
            "{fname} called with {} arguments, expected {lo} or {hi}",
            args.len()
        ));
    }
    let Value::Storage(storage) = &args[0] else {
        return Err(format!(
            "{fname}: first argument is a {}, expected a storage",
            args[0].type_name()
        ));
    };
    let offset = as_int(&args[1], "storage offset")?;
    let size = int_seq(&args[2], "tensor size")?;
    let stride = int_seq(&args[3], "tensor stride")?;
    if size.len() != stride.len() {
        return Err(format!(
            "{fname}: size has {} dimensions but stride has {}",
            size.len(),
            stride.len()
        ));
    }
    let elem = if v3 {
        match &args[6] {
            Value::Global(Global::DType(e)) => *e,
            other => {
                return Err(format!(
                    "{fname}: dtype argument is a {}, expected a torch dtype",
                    other.type_name()
                ));
            }
        }
    } else {
        storage.elem
    };
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: Rc::clone(storage),
        offset,
        size,
        stride,
        elem,
    })))
}

/// `('storage', torch.<X>Storage, key, location, numel)`.
fn persistent_load(pid: &Value) -> Result<Value, String> {
    let Value::Tuple(t) = pid else {
        return Err(format!(
            "persistent id is a {}, expected a tuple",
            pid.type_name()
        ));
    };
    let items = &t.items;
    let tag_ok = matches!(items.first(), Some(Value::Str(s)) if &**s == "storage");
    if !tag_ok || !(items.len() == 5 || items.len() == 6) {
        return Err(
            "unsupported persistent id (expected ('storage', type, key, location, numel))".into(),
        );
    }
    let Value::Global(Global::StorageClass(elem)) = &items[1] else {
        return Err(format!(
            "persistent id storage type is a {}, expected a torch storage class",
            items[1].type_name()
        ));
    };
    let key: Rc<str> = match &items[2] {
        Value::Str(s) => Rc::clone(s),
        Value::Int(i) => i.to_string().into(),
        other => {
            return Err(format!(
                "persistent id key is a {}, expected a str",
                other.type_name()
            ));
        }
    };
    let numel = as_int(&items[4], "persistent id numel")?;
    let numel =
        u64::try_from(numel).map_err(|_| format!("storage {key} has negative size {numel}"))?;
    Ok(Value::Storage(Rc::new(StorageRef { key, elem, numel })))
}

#[derive(Debug)]
enum PErrKind {
    Malformed(String),
    Opcode(u8),
    Global { module: String, name: String },
    Limit { what: &'static str, limit: u64 },
}

#[derive(Debug)]
struct PErr {
    offset: usize,
    kind: PErrKind,
}

impl PErr {
    fn into_error(self, path: &Path) -> TorchBinError {
        let path = path.to_path_buf();
        let offset = self.offset;
        match self.kind {
            PErrKind::Malformed(msg) => TorchBinError::Pickle { path, offset, msg },
            PErrKind::Opcode(opcode) => TorchBinError::UnsupportedOpcode {
                path,
                offset,
                opcode,
            },
            PErrKind::Global { module, name } => TorchBinError::UnsupportedGlobal {
                path,
                offset,
                module,
                name,
            },
            PErrKind::Limit { what, limit } => TorchBinError::LimitExceeded {
                path,
                offset,
                what,
                limit,
            },
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    op_start: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    limits: &'a BinLimits,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], limits: &'a BinLimits) -> Self {
        Unpickler {
            data,
            pos: 0,
            op_start: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            limits,
        }
    }

    fn err(&self, kind: PErrKind) -> PErr {
        PErr {
            offset: self.op_start,
            kind,
        }
    }

    fn bad(&self, msg: impl Into<String>) -> PErr {
        self.err(PErrKind::Malformed(msg.into()))
    }

    fn limit(&self, what: &'static str, limit: usize) -> PErr {
        self.err(PErrKind::Limit {
            what,
            limit: limit as u64,
        })
    }

    /// Takes `n` bytes, refusing before any allocation if they are not there.
    fn take(&mut self, n: u64) -> Result<&'a [u8], PErr> {
        let remaining = self.data.len() - self.pos;
        if n > remaining as u64 {
            return Err(self.bad(format!(
                "truncated: needs {n} bytes but only {remaining} remain"
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.data[start..self.pos])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PErr> {
        let b = self.take(N as u64)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PErr> {
        Ok(self.array::<1>()?[0])
    }

    fn u32le(&mut self) -> Result<u32, PErr> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64le(&mut self) -> Result<u64, PErr> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn line(&mut self) -> Result<&'a str, PErr> {
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_LINE + 1)];
        let Some(n) = window.iter().position(|&b| b == b'\n') else {
            return Err(self.bad(format!(
                "GLOBAL operand is not a newline-terminated line of at most {MAX_GLOBAL_LINE} bytes"
            )));
        };
        let s = std::str::from_utf8(&window[..n])
            .map_err(|_| self.bad("GLOBAL operand is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn text(&self, bytes: &[u8]) -> Result<Value, PErr> {
        let s = std::str::from_utf8(bytes).map_err(|_| self.bad("string is not valid UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: Value) -> Result<(), PErr> {
        if self.stack.len() >= self.limits.max_stack_depth {
            return Err(self.limit("pickle stack depth", self.limits.max_stack_depth));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PErr> {
        if self.stack.len() <= self.floor() {
            return Err(self.bad("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.bad("stack underflow"))
    }

    fn top(&self) -> Result<&Value, PErr> {
        if self.stack.len() <= self.floor() {
            return Err(self.bad("stack underflow"));
        }
        self.stack.last().ok_or_else(|| self.bad("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, PErr> {
        let Some(m) = self.marks.pop() else {
            return Err(self.bad("no MARK on the stack"));
        };
        if m > self.stack.len() {
            return Err(self.bad("MARK above the stack top"));
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), PErr> {
        let v = self.top()?.clone();
        if !self.memo.contains_key(&idx) && self.memo.len() >= self.limits.max_memo {
            return Err(self.limit("pickle memo size", self.limits.max_memo));
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<(), PErr> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.bad(format!("memo key {idx} is not defined")))?;
        self.push(v)
    }

    fn global(&self, module: &str, name: &str) -> Result<Value, PErr> {
        resolve_global(module, name)
            .map(Value::Global)
            .ok_or_else(|| {
                self.err(PErrKind::Global {
                    module: module.to_owned(),
                    name: name.to_owned(),
                })
            })
    }

    /// Applies a small helper that reports errors as plain strings.
    fn lift<T>(&self, r: Result<T, String>) -> Result<T, PErr> {
        r.map_err(|m| self.bad(m))
    }

    fn pop_tuple(&mut self, n: usize) -> Result<(), PErr> {
        let floor = self.floor();
        if self.stack.len() < floor + n {
            return Err(self.bad("stack underflow"));
        }
        let items = self.stack.split_off(self.stack.len() - n);
        let t = self.lift(make_tuple(items))?;
        self.push(t)
    }

    fn reduce(&mut self, func: Value, args: Value) -> Result<Value, PErr> {
        let Value::Global(g) = func else {
            return Err(self.bad(format!(
                "REDUCE callable is a {}, expected a global",
                func.type_name()
            )));
        };
        let Value::Tuple(args) = args else {
            return Err(self.bad(format!(
                "REDUCE arguments are a {}, expected a tuple",
                args.type_name()
            )));
        };
        let a = &args.items;
        match g {
            Global::OrderedDict => {
                let dict = Value::new_dict();
                match a.as_slice() {
                    [] => {}
                    [pairs] => {
                        let pairs: Vec<Value> = match pairs {
                            Value::Tuple(t) => t.items.clone(),
                            Value::List(l) => self
                                .lift(l.try_borrow().map_err(|_| RECURSIVE.to_string()))?
                                .items
                                .clone(),
                            other => {
                                return Err(self.bad(format!(
                                    "OrderedDict argument is a {}, expected pairs",
                                    other.type_name()
                                )));
                            }
                        };
                        let mut flat = Vec::with_capacity(pairs.len() * 2);
                        for p in pairs {
                            match p {
                                Value::Tuple(t) if t.items.len() == 2 => {
                                    flat.extend(t.items.iter().cloned())
                                }
                                _ => return Err(self.bad("OrderedDict item is not a pair")),
                            }
                        }
                        self.lift(dict_set_items(&dict, flat))?;
                    }
                    _ => return Err(self.bad("OrderedDict called with more than one argument")),
                }
                Ok(dict)
            }
            Global::RebuildTensorV2 => self.lift(rebuild_tensor(a, false)),
            Global::RebuildTensorV3 => self.lift(rebuild_tensor(a, true)),
            Global::RebuildParameter => {
                match a.as_slice() {
                    [Value::Tensor(t), _, _] => Ok(Value::Tensor(Rc::clone(t))),
                    _ => Err(self
                        .bad("_rebuild_parameter expects (tensor, requires_grad, backward_hooks)")),
                }
            }
            Global::StorageClass(e) => Err(self.bad(format!(
                "calling storage class {} is not supported",
                e.storage.unwrap_or("UntypedStorage")
            ))),
            Global::DType(e) => {
                Err(self.bad(format!("calling dtype {} is not supported", e.dtype)))
            }
        }
    }

    fn run(mut self) -> Result<Value, PErr> {
        loop {
            self.op_start = self.pos;
            if self.pos >= self.data.len() {
                return Err(self.bad("pickle ends without STOP"));
            }
            let code = self.u8()?;
            match code {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.bad(format!("unsupported pickle protocol {v}")));
                    }
                }
                op::FRAME => {
                    let n = self.u64le()?;
                    let remaining = (self.data.len() - self.pos) as u64;
                    if n > remaining {
                        return Err(
                            self.bad(format!("FRAME of {n} bytes but only {remaining} remain"))
                        );
                    }
                }
                op::STOP => return self.pop(),
                op::MARK => {
                    if self.marks.len() >= self.limits.max_stack_depth {
                        return Err(self.limit("open MARK count", self.limits.max_stack_depth));
                    }
                    self.marks.push(self.stack.len());
                }
                op::POP => {
                    self.pop()?;
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                op::NONE => self.push(Value::None)?,
                op::NEWTRUE => self.push(Value::Bool(true))?,
                op::NEWFALSE => self.push(Value::Bool(false))?,
                op::BININT => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)))?;
                }
                op::LONG1 | op::LONG4 => {
                    let n = if code == op::LONG1 {
                        u64::from(self.u8()?)
                    } else {
                        u64::from(self.u32le()?)
                    };
                    let bytes = self.take(n)?;
                    let v = decode_long(bytes)
                        .ok_or_else(|| self.bad("integer does not fit in 64 bits"))?;
                    self.push(Value::Int(v))?;
                }
                op::BINFLOAT => {
                    self.take(8)?;
                    self.push(Value::Float)?;
                }
                op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8 => {
                    let n = match code {
                        op::SHORT_BINUNICODE => u64::from(self.u8()?),
                        op::BINUNICODE => u64::from(self.u32le()?),
                        _ => self.u64le()?,
                    };
                    let b = self.take(n)?;
                    let v = self.text(b)?;
                    self.push(v)?;
                }
                op::BINSTRING | op::SHORT_BINSTRING => {
                    let n = if code == op::SHORT_BINSTRING {
                        u64::from(self.u8()?)
                    } else {
                        let n = i32::from_le_bytes(self.array()?);
                        u64::try_from(n).map_err(|_| self.bad("BINSTRING with negative length"))?
                    };
                    let b = self.take(n)?;
                    // torch.load decodes legacy byte strings as UTF-8.
                    let v = match std::str::from_utf8(b) {
                        Ok(s) => Value::Str(Rc::from(s)),
                        Err(_) => Value::Bytes,
                    };
                    self.push(v)?;
                }
                op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 => {
                    let n = match code {
                        op::SHORT_BINBYTES => u64::from(self.u8()?),
                        op::BINBYTES => u64::from(self.u32le()?),
                        _ => self.u64le()?,
                    };
                    self.take(n)?;
                    self.push(Value::Bytes)?;
                }
                op::EMPTY_TUPLE => {
                    let t = self.lift(make_tuple(Vec::new()))?;
                    self.push(t)?;
                }
                op::TUPLE1 => self.pop_tuple(1)?,
                op::TUPLE2 => self.pop_tuple(2)?,
                op::TUPLE3 => self.pop_tuple(3)?,
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    let t = self.lift(make_tuple(items))?;
                    self.push(t)?;
                }
                op::EMPTY_LIST => {
                    let l = self.lift(make_list(Vec::new()))?;
                    self.push(l)?;
                }
                op::LIST => {
                    let items = self.pop_mark()?;
                    let l = self.lift(make_list(items))?;
                    self.push(l)?;
                }
                op::EMPTY_DICT => self.push(Value::new_dict())?,
                op::DICT => {
                    let items = self.pop_mark()?;
                    let d = Value::new_dict();
                    self.lift(dict_set_items(&d, items))?;
                    self.push(d)?;
                }
                op::APPEND => {
                    let v = self.pop()?;
                    let list = self.top()?.clone();
                    self.lift(list_extend(&list, vec![v]))?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    let list = self.top()?.clone();
                    self.lift(list_extend(&list, items))?;
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?.clone();
                    self.lift(dict_set_items(&dict, vec![k, v]))?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?.clone();
                    self.lift(dict_set_items(&dict, items))?;
                }
                op::BINPUT => {
                    let i = self.u8()?;
                    self.memo_put(u32::from(i))?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32le()?;
                    self.memo_put(i)?;
                }
                op::MEMOIZE => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| self.limit("pickle memo size", self.limits.max_memo))?;
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.u8()?;
                    self.memo_get(u32::from(i))?;
                }
                op::LONG_BINGET => {
                    let i = self.u32le()?;
                    self.memo_get(i)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.push(g)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return Err(self.bad("STACK_GLOBAL operands are not strings"));
                    };
                    let g = self.global(module, name)?;
                    self.push(g)?;
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v)?;
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let empty = matches!(&args, Value::Tuple(t) if t.items.is_empty());
                    if !(matches!(cls, Value::Global(Global::OrderedDict)) && empty) {
                        return Err(self.bad(format!(
                            "NEWOBJ of a {} is not supported (only OrderedDict())",
                            cls.type_name()
                        )));
                    }
                    self.push(Value::new_dict())?;
                }
                op::BUILD => {
                    // State of an OrderedDict (e.g. `_metadata` of a
                    // state_dict) or of a tensor carries Python attributes
                    // only; it is dropped.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(target, Value::Dict(_) | Value::Tensor(_)) {
                        return Err(self.bad(format!(
                            "BUILD on a {} is not supported",
                            target.type_name()
                        )));
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let v = self.lift(persistent_load(&pid))?;
                    self.push(v)?;
                }
                other => return Err(self.err(PErrKind::Opcode(other))),
            }
        }
    }
}

/// Little-endian two's complement (LONG1 / LONG4 payload).
fn decode_long(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() {
        return Some(0);
    }
    if bytes.len() > 16 {
        return None;
    }
    let negative = bytes[bytes.len() - 1] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
    buf[..bytes.len()].copy_from_slice(bytes);
    i64::try_from(i128::from_le_bytes(buf)).ok()
}

// ---------------------------------------------------------------------------
// From the unpickled object to a list of tensor plans.
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct TensorPlan {
    name: String,
    dtype: BinDType,
    shape: Vec<usize>,
    key: Rc<str>,
    /// Element offset into the storage, as in the pickle.
    elem_offset: u64,
    byte_offset: u64,
    nbytes: u64,
    /// Storage size the pickle declares, in bytes.
    storage_bytes: u64,
}

impl TensorPlan {
    fn end(&self) -> u64 {
        self.byte_offset + self.nbytes
    }
}

fn plan_tensor(
    path: &Path,
    name: &str,
    t: &TensorRef,
    limits: &BinLimits,
) -> Result<TensorPlan, TorchBinError> {
    let bad = |msg: String| TorchBinError::BadTensor {
        path: path.to_path_buf(),
        tensor: name.to_owned(),
        msg,
    };
    let Some(dtype) = t.elem.bin else {
        return Err(TorchBinError::UnsupportedDType {
            path: path.to_path_buf(),
            tensor: name.to_owned(),
            dtype: t.elem.dtype,
        });
    };
    if t.size.len() > limits.max_rank {
        return Err(TorchBinError::RankTooLarge {
            path: path.to_path_buf(),
            tensor: name.to_owned(),
            rank: t.size.len(),
            limit: limits.max_rank,
        });
    }
    let mut shape = Vec::with_capacity(t.size.len());
    let mut numel: u64 = 1;
    for &d in &t.size {
        let d = u64::try_from(d)
            .map_err(|_| bad(format!("negative dimension in shape {:?}", t.size)))?;
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| bad(format!("shape {:?} overflows", t.size)))?;
        shape.push(usize::try_from(d).map_err(|_| bad(format!("shape {:?} overflows", t.size)))?);
    }
    if numel > 0 {
        let mut expected: i64 = 1;
        for (&d, &s) in t.size.iter().zip(&t.stride).rev() {
            if d != 1 && s != expected {
                return Err(TorchBinError::NonContiguous {
                    path: path.to_path_buf(),
                    tensor: name.to_owned(),
                    shape: t.size.clone(),
                    stride: t.stride.clone(),
                });
            }
            // Cannot overflow: the product of all dimensions fits in u64 and
            // every prefix product is at most numel, checked against i64 here.
            expected = expected.saturating_mul(d);
        }
    }
    let elem_offset = u64::try_from(t.offset)
        .map_err(|_| bad(format!("negative storage offset {}", t.offset)))?;
    let esize = dtype.size_bytes() as u64;
    let overflow = || bad("tensor extent overflows".to_owned());
    let byte_offset = elem_offset.checked_mul(esize).ok_or_else(overflow)?;
    let nbytes = numel.checked_mul(esize).ok_or_else(overflow)?;
    byte_offset.checked_add(nbytes).ok_or_else(overflow)?;
    usize::try_from(nbytes).map_err(|_| overflow())?;
    let storage_bytes = t
        .storage
        .numel
        .checked_mul(t.storage.elem.size)
        .ok_or_else(|| bad(format!("storage {} size overflows", t.storage.key)))?;
    Ok(TensorPlan {
        name: name.to_owned(),
        dtype,
        shape,
        key: Rc::clone(&t.storage.key),
        elem_offset,
        byte_offset,
        nbytes,
        storage_bytes,
    })
}

/// Runs the restricted unpickler on `pkl` and checks that it describes a
/// dict of supported tensors.
fn plan_from_pickle(
    path: &Path,
    pkl: &[u8],
    limits: &BinLimits,
) -> Result<Vec<TensorPlan>, TorchBinError> {
    let root = Unpickler::new(pkl, limits)
        .run()
        .map_err(|e| e.into_error(path))?;
    let Value::Dict(dict) = &root else {
        return Err(TorchBinError::NotAStateDict {
            path: path.to_path_buf(),
            found: root.type_name(),
        });
    };
    let dict = dict.try_borrow().map_err(|_| TorchBinError::Pickle {
        path: path.to_path_buf(),
        offset: pkl.len(),
        msg: RECURSIVE.into(),
    })?;
    if dict.items.len() > limits.max_tensors {
        return Err(TorchBinError::TooManyTensors {
            path: path.to_path_buf(),
            count: dict.items.len(),
            limit: limits.max_tensors,
        });
    }
    let mut seen: HashSet<&str> = HashSet::with_capacity(dict.items.len());
    let mut plans = Vec::with_capacity(dict.items.len());
    for (k, v) in &dict.items {
        let Value::Str(name) = k else {
            return Err(TorchBinError::BadEntry {
                path: path.to_path_buf(),
                key: format!("<{}>", k.type_name()),
                msg: "key is not a str".into(),
            });
        };
        let Value::Tensor(t) = v else {
            return Err(TorchBinError::BadEntry {
                path: path.to_path_buf(),
                key: name.to_string(),
                msg: format!("value is a {}, expected a tensor", v.type_name()),
            });
        };
        if !seen.insert(name) {
            return Err(TorchBinError::DuplicateTensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
            });
        }
        plans.push(plan_tensor(path, name, t, limits)?);
    }
    Ok(plans)
}

// ---------------------------------------------------------------------------
// Reading the archive.
// ---------------------------------------------------------------------------

type Archive = ZipArchive<BufReader<File>>;

fn io_err(path: &Path, action: impl Into<String>) -> impl FnOnce(io::Error) -> TorchBinError {
    let path = path.to_path_buf();
    let action = action.into();
    move |source| TorchBinError::Io {
        path,
        action,
        source,
    }
}

fn entry_err(path: &Path, entry: &str) -> impl FnOnce(ZipError) -> TorchBinError {
    let path = path.to_path_buf();
    let entry = entry.to_owned();
    move |source| TorchBinError::ZipEntry {
        path,
        entry,
        source,
    }
}

/// Finds the single `<prefix>/data.pkl` entry and returns the prefix.
fn find_prefix(path: &Path, zip: &Archive) -> Result<String, TorchBinError> {
    let mut found: Vec<String> = Vec::new();
    for name in zip.file_names() {
        let Ok(name) = name else { continue };
        if let Some(prefix) = name.strip_suffix("/data.pkl")
            && !prefix.is_empty()
            && !prefix.contains('/')
        {
            found.push(name.into_owned());
        }
    }
    match found.len() {
        0 => Err(TorchBinError::MissingDataPkl {
            path: path.to_path_buf(),
        }),
        1 => Ok(found[0]
            .strip_suffix("/data.pkl")
            .unwrap_or_default()
            .to_owned()),
        _ => Err(TorchBinError::AmbiguousDataPkl {
            path: path.to_path_buf(),
            entries: found,
        }),
    }
}

/// Reads a whole stored entry after checking its declared size against
/// `limit`; the zip reader itself refuses data beyond the declared size and
/// checks the CRC.
fn read_entry(
    path: &Path,
    zip: &mut Archive,
    index: usize,
    entry: &str,
    limit: u64,
    action: &str,
) -> Result<Vec<u8>, TorchBinError> {
    let mut f = zip.by_index(index).map_err(entry_err(path, entry))?;
    if f.compression() != CompressionMethod::Stored {
        return Err(TorchBinError::UnsupportedCompression {
            path: path.to_path_buf(),
            entry: entry.to_owned(),
            method: f.compression().to_string(),
        });
    }
    let declared = f.size();
    if declared > limit {
        return Err(TorchBinError::EntryTooLarge {
            path: path.to_path_buf(),
            entry: entry.to_owned(),
            size: declared,
            limit,
        });
    }
    let cap = usize::try_from(declared).map_err(|_| TorchBinError::EntryTooLarge {
        path: path.to_path_buf(),
        entry: entry.to_owned(),
        size: declared,
        limit: usize::MAX as u64,
    })?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(cap).map_err(|e| TorchBinError::Io {
        path: path.to_path_buf(),
        action: format!("{action}: allocating {cap} bytes"),
        source: io::Error::new(io::ErrorKind::OutOfMemory, e),
    })?;
    f.read_to_end(&mut buf).map_err(io_err(path, action))?;
    if buf.len() as u64 != declared {
        return Err(TorchBinError::EntrySizeMismatch {
            path: path.to_path_buf(),
            entry: entry.to_owned(),
            declared,
            actual: buf.len() as u64,
        });
    }
    Ok(buf)
}

/// Compression method and declared size of an entry, without reading it.
fn entry_meta(
    path: &Path,
    zip: &mut Archive,
    index: usize,
    entry: &str,
) -> Result<(CompressionMethod, u64), TorchBinError> {
    let f = zip.by_index(index).map_err(entry_err(path, entry))?;
    Ok((f.compression(), f.size()))
}

fn check_byteorder(path: &Path, zip: &mut Archive, prefix: &str) -> Result<(), TorchBinError> {
    let entry = format!("{prefix}/byteorder");
    let Some(index) = zip.index_for_name(&entry) else {
        return Ok(());
    };
    let data = read_entry(path, zip, index, &entry, 16, "reading the byteorder record")?;
    let found = String::from_utf8_lossy(&data).trim().to_owned();
    if found == "little" {
        Ok(())
    } else {
        Err(TorchBinError::ByteOrder {
            path: path.to_path_buf(),
            found,
        })
    }
}

/// Reads every tensor of a `torch.save` zip checkpoint (a dict of bf16, f16
/// or f32 tensors) in the dict's order.
pub fn read_torch_bin(path: &Path, limits: &BinLimits) -> Result<Vec<BinTensor>, TorchBinError> {
    let file = File::open(path).map_err(io_err(path, "opening the file"))?;
    let file_len = file
        .metadata()
        .map_err(io_err(path, "reading file metadata"))?
        .len();
    if file_len > limits.max_file_bytes {
        return Err(TorchBinError::FileTooLarge {
            path: path.to_path_buf(),
            size: file_len,
            limit: limits.max_file_bytes,
        });
    }
    let mut zip = ZipArchive::new(BufReader::new(file)).map_err(|source| TorchBinError::Zip {
        path: path.to_path_buf(),
        source,
    })?;
    let prefix = find_prefix(path, &zip)?;
    check_byteorder(path, &mut zip, &prefix)?;

    let pkl_name = format!("{prefix}/data.pkl");
    let pkl_index = zip
        .index_for_name(&pkl_name)
        .ok_or_else(|| TorchBinError::MissingDataPkl {
            path: path.to_path_buf(),
        })?;
    let pkl = read_entry(
        path,
        &mut zip,
        pkl_index,
        &pkl_name,
        limits.max_pickle_bytes.min(file_len),
        "reading data.pkl",
    )?;
    let plans = plan_from_pickle(path, &pkl, limits)?;
    drop(pkl);

    // Group tensors by storage, in order of first use.
    let mut groups: Vec<(Rc<str>, Vec<usize>)> = Vec::new();
    let mut group_of: HashMap<Rc<str>, usize> = HashMap::new();
    for (i, p) in plans.iter().enumerate() {
        match group_of.get(&p.key) {
            Some(&g) => groups[g].1.push(i),
            None => {
                group_of.insert(Rc::clone(&p.key), groups.len());
                groups.push((Rc::clone(&p.key), vec![i]));
            }
        }
    }

    let mut out: Vec<Option<BinTensor>> = Vec::with_capacity(plans.len());
    out.resize_with(plans.len(), || None);
    for (key, members) in &groups {
        let first = &plans[members[0]];
        let entry = format!("{prefix}/data/{key}");
        let Some(index) = zip.index_for_name(&entry) else {
            return Err(TorchBinError::MissingStorage {
                path: path.to_path_buf(),
                tensor: first.name.clone(),
                key: key.to_string(),
                entry,
            });
        };
        let (method, size) = entry_meta(path, &mut zip, index, &entry)?;
        if method != CompressionMethod::Stored {
            return Err(TorchBinError::UnsupportedCompression {
                path: path.to_path_buf(),
                entry,
                method: method.to_string(),
            });
        }
        for &m in members {
            let p = &plans[m];
            if p.end() > size {
                return Err(TorchBinError::StorageTooSmall {
                    path: path.to_path_buf(),
                    tensor: p.name.clone(),
                    key: key.to_string(),
                    n: size,
                    shape: p.shape.clone(),
                    offset: p.elem_offset,
                    m: p.end(),
                });
            }
            if p.storage_bytes > size {
                return Err(TorchBinError::StorageSizeMismatch {
                    path: path.to_path_buf(),
                    tensor: p.name.clone(),
                    key: key.to_string(),
                    declared: p.storage_bytes,
                    actual: size,
                });
            }
        }
        let action = format!("reading storage {key} of tensor {}", first.name);
        let mut bytes = read_entry(path, &mut zip, index, &entry, file_len, &action)?;
        let whole = members.len() == 1 && first.byte_offset == 0 && first.nbytes == size;
        for &m in members {
            let p = &plans[m];
            let data = if whole {
                std::mem::take(&mut bytes)
            } else {
                // Bounds were checked against `size`, which equals bytes.len().
                let start = p.byte_offset as usize;
                bytes[start..start + p.nbytes as usize].to_vec()
            };
            out[m] = Some(BinTensor {
                name: p.name.clone(),
                dtype: p.dtype,
                shape: p.shape.clone(),
                data,
            });
        }
    }
    Ok(out.into_iter().flatten().collect())
}

// ---------------------------------------------------------------------------
// Writing.
// ---------------------------------------------------------------------------

/// One entry of the pickled dict, as the writer (and the tests) describe it.
#[derive(Debug, Clone)]
struct PickleTensorSpec<'a> {
    name: &'a str,
    storage_class: &'a str,
    key: &'a str,
    storage_numel: u64,
    offset: u64,
    shape: &'a [usize],
    stride: &'a [usize],
}

struct PickleWriter {
    out: Vec<u8>,
    globals: HashMap<(String, String), u32>,
    next_memo: u32,
}

impl PickleWriter {
    fn new() -> Self {
        PickleWriter {
            out: vec![op::PROTO, 2],
            globals: HashMap::new(),
            next_memo: 0,
        }
    }

    fn global(&mut self, module: &str, name: &str) {
        let key = (module.to_owned(), name.to_owned());
        if let Some(&i) = self.globals.get(&key) {
            if let Ok(i) = u8::try_from(i) {
                self.out.extend([op::BINGET, i]);
            } else {
                self.out.push(op::LONG_BINGET);
                self.out.extend(i.to_le_bytes());
            }
            return;
        }
        self.out.push(op::GLOBAL);
        self.out.extend(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend(name.as_bytes());
        self.out.push(b'\n');
        let i = self.next_memo;
        self.next_memo += 1;
        if let Ok(b) = u8::try_from(i) {
            self.out.extend([op::BINPUT, b]);
        } else {
            self.out.push(op::LONG_BINPUT);
            self.out.extend(i.to_le_bytes());
        }
        self.globals.insert(key, i);
    }

    /// BINUNICODE; callers check that `s` is shorter than 4 GiB.
    fn string(&mut self, s: &str) {
        self.out.push(op::BINUNICODE);
        self.out.extend((s.len() as u32).to_le_bytes());
        self.out.extend(s.as_bytes());
    }

    fn int(&mut self, v: u64) {
        if let Ok(b) = u8::try_from(v) {
            self.out.extend([op::BININT1, b]);
        } else if let Ok(w) = u16::try_from(v) {
            self.out.push(op::BININT2);
            self.out.extend(w.to_le_bytes());
        } else if let Ok(d) = i32::try_from(v) {
            self.out.push(op::BININT);
            self.out.extend(d.to_le_bytes());
        } else {
            // Minimal little-endian two's complement, as pickle's LONG1.
            let bytes = v.to_le_bytes();
            let mut n = 8 - (v.leading_zeros() / 8) as usize;
            let mut payload = bytes[..n].to_vec();
            if payload[n - 1] & 0x80 != 0 {
                payload.push(0);
                n += 1;
            }
            self.out.extend([op::LONG1, n as u8]);
            self.out.extend(payload);
        }
    }

    fn int_tuple(&mut self, vals: &[usize]) {
        let is_small = vals.len() <= 3;
        if vals.is_empty() {
            self.out.push(op::EMPTY_TUPLE);
            return;
        }
        if !is_small {
            self.out.push(op::MARK);
        }
        for &v in vals {
            self.int(v as u64);
        }
        self.out.push(match vals.len() {
            1 => op::TUPLE1,
            2 => op::TUPLE2,
            3 => op::TUPLE3,
            _ => op::TUPLE,
        });
    }

    fn tensor(&mut self, t: &PickleTensorSpec<'_>) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(op::MARK);
        // persistent id ('storage', torch.<X>Storage, key, 'cpu', numel)
        self.out.push(op::MARK);
        self.string("storage");
        self.global("torch", t.storage_class);
        self.string(t.key);
        self.string("cpu");
        self.int(t.storage_numel);
        self.out.push(op::TUPLE);
        self.out.push(op::BINPERSID);
        self.int(t.offset);
        self.int_tuple(t.shape);
        self.int_tuple(t.stride);
        self.out.push(op::NEWFALSE);
        self.global("collections", "OrderedDict");
        self.out.extend([op::EMPTY_TUPLE, op::REDUCE]);
        self.out.extend([op::TUPLE, op::REDUCE]);
    }
}

/// Pickles an OrderedDict of tensors the way `torch.save` does (protocol 2).
fn encode_pickle(specs: &[PickleTensorSpec<'_>]) -> Vec<u8> {
    let mut w = PickleWriter::new();
    w.global("collections", "OrderedDict");
    w.out.extend([op::EMPTY_TUPLE, op::REDUCE]);
    for batch in specs.chunks(1000) {
        w.out.push(op::MARK);
        for t in batch {
            w.string(t.name);
            w.tensor(t);
        }
        w.out.push(op::SETITEMS);
    }
    w.out.push(op::STOP);
    w.out
}

fn contiguous_stride(shape: &[usize]) -> Vec<usize> {
    let mut stride = vec![0; shape.len()];
    let mut acc = 1usize;
    for (s, &d) in stride.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(d);
    }
    stride
}

fn invalid_input(path: &Path, msg: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {msg}", path.display()),
    )
}

fn with_path(path: &Path) -> impl Fn(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn zip_to_io(path: &Path) -> impl Fn(ZipError) -> io::Error + '_ {
    move |e| {
        let e = io::Error::from(e);
        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
}

/// Stored entries, data aligned to 64 bytes like torch's own writer.
fn entry_options(len: u64) -> SimpleFileOptions {
    SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .with_alignment(64)
        .large_file(len >= u64::from(u32::MAX))
}

/// Writes a zip archive with the given named entries (stored, aligned).
fn write_zip_entries(path: &Path, entries: &[(&str, &[u8])]) -> io::Result<()> {
    let file = File::create(path).map_err(with_path(path))?;
    let mut zip = ZipWriter::new(BufWriter::new(file));
    for (name, data) in entries {
        zip.start_file(*name, entry_options(data.len() as u64))
            .map_err(zip_to_io(path))?;
        zip.write_all(data).map_err(with_path(path))?;
    }
    let mut inner = zip.finish().map_err(zip_to_io(path))?;
    inner.flush().map_err(with_path(path))?;
    inner.get_mut().sync_all().map_err(with_path(path))?;
    Ok(())
}

/// Writes `tensors` as a `torch.save` zip checkpoint (an OrderedDict of
/// tensors, one storage each) that `torch.load(path, weights_only=True)`
/// reads.
pub fn write_torch_bin(path: &Path, tensors: &[BinTensor]) -> io::Result<()> {
    let mut names = HashSet::with_capacity(tensors.len());
    let mut strides = Vec::with_capacity(tensors.len());
    let mut numels = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(invalid_input(
                path,
                format!("tensor {}: duplicate tensor name", t.name),
            ));
        }
        if u32::try_from(t.name.len()).is_err() {
            return Err(invalid_input(
                path,
                "tensor name longer than 4 GiB".to_owned(),
            ));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                invalid_input(
                    path,
                    format!("tensor {}: shape {:?} overflows", t.name, t.shape),
                )
            })?;
        let need = numel.checked_mul(t.dtype.size_bytes());
        if need != Some(t.data.len()) {
            return Err(invalid_input(
                path,
                format!(
                    "tensor {}: data holds {} bytes but shape {:?} of {:?} needs {}",
                    t.name,
                    t.data.len(),
                    t.shape,
                    t.dtype,
                    numel.saturating_mul(t.dtype.size_bytes())
                ),
            ));
        }
        strides.push(contiguous_stride(&t.shape));
        numels.push(numel as u64);
    }
    let keys: Vec<String> = (0..tensors.len()).map(|i| i.to_string()).collect();
    let specs: Vec<PickleTensorSpec<'_>> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| PickleTensorSpec {
            name: &t.name,
            storage_class: t.dtype.storage_class(),
            key: &keys[i],
            storage_numel: numels[i],
            offset: 0,
            shape: &t.shape,
            stride: &strides[i],
        })
        .collect();
    let pkl = encode_pickle(&specs);
    let data_names: Vec<String> = keys.iter().map(|k| format!("archive/data/{k}")).collect();
    let mut entries: Vec<(&str, &[u8])> = Vec::with_capacity(tensors.len() + 3);
    entries.push(("archive/data.pkl", &pkl));
    entries.push(("archive/byteorder", b"little"));
    for (name, t) in data_names.iter().zip(tensors) {
        entries.push((name, &t.data));
    }
    entries.push(("archive/version", b"3\n"));
    write_zip_entries(path, &entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir()
                .join(format!("torchbin-test-{}-{tag}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }

        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn bytes_for(n: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    fn tensor(name: &str, dtype: BinDType, shape: &[usize], seed: u32) -> BinTensor {
        let n: usize = shape.iter().product();
        BinTensor {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
            data: bytes_for(n * dtype.size_bytes(), seed),
        }
    }

    fn sample() -> Vec<BinTensor> {
        vec![
            tensor("model.embed_tokens.weight", BinDType::BF16, &[4, 3], 1),
            tensor("model.norm.weight", BinDType::F16, &[5], 2),
            tensor("lm_head.bias", BinDType::F32, &[2, 2, 2], 3),
            tensor("scalar", BinDType::F32, &[], 4),
            tensor("empty", BinDType::BF16, &[0, 4], 5),
            tensor("deep", BinDType::F16, &[1, 2, 1, 3, 1, 2], 6),
            tensor("big_dim", BinDType::BF16, &[70_000], 7),
        ]
    }

    fn assert_same(a: &[BinTensor], b: &[BinTensor]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.name, y.name);
            assert_eq!(x.dtype, y.dtype, "{}", x.name);
            assert_eq!(x.shape, y.shape, "{}", x.name);
            assert_eq!(x.data, y.data, "{}", x.name);
        }
    }

    fn spec<'a>(
        name: &'a str,
        class: &'a str,
        key: &'a str,
        storage_numel: u64,
        offset: u64,
        shape: &'a [usize],
        stride: &'a [usize],
    ) -> PickleTensorSpec<'a> {
        PickleTensorSpec {
            name,
            storage_class: class,
            key,
            storage_numel,
            offset,
            shape,
            stride,
        }
    }

    /// A checkpoint with a hand-built pickle and the given storages.
    fn write_raw(path: &Path, pkl: &[u8], storages: &[(&str, &[u8])]) {
        let names: Vec<String> = storages
            .iter()
            .map(|(k, _)| format!("archive/data/{k}"))
            .collect();
        let mut entries: Vec<(&str, &[u8])> = vec![("archive/data.pkl", pkl)];
        for (n, (_, d)) in names.iter().zip(storages) {
            entries.push((n, d));
        }
        entries.push(("archive/version", b"3\n"));
        write_zip_entries(path, &entries).expect("write zip");
    }

    fn read(path: &Path) -> Result<Vec<BinTensor>, TorchBinError> {
        read_torch_bin(path, &BinLimits::default())
    }

    #[test]
    fn size_bytes() {
        assert_eq!(BinDType::BF16.size_bytes(), 2);
        assert_eq!(BinDType::F16.size_bytes(), 2);
        assert_eq!(BinDType::F32.size_bytes(), 4);
    }

    #[test]
    fn round_trip_all_dtypes() {
        let dir = TempDir::new("rt");
        let p = dir.file("pytorch_model-00001-of-00002.bin");
        let ts = sample();
        write_torch_bin(&p, &ts).unwrap();
        let back = read(&p).unwrap();
        assert_same(&ts, &back);
    }

    #[test]
    fn written_layout_matches_torch() {
        let dir = TempDir::new("layout");
        let p = dir.file("m.bin");
        write_torch_bin(&p, &sample()).unwrap();
        let mut zip = ZipArchive::new(File::open(&p).unwrap()).unwrap();
        let names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
        assert!(names.contains(&"archive/data.pkl".to_owned()));
        assert!(names.contains(&"archive/data/0".to_owned()));
        for i in 0..zip.len() {
            let f = zip.by_index(i).unwrap();
            assert_eq!(f.compression(), CompressionMethod::Stored);
            assert_eq!(
                f.data_start().unwrap() % 64,
                0,
                "{} not aligned",
                f.name().unwrap()
            );
        }
        let mut v = String::new();
        zip.by_name("archive/version")
            .unwrap()
            .read_to_string(&mut v)
            .unwrap();
        assert_eq!(v, "3\n");
        let mut b = String::new();
        zip.by_name("archive/byteorder")
            .unwrap()
            .read_to_string(&mut b)
            .unwrap();
        assert_eq!(b, "little");
    }

    #[test]
    fn round_trip_many_tensors_and_empty_dict() {
        let dir = TempDir::new("many");
        let p = dir.file("many.bin");
        let ts: Vec<BinTensor> = (0..2100)
            .map(|i| {
                tensor(
                    &format!("layer.{i}.w"),
                    BinDType::F16,
                    &[i % 5 + 1],
                    i as u32,
                )
            })
            .collect();
        write_torch_bin(&p, &ts).unwrap();
        assert_same(&ts, &read(&p).unwrap());

        let p = dir.file("empty.bin");
        write_torch_bin(&p, &[]).unwrap();
        assert!(read(&p).unwrap().is_empty());
    }

    #[test]
    fn write_rejects_bad_input() {
        let dir = TempDir::new("wbad");
        let p = dir.file("x.bin");
        let mut t = tensor("a", BinDType::F32, &[3], 1);
        t.data.pop();
        let e = write_torch_bin(&p, &[t]).unwrap_err();
        assert!(e.to_string().contains("tensor a"), "{e}");
        let a = tensor("a", BinDType::F32, &[3], 1);
        let e = write_torch_bin(&p, &[a.clone(), a]).unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn shared_storage_views() {
        let dir = TempDir::new("views");
        let p = dir.file("views.bin");
        let storage = bytes_for(12 * 4, 9);
        let pkl = encode_pickle(&[
            spec("all", "FloatStorage", "0", 12, 0, &[3, 4], &[4, 1]),
            spec("row1", "FloatStorage", "0", 12, 4, &[4], &[1]),
            spec("tail", "FloatStorage", "0", 12, 8, &[2, 2], &[2, 1]),
            spec("other", "HalfStorage", "1", 3, 0, &[3], &[1]),
            // size-1 dimensions may carry any stride
            spec("col", "FloatStorage", "0", 12, 11, &[1, 1], &[7, 3]),
        ]);
        let half = bytes_for(6, 10);
        write_raw(&p, &pkl, &[("0", &storage), ("1", &half)]);
        let ts = read(&p).unwrap();
        let names: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["all", "row1", "tail", "other", "col"]);
        assert_eq!(ts[0].data, storage);
        assert_eq!(ts[1].data, storage[16..32]);
        assert_eq!(ts[1].shape, [4]);
        assert_eq!(ts[2].data, storage[32..48]);
        assert_eq!(ts[3].data, half);
        assert_eq!(ts[3].dtype, BinDType::F16);
        assert_eq!(ts[4].data, storage[44..48]);
    }

    #[test]
    fn view_past_storage_end_is_refused() {
        let dir = TempDir::new("viewend");
        let p = dir.file("v.bin");
        let storage = bytes_for(12 * 4, 9);
        let pkl = encode_pickle(&[spec("late", "FloatStorage", "0", 12, 10, &[4], &[1])]);
        write_raw(&p, &pkl, &[("0", &storage)]);
        let e = read(&p).unwrap_err();
        assert!(matches!(e, TorchBinError::StorageTooSmall { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("tensor late") && msg.contains("needs 56"),
            "{msg}"
        );
    }

    #[test]
    fn non_contiguous_stride_is_refused() {
        let dir = TempDir::new("stride");
        let p = dir.file("s.bin");
        let storage = bytes_for(6 * 4, 1);
        let pkl = encode_pickle(&[spec(
            "transposed",
            "FloatStorage",
            "0",
            6,
            0,
            &[2, 3],
            &[1, 2],
        )]);
        write_raw(&p, &pkl, &[("0", &storage)]);
        let e = read(&p).unwrap_err();
        assert!(matches!(e, TorchBinError::NonContiguous { .. }), "{e}");
        assert!(e.to_string().contains("transposed"), "{e}");
    }

    #[test]
    fn other_dtypes_are_refused_by_name() {
        let dir = TempDir::new("int64");
        let p = dir.file("i.bin");
        let storage = bytes_for(4 * 8, 1);
        let pkl = encode_pickle(&[
            spec("ok", "FloatStorage", "1", 1, 0, &[1], &[1]),
            spec("position_ids", "LongStorage", "0", 4, 0, &[1, 4], &[4, 1]),
        ]);
        write_raw(&p, &pkl, &[("0", &storage), ("1", &[0u8; 4])]);
        let e = read(&p).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, TorchBinError::UnsupportedDType { .. }), "{msg}");
        assert!(
            msg.contains("position_ids") && msg.contains("int64"),
            "{msg}"
        );
        assert!(msg.contains(&p.display().to_string()), "{msg}");
    }

    #[test]
    fn forbidden_global_is_refused() {
        let dir = TempDir::new("global");
        let p = dir.file("evil.bin");
        // os.system('ls'), as pickle protocol 2 writes it.
        let pkl = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        write_raw(&p, pkl, &[]);
        let e = read(&p).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, TorchBinError::UnsupportedGlobal { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("unsupported pickle global 'os system'"),
            "{msg}"
        );
        assert!(msg.contains("evil.bin"), "{msg}");

        // The protocol 4 spelling: FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL.
        let mut pkl4 = vec![0x80, 4, 0x95];
        let body = b"\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x011\x85R.";
        pkl4.extend((body.len() as u64).to_le_bytes());
        pkl4.extend(body);
        write_raw(&p, &pkl4, &[]);
        let msg = read(&p).unwrap_err().to_string();
        assert!(
            msg.contains("unsupported pickle global 'builtins eval'"),
            "{msg}"
        );

        // An allowed module with a name that is not allowed.
        let pkl = b"\x80\x02ctorch._utils\n_rebuild_qtensor\n.";
        write_raw(&p, pkl, &[]);
        let msg = read(&p).unwrap_err().to_string();
        assert!(msg.contains("'torch._utils _rebuild_qtensor'"), "{msg}");
    }

    #[test]
    fn truncated_files_error() {
        let dir = TempDir::new("trunc");
        let p = dir.file("full.bin");
        write_torch_bin(&p, &sample()).unwrap();
        let full = std::fs::read(&p).unwrap();
        let q = dir.file("cut.bin");
        for cut in [
            0,
            1,
            4,
            30,
            100,
            full.len() / 3,
            full.len() / 2,
            full.len() - 23,
            full.len() - 1,
        ] {
            std::fs::write(&q, &full[..cut]).unwrap();
            assert!(read(&q).is_err(), "cut at {cut} was accepted");
        }
    }

    #[test]
    fn huge_length_claims_error_without_allocating() {
        let limits = BinLimits::default();
        let path = Path::new("mem.bin");
        let cases: [&[u8]; 6] = [
            b"\x80\x02X\xff\xff\xff\xffabc",
            b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc",
            b"\x80\x04\x8e\x00\x00\x00\x00\x01\x00\x00\x00abc",
            b"\x80\x02T\xff\xff\xff\x7fabc",
            b"\x80\x02\x8b\xff\xff\xff\xff\x01",
            b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xffN.",
        ];
        for pkl in cases {
            let e = plan_from_pickle(path, pkl, &limits).unwrap_err();
            assert!(matches!(e, TorchBinError::Pickle { .. }), "{e}");
            assert!(e.to_string().contains("remain"), "{e}");
        }

        // The same through a real file.
        let dir = TempDir::new("huge");
        let p = dir.file("huge.bin");
        write_raw(&p, b"\x80\x02X\xff\xff\xff\xffabc", &[]);
        let msg = read(&p).unwrap_err().to_string();
        assert!(msg.contains("needs 4294967295 bytes"), "{msg}");
    }

    #[test]
    fn short_storage_entry_names_tensor() {
        let dir = TempDir::new("short");
        let p = dir.file("short.bin");
        let pkl = encode_pickle(&[spec(
            "layers.0.mlp.w",
            "BFloat16Storage",
            "0",
            6,
            0,
            &[2, 3],
            &[3, 1],
        )]);
        write_raw(&p, &pkl, &[("0", &[0u8; 10])]);
        let e = read(&p).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, TorchBinError::StorageTooSmall { .. }), "{msg}");
        assert!(
            msg.contains("tensor layers.0.mlp.w: storage 0 holds 10 bytes but shape [2, 3]"),
            "{msg}"
        );
        assert!(msg.contains("needs 12"), "{msg}");

        // Tensor fits, but the storage is declared larger than its entry.
        let pkl = encode_pickle(&[spec("w", "BFloat16Storage", "0", 8, 0, &[2, 3], &[3, 1])]);
        write_raw(&p, &pkl, &[("0", &[0u8; 12])]);
        let e = read(&p).unwrap_err();
        assert!(
            matches!(e, TorchBinError::StorageSizeMismatch { .. }),
            "{e}"
        );
    }

    #[test]
    fn corrupted_storage_bytes_fail_the_crc() {
        let dir = TempDir::new("crc");
        let p = dir.file("c.bin");
        let t = BinTensor {
            name: "w".into(),
            dtype: BinDType::F32,
            shape: vec![64],
            data: vec![0x5a; 256],
        };
        write_torch_bin(&p, &[t]).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes
            .windows(256)
            .position(|w| w.iter().all(|&b| b == 0x5a))
            .unwrap();
        bytes[at + 100] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = read(&p).unwrap_err();
        assert!(e.to_string().contains("storage 0 of tensor w"), "{e}");
    }

    #[test]
    fn error_is_send_sync() {
        fn check<T: Send + Sync + 'static + std::error::Error>() {}
        check::<TorchBinError>();
    }

    #[test]
    fn missing_entries() {
        let dir = TempDir::new("missing");
        let p = dir.file("m.bin");
        let pkl = encode_pickle(&[spec("w", "FloatStorage", "7", 1, 0, &[1], &[1])]);
        write_raw(&p, &pkl, &[("0", &[0u8; 4])]);
        let e = read(&p).unwrap_err();
        assert!(matches!(e, TorchBinError::MissingStorage { .. }), "{e}");
        assert!(e.to_string().contains("tensor w") && e.to_string().contains("archive/data/7"));

        write_zip_entries(&p, &[("archive/version", b"3\n")]).unwrap();
        assert!(matches!(
            read(&p).unwrap_err(),
            TorchBinError::MissingDataPkl { .. }
        ));

        write_zip_entries(&p, &[("a/data.pkl", b"N."), ("b/data.pkl", b"N.")]).unwrap();
        assert!(matches!(
            read(&p).unwrap_err(),
            TorchBinError::AmbiguousDataPkl { .. }
        ));

        let e = read(&dir.file("does-not-exist.bin")).unwrap_err();
        assert!(matches!(e, TorchBinError::Io { .. }), "{e}");
        assert!(e.to_string().contains("does-not-exist.bin"), "{e}");
    }

    #[test]
    fn other_prefix_is_found() {
        let dir = TempDir::new("prefix");
        let p = dir.file("p.bin");
        let pkl = encode_pickle(&[spec("w", "FloatStorage", "0", 1, 0, &[1], &[1])]);
        write_zip_entries(
            &p,
            &[
                ("pytorch_model/data.pkl", &pkl),
                ("pytorch_model/byteorder", b"little"),
                ("pytorch_model/data/0", &[1, 2, 3, 4]),
                ("pytorch_model/version", b"3\n"),
            ],
        )
        .unwrap();
        assert_eq!(read(&p).unwrap()[0].data, [1, 2, 3, 4]);

        write_zip_entries(
            &p,
            &[
                ("x/data.pkl", &pkl),
                ("x/byteorder", b"big"),
                ("x/data/0", &[0; 4]),
            ],
        )
        .unwrap();
        assert!(matches!(
            read(&p).unwrap_err(),
            TorchBinError::ByteOrder { .. }
        ));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let dir = TempDir::new("dup");
        let p = dir.file("d.bin");
        let pkl = encode_pickle(&[
            spec("w", "FloatStorage", "0", 1, 0, &[1], &[1]),
            spec("w", "FloatStorage", "0", 1, 0, &[1], &[1]),
        ]);
        write_raw(&p, &pkl, &[("0", &[0u8; 4])]);
        let e = read(&p).unwrap_err();
        assert!(matches!(e, TorchBinError::DuplicateTensor { .. }), "{e}");
        assert!(e.to_string().contains("tensor w"));
    }

    #[test]
    fn bogus_zip_errors() {
        let dir = TempDir::new("bogus");
        let p = dir.file("b.bin");
        for content in [
            &b""[..],
            b"PK\x03\x04garbage",
            &bytes_for(5000, 3),
            b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
        ] {
            std::fs::write(&p, content).unwrap();
            let e = read(&p).unwrap_err();
            assert!(matches!(e, TorchBinError::Zip { .. }), "{e}");
            assert!(e.to_string().contains("b.bin"), "{e}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let dir = TempDir::new("limits");
        let p = dir.file("l.bin");
        let ts = vec![
            tensor("a", BinDType::F32, &[2, 2, 2], 1),
            tensor("b", BinDType::F32, &[3], 2),
        ];
        write_torch_bin(&p, &ts).unwrap();
        let lim = |f: &dyn Fn(&mut BinLimits)| {
            let mut l = BinLimits::default();
            f(&mut l);
            read_torch_bin(&p, &l).unwrap_err()
        };
        assert!(matches!(
            lim(&|l| l.max_tensors = 1),
            TorchBinError::TooManyTensors { .. }
        ));
        assert!(matches!(
            lim(&|l| l.max_rank = 2),
            TorchBinError::RankTooLarge { .. }
        ));
        assert!(matches!(
            lim(&|l| l.max_memo = 2),
            TorchBinError::LimitExceeded { .. }
        ));
        assert!(matches!(
            lim(&|l| l.max_stack_depth = 5),
            TorchBinError::LimitExceeded { .. }
        ));
        assert!(matches!(
            lim(&|l| l.max_pickle_bytes = 10),
            TorchBinError::EntryTooLarge { .. }
        ));
        assert!(matches!(
            lim(&|l| l.max_file_bytes = 10),
            TorchBinError::FileTooLarge { .. }
        ));
    }

    #[test]
    fn deep_or_recursive_structures_are_refused() {
        let limits = BinLimits::default();
        let path = Path::new("deep.bin");
        // None wrapped in a million TUPLE1s.
        let mut pkl = vec![0x80, 2, b'N'];
        pkl.extend(std::iter::repeat_n(op::TUPLE1, 1_000_000));
        pkl.push(b'.');
        let e = plan_from_pickle(path, &pkl, &limits).unwrap_err();
        assert!(e.to_string().contains("nest deeper"), "{e}");

        // A million nested MARKs with the default limit is fine until the
        // end of input; with a small limit it is refused.
        let mut pkl = vec![0x80, 2];
        pkl.extend(std::iter::repeat_n(op::MARK, 1000));
        let small = BinLimits {
            max_stack_depth: 100,
            ..BinLimits::default()
        };
        let e = plan_from_pickle(path, &pkl, &small).unwrap_err();
        assert!(matches!(e, TorchBinError::LimitExceeded { .. }), "{e}");

        // A list appended to itself, and a dict stored in itself.
        for pkl in [
            &b"\x80\x02]q\x00h\x00a."[..],
            b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.",
        ] {
            let e = plan_from_pickle(path, pkl, &limits).unwrap_err();
            assert!(e.to_string().contains("recursive"), "{e}");
        }
        // Mutating a list after nesting it.
        let pkl = b"\x80\x02]q\x00\x85h\x00Na.";
        let e = plan_from_pickle(path, pkl, &limits).unwrap_err();
        assert!(e.to_string().contains("recursive"), "{e}");

        // Memo bombs stay cheap: one string referenced a million times.
        let mut pkl = b"\x80\x02X\x00\x00\x10\x00".to_vec();
        pkl.extend(std::iter::repeat_n(b'a', 1 << 20));
        pkl.extend(b"q\x00(");
        for _ in 0..1_000_000 {
            pkl.extend(b"h\x00");
        }
        pkl.extend(b"l.");
        let e = plan_from_pickle(path, &pkl, &limits).unwrap_err();
        assert!(
            matches!(e, TorchBinError::NotAStateDict { found: "list", .. }),
            "{e}"
        );
    }

    #[test]
    fn top_level_must_be_dict_of_tensors() {
        let limits = BinLimits::default();
        let path = Path::new("t.bin");
        let e = plan_from_pickle(path, b"\x80\x02]q\x00.", &limits).unwrap_err();
        assert!(matches!(e, TorchBinError::NotAStateDict { .. }), "{e}");
        let e =
            plan_from_pickle(path, b"\x80\x02}X\x05\x00\x00\x00epochK\x03s.", &limits).unwrap_err();
        assert!(e.to_string().contains("entry epoch: value is a int"), "{e}");
        let e = plan_from_pickle(path, b"\x80\x02}K\x01K\x03s.", &limits).unwrap_err();
        assert!(matches!(e, TorchBinError::BadEntry { .. }), "{e}");
        let e = plan_from_pickle(path, b"\x80\x02}", &limits).unwrap_err();
        assert!(e.to_string().contains("without STOP"), "{e}");
        let e = plan_from_pickle(path, b"\x80\x02I1\n.", &limits).unwrap_err();
        assert!(
            matches!(e, TorchBinError::UnsupportedOpcode { opcode: b'I', .. }),
            "{e}"
        );
    }

    /// Builds a pickle the way newer writers may: protocol 4 framing,
    /// STACK_GLOBAL, MEMOIZE, a `_rebuild_parameter` wrapper, BUILD state on
    /// the OrderedDict, a v3 tensor on an UntypedStorage, and a plain dict.
    #[test]
    fn protocol4_parameter_v3_and_build() {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.push(op::SHORT_BINUNICODE);
            out.push(v.len() as u8);
            out.extend(v.as_bytes());
            out.push(op::MEMOIZE);
        }
        fn g(out: &mut Vec<u8>, m: &str, n: &str) {
            s(out, m);
            s(out, n);
            out.push(op::STACK_GLOBAL);
            out.push(op::MEMOIZE);
        }
        let mut b = Vec::new();
        g(&mut b, "collections", "OrderedDict");
        b.extend([op::EMPTY_TUPLE, op::REDUCE, op::MEMOIZE, op::MARK]);
        // "p": _rebuild_parameter(_rebuild_tensor_v2(pid, 1, (2,), (1,), False, OrderedDict()), True, OrderedDict())
        s(&mut b, "p");
        g(&mut b, "torch._utils", "_rebuild_parameter");
        g(&mut b, "torch._utils", "_rebuild_tensor_v2");
        b.push(op::MARK);
        b.push(op::MARK);
        s(&mut b, "storage");
        g(&mut b, "torch", "HalfStorage");
        s(&mut b, "0");
        s(&mut b, "cuda:0");
        b.extend([op::BININT1, 3, op::TUPLE, op::BINPERSID]);
        b.extend([
            op::BININT1,
            1,
            op::BININT1,
            2,
            op::TUPLE1,
            op::BININT1,
            1,
            op::TUPLE1,
        ]);
        b.push(op::NEWFALSE);
        b.extend([op::BINGET, 2, op::EMPTY_TUPLE, op::REDUCE]);
        b.extend([op::TUPLE, op::REDUCE]);
        b.extend([op::NEWTRUE, op::EMPTY_DICT, op::TUPLE3, op::REDUCE]);
        // "q": _rebuild_tensor_v3(pid(UntypedStorage, numel in bytes), 0, (2,), (1,), False, {}, torch.bfloat16)
        s(&mut b, "q");
        g(&mut b, "torch._utils", "_rebuild_tensor_v3");
        b.push(op::MARK);
        b.push(op::MARK);
        s(&mut b, "storage");
        g(&mut b, "torch", "UntypedStorage");
        s(&mut b, "1");
        s(&mut b, "cpu");
        b.extend([op::BININT1, 4, op::TUPLE, op::BINPERSID]);
        b.extend([
            op::BININT1,
            0,
            op::BININT1,
            2,
            op::TUPLE1,
            op::BININT1,
            1,
            op::TUPLE1,
        ]);
        b.extend([op::NEWFALSE, op::EMPTY_DICT]);
        g(&mut b, "torch", "bfloat16");
        b.extend([op::TUPLE, op::REDUCE]);
        b.push(op::SETITEMS);
        // BUILD with {'_metadata': {'': {'version': 1}}}
        b.push(op::MARK);
        s(&mut b, "_metadata");
        b.push(op::EMPTY_DICT);
        s(&mut b, "");
        b.push(op::EMPTY_DICT);
        s(&mut b, "version");
        b.extend([
            op::BININT1,
            1,
            op::SETITEM,
            op::SETITEM,
            op::DICT,
            op::BUILD,
        ]);
        b.push(op::STOP);
        let mut pkl = vec![op::PROTO, 4, op::FRAME];
        pkl.extend((b.len() as u64).to_le_bytes());
        pkl.extend(&b);

        let dir = TempDir::new("p4");
        let p = dir.file("p4.bin");
        write_raw(
            &p,
            &pkl,
            &[("0", &[1, 2, 3, 4, 5, 6]), ("1", &[7, 8, 9, 10])],
        );
        let ts = read(&p).unwrap();
        assert_eq!(ts.len(), 2);
        assert_eq!((ts[0].name.as_str(), ts[0].dtype), ("p", BinDType::F16));
        assert_eq!(ts[0].shape, [2]);
        assert_eq!(ts[0].data, [3, 4, 5, 6]);
        assert_eq!((ts[1].name.as_str(), ts[1].dtype), ("q", BinDType::BF16));
        assert_eq!(ts[1].data, [7, 8, 9, 10]);
    }

    #[test]
    fn long_ints_decode() {
        assert_eq!(decode_long(&[]), Some(0));
        assert_eq!(decode_long(&[0xff]), Some(-1));
        assert_eq!(decode_long(&[0x00, 0x80, 0x00]), Some(0x8000));
        assert_eq!(decode_long(&[0xff; 8]), Some(-1));
        assert_eq!(decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), None);
        let mut w = PickleWriter::new();
        for v in [
            0u64,
            255,
            256,
            65_535,
            65_536,
            i32::MAX as u64,
            1 << 31,
            1 << 40,
            u64::MAX >> 1,
        ] {
            w.out.truncate(2);
            w.int(v);
            w.out.push(op::STOP);
            let got = Unpickler::new(&w.out, &BinLimits::default()).run().unwrap();
            assert!(matches!(got, Value::Int(i) if i as u64 == v), "{v}");
        }
    }

    /// Deterministic pseudo-random positions.
    fn positions(len: usize, count: usize, seed: u64) -> Vec<(usize, u8)> {
        let mut x = seed | 1;
        (0..count)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x % len as u64) as usize, (x >> 40) as u8 | 1)
            })
            .collect()
    }

    #[test]
    fn fuzz_file_bytes() {
        let dir = TempDir::new("fuzz");
        let p = dir.file("valid.bin");
        let ts = vec![
            tensor("a", BinDType::BF16, &[3, 5], 1),
            tensor("b", BinDType::F32, &[4], 2),
            tensor("c", BinDType::F16, &[], 3),
        ];
        write_torch_bin(&p, &ts).unwrap();
        let good = std::fs::read(&p).unwrap();
        let q = dir.file("mutant.bin");
        for (i, (pos, x)) in positions(good.len(), 200, 0x9e37_79b9_7f4a_7c15)
            .into_iter()
            .enumerate()
        {
            let mut m = good.clone();
            if i % 4 == 3 {
                m.truncate(pos);
            } else {
                m[pos] ^= x;
            }
            std::fs::write(&q, &m).unwrap();
            let _ = read(&q);
        }
    }

    #[test]
    fn fuzz_pickle_bytes() {
        let dir = TempDir::new("fuzzpkl");
        let q = dir.file("mutant.bin");
        let storage = bytes_for(48, 1);
        let pkl = encode_pickle(&[
            spec("all", "FloatStorage", "0", 12, 0, &[3, 4], &[4, 1]),
            spec("row", "FloatStorage", "0", 12, 4, &[4], &[1]),
            spec("h", "HalfStorage", "1", 2, 0, &[2], &[1]),
        ]);
        let limits = BinLimits::default();
        for (i, (pos, x)) in positions(pkl.len(), 200, 0x1234_5678_9abc_def1)
            .into_iter()
            .enumerate()
        {
            let mut m = pkl.clone();
            match i % 5 {
                0 => m.truncate(pos),
                1 => m[pos] = x,
                2 => m.insert(pos, x),
                3 => {
                    m.remove(pos);
                }
                _ => m[pos] ^= x,
            }
            let _ = plan_from_pickle(Path::new("x.bin"), &m, &limits);
            if i % 4 == 0 {
                write_raw(&q, &m, &[("0", &storage), ("1", &storage[..4])]);
                let _ = read(&q);
            }
        }
    }
}
