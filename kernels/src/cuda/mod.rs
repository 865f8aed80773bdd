//! The CUDA backend: the [`Backend`] operations as CUDA kernels (`kernels/cuda/*.cu`,
//! compiled at start-up by NVRTC for the device's architecture and cached) and cuBLAS
//! GEMMs, on one stream of one GPU.
//!
//! Everything is bf16 in memory with fp32 accumulation, and rounds where the CPU
//! oracle rounds under [`Precision::Bf16`], so the two agree to bf16 tolerance.
//!
//! Shapes of the work that matters:
//! - GEMMs of up to 8 rows (decode) run a GEMV kernel that reads every weight byte
//!   once with 16-byte streaming loads; larger ones go to cuBLAS (tensor cores).
//! - The MoE block stays on the device: routing, a stable sort of the (token, choice)
//!   pairs by expert, then for decode fused gate/up+SwiGLU and down GEMVs that walk
//!   only the experts that received tokens (pointer tables, no host round trip), and
//!   for prefill per-expert cuBLAS GEMMs on the expert-sorted rows.
//! - Attention is one paged, causal, flash-style kernel for prefill and decode (online
//!   softmax over 32-key tiles, split over the key range when there are few rows).
//!
//! `unsafe` here is limited to kernel launches and raw cuBLAS calls: each launch
//! passes device pointers of buffers whose sizes the calling method has checked.

mod compile;
mod nccl;

pub use compile::{SOURCES, compile, compile_options, probe_libraries, program_source};
pub use nccl::{NcclComm, NcclId};

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys as blas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PinnedHostSlice, PushKernelArg, ValidAsZeroBits,
};

use crate::backend::{AttnSeq, Backend, KvSpec, MlpRef, Precision, RecordKey, Routing, ScoreScale};
use crate::numeric::{self, DType};
use crate::weight::HostMatrix;

/// Why the CUDA backend could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "CUDA libraries not found: {0}. Install the CUDA 13 runtime (driver, NVRTC, cuBLAS) or \
         add the folder holding them to LD_LIBRARY_PATH (on the project's GPU hosts: \
         /usr/local/cuda/lib64 or .../site-packages/nvidia/cu13/lib)"
    )]
    MissingLibraries(String),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("the CUDA backend computes in bf16; {0:?} was asked for")]
    Precision(Precision),
}

fn drv<E: std::fmt::Debug>(e: E) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// Defines the kernel table: one `CudaFunction` per `extern "C"` kernel.
macro_rules! kernel_table {
    ($($name:ident),* $(,)?) => {
        struct Kernels {
            $($name: CudaFunction,)*
        }
        /// Every kernel the backend loads by name.
        #[cfg_attr(not(test), allow(dead_code))]
        const KERNEL_NAMES: &[&str] = &[$(stringify!($name)),*];
        impl Kernels {
            fn load(m: &Arc<CudaModule>) -> Result<Self, CudaError> {
                Ok(Self {
                    $($name: m.load_function(stringify!($name)).map_err(drv)?,)*
                })
            }
        }
    };
}

kernel_table!(
    embed,
    add_inplace,
    rms_norm,
    add_rms_norm,
    swiglu,
    scatter_rows,
    combine,
    combine_perm,
    fill_uniform,
    rope_qk_write,
    write_kv,
    copy_kv,
    attn_fwd,
    attn_fwd_small,
    attn_merge,
    route_bf16,
    route_f32,
    moe_permute,
    combine_shared,
    gather_rows_div,
    moe_gate_up,
    moe_gate_up_mt2,
    moe_down,
    moe_down_mt2,
    moe_down_s2,
    moe_down_mt2_s2,
    gemv,
    gemv_mt2,
    gemv_s2,
    gemv_mt2_s2,
    argmax_rows,
    argmax_rows_f32,
);

/// Launches kernel `$f` of `$self` on its stream with the given grid, block size,
/// dynamic shared memory and arguments (device pointers as `u64`, scalars).
macro_rules! launch {
    ($self:expr, $f:ident, $grid:expr, $block:expr, $smem:expr; $($arg:expr),* $(,)?) => {{
        let cfg = LaunchConfig {
            grid_dim: $grid,
            block_dim: ($block, 1, 1),
            shared_mem_bytes: $smem,
        };
        let mut b = $self.stream.launch_builder(&$self.k.$f);
        $( b.arg($arg); )*
        // SAFETY: the kernel's signature in kernels/cuda matches the argument list
        // above, and every pointer argument is a live allocation of the size the
        // calling method checked against the shapes it passes.
        unsafe { b.launch(cfg) }.expect(concat!("launching ", stringify!($f)));
    }};
}

/// Device memory of an activation: bf16, or fp32 (router logits kept in fp32).
pub enum ActBuf {
    Bf16(CudaSlice<u16>),
    F32(CudaSlice<f32>),
}

/// An activation matrix on the device.
pub struct CudaAct {
    pub buf: ActBuf,
    pub rows: usize,
    pub cols: usize,
}

/// A bf16 weight matrix `[rows, cols]` on the device.
pub struct CudaWeight {
    pub buf: CudaSlice<u8>,
    pub rows: usize,
    pub cols: usize,
}

/// A 1-D fp32 parameter (norm weights) on the device.
pub struct CudaVector {
    pub buf: CudaSlice<f32>,
    pub len: usize,
}

/// The paged KV cache: one K and one V region of `[n_cache_layers, slots, width]` bf16.
pub struct CudaKv {
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
    pub spec: KvSpec,
}

/// A forward batch on the device.
pub struct CudaBatch {
    rows: usize,
    /// Bound on every sequence's context (the key splits are sized for it).
    max_ctx: usize,
    tokens: CudaSlice<i32>,
    positions: CudaSlice<i32>,
    new_slots: CudaSlice<i32>,
    seq_row: CudaSlice<i32>,
    seq_pos: CudaSlice<i32>,
    seq_slot: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    /// (first row, position of the first new row, new rows) per sequence.
    host: Vec<(usize, usize, usize)>,
    /// Row tiles for the attention kernel, per rows-per-tile (built on first use).
    tiles: Mutex<HashMap<usize, RowTiles>>,
}

/// A batch's host-side arrays, before upload.
struct BatchHost {
    tokens: Vec<i32>,
    positions: Vec<i32>,
    new_slots: Vec<i32>,
    seq_row: Vec<i32>,
    seq_pos: Vec<i32>,
    seq_slot: Vec<i32>,
    slots: Vec<i32>,
    host: Vec<(usize, usize, usize)>,
    max_ctx: usize,
}

impl BatchHost {
    /// Flattens `seqs`; with `stride`, sequence s's slot list starts at `s * stride`
    /// (fixed offsets, so a recorded batch can be refilled in place).
    fn new(seqs: &[AttnSeq], tokens: &[u32], stride: Option<usize>) -> Self {
        let idx = |x: usize| i32::try_from(x).expect("index fits i32");
        let mut h = BatchHost {
            tokens: tokens.iter().map(|&t| t as i32).collect(),
            positions: Vec::new(),
            new_slots: Vec::new(),
            seq_row: Vec::new(),
            seq_pos: Vec::new(),
            seq_slot: Vec::new(),
            slots: Vec::new(),
            host: Vec::with_capacity(seqs.len()),
            max_ctx: 1,
        };
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(
                s.rows.start,
                h.positions.len(),
                "batch rows must be contiguous"
            );
            let n = s.rows.len();
            assert_eq!(
                s.slots.len(),
                s.first_pos + n,
                "slots must cover the context"
            );
            h.positions.extend((s.first_pos..s.first_pos + n).map(idx));
            h.new_slots
                .extend(s.slots[s.first_pos..].iter().map(|&x| idx(x)));
            h.seq_row.push(idx(s.rows.start));
            h.seq_pos.push(idx(s.first_pos));
            if let Some(stride) = stride {
                assert!(
                    s.slots.len() <= stride,
                    "context exceeds the recorded bound"
                );
                h.slots.resize(i * stride, 0);
            }
            h.seq_slot.push(idx(h.slots.len()));
            h.slots.extend(s.slots.iter().map(|&x| idx(x)));
            h.host.push((s.rows.start, s.first_pos, n));
            h.max_ctx = h.max_ctx.max(s.first_pos + n);
        }
        assert_eq!(h.tokens.len(), h.positions.len(), "one token per row");
        if let Some(stride) = stride {
            h.slots.resize(seqs.len() * stride, 0);
            h.max_ctx = stride;
        }
        h
    }
}

/// A recorded decode step: the graph, the input buffers it reads, its output.
struct Recorded {
    graph: GraphCell,
    batch: CudaBatch,
    out: CudaAct,
    /// When it last ran (the backend's step clock): the least recently used recording
    /// makes room for a new shape.
    last_used: u64,
}

/// A CUDA graph, used only under the backend's `graphs` lock.
struct GraphCell(cudarc::driver::CudaGraph);

// SAFETY: a graph executable may be launched from any thread with its context bound
// (cudarc binds it); the driver only requires that calls on one graph be serialised,
// which the Mutex around every `GraphCell` guarantees.
unsafe impl Send for GraphCell {}

/// Most recorded steps kept (one per padded batch size, speculation depth and context
/// bound, for the target and a draft model); past it the least recently used is
/// dropped. `HYSERVE_GRAPH_CACHE` sets another bound (experiments on recording churn).
pub const MAX_RECORDINGS: usize = 96;
/// Forward passes between two `cuda graphs` log lines of a backend.
const GRAPH_LOG_EVERY: u64 = 1024;
/// One recorded step in this many is timed on the device (two events around its
/// launch), so timing costs next to nothing.
const GRAPH_TIME_EVERY: u64 = 8;

/// Numbers a backend was started with, to tell backends of one process apart in logs.
static NEXT_BACKEND_ID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What a backend's forward passes did with recordings: how many replayed one and what
/// that cost (on the host, and on the device for a sample), how many ran unrecorded,
/// how many recordings were made, dropped for room, or failed. Counted since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GraphStats {
    /// Forward passes that replayed a recording.
    pub replays: u64,
    /// Host seconds those replays took to refill their inputs and launch.
    pub replay_host_seconds: f64,
    /// Replays timed on the device, and their device seconds.
    pub replays_timed: u64,
    pub replay_device_seconds: f64,
    /// Forward passes run without a recording (prefill, shapes not recordable, shapes
    /// being warmed up).
    pub unrecorded: u64,
    /// Host seconds of the passes that warmed a recordable shape up (run unrecorded,
    /// then recorded and instantiated on its third run): launches, capture and
    /// instantiation, not the device's run of the work.
    pub warm_up_seconds: f64,
    /// Recordings made, dropped to make room for another, and captures that failed.
    pub recorded: u64,
    pub dropped: u64,
    pub failed: u64,
}

impl GraphStats {
    /// Mean host and device microseconds per replay (0 where none ran or was timed).
    pub fn replay_micros(&self) -> (f64, f64) {
        let per = |s: f64, n: u64| if n == 0 { 0.0 } else { 1e6 * s / n as f64 };
        (
            per(self.replay_host_seconds, self.replays),
            per(self.replay_device_seconds, self.replays_timed),
        )
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &GraphStats) -> GraphStats {
        GraphStats {
            replays: self.replays - before.replays,
            replay_host_seconds: self.replay_host_seconds - before.replay_host_seconds,
            replays_timed: self.replays_timed - before.replays_timed,
            replay_device_seconds: self.replay_device_seconds - before.replay_device_seconds,
            unrecorded: self.unrecorded - before.unrecorded,
            warm_up_seconds: self.warm_up_seconds - before.warm_up_seconds,
            recorded: self.recorded - before.recorded,
            dropped: self.dropped - before.dropped,
            failed: self.failed - before.failed,
        }
    }
}

/// [`GraphStats`] being counted, and the device timing of one replay in flight.
struct GraphTally {
    stats: GraphStats,
    /// The counts at the last log line.
    logged: GraphStats,
    /// Start and end events of the device timing; `timing` while a timed replay has not
    /// been read back yet.
    events: Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
    timing: bool,
}
/// Steps of one recordable shape before it is recorded.
const RECORD_AFTER: usize = 3;

/// Attention row tiles on the device and their count.
type RowTiles = (Arc<CudaSlice<i32>>, usize);

/// Device pointer tables of one MoE layer's experts.
struct ExpertTables {
    gate: CudaSlice<u64>,
    up: CudaSlice<u64>,
    down: CudaSlice<u64>,
}

/// The routing tables of the identity routing (every row to expert 0), used to run a
/// dense MLP through the fused expert GEMVs.
struct Identity {
    off: CudaSlice<i32>,
    perm: CudaSlice<i32>,
    active: CudaSlice<i32>,
    meta: CudaSlice<i32>,
}

/// Bytes of cuBLAS workspace.
const BLAS_WORKSPACE: usize = 32 << 20;

/// Output rows (times experts) below which a GEMV gives each row two warps, splitting
/// K: one warp per row would leave most of an H100's 8448 warp slots idle.
const SPLIT_K_BELOW_ROWS: usize = 16384;

/// Rows at or below which a GEMM runs as a GEMV (every weight byte read once).
const GEMV_MAX_ROWS: usize = 8;
/// (token, choice) pairs at or below which the routed experts run as GEMVs (a few
/// tokens per expert: each pass of 8 reads the expert's weights once): 64, or 8 per
/// expert where there are more than 8 experts, so that a speculative verification
/// of a batch (a few rows per sequence) stays on this path, which needs no host
/// synchronisation and can be recorded.
const MOE_GEMV_MAX_PAIRS: usize = 64;

fn moe_gemv_max_pairs(n_experts: usize) -> usize {
    MOE_GEMV_MAX_PAIRS.max(8 * n_experts)
}

/// Batch sizes recorded steps are padded to (then multiples of 32): a server's batch
/// drifts as requests come and go, and each size would otherwise be its own
/// recording: 12 recordings per depth and context bound cover 1 to 64 sequences, at
/// the cost of up to half as many rows again (launch-bound steps barely notice).
const RECORDED_BATCHES: [usize; 12] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64];

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    name: String,
    arch: String,
    expert_tables: Mutex<HashMap<(u64, usize), Arc<ExpertTables>>>,
    identity: Mutex<HashMap<usize, Arc<Identity>>>,
    inv_freq: Mutex<HashMap<Vec<u32>, Arc<CudaSlice<f32>>>>,
    graphs: Mutex<HashMap<RecordKey, Recorded>>,
    /// Most recordings kept ([`MAX_RECORDINGS`] unless `HYSERVE_GRAPH_CACHE` says).
    max_recordings: usize,
    /// This backend's number in the process (log lines name it).
    id: usize,
    /// Recordings kept (the length of `graphs`, read without its lock).
    kept: std::sync::atomic::AtomicUsize,
    tally: Mutex<GraphTally>,
    /// Recorded steps run so far (the clock of [`Recorded::last_used`]).
    graph_clock: std::sync::atomic::AtomicU64,
    /// Recordable steps run without a recording ([`Backend::warm_up_passes`]).
    warm_ups: std::sync::atomic::AtomicU64,
    /// How often each recordable shape not yet recorded has run.
    graph_seen: Mutex<HashMap<RecordKey, usize>>,
    graphs_enabled: bool,
    /// Fewest keys one attention block takes when the key range is split (a multiple
    /// of the 32-key tile; `HYSERVE_ATTN_MIN_CHUNK` overrides it for tuning).
    attn_min_chunk: usize,
    /// Streaming multiprocessors (attention sizes its key splits to fill them).
    n_sms: usize,
    /// cuBLAS's workspace (set explicitly, so recording a GEMM allocates nothing).
    _blas_workspace: CudaSlice<u8>,
    /// Expert-load counters, `[layer][expert]` with a stride of [`MAX_EXPERTS`], added to
    /// by the routing of counted MoE blocks and drained by [`Backend::take_expert_load`];
    /// and the number of a step's own tokens (the rest is a recorded shape's padding).
    /// Both persistent, so recordings embed their addresses.
    expert_load: Mutex<CudaSlice<u64>>,
    expert_load_ptr: u64,
    counted_tokens: Mutex<(CudaSlice<i32>, Option<usize>)>,
    counted_tokens_ptr: u64,
    /// Page-locked host buffers that downloads (a step's logits) come back through.
    staging: Mutex<Staging>,
}

/// Page-locked host memory that device-to-host copies land in, kept between steps and
/// grown as needed. A copy into pageable memory goes through a driver bounce buffer at
/// a fraction of the link's speed, and a fresh `Vec` of a step's logits (hundreds of
/// KiB) faults its pages in on every step.
#[derive(Default)]
struct Staging {
    f32: Option<PinnedHostSlice<f32>>,
    bf16: Option<PinnedHostSlice<u16>>,
}

/// Fewest elements a staging buffer is allocated with (256 KiB of fp32).
const STAGING_MIN: usize = 1 << 16;

/// Experts per layer the routing supports (and the expert-load counters' stride).
const MAX_EXPERTS: usize = 256;
/// Layers whose expert load is counted on the device.
const MAX_COUNTED_LAYERS: usize = 256;

/// Facts about the started backend, for logs and benchmark records.
#[derive(Clone, Debug)]
pub struct CudaInfo {
    pub device: String,
    pub arch: String,
    pub total_mem: usize,
    pub kernels_cached: bool,
    pub compile_ms: f64,
}

impl CudaBackend {
    /// Starts the backend on GPU `ordinal`: checks the libraries, creates a context and
    /// stream, compiles (or loads cached) kernels for the device's architecture.
    pub fn new(ordinal: usize, precision: Precision) -> Result<(Self, CudaInfo), CudaError> {
        if precision != Precision::Bf16 {
            return Err(CudaError::Precision(precision));
        }
        probe_libraries(&["cuda", "nvrtc", "cublas", "cublasLt"])?;
        let ctx = CudaContext::new(ordinal).map_err(drv)?;
        // SAFETY: this backend uses one stream for all its work, so cudarc's per-buffer
        // event tracking (cross-stream synchronisation) is not needed; dropping it
        // removes two event records from every launch.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv)?;
        keep_pool_memory(&ctx)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let arch = format!("sm_{major}{minor}");
        let t0 = std::time::Instant::now();
        let (cubin, cached) = compile::cubin_for(&arch)?;
        let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(drv)?;
        let k = Kernels::load(&module)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(format!("{e:?}")))?;
        let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE).map_err(drv)?;
        let expert_load = stream
            .alloc_zeros::<u64>(MAX_COUNTED_LAYERS * MAX_EXPERTS)
            .map_err(drv)?;
        let counted_tokens = stream.alloc_zeros::<i32>(1).map_err(drv)?;
        let expert_load_ptr = expert_load.device_ptr(&stream).0;
        let counted_tokens_ptr = counted_tokens.device_ptr(&stream).0;
        {
            let (wp, _sync) = workspace.device_ptr(&stream);
            // SAFETY: the workspace is a live allocation of BLAS_WORKSPACE bytes owned
            // by the backend for as long as the handle.
            let r = unsafe {
                blas::cublasSetWorkspace_v2(*blas.handle(), wp as *mut c_void, BLAS_WORKSPACE)
            };
            if r != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Blas(format!("cublasSetWorkspace: {r:?}")));
            }
        }
        let graphs_enabled = std::env::var("HYSERVE_CUDA_GRAPHS").map_or(true, |v| v != "0");
        // Timing is a diagnostic: a backend whose events cannot be made times nothing.
        let timed = || ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT));
        let timing_events = timed().and_then(|a| Ok((a, timed()?))).ok();
        let device = ctx.name().map_err(drv)?;
        let sm_count =
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        let n_sms = ctx.attribute(sm_count).map_err(drv)? as usize;
        let id = NEXT_BACKEND_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(backend = id, ordinal, %device, "CUDA backend started");
        let info = CudaInfo {
            device: device.clone(),
            arch: arch.clone(),
            total_mem: ctx.total_mem().map_err(drv)?,
            kernels_cached: cached,
            compile_ms,
        };
        Ok((
            Self {
                name: format!("cuda:{ordinal} ({device})"),
                ctx,
                stream,
                blas,
                k,
                arch,
                expert_tables: Mutex::new(HashMap::new()),
                identity: Mutex::new(HashMap::new()),
                inv_freq: Mutex::new(HashMap::new()),
                graphs: Mutex::new(HashMap::new()),
                max_recordings: std::env::var("HYSERVE_GRAPH_CACHE")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .map_or(MAX_RECORDINGS, |n| n.max(1)),
                id,
                kept: std::sync::atomic::AtomicUsize::new(0),
                tally: Mutex::new(GraphTally {
                    stats: GraphStats::default(),
                    logged: GraphStats::default(),
                    events: timing_events,
                    timing: false,
                }),
                graph_clock: std::sync::atomic::AtomicU64::new(0),
                warm_ups: std::sync::atomic::AtomicU64::new(0),
                graph_seen: Mutex::new(HashMap::new()),
                graphs_enabled,
                attn_min_chunk: std::env::var("HYSERVE_ATTN_MIN_CHUNK")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .map_or(64, |c| c.max(ATT_TILE).div_ceil(ATT_TILE) * ATT_TILE),
                n_sms,
                _blas_workspace: workspace,
                expert_load: Mutex::new(expert_load),
                expert_load_ptr,
                counted_tokens: Mutex::new((counted_tokens, None)),
                counted_tokens_ptr,
                staging: Mutex::new(Staging::default()),
            },
            info,
        ))
    }

    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The first `n` elements of `src` copied into the page-locked buffer `slot`
    /// (allocated, or replaced by a larger one, when it is too small), once the copy
    /// has finished.
    fn stage<'a, T: DeviceRepr + ValidAsZeroBits>(
        &self,
        slot: &'a mut Option<PinnedHostSlice<T>>,
        src: &CudaSlice<T>,
        n: usize,
    ) -> &'a [T] {
        if slot.as_ref().is_none_or(|p| p.len() < n) {
            // The old buffer is freed before its successor is taken.
            *slot = None;
            let len = n.next_power_of_two().max(STAGING_MIN);
            // Plain page-locked memory: write-combined memory (cudarc's default) is
            // slow for the host to read, and the host reads every element.
            // SAFETY: the buffer starts uninitialised; only the `n` elements the copy
            // below writes are read back.
            let buf = unsafe { self.ctx.alloc_pinned_with_flags::<T>(len, 0) };
            *slot = Some(buf.expect("page-locked host allocation"));
        }
        let buf = slot.as_mut().expect("staging buffer allocated above");
        // Exactly `n` elements: the driver copies the destination's length.
        let host = &mut buf.as_mut_slice().expect("staging buffer")[..n];
        self.stream
            .memcpy_dtoh(&src.slice(..n), host)
            .expect("device to host copy");
        // The copy into page-locked memory is asynchronous, and a plain slice records
        // nothing on the stream: wait for it.
        self.stream.synchronize().expect("device to host copy");
        host
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) {
        self.stream.synchronize().expect("stream synchronize");
    }

    /// Turns decode-step recording (CUDA graphs) on or off (on unless
    /// `HYSERVE_CUDA_GRAPHS=0`); turning it off drops the recordings.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs_enabled = on;
        if !on {
            self.graphs.lock().expect("graphs lock").clear();
            self.kept.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Keeps at most `n` recordings from now on (at least 1; `HYSERVE_GRAPH_CACHE` or
    /// [`MAX_RECORDINGS`] before), for tests of the cap. Recordings past it stay until
    /// new shapes replace them.
    pub fn set_max_recordings(&mut self, n: usize) {
        self.max_recordings = n.max(1);
    }

    /// Decode steps recorded so far.
    pub fn recorded_graphs(&self) -> usize {
        self.graphs.lock().expect("graphs lock").len()
    }

    /// What this backend's forward passes did with recordings so far.
    pub fn graph_stats(&self) -> GraphStats {
        let mut t = self.tally.lock().expect("tally lock");
        self.read_timing(&mut t);
        t.stats
    }

    /// Reads the device time of the timed replay in flight once it is done (every
    /// step downloads its logits, so by the next pass it is).
    fn read_timing(&self, t: &mut GraphTally) {
        if !t.timing {
            return;
        }
        let Some((start, end)) = &t.events else {
            return;
        };
        // SAFETY: a valid event of this backend's context.
        let done = unsafe { cudarc::driver::result::event::query(end.cu_event()) }.is_ok();
        if !done {
            return;
        }
        t.timing = false;
        if let Ok(ms) = start.elapsed_ms(end) {
            t.stats.replays_timed += 1;
            t.stats.replay_device_seconds += f64::from(ms) * 1e-3;
        }
    }

    /// Counts one forward pass; every [`GRAPH_LOG_EVERY`] passes, logs what the last
    /// ones did with recordings, with the device's graph memory.
    fn count_pass(&self, f: impl FnOnce(&mut GraphStats)) {
        let mut t = self.tally.lock().expect("tally lock");
        self.read_timing(&mut t);
        f(&mut t.stats);
        let d = t.stats.since(&t.logged);
        if d.replays + d.unrecorded < GRAPH_LOG_EVERY {
            return;
        }
        t.logged = t.stats;
        let (host_us, device_us) = d.replay_micros();
        let (used, reserved) = self.graph_memory();
        tracing::info!(
            backend = self.id,
            replays = d.replays,
            replay_host_us = format!("{host_us:.1}"),
            replay_device_us = format!("{device_us:.1}"),
            unrecorded = d.unrecorded,
            warm_up_ms = format!("{:.1}", 1e3 * d.warm_up_seconds),
            recorded = d.recorded,
            dropped = d.dropped,
            failed = d.failed,
            kept = self.kept.load(std::sync::atomic::Ordering::Relaxed),
            graph_memory_used_mib = used >> 20,
            graph_memory_reserved_mib = reserved >> 20,
            "cuda graphs"
        );
    }

    /// The device's memory in use by recordings' own allocations, and reserved for
    /// them (0 where the driver does not say).
    pub fn graph_memory(&self) -> (u64, u64) {
        use cudarc::driver::sys::{self, CUgraphMem_attribute as A};
        let get = |attr: A| {
            let mut v = 0u64;
            // SAFETY: valid device handle; these attributes write one u64.
            let r = unsafe {
                sys::cuDeviceGetGraphMemAttribute(
                    self.ctx.cu_device(),
                    attr,
                    &mut v as *mut u64 as *mut c_void,
                )
            };
            if r == sys::CUresult::CUDA_SUCCESS {
                v
            } else {
                0
            }
        };
        (
            get(A::CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT),
            get(A::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT),
        )
    }

    fn batch_from(&self, h: &BatchHost) -> CudaBatch {
        CudaBatch {
            rows: h.positions.len(),
            max_ctx: h.max_ctx,
            tokens: self.upload_i32(&h.tokens),
            positions: self.upload_i32(&h.positions),
            new_slots: self.upload_i32(&h.new_slots),
            seq_row: self.upload_i32(&h.seq_row),
            seq_pos: self.upload_i32(&h.seq_pos),
            seq_slot: self.upload_i32(&h.seq_slot),
            slots: self.upload_i32(&h.slots),
            host: h.host.clone(),
            tiles: Mutex::new(HashMap::new()),
        }
    }

    /// New contents for a recorded batch, in place (same shapes, same buffers).
    fn refill(&self, b: &mut CudaBatch, h: &BatchHost) {
        assert_eq!(b.rows, h.positions.len());
        let s = &self.stream;
        let copy = |dst: &mut CudaSlice<i32>, src: &[i32]| {
            assert_eq!(dst.len(), src.len().max(1));
            if !src.is_empty() {
                s.memcpy_htod(src, dst).expect("host to device copy");
            }
        };
        copy(&mut b.tokens, &h.tokens);
        copy(&mut b.positions, &h.positions);
        copy(&mut b.new_slots, &h.new_slots);
        copy(&mut b.seq_row, &h.seq_row);
        copy(&mut b.seq_pos, &h.seq_pos);
        copy(&mut b.seq_slot, &h.seq_slot);
        copy(&mut b.slots, &h.slots);
    }

    /// Device-to-device copy of `bytes` between raw pointers.
    fn copy_bytes(&self, src: u64, dst: u64, bytes: usize) {
        if bytes == 0 {
            return;
        }
        // SAFETY: both pointers are live device allocations of at least `bytes`
        // bytes (checked by the callers), on this backend's context and stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .expect("device copy");
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn act_ptr(&self, a: &CudaAct) -> u64 {
        match &a.buf {
            ActBuf::Bf16(s) => self.ptr(s),
            ActBuf::F32(s) => self.ptr(s),
        }
    }

    fn bf16_ptr(&self, a: &CudaAct) -> u64 {
        match &a.buf {
            ActBuf::Bf16(s) => self.ptr(s),
            ActBuf::F32(_) => panic!("expected a bf16 activation"),
        }
    }

    /// An uninitialised bf16 activation; the caller's kernel writes every element.
    fn alloc_act(&self, rows: usize, cols: usize) -> CudaAct {
        // SAFETY: bf16 bits have no invalid values; every caller fully overwrites the
        // buffer before it is read.
        let buf = unsafe { self.stream.alloc::<u16>((rows * cols).max(1)) }.expect("device alloc");
        CudaAct {
            buf: ActBuf::Bf16(buf),
            rows,
            cols,
        }
    }

    fn alloc_f32(&self, n: usize) -> CudaSlice<f32> {
        // SAFETY: as `alloc_act`: written by the kernel that produces it before any read.
        unsafe { self.stream.alloc::<f32>(n.max(1)) }.expect("device alloc")
    }

    fn upload_i32(&self, v: &[i32]) -> CudaSlice<i32> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<i32>(1).expect("device alloc");
        }
        self.stream.clone_htod(v).expect("host to device copy")
    }

    fn upload_idx(&self, v: &[usize]) -> CudaSlice<i32> {
        let v: Vec<i32> = v
            .iter()
            .map(|&x| i32::try_from(x).expect("index fits i32"))
            .collect();
        self.upload_i32(&v)
    }

    fn upload_f32(&self, v: &[f32]) -> CudaSlice<f32> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<f32>(1).expect("device alloc");
        }
        self.stream.clone_htod(v).expect("host to device copy")
    }

    /// An fp32 activation `[rows, cols]` of `data` as it is (where [`Backend::upload`]
    /// rounds to bf16): the type of logits kept in fp32, for tests.
    pub fn upload_fp32(&self, rows: usize, cols: usize, data: &[f32]) -> CudaAct {
        assert_eq!(data.len(), rows * cols, "{rows}x{cols} values");
        CudaAct {
            buf: ActBuf::F32(self.upload_f32(data)),
            rows,
            cols,
        }
    }

    /// A random bf16 weight `[rows, cols]`, uniform in `[-scale, scale)`, generated on
    /// the device from `seed` (benchmarks at real dimensions without a checkpoint).
    pub fn random_weight(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> CudaWeight {
        let n = rows * cols;
        // SAFETY: `fill_uniform` writes all `n` elements.
        let buf = unsafe { self.stream.alloc::<u8>(2 * n) }.expect("device alloc");
        let p = self.ptr(&buf);
        let n64 = n as i64;
        launch!(self, fill_uniform, (n.div_ceil(256) as u32, 1, 1), 256, 0; &p, &n64, &seed, &scale);
        CudaWeight { buf, rows, cols }
    }

    /// A random activation `[rows, cols]`, uniform in `[-scale, scale)`.
    pub fn random_act(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> CudaAct {
        let a = self.alloc_act(rows, cols);
        let p = self.bf16_ptr(&a);
        let n64 = (rows * cols) as i64;
        launch!(self, fill_uniform, ((rows * cols).div_ceil(256) as u32, 1, 1), 256, 0; &p, &n64, &seed, &scale);
        a
    }

    /// Fills every cache slot with random values (attention benchmarks).
    pub fn randomize_kv(&self, kv: &mut CudaKv, seed: u64) {
        let n = kv.k.len();
        let n64 = n as i64;
        let scale = 1.0f32;
        for (i, s) in [&kv.k, &kv.v].into_iter().enumerate() {
            let p = self.ptr(s);
            let sd = seed.wrapping_add(i as u64);
            launch!(self, fill_uniform, (n.div_ceil(256) as u32, 1, 1), 256, 0; &p, &n64, &sd, &scale);
        }
    }

    /// Greedy sampling on the device: the arg-max token of every logits row.
    pub fn argmax(&self, logits: &CudaAct) -> Vec<u32> {
        self.argmax_rows(logits, &[logits.rows])
            .pop()
            .unwrap_or_default()
    }

    /// `out = x · Wᵀ` into a new activation, bf16 or fp32.
    fn gemm(&self, x: &CudaAct, w: &CudaWeight, f32_out: bool) -> CudaAct {
        assert_eq!(
            x.cols, w.cols,
            "matmul: {} columns times a [{}, {}] weight",
            x.cols, w.rows, w.cols
        );
        let (m, n, k) = (x.rows, w.rows, w.cols);
        let out = if f32_out {
            CudaAct {
                buf: ActBuf::F32(self.alloc_f32(m * n)),
                rows: m,
                cols: n,
            }
        } else {
            self.alloc_act(m, n)
        };
        if m == 0 {
            return out;
        }
        let (xp, wp, op) = (self.bf16_ptr(x), self.ptr(&w.buf), self.act_ptr(&out));
        self.gemm_raw(xp, wp, op, m, n, k, f32_out);
        out
    }

    /// `C[m, n] = A[m, k] · B[n, k]ᵀ` on raw pointers: GEMV kernel for few rows,
    /// cuBLAS (bf16 tensor cores, fp32 accumulation) otherwise.
    #[allow(clippy::too_many_arguments)]
    fn gemm_raw(&self, a: u64, b: u64, c: u64, m: usize, n: usize, k: usize, f32_out: bool) {
        if m <= GEMV_MAX_ROWS && k.is_multiple_of(8) {
            let (null, mi, ni, ki) = (0u64, m as i32, n as i32, k as i32);
            let (cb, cf) = if f32_out { (null, c) } else { (c, null) };
            // Two warps per column when one warp per column would not fill the GPU.
            let split = n < SPLIT_K_BELOW_ROWS;
            let grid = (n.div_ceil(if split { 4 } else { 8 }) as u32, 1, 1);
            match (m <= 2, split) {
                (true, false) => {
                    launch!(self, gemv_mt2, grid, 256, 0; &b, &a, &cb, &cf, &ni, &ki, &mi)
                }
                (false, false) => {
                    launch!(self, gemv, grid, 256, 0; &b, &a, &cb, &cf, &ni, &ki, &mi)
                }
                (true, true) => {
                    launch!(self, gemv_mt2_s2, grid, 256, 0; &b, &a, &cb, &cf, &ni, &ki, &mi)
                }
                (false, true) => {
                    launch!(self, gemv_s2, grid, 256, 0; &b, &a, &cb, &cf, &ni, &ki, &mi)
                }
            }
            return;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let out_type = if f32_out {
            blas::cudaDataType::CUDA_R_32F
        } else {
            blas::cudaDataType::CUDA_R_16BF
        };
        // Row-major C[m, n] = A · Bᵀ is column-major Cᵀ[n, m] = B(ᵀ as stored) · A.
        // SAFETY: a, b, c point to live buffers of m*k, n*k and m*n elements of the
        // stated types (checked by the callers); alpha and beta are host scalars in the
        // default host pointer mode; the handle is bound to this backend's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                k as i32,
                a as *const c_void,
                blas::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                out_type,
                n as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .expect("cublasGemmEx");
    }

    /// Pointer tables of `experts`, cached per layer (keyed by the first gate pointer
    /// and the count, so a dense MLP and an expert list never share an entry).
    fn expert_tables(&self, experts: &[MlpRef<'_, CudaWeight>]) -> Arc<ExpertTables> {
        let key = (self.ptr(&experts[0].gate.buf), experts.len());
        let mut map = self.expert_tables.lock().expect("tables lock");
        map.entry(key)
            .or_insert_with(|| {
                let col = |f: &dyn Fn(&MlpRef<'_, CudaWeight>) -> u64| -> CudaSlice<u64> {
                    let v: Vec<u64> = experts.iter().map(f).collect();
                    self.stream.clone_htod(&v).expect("host to device copy")
                };
                Arc::new(ExpertTables {
                    gate: col(&|m| self.ptr(&m.gate.buf)),
                    up: col(&|m| self.ptr(&m.up.buf)),
                    down: col(&|m| self.ptr(&m.down.buf)),
                })
            })
            .clone()
    }

    fn identity(&self, rows: usize) -> Arc<Identity> {
        let mut map = self.identity.lock().expect("identity lock");
        map.entry(rows)
            .or_insert_with(|| {
                let perm: Vec<i32> = (0..rows as i32).collect();
                Arc::new(Identity {
                    off: self.upload_i32(&[0, rows as i32]),
                    perm: self.upload_i32(&perm),
                    active: self.upload_i32(&[0]),
                    meta: self.upload_i32(&[1]),
                })
            })
            .clone()
    }

    fn inv_freq(&self, inv_freq: &[f32]) -> Arc<CudaSlice<f32>> {
        let key: Vec<u32> = inv_freq.iter().map(|f| f.to_bits()).collect();
        let mut map = self.inv_freq.lock().expect("inv_freq lock");
        map.entry(key)
            .or_insert_with(|| Arc::new(self.upload_f32(inv_freq)))
            .clone()
    }

    /// Fused gate/up + SwiGLU, then down, as GEMVs over the routing tables.
    #[allow(clippy::too_many_arguments)]
    fn expert_gemvs(
        &self,
        tables: (u64, u64, u64),
        x: &CudaAct,
        routing: (u64, u64, u64, u64),
        pairs: usize,
        n_routed: usize,
        topk: usize,
        n_experts: usize,
        width: usize,
        y: u64,
    ) {
        let hidden = x.cols;
        assert!(
            hidden.is_multiple_of(8) && width.is_multiple_of(8),
            "expert GEMVs need widths divisible by 8"
        );
        let act = self.alloc_act(pairs, width);
        let (gp, upp, dp) = tables;
        let (off, perm, active, meta) = routing;
        let (xp, ap) = (self.bf16_ptr(x), self.bf16_ptr(&act));
        let (tk, wi, hi, nr) = (topk as i32, width as i32, hidden as i32, n_routed as i32);
        // At most min(pairs, experts) experts are active; block rows past the active
        // count exit at once.
        let slots = pairs.min(n_experts) as u32;
        // No expert gets more rows than there are tokens (a token picks distinct
        // experts; the shared expert takes each token once).
        let tokens = n_routed.div_ceil(topk).max(pairs - n_routed);
        let gx = width.div_ceil(8) as u32;
        let split = hidden * (slots as usize) < SPLIT_K_BELOW_ROWS;
        let dx = hidden.div_ceil(if split { 4 } else { 8 }) as u32;
        let (ga, gb) = (tokens <= 2, (gx, slots, 1));
        if ga {
            launch!(self, moe_gate_up_mt2, gb, 256, 0;
                &gp, &upp, &xp, &off, &perm, &active, &meta, &tk, &nr, &ap, &wi, &hi);
        } else {
            launch!(self, moe_gate_up, gb, 256, 0;
                &gp, &upp, &xp, &off, &perm, &active, &meta, &tk, &nr, &ap, &wi, &hi);
        }
        let db = (dx, slots, 1);
        match (tokens <= 2, split) {
            (true, false) => launch!(self, moe_down_mt2, db, 256, 0;
                &dp, &ap, &off, &perm, &active, &meta, &y, &hi, &wi),
            (false, false) => launch!(self, moe_down, db, 256, 0;
                &dp, &ap, &off, &perm, &active, &meta, &y, &hi, &wi),
            (true, true) => launch!(self, moe_down_mt2_s2, db, 256, 0;
                &dp, &ap, &off, &perm, &active, &meta, &y, &hi, &wi),
            (false, true) => launch!(self, moe_down_s2, db, 256, 0;
                &dp, &ap, &off, &perm, &active, &meta, &y, &hi, &wi),
        }
    }

    /// A dense MLP of few rows through the fused expert GEMVs (identity routing).
    fn mlp_gemv(&self, x: &CudaAct, m: MlpRef<'_, CudaWeight>) -> CudaAct {
        let id = self.identity(x.rows);
        let out = self.alloc_act(x.rows, x.cols);
        let tables = self.expert_tables(&[m]);
        let t = (
            self.ptr(&tables.gate),
            self.ptr(&tables.up),
            self.ptr(&tables.down),
        );
        let r = (
            self.ptr(&id.off),
            self.ptr(&id.perm),
            self.ptr(&id.active),
            self.ptr(&id.meta),
        );
        self.expert_gemvs(
            t,
            x,
            r,
            x.rows,
            x.rows,
            1,
            1,
            m.gate.rows,
            self.bf16_ptr(&out),
        );
        out
    }

    fn tiles(&self, batch: &CudaBatch, per_tile: usize) -> RowTiles {
        let mut map = batch.tiles.lock().expect("tiles lock");
        map.entry(per_tile)
            .or_insert_with(|| {
                let mut t = Vec::new();
                for (s, &(_, _, n)) in batch.host.iter().enumerate() {
                    let mut r = 0;
                    while r < n {
                        let len = per_tile.min(n - r);
                        t.extend([s as i32, r as i32, len as i32]);
                        r += len;
                    }
                }
                let n = t.len() / 3;
                (Arc::new(self.upload_i32(&t)), n)
            })
            .clone()
    }
}

/// Keeps freed memory in the stream-ordered pool instead of returning it to the driver
/// at every synchronisation (activations are allocated and freed every step).
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<(), CudaError> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: valid out-pointer and device handle; the attribute takes a u64 in/out.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(drv)?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
        .result()
        .map_err(drv)?;
    }
    Ok(())
}

fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&x| numeric::f32_to_bf16_bits(x))
        .collect()
}

/// Most query vectors one attention block serves (8 warps x 8).
const ATT_MAX_VECS: usize = 64;
const ATT_TILE: usize = 32;
/// Static limit on the attention kernel's dynamic shared memory.
const ATT_SMEM: usize = 48 * 1024;

/// The rows `groups` asks of `a` (their sum), which `a` must have.
fn rows_asked(a: &CudaAct, groups: &[usize]) -> usize {
    let rows: usize = groups.iter().sum();
    assert!(
        rows <= a.rows,
        "{rows} rows asked of a {}-row matrix",
        a.rows
    );
    rows
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type Act = CudaAct;
    type Kv = CudaKv;
    type Batch = CudaBatch;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn precision(&self) -> Precision {
        Precision::Bf16
    }

    fn load_matrix(&self, host: &HostMatrix) -> CudaWeight {
        let host = if host.dtype == DType::BF16 {
            host.clone()
        } else {
            host.cast(DType::BF16)
        };
        let buf = if host.bytes.is_empty() {
            self.stream.alloc_zeros::<u8>(2).expect("device alloc")
        } else {
            self.stream
                .clone_htod(host.bytes.as_slice())
                .expect("host to device copy")
        };
        CudaWeight {
            buf,
            rows: host.rows,
            cols: host.cols,
        }
    }

    fn load_vector(&self, values: &[f32]) -> CudaVector {
        let rounded: Vec<f32> = values.iter().map(|&x| numeric::round_bf16(x)).collect();
        CudaVector {
            buf: self.upload_f32(&rounded),
            len: values.len(),
        }
    }

    fn random_matrix(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> CudaWeight {
        self.random_weight(rows, cols, seed, scale)
    }

    fn weight_bytes(&self, w: &CudaWeight) -> usize {
        w.rows * w.cols * 2
    }

    fn before_weight_swap(&self) {
        self.synchronize();
        self.expert_tables.lock().expect("tables lock").clear();
        self.graphs.lock().expect("graphs lock").clear();
        self.graph_seen.lock().expect("graph_seen lock").clear();
    }

    fn slice_rows(&self, w: &CudaWeight, rows: std::ops::Range<usize>) -> CudaWeight {
        assert!(
            rows.start < rows.end && rows.end <= w.rows,
            "row range inside the weight"
        );
        let row_bytes = 2 * w.cols;
        let buf = self
            .stream
            .clone_dtod(&w.buf.slice(rows.start * row_bytes..rows.end * row_bytes))
            .expect("device to device copy");
        CudaWeight {
            buf,
            rows: rows.len(),
            cols: w.cols,
        }
    }

    fn alloc_kv(&self, spec: KvSpec) -> CudaKv {
        assert_eq!(spec.dtype, DType::BF16, "the CUDA KV cache is bf16");
        let n = spec.n_cache_layers * spec.capacity_tokens() * spec.n_kv_heads * spec.head_dim;
        CudaKv {
            k: self
                .stream
                .alloc_zeros::<u16>(n.max(1))
                .expect("KV cache alloc"),
            v: self
                .stream
                .alloc_zeros::<u16>(n.max(1))
                .expect("KV cache alloc"),
            spec,
        }
    }

    fn zeros(&self, rows: usize, cols: usize) -> CudaAct {
        CudaAct {
            buf: ActBuf::Bf16(
                self.stream
                    .alloc_zeros::<u16>((rows * cols).max(1))
                    .expect("device alloc"),
            ),
            rows,
            cols,
        }
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> CudaAct {
        assert_eq!(data.len(), rows * cols);
        if data.is_empty() {
            return self.zeros(rows, cols);
        }
        CudaAct {
            buf: ActBuf::Bf16(
                self.stream
                    .clone_htod(&bf16_bits(data))
                    .expect("host to device copy"),
            ),
            rows,
            cols,
        }
    }

    fn download(&self, a: &CudaAct) -> Vec<f32> {
        self.download_rows(a, &[a.rows]).pop().unwrap_or_default()
    }

    fn download_rows(&self, a: &CudaAct, groups: &[usize]) -> Vec<Vec<f32>> {
        let n = rows_asked(a, groups) * a.cols;
        if n == 0 {
            return vec![Vec::new(); groups.len()];
        }
        let mut staging = self.staging.lock().expect("staging lock");
        match &a.buf {
            ActBuf::F32(s) => {
                let host = self.stage(&mut staging.f32, s, n);
                crate::backend::split_rows(host, a.cols, groups)
            }
            ActBuf::Bf16(s) => {
                let host = self.stage(&mut staging.bf16, s, n);
                crate::backend::split_rows_as(host, a.cols, groups, numeric::bf16_bits_to_f32)
            }
        }
    }

    /// On the device: one block per row, and only the ids come back (4 bytes a row,
    /// where the row itself is 2 bytes a vocabulary entry).
    fn argmax_rows(&self, a: &CudaAct, groups: &[usize]) -> Vec<Vec<u32>> {
        let rows = rows_asked(a, groups);
        if rows == 0 {
            return vec![Vec::new(); groups.len()];
        }
        let out = self.stream.alloc_zeros::<i32>(rows).expect("device alloc");
        let (op, cols) = (self.ptr(&out), a.cols as i32);
        let lp = self.act_ptr(a);
        match &a.buf {
            ActBuf::Bf16(_) => {
                launch!(self, argmax_rows, (rows as u32, 1, 1), 1024, 0; &lp, &cols, &op)
            }
            ActBuf::F32(_) => {
                launch!(self, argmax_rows_f32, (rows as u32, 1, 1), 1024, 0; &lp, &cols, &op)
            }
        }
        let ids = self.stream.clone_dtoh(&out).expect("device to host copy");
        crate::backend::split_rows_as(&ids, 1, groups, |i| i as u32)
    }

    fn shape(&self, a: &CudaAct) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn matmul_fp32(&self, x: &CudaAct, w: &CudaWeight) -> CudaAct {
        self.gemm(x, w, true)
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> CudaAct {
        assert!(
            ids.iter().all(|&i| (i as usize) < table.rows),
            "token id out of range"
        );
        let out = self.alloc_act(ids.len(), table.cols);
        if ids.is_empty() {
            return out;
        }
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let d = self.upload_i32(&ids);
        let (tp, ip, op, cols) = (
            self.ptr(&table.buf),
            self.ptr(&d),
            self.bf16_ptr(&out),
            table.cols as i32,
        );
        launch!(self, embed, (ids.len() as u32, 1, 1), 256, 0; &tp, &ip, &op, &cols);
        out
    }

    fn matmul(&self, x: &CudaAct, w: &CudaWeight) -> CudaAct {
        self.gemm(x, w, false)
    }

    fn gather_rows(&self, x: &CudaAct, rows: &[usize]) -> CudaAct {
        assert!(
            rows.iter().all(|&r| r < x.rows),
            "gather_rows: row out of range"
        );
        let out = self.alloc_act(rows.len(), x.cols);
        if rows.is_empty() {
            return out;
        }
        let r = self.upload_idx(rows);
        let (xp, rp, op, cols, one) = (
            self.bf16_ptr(x),
            self.ptr(&r),
            self.bf16_ptr(&out),
            x.cols as i32,
            1i32,
        );
        launch!(self, gather_rows_div, (rows.len() as u32, 1, 1), 256, 0; &xp, &rp, &one, &op, &cols);
        out
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaVector, eps: f32) -> CudaAct {
        let g = w.len;
        assert_eq!(
            x.cols % g,
            0,
            "rms_norm: width {} not a multiple of {g}",
            x.cols
        );
        let out = self.alloc_act(x.rows, x.cols);
        let groups = x.rows * x.cols / g;
        if groups == 0 {
            return out;
        }
        let (xp, wp, op) = (self.bf16_ptr(x), self.ptr(&w.buf), self.bf16_ptr(&out));
        let (ng, gi) = (groups as i64, g as i32);
        launch!(self, rms_norm, (groups.div_ceil(8) as u32, 1, 1), 256, 0; &xp, &wp, &op, &ng, &gi, &eps);
        out
    }

    fn add_assign(&self, x: &mut CudaAct, y: &CudaAct) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols));
        let n = x.rows * x.cols;
        if n == 0 {
            return;
        }
        let (xp, yp, n64) = (self.bf16_ptr(x), self.bf16_ptr(y), n as i64);
        launch!(self, add_inplace, (n.div_ceil(256) as u32, 1, 1), 256, 0; &xp, &yp, &n64);
    }

    fn add_rms_norm(&self, x: &mut CudaAct, y: &CudaAct, w: &CudaVector, eps: f32) -> CudaAct {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols));
        assert_eq!(x.cols, w.len, "add_rms_norm normalises whole rows");
        let out = self.alloc_act(x.rows, x.cols);
        if x.rows == 0 {
            return out;
        }
        let (xp, yp, wp, op, cols) = (
            self.bf16_ptr(x),
            self.bf16_ptr(y),
            self.ptr(&w.buf),
            self.bf16_ptr(&out),
            x.cols as i32,
        );
        launch!(self, add_rms_norm, (x.rows as u32, 1, 1), 512, 0; &xp, &yp, &wp, &op, &cols, &eps);
        out
    }

    fn swiglu(&self, gate: &CudaAct, up: &CudaAct) -> CudaAct {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols));
        let n = gate.rows * gate.cols;
        let out = self.alloc_act(gate.rows, gate.cols);
        if n == 0 {
            return out;
        }
        let (gp, upp, op, n64) = (
            self.bf16_ptr(gate),
            self.bf16_ptr(up),
            self.bf16_ptr(&out),
            n as i64,
        );
        launch!(self, swiglu, (n.div_ceil(256) as u32, 1, 1), 256, 0; &gp, &upp, &op, &n64);
        out
    }

    fn rope(&self, x: &mut CudaAct, head_dim: usize, positions: &[usize], inv_freq: &[f32]) {
        assert_eq!(inv_freq.len(), head_dim / 2);
        assert_eq!(positions.len(), x.rows);
        assert_eq!(x.cols % head_dim, 0);
        assert!(
            head_dim <= 128 && head_dim.is_multiple_of(2),
            "head_dim {head_dim} unsupported"
        );
        if x.rows == 0 {
            return;
        }
        let pos = self.upload_idx(positions);
        let f = self.inv_freq(inv_freq);
        let n_q = (x.cols / head_dim) as i32;
        let (xp, pp, fp, null, zero, d, eps) = (
            self.bf16_ptr(x),
            self.ptr(&pos),
            self.ptr(&*f),
            0u64,
            0i32,
            head_dim as i32,
            0f32,
        );
        launch!(self, rope_qk_write, (x.rows as u32, n_q as u32, 1), 32, 0;
            &xp, &null, &null, &null, &null, &pp, &null, &fp, &null, &eps, &n_q, &zero, &d);
    }

    fn write_kv(&self, kv: &mut CudaKv, layer: usize, k: &CudaAct, v: &CudaAct, slots: &[usize]) {
        let width = kv.spec.n_kv_heads * kv.spec.head_dim;
        assert_eq!((k.cols, v.cols), (width, width));
        assert_eq!(k.rows, slots.len());
        assert!(layer < kv.spec.n_cache_layers);
        assert!(
            slots.iter().all(|&s| s < kv.spec.capacity_tokens()),
            "kv slot out of range"
        );
        if slots.is_empty() {
            return;
        }
        let s = self.upload_idx(slots);
        let off = (layer * kv.spec.capacity_tokens() * width * 2) as u64;
        let (kp, vp, sp, kc, vc, w) = (
            self.bf16_ptr(k),
            self.bf16_ptr(v),
            self.ptr(&s),
            self.ptr(&kv.k) + off,
            self.ptr(&kv.v) + off,
            width as i32,
        );
        launch!(self, write_kv, (slots.len() as u32, 1, 1), 128, 0; &kp, &vp, &sp, &kc, &vc, &w);
    }

    fn batch(&self, seqs: Vec<AttnSeq>, tokens: &[u32]) -> CudaBatch {
        // Every unrecorded forward pass makes its batch here.
        self.count_pass(|s| s.unrecorded += 1);
        self.batch_from(&BatchHost::new(&seqs, tokens, None))
    }

    fn embed_batch(&self, table: &CudaWeight, batch: &CudaBatch) -> CudaAct {
        let out = self.alloc_act(batch.rows, table.cols);
        if batch.rows == 0 {
            return out;
        }
        let (tp, ip, op, cols) = (
            self.ptr(&table.buf),
            self.ptr(&batch.tokens),
            self.bf16_ptr(&out),
            table.cols as i32,
        );
        launch!(self, embed, (batch.rows as u32, 1, 1), 256, 0; &tp, &ip, &op, &cols);
        out
    }

    fn padded_sequences(
        &self,
        n_seqs: usize,
        rows: usize,
        top_k: usize,
        n_experts: usize,
    ) -> usize {
        if !self.graphs_enabled || n_seqs == 0 {
            return n_seqs;
        }
        let padded = RECORDED_BATCHES
            .iter()
            .copied()
            .find(|&b| b >= n_seqs)
            .unwrap_or_else(|| n_seqs.next_multiple_of(32));
        // Padding must not push the MoE off its recordable path.
        if padded * rows * top_k > moe_gemv_max_pairs(n_experts) {
            return n_seqs;
        }
        padded
    }

    fn uses_thread_pool(&self) -> bool {
        false
    }

    fn recording_capacity(&self) -> usize {
        if self.graphs_enabled {
            self.max_recordings
        } else {
            0
        }
    }

    fn warm_up_passes(&self) -> u64 {
        self.warm_ups.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn record_id(&self, kv: &CudaKv, weight: &CudaWeight) -> u64 {
        // Device addresses: a recording embeds them, so equal addresses replay correctly.
        self.ptr(&kv.k).rotate_left(32) ^ self.ptr(&weight.buf)
    }

    fn forward_recorded(
        &self,
        key: RecordKey,
        seqs: Vec<AttnSeq>,
        tokens: &[u32],
        f: &mut dyn FnMut(&CudaBatch) -> CudaAct,
    ) -> CudaAct {
        // Recordable: decode and verification steps (a few rows per sequence, the
        // layout fixed by the key) whose MoE stays on the GEMV path (no host sync).
        let recordable = self.graphs_enabled
            && key.moe_pairs <= moe_gemv_max_pairs(key.moe_experts)
            && key.seq_rows == RecordKey::layout(seqs.iter().map(|s| s.rows.len()))
            && seqs.iter().all(|s| {
                s.rows.len() <= RecordKey::MAX_SEQ_ROWS
                    && s.first_pos + s.rows.len() <= key.ctx_bound
            });
        if !recordable {
            let batch = self.batch(seqs, tokens);
            return f(&batch);
        }
        let mut graphs = self.graphs.lock().expect("graphs lock");
        let now = self
            .graph_clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(g) = graphs.get_mut(&key) {
            let t0 = std::time::Instant::now();
            g.last_used = now;
            let h = BatchHost::new(&seqs, tokens, Some(key.ctx_bound));
            self.refill(&mut g.batch, &h);
            let mut tally = self.tally.lock().expect("tally lock");
            self.read_timing(&mut tally);
            let timed = match &tally.events {
                Some((start, _)) if !tally.timing && now.is_multiple_of(GRAPH_TIME_EVERY) => {
                    start.record(&self.stream).is_ok()
                }
                _ => false,
            };
            g.graph.0.launch().expect("graph launch");
            let host = t0.elapsed().as_secs_f64();
            if timed && let Some((_, end)) = &tally.events {
                tally.timing = end.record(&self.stream).is_ok();
            }
            drop(tally);
            self.count_pass(|s| {
                s.replays += 1;
                s.replay_host_seconds += host;
            });
            let out = self.alloc_act(g.out.rows, g.out.cols);
            let (src, dst) = (self.bf16_ptr(&g.out), self.bf16_ptr(&out));
            self.copy_bytes(src, dst, 2 * g.out.rows * g.out.cols);
            return out;
        }
        self.warm_ups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let warmed = |s: &mut GraphStats| {
            s.unrecorded += 1;
            s.warm_up_seconds += t0.elapsed().as_secs_f64();
        };
        // A shape seen for the third time is worth recording (serving's batch size
        // drifts while requests come and go, and speculation's depth with acceptance;
        // steady decoding repeats a few shapes). Run the step (its result is this
        // step's), then record the same work on the same input buffers for the steps
        // to come.
        let h = BatchHost::new(&seqs, tokens, Some(key.ctx_bound));
        let batch = self.batch_from(&h);
        let out = f(&batch);
        let mut seen = self.graph_seen.lock().expect("graph_seen lock");
        if seen.len() >= 4 * self.max_recordings {
            seen.clear(); // bounded: shapes seen once long ago start over
        }
        let count = seen.entry(key).or_insert(0);
        *count += 1;
        let count = *count;
        drop(seen);
        if count < RECORD_AFTER {
            self.count_pass(warmed);
            return out;
        }
        if graphs.len() >= self.max_recordings {
            // A graph still running is freed by the driver once it completes.
            let oldest = graphs
                .iter()
                .min_by_key(|(_, g)| g.last_used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                graphs.remove(&k);
                self.kept
                    .store(graphs.len(), std::sync::atomic::Ordering::Relaxed);
                self.count_pass(|s| s.dropped += 1);
            }
        }
        self.graph_seen
            .lock()
            .expect("graph_seen lock")
            .remove(&key);
        let persist = self.alloc_act(out.rows, out.cols);
        self.synchronize();
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        self.stream
            .begin_capture(mode)
            .expect("begin graph capture");
        let recorded = f(&batch);
        let (src, dst) = (self.bf16_ptr(&recorded), self.bf16_ptr(&persist));
        self.copy_bytes(src, dst, 2 * recorded.rows * recorded.cols);
        drop(recorded);
        let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
        match self.stream.end_capture(flags) {
            Ok(Some(graph)) => {
                tracing::debug!(
                    rows = key.rows,
                    ctx_bound = key.ctx_bound,
                    "recorded a decode graph"
                );
                self.count_pass(|s| s.recorded += 1);
                self.kept
                    .store(graphs.len() + 1, std::sync::atomic::Ordering::Relaxed);
                graphs.insert(
                    key,
                    Recorded {
                        graph: GraphCell(graph),
                        batch,
                        out: persist,
                        last_used: now,
                    },
                );
            }
            Ok(None) => {
                self.count_pass(|s| s.failed += 1);
                tracing::warn!(rows = key.rows, "decode graph capture was empty")
            }
            Err(e) => {
                self.count_pass(|s| s.failed += 1);
                tracing::warn!(rows = key.rows, error = ?e, "decode graph not recorded")
            }
        }
        self.count_pass(warmed);
        out
    }

    fn attn_prep(
        &self,
        q: &mut CudaAct,
        new_kv: Option<(CudaAct, CudaAct)>,
        kv: &mut CudaKv,
        layer: usize,
        head_dim: usize,
        inv_freq: &[f32],
        q_norm: Option<(&CudaVector, f32)>,
        batch: &CudaBatch,
    ) {
        assert_eq!(q.rows, batch.rows);
        assert_eq!(q.cols % head_dim, 0);
        assert!(
            head_dim <= 128 && head_dim.is_multiple_of(2),
            "head_dim {head_dim} unsupported"
        );
        assert_eq!(inv_freq.len(), head_dim / 2);
        assert!(layer < kv.spec.n_cache_layers);
        if q.rows == 0 {
            return;
        }
        let n_q = (q.cols / head_dim) as i32;
        let width = kv.spec.n_kv_heads * kv.spec.head_dim;
        let off = (layer * kv.spec.capacity_tokens() * width * 2) as u64;
        let f = self.inv_freq(inv_freq);
        let (kp, vp, n_kv) = match &new_kv {
            Some((k, v)) => {
                assert_eq!((k.cols, v.cols), (width, width));
                (
                    self.bf16_ptr(k),
                    self.bf16_ptr(v),
                    kv.spec.n_kv_heads as i32,
                )
            }
            None => (0, 0, 0),
        };
        let (qw, eps) = match q_norm {
            Some((w, eps)) => {
                assert_eq!(w.len, head_dim);
                (self.ptr(&w.buf), eps)
            }
            None => (0, 0.0),
        };
        let (qp, kc, vc, pp, sp, fp, d) = (
            self.bf16_ptr(q),
            self.ptr(&kv.k) + off,
            self.ptr(&kv.v) + off,
            self.ptr(&batch.positions),
            self.ptr(&batch.new_slots),
            self.ptr(&*f),
            head_dim as i32,
        );
        let heads = (n_q + 2 * n_kv) as u32;
        launch!(self, rope_qk_write, (q.rows as u32, heads, 1), 32, 0;
            &qp, &kp, &vp, &kc, &vc, &pp, &sp, &fp, &qw, &eps, &n_q, &n_kv, &d);
    }

    fn attention(
        &self,
        q: &CudaAct,
        kv: &CudaKv,
        layer: usize,
        n_heads: usize,
        key_norm: Option<(&CudaVector, f32)>,
        scale: ScoreScale,
        batch: &CudaBatch,
    ) -> CudaAct {
        let spec = kv.spec;
        let (d, n_kv) = (spec.head_dim, spec.n_kv_heads);
        assert_eq!(q.cols, n_heads * d);
        assert_eq!(q.rows, batch.rows);
        assert_eq!(n_heads % n_kv, 0);
        assert!(d <= 128, "head_dim {d} unsupported");
        let group = n_heads / n_kv;
        let out = self.alloc_act(q.rows, q.cols);
        if q.rows == 0 {
            return out;
        }
        // Query vectors per block: as many rows as fit 64 vectors and the shared memory.
        assert!(
            d % 4 == 0,
            "head_dim {d}: the attention kernel needs a multiple of 4"
        );
        let tile_bytes = ATT_TILE * (2 * d + 4) * 4;
        let max_vecs = ATT_MAX_VECS.min((ATT_SMEM - tile_bytes) / (d * 4));
        assert!(
            group <= max_vecs,
            "{group} query heads per kv head unsupported"
        );
        // Decode batches (one new row per sequence) use the small-block variant.
        let max_new = batch.host.iter().map(|&(_, _, n)| n).max().unwrap_or(1);
        let per_tile = (max_vecs / group).max(1).min(max_new);
        let (tiles, n_tiles) = self.tiles(batch, per_tile);
        // Split the key range when the grid would not fill the GPU (decode).
        let max_ctx = batch.max_ctx;
        let blocks = n_kv * n_tiles;
        let want = 4 * self.n_sms;
        let max_splits = max_ctx.div_ceil(self.attn_min_chunk).max(1);
        let n_splits = want.div_ceil(blocks).clamp(1, max_splits);
        let chunk = max_ctx.div_ceil(n_splits).div_ceil(ATT_TILE) * ATT_TILE;
        let n_splits = max_ctx.div_ceil(chunk);
        let parts = q.rows * n_heads * n_splits;
        let (pm, pl, pa) = (
            self.alloc_f32(parts),
            self.alloc_f32(parts),
            self.alloc_f32(parts * d),
        );
        let width = n_kv * d;
        let off = (layer * spec.capacity_tokens() * width * 2) as u64;
        let (kw, eps) = match key_norm {
            Some((w, eps)) => {
                assert_eq!(w.len, d);
                (self.ptr(&w.buf), eps)
            }
            None => (0, 0.0),
        };
        let smem = ((per_tile * group * d) * 4 + tile_bytes) as u32;
        // The score scale exactly as the CPU oracle computes it.
        let (scale_mode, scale_val) = match scale {
            ScoreScale::DivSqrt => (0i32, (d as f32).sqrt()),
            ScoreScale::MulInvSqrt => (1i32, (d as f64).powf(-0.5) as f32),
        };
        let (qp, kc, vc, tp) = (
            self.bf16_ptr(q),
            self.ptr(&kv.k) + off,
            self.ptr(&kv.v) + off,
            self.ptr(&*tiles),
        );
        let (sr, spos, ss, sl) = (
            self.ptr(&batch.seq_row),
            self.ptr(&batch.seq_pos),
            self.ptr(&batch.seq_slot),
            self.ptr(&batch.slots),
        );
        let (nq, nkv, di, ch, ns) = (
            n_heads as i32,
            n_kv as i32,
            d as i32,
            chunk as i32,
            n_splits as i32,
        );
        let (pmp, plp, pap) = (self.ptr(&pm), self.ptr(&pl), self.ptr(&pa));
        let grid = (n_kv as u32, n_tiles as u32, n_splits as u32);
        let vecs = per_tile * group;
        if vecs <= 2 * 8 {
            // At least 4 warps: each warp stages at most 8 of a tile's 32 keys.
            let threads = 32 * vecs.div_ceil(2).max(4) as u32;
            launch!(self, attn_fwd_small, grid, threads, smem;
                &qp, &kc, &vc, &tp, &sr, &spos, &ss, &sl, &kw, &eps, &scale_mode, &scale_val,
                &nq, &nkv, &di, &ch, &ns, &pmp, &plp, &pap);
        } else {
            let threads = 32 * vecs.div_ceil(8).max(4) as u32;
            launch!(self, attn_fwd, grid, threads, smem;
                &qp, &kc, &vc, &tp, &sr, &spos, &ss, &sl, &kw, &eps, &scale_mode, &scale_val,
                &nq, &nkv, &di, &ch, &ns, &pmp, &plp, &pap);
        }
        let op = self.bf16_ptr(&out);
        launch!(self, attn_merge, ((q.rows * n_heads) as u32, 1, 1), d.div_ceil(32) as u32 * 32, 0;
            &pmp, &plp, &pap, &op, &ns, &di);
        out
    }

    fn route(
        &self,
        logits: &CudaAct,
        k: usize,
        renormalize: bool,
        round_weights: bool,
    ) -> (Vec<u32>, Vec<f32>) {
        let (experts, weights) = self.route_device(logits, k, renormalize, round_weights);
        let e = self
            .stream
            .clone_dtoh(&experts)
            .expect("device to host copy");
        let w = self
            .stream
            .clone_dtoh(&weights)
            .expect("device to host copy");
        let n = logits.rows * k;
        (e[..n].iter().map(|&x| x as u32).collect(), w[..n].to_vec())
    }

    fn combine(&self, out: &mut CudaAct, src: &CudaAct, weights: &[f32], k: usize) {
        assert_eq!(src.rows, out.rows * k);
        assert_eq!(weights.len(), src.rows);
        assert_eq!(src.cols, out.cols);
        if out.rows == 0 {
            return;
        }
        let w = self.upload_f32(weights);
        let (op, sp, wp, ki, cols) = (
            self.bf16_ptr(out),
            self.bf16_ptr(src),
            self.ptr(&w),
            k as i32,
            out.cols as i32,
        );
        launch!(self, combine, (out.rows as u32, 1, 1), 256, 0; &op, &sp, &wp, &ki, &cols);
    }

    fn scatter_rows(&self, dst: &mut CudaAct, src: &CudaAct, at: &[usize]) {
        assert_eq!(src.rows, at.len());
        assert_eq!(src.cols, dst.cols);
        assert!(
            at.iter().all(|&r| r < dst.rows),
            "scatter_rows: row out of range"
        );
        if at.is_empty() {
            return;
        }
        let a = self.upload_idx(at);
        let (dp, sp, ap, cols) = (
            self.bf16_ptr(dst),
            self.bf16_ptr(src),
            self.ptr(&a),
            dst.cols as i32,
        );
        launch!(self, scatter_rows, (at.len() as u32, 1, 1), 256, 0; &dp, &sp, &ap, &cols);
    }

    fn copy_kv(&self, kv: &mut CudaKv, from: &[usize], to: &[usize]) {
        assert_eq!(from.len(), to.len());
        let cap = kv.spec.capacity_tokens();
        assert!(
            from.iter().chain(to).all(|&s| s < cap),
            "kv slot out of range"
        );
        if from.is_empty() {
            return;
        }
        let width = kv.spec.n_kv_heads * kv.spec.head_dim;
        let (f, t) = (self.upload_idx(from), self.upload_idx(to));
        let (kp, vp, fp, tp, w, le) = (
            self.ptr(&kv.k),
            self.ptr(&kv.v),
            self.ptr(&f),
            self.ptr(&t),
            width as i32,
            (cap * width) as i64,
        );
        launch!(self, copy_kv, (from.len() as u32, kv.spec.n_cache_layers as u32, 1), 128, 0;
            &kp, &vp, &fp, &tp, &w, &le);
    }

    fn mlp(&self, x: &CudaAct, m: MlpRef<'_, CudaWeight>) -> CudaAct {
        if x.rows <= GEMV_MAX_ROWS && x.cols.is_multiple_of(8) && m.gate.rows.is_multiple_of(8) {
            return self.mlp_gemv(x, m);
        }
        let g = self.matmul(x, m.gate);
        let u = self.matmul(x, m.up);
        self.matmul(&self.swiglu(&g, &u), m.down)
    }

    fn moe(
        &self,
        h: &CudaAct,
        router: &CudaWeight,
        routing: Routing,
        shared: Option<MlpRef<'_, CudaWeight>>,
        experts: &[MlpRef<'_, CudaWeight>],
    ) -> CudaAct {
        self.moe_with(h, router, routing, shared, experts, None)
    }

    /// Counts on the device, into the layer's counters, without a host copy (it would
    /// cost a synchronisation per layer and could not be recorded):
    /// [`Backend::take_expert_load`] brings them back.
    fn moe_counted(
        &self,
        h: &CudaAct,
        router: &CudaWeight,
        routing: Routing,
        shared: Option<MlpRef<'_, CudaWeight>>,
        experts: &[MlpRef<'_, CudaWeight>],
        load: crate::backend::LayerLoad<'_>,
    ) -> (CudaAct, bool) {
        let out = self.moe_with(h, router, routing, shared, experts, Some(load.layer));
        (out, false)
    }

    fn set_counted_tokens(&self, n: usize) {
        let Ok(mut c) = self.counted_tokens.lock() else {
            return;
        };
        // Steady decoding repeats one batch size: copy only when it changes.
        let n = n.min(i32::MAX as usize);
        if c.1 == Some(n) {
            return;
        }
        self.stream
            .memcpy_htod(&[n as i32], &mut c.0)
            .expect("host to device copy");
        c.1 = Some(n);
    }

    fn take_expert_load(&self, load: &mut [Vec<u64>]) -> bool {
        let n_layers = load.len().min(MAX_COUNTED_LAYERS);
        if n_layers == 0 {
            return false;
        }
        let Ok(mut counters) = self.expert_load.lock() else {
            return false;
        };
        let mut used = counters.slice_mut(..n_layers * MAX_EXPERTS);
        let host = self.stream.clone_dtoh(&used).expect("device to host copy");
        self.stream.memset_zeros(&mut used).expect("device memset");
        for (l, row) in load.iter_mut().take(n_layers).enumerate() {
            for (e, n) in row.iter_mut().enumerate().take(MAX_EXPERTS) {
                *n += host[l * MAX_EXPERTS + e];
            }
        }
        true
    }
}

impl CudaBackend {
    /// Routing on the device: `(experts, weights)`, `k` per row, as `route` defines.
    fn route_device(
        &self,
        logits: &CudaAct,
        k: usize,
        renormalize: bool,
        round_weights: bool,
    ) -> (CudaSlice<i32>, CudaSlice<f32>) {
        let e = logits.cols;
        assert!(
            k >= 1 && k <= e && e <= 256,
            "route: k={k} with {e} experts"
        );
        let n = logits.rows * k;
        let experts = self
            .stream
            .alloc_zeros::<i32>(n.max(1))
            .expect("device alloc");
        let weights = self.alloc_f32(n);
        if logits.rows == 0 {
            return (experts, weights);
        }
        let (lp, ep, wp) = (self.act_ptr(logits), self.ptr(&experts), self.ptr(&weights));
        let (rows, ei, ki, rn, rw) = (
            logits.rows as i32,
            e as i32,
            k as i32,
            renormalize as i32,
            round_weights as i32,
        );
        let grid = (logits.rows.div_ceil(128) as u32, 1, 1);
        match logits.buf {
            ActBuf::Bf16(_) => {
                launch!(self, route_bf16, grid, 128, 0; &lp, &rows, &ei, &ki, &rn, &rw, &ep, &wp)
            }
            ActBuf::F32(_) => {
                launch!(self, route_f32, grid, 128, 0; &lp, &rows, &ei, &ki, &rn, &rw, &ep, &wp)
            }
        }
        (experts, weights)
    }
}

impl CudaBackend {
    /// The MoE block; with `count_layer`, its routed pairs are added to that layer's
    /// expert-load counters on the device.
    fn moe_with(
        &self,
        h: &CudaAct,
        router: &CudaWeight,
        routing: Routing,
        shared: Option<MlpRef<'_, CudaWeight>>,
        experts: &[MlpRef<'_, CudaWeight>],
        count_layer: Option<usize>,
    ) -> CudaAct {
        let (n_tokens, hidden) = (h.rows, h.cols);
        let k = routing.top_k;
        let n_exp = experts.len();
        assert!((1..=256).contains(&n_exp), "{n_exp} experts unsupported");
        if n_tokens == 0 {
            return self.zeros(0, hidden);
        }
        let width = experts[0].gate.rows;
        let pairs = n_tokens * k;
        let decode = pairs <= moe_gemv_max_pairs(n_exp)
            && hidden % 8 == 0
            && width.is_multiple_of(8)
            && shared.is_none_or(|m| m.gate.rows == width);
        // Decode runs the shared expert as one more expert of the same GEMV launches
        // while its rows fit one pass; beyond that a GEMM reads its weights once.
        let n_shared = if decode && shared.is_some() && n_tokens <= GEMV_MAX_ROWS {
            n_tokens
        } else {
            0
        };
        let shared_apart = shared.filter(|_| n_shared == 0).map(|m| self.mlp(h, m));
        let logits = self.gemm(h, router, routing.fp32_logits);
        let (chosen, weights) =
            self.route_device(&logits, k, routing.renormalize, routing.round_weights);
        // Every element of these is written by `moe_permute` before it is read.
        let alloc_i = |n: usize| {
            // SAFETY: i32 has no invalid bit patterns; moe_permute writes off, perm,
            // inv and meta in full, and active up to meta[0], the only part read.
            unsafe { self.stream.alloc::<i32>(n.max(1)) }.expect("device alloc")
        };
        let rows = pairs + n_shared;
        let (off, perm, inv, active, meta) = (
            alloc_i(n_exp + 2),
            alloc_i(rows),
            alloc_i(rows),
            alloc_i(n_exp + 1),
            alloc_i(1),
        );
        let (cp, offp, pp, ip, ap, mp) = (
            self.ptr(&chosen),
            self.ptr(&off),
            self.ptr(&perm),
            self.ptr(&inv),
            self.ptr(&active),
            self.ptr(&meta),
        );
        let (np, ne, ns, ki) = (pairs as i32, n_exp as i32, n_shared as i32, k as i32);
        let load_ptr = count_layer
            .filter(|&l| l < MAX_COUNTED_LAYERS)
            .map_or(0, |l| self.expert_load_ptr + (l * MAX_EXPERTS * 8) as u64);
        let real_ptr = self.counted_tokens_ptr;
        launch!(self, moe_permute, (1, 1, 1), 1024, 0; &cp, &np, &ne, &ns, &offp, &pp, &ip, &ap, &mp, &load_ptr, &real_ptr, &ki);
        let wp = self.ptr(&weights);
        let cols = hidden as i32;
        if decode {
            // Everything stays on the device: routed outputs in pair order, then the
            // shared expert's rows; one combine writes the block's output.
            let mut all: Vec<MlpRef<'_, CudaWeight>> = experts.to_vec();
            all.extend(shared);
            let t = self.expert_tables(&all);
            let tables = (self.ptr(&t.gate), self.ptr(&t.up), self.ptr(&t.down));
            let y = self.alloc_act(rows, hidden);
            let yp = self.bf16_ptr(&y);
            self.expert_gemvs(
                tables,
                h,
                (offp, pp, ap, mp),
                rows,
                pairs,
                k,
                all.len(),
                width,
                yp,
            );
            if let Some(out) = shared_apart {
                // The routed rows are in pair order here (no shared rows appended).
                let op = self.bf16_ptr(&out);
                launch!(self, combine, (n_tokens as u32, 1, 1), 256, 0; &op, &yp, &wp, &ki, &cols);
                return out;
            }
            let out = self.alloc_act(n_tokens, hidden);
            let (op, hs) = (self.bf16_ptr(&out), (n_shared > 0) as i32);
            launch!(self, combine_shared, (n_tokens as u32, 1, 1), 256, 0; &op, &yp, &wp, &ki, &cols, &np, &hs);
            return out;
        }
        let out = shared_apart.unwrap_or_else(|| self.zeros(n_tokens, hidden));
        let routed = self.alloc_act(pairs, hidden);
        // Prefill: expert-sorted rows, one cuBLAS GEMM per expert and projection.
        let offsets = self.stream.clone_dtoh(&off).expect("device to host copy");
        let xs = self.alloc_act(pairs, hidden);
        let (hp, xsp) = (self.bf16_ptr(h), self.bf16_ptr(&xs));
        launch!(self, gather_rows_div, (pairs as u32, 1, 1), 256, 0; &hp, &pp, &ki, &xsp, &cols);
        let (g, u) = (self.alloc_act(pairs, width), self.alloc_act(pairs, width));
        let (gp, upp) = (self.bf16_ptr(&g), self.bf16_ptr(&u));
        let row = |base: u64, i: usize, w: usize| base + (i * w * 2) as u64;
        for (e, m) in experts.iter().enumerate() {
            let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
            if a == b {
                continue;
            }
            assert_eq!(m.gate.rows, width, "experts of one layer share a width");
            self.gemm_raw(
                row(xsp, a, hidden),
                self.ptr(&m.gate.buf),
                row(gp, a, width),
                b - a,
                width,
                hidden,
                false,
            );
            self.gemm_raw(
                row(xsp, a, hidden),
                self.ptr(&m.up.buf),
                row(upp, a, width),
                b - a,
                width,
                hidden,
                false,
            );
        }
        let act = self.swiglu(&g, &u);
        drop((g, u));
        let actp = self.bf16_ptr(&act);
        let rp = self.bf16_ptr(&routed);
        for (e, m) in experts.iter().enumerate() {
            let (a, b) = (offsets[e] as usize, offsets[e + 1] as usize);
            if a == b {
                continue;
            }
            self.gemm_raw(
                row(actp, a, width),
                self.ptr(&m.down.buf),
                row(rp, a, hidden),
                b - a,
                hidden,
                width,
                false,
            );
        }
        let op = self.bf16_ptr(&out);
        launch!(self, combine_perm, (n_tokens as u32, 1, 1), 256, 0; &op, &rp, &wp, &ip, &ki, &cols);
        out
    }
}

/// Ceilings measured on the device, for benchmark ratios.
impl CudaBackend {
    /// Device-to-device copy bandwidth in GB/s, counting bytes read plus written
    /// (best of `reps` copies of `bytes`).
    pub fn copy_bandwidth_gbs(&self, bytes: usize, reps: usize) -> f64 {
        let src = self.stream.alloc_zeros::<u8>(bytes).expect("device alloc");
        let mut dst = self.stream.alloc_zeros::<u8>(bytes).expect("device alloc");
        let mut best = f64::MAX;
        for _ in 0..reps.max(2) {
            self.synchronize();
            let t = std::time::Instant::now();
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .expect("device copy");
            self.synchronize();
            best = best.min(t.elapsed().as_secs_f64());
        }
        2.0 * bytes as f64 / best / 1e9
    }

    /// cuBLAS bf16 GEMM throughput in TFLOP/s for `[m, k] x [n, k]ᵀ` (best of `reps`).
    pub fn gemm_tflops(&self, m: usize, n: usize, k: usize, reps: usize) -> f64 {
        let a = self.random_act(m, k, 1, 1.0);
        let b = self.random_weight(n, k, 2, 1.0);
        let c = self.alloc_act(m, n);
        let (ap, bp, cp) = (self.bf16_ptr(&a), self.ptr(&b.buf), self.bf16_ptr(&c));
        let mut best = f64::MAX;
        for _ in 0..reps.max(2) {
            self.synchronize();
            let t = std::time::Instant::now();
            self.gemm_raw(ap, bp, cp, m, n, k, false);
            self.synchronize();
            best = best.min(t.elapsed().as_secs_f64());
        }
        2.0 * (m * n * k) as f64 / best / 1e12
    }
}
