//! The exchange between GPUs over NCCL: every round is one all-to-all (grouped
//! send/recv) on the GPU's stream. The rows of this transport are the graph's host
//! rows, staged through device buffers; the device-resident variant that hands the
//! MoE kernels' buffers to NCCL directly is the next step (see ARCHITECTURE.md).

use hyserve_kernels::cuda::NcclComm;
use hyserve_model::{Exchange, ExchangeError, Round, Rows};

/// A round's 16 header bytes: step, layer, phase.
fn round_header(r: Round) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&r.step.to_le_bytes());
    h[8..12].copy_from_slice(&r.layer.to_le_bytes());
    h[12..].copy_from_slice(&u32::from(r.phase).to_le_bytes());
    h
}

/// An [`Exchange`] over one rank's NCCL communicator.
pub struct NcclExchange {
    comm: NcclComm,
    /// What each `send` received, until its `recv` (rounds overlap: a layer's dispatch
    /// is received after its tensor-parallel gathers).
    got: std::collections::BTreeMap<Round, Vec<Rows>>,
}

impl NcclExchange {
    pub fn new(comm: NcclComm) -> Self {
        Self {
            comm,
            got: Default::default(),
        }
    }
}

impl Exchange for NcclExchange {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world()
    }

    /// NCCL is collective: the round's all-to-all among `peers` runs here, with every
    /// one of their sends.
    fn send_to(
        &mut self,
        round: Round,
        peers: &[usize],
        rows: Vec<Rows>,
    ) -> Result<(), ExchangeError> {
        let rank = self.rank();
        // Collectives pair by call order, not by round: every message carries its round,
        // so ranks that fell out of step get an error, never each other's rows.
        let header = round_header(round);
        let bytes: Vec<Vec<u8>> = rows
            .iter()
            .enumerate()
            .map(|(p, r)| {
                if p == rank || !peers.contains(&p) {
                    Vec::new()
                } else {
                    let mut b = header.to_vec();
                    r.write_bytes(&mut b);
                    b
                }
            })
            .collect();
        let got = self
            .comm
            .all_to_all_bytes(&bytes, peers)
            .map_err(|reason| ExchangeError::PeerLost {
                peer: usize::MAX,
                reason,
            })?;
        let rows = got
            .iter()
            .enumerate()
            .map(|(p, b)| {
                if p == rank || !peers.contains(&p) {
                    return Ok(Rows::default());
                }
                let malformed = |reason: String| ExchangeError::Malformed { peer: p, reason };
                let (head, body) = b.split_at_checked(header.len()).ok_or_else(|| {
                    malformed(format!("{} bytes carry no round", b.len()))
                })?;
                if head != header {
                    return Err(malformed(format!(
                        "out of step: its message is for another round than step {} layer {} phase {}",
                        round.step, round.layer, round.phase
                    )));
                }
                Rows::from_bytes(body)
                    .ok_or_else(|| malformed(format!("{} bytes are not rows", body.len())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // A step aborted between a send and its recv leaves its rounds here.
        self.got = self.got.split_off(&Round {
            step: round.step,
            layer: 0,
            phase: 0,
        });
        self.got.insert(round, rows);
        Ok(())
    }

    fn recv_from(&mut self, round: Round, _peers: &[usize]) -> Result<Vec<Rows>, ExchangeError> {
        match self.got.remove(&round) {
            Some(rows) => Ok(rows),
            None => Err(ExchangeError::Malformed {
                peer: usize::MAX,
                reason: format!(
                    "recv of step {} layer {} without its send",
                    round.step, round.layer
                ),
            }),
        }
    }
}
