//! The exchange between GPUs over NCCL: every round is one all-to-all (grouped
//! send/recv) on the GPU's stream. The rows of this transport are the graph's host
//! rows, staged through device buffers; the device-resident variant that hands the
//! MoE kernels' buffers to NCCL directly is the next step (see ARCHITECTURE.md).

use hyserve_kernels::cuda::NcclComm;
use hyserve_model::{Exchange, ExchangeError, Round, Rows};

/// An [`Exchange`] over one rank's NCCL communicator.
pub struct NcclExchange {
    comm: NcclComm,
    /// What the last `send` received, for the matching `recv`.
    got: Option<(Round, Vec<Rows>)>,
}

impl NcclExchange {
    pub fn new(comm: NcclComm) -> Self {
        Self { comm, got: None }
    }
}

impl Exchange for NcclExchange {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world()
    }

    /// NCCL is collective: the round's all-to-all runs here, with every rank's send.
    fn send(&mut self, round: Round, rows: Vec<Rows>) -> Result<(), ExchangeError> {
        let rank = self.rank();
        let bytes: Vec<Vec<u8>> = rows
            .iter()
            .enumerate()
            .map(|(p, r)| if p == rank { Vec::new() } else { r.to_bytes() })
            .collect();
        let got = self
            .comm
            .all_to_all_bytes(&bytes)
            .map_err(|reason| ExchangeError::PeerLost {
                peer: usize::MAX,
                reason,
            })?;
        let rows = got
            .iter()
            .enumerate()
            .map(|(p, b)| {
                Rows::from_bytes(b).ok_or_else(|| ExchangeError::Malformed {
                    peer: p,
                    reason: format!("{} bytes are not rows", b.len()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.got = Some((round, rows));
        Ok(())
    }

    fn recv(&mut self, round: Round) -> Result<Vec<Rows>, ExchangeError> {
        match self.got.take() {
            Some((r, rows)) if r == round => Ok(rows),
            _ => Err(ExchangeError::Malformed {
                peer: usize::MAX,
                reason: format!(
                    "recv of step {} layer {} without its send",
                    round.step, round.layer
                ),
            }),
        }
    }
}
