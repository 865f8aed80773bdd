//! NCCL between GPUs (cudarc's `nccl` binding): one communicator per GPU on the
//! backend's own stream, so an exchange is ordered with the layer's kernels.
//!
//! [`NcclComm::all_to_all_bytes`] is the all-to-all of expert parallelism built from
//! grouped point-to-point send/recv: first every rank's byte counts, then the payloads,
//! each peer's in a buffer of its own. Payloads are staged through host memory (the
//! exchange's rows are host rows); [`NcclComm::all_to_all_probe`] measures the
//! device-to-device all-to-all bandwidth the exchange is compared with.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use cudarc::nccl::safe::{Comm, Id, NcclType};

use super::CudaBackend;

/// A communicator's unique id: made by one rank, handed to the others (through the
/// coordinator between processes).
#[derive(Clone)]
pub struct NcclId(pub [core::ffi::c_char; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (needs libnccl).
    pub fn new() -> Result<Self, String> {
        Id::new()
            .map(|id| NcclId(*id.internal()))
            .map_err(|e| format!("ncclGetUniqueId: {e:?}"))
    }
}

/// One rank's communicator.
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: an NCCL communicator may be driven from any thread as long as no two threads
// use it at once (NCCL's threading rules). `NcclComm` is `Send` but not `Sync`, so it has
// one owner at a time and every call on it is made by that owner's thread.
unsafe impl Send for NcclComm {}

fn err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e:?}")
}

impl CudaBackend {
    /// Joins the communicator `id` as `rank` of `world` (every rank must call this,
    /// concurrently).
    pub fn nccl_comm(&self, rank: usize, world: usize, id: &NcclId) -> Result<NcclComm, String> {
        let comm = Comm::from_rank(self.stream.clone(), rank, world, Id::uninit(id.0))
            .map_err(err("ncclCommInitRank"))?;
        Ok(NcclComm {
            comm,
            stream: self.stream.clone(),
        })
    }
}

impl NcclComm {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    /// One NCCL group of a send and a receive per peer (`None`: nothing that way);
    /// this rank's own entries are skipped.
    fn grouped<T: NcclType>(
        &self,
        sends: Vec<Option<CudaView<'_, T>>>,
        recvs: Vec<Option<CudaViewMut<'_, T>>>,
    ) -> Result<(), String> {
        let rank = self.rank();
        let mut g = self.comm.group();
        for (p, (sv, rv)) in sends.into_iter().zip(recvs).enumerate() {
            if p == rank {
                continue;
            }
            if let Some(v) = sv {
                g.send(v, p as i32).map_err(err("ncclSend"))?;
            }
            if let Some(v) = rv {
                g.recv(v, p as i32).map_err(err("ncclRecv"))?;
            }
        }
        Ok(())
    }

    /// Sends `send[d]` to every rank `d` of `peers` and returns what each of them sent
    /// here (this rank's own entry is passed through; ranks outside `peers` take no
    /// part and get empty entries). Blocks until the bytes are on the host.
    pub fn all_to_all_bytes(
        &self,
        send: &[Vec<u8>],
        peers: &[usize],
    ) -> Result<Vec<Vec<u8>>, String> {
        let (rank, world) = (self.rank(), self.world());
        assert_eq!(send.len(), world, "one buffer per rank");
        let take = |p: usize| p != rank && peers.contains(&p);
        let s = &self.stream;
        // 1. Byte counts.
        let counts: Vec<CudaSlice<u64>> = send
            .iter()
            .map(|v| s.clone_htod(&[v.len() as u64]))
            .collect::<Result<_, _>>()
            .map_err(err("upload"))?;
        let mut incoming: Vec<CudaSlice<u64>> = (0..world)
            .map(|_| s.alloc_zeros::<u64>(1))
            .collect::<Result<_, _>>()
            .map_err(err("alloc"))?;
        self.grouped(
            counts
                .iter()
                .enumerate()
                .map(|(p, c)| take(p).then(|| c.as_view()))
                .collect(),
            incoming
                .iter_mut()
                .enumerate()
                .map(|(p, c)| take(p).then(|| c.as_view_mut()))
                .collect(),
        )?;
        let mut sizes = vec![0usize; world];
        for (p, c) in incoming.iter().enumerate() {
            if take(p) {
                sizes[p] = s.clone_dtoh(c).map_err(err("download"))?[0] as usize;
            }
        }
        // 2. Payloads, each peer's in its own buffer.
        let payload: Vec<Option<CudaSlice<u8>>> = send
            .iter()
            .enumerate()
            .map(|(p, v)| {
                if !take(p) || v.is_empty() {
                    Ok(None)
                } else {
                    s.clone_htod(v.as_slice()).map(Some)
                }
            })
            .collect::<Result<_, _>>()
            .map_err(err("upload"))?;
        let mut recv: Vec<Option<CudaSlice<u8>>> = sizes
            .iter()
            .enumerate()
            .map(|(p, &n)| {
                if !take(p) || n == 0 {
                    Ok(None)
                } else {
                    s.alloc_zeros::<u8>(n).map(Some)
                }
            })
            .collect::<Result<_, _>>()
            .map_err(err("alloc"))?;
        self.grouped(
            payload
                .iter()
                .map(|b| b.as_ref().map(|b| b.as_view()))
                .collect(),
            recv.iter_mut()
                .map(|b| b.as_mut().map(|b| b.as_view_mut()))
                .collect(),
        )?;
        let mut out = Vec::with_capacity(world);
        for (p, b) in recv.iter().enumerate() {
            out.push(match b {
                _ if p == rank => send[rank].clone(),
                Some(b) => s.clone_dtoh(b).map_err(err("download"))?,
                None => Vec::new(),
            });
        }
        Ok(out)
    }

    /// Device-to-device all-to-all of `bytes` to and from every peer: the best of
    /// `reps` timings, as bytes sent per rank per second (GB/s, 1e9).
    pub fn all_to_all_probe(&self, bytes: usize, reps: usize) -> Result<f64, String> {
        let world = self.world();
        if world < 2 {
            return Ok(0.0);
        }
        let s = &self.stream;
        let send: Vec<CudaSlice<u8>> = (0..world)
            .map(|_| s.alloc_zeros::<u8>(bytes))
            .collect::<Result<_, _>>()
            .map_err(err("alloc"))?;
        let mut recv: Vec<CudaSlice<u8>> = (0..world)
            .map(|_| s.alloc_zeros::<u8>(bytes))
            .collect::<Result<_, _>>()
            .map_err(err("alloc"))?;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) + 1 {
            s.synchronize().map_err(err("sync"))?;
            let t0 = Instant::now();
            self.grouped(
                send.iter().map(|b| Some(b.as_view())).collect(),
                recv.iter_mut().map(|b| Some(b.as_view_mut())).collect(),
            )?;
            s.synchronize().map_err(err("sync"))?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok((bytes * (world - 1)) as f64 / best / 1e9)
    }
}
