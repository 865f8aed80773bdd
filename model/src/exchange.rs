//! The token exchange of expert parallelism: the seam between the layer graph and the
//! transports that move activation rows between workers.
//!
//! Every worker of an expert-parallel group takes part in every layer's two all-rank
//! rounds, in lockstep: the dispatch sends each routed (token, expert) row to a worker
//! holding that expert, the combine returns the expert outputs in the order they came.
//! A worker sends one message (possibly empty) to every peer in every round, so a peer
//! with no tokens of its own still serves the others, and a missing message means a lost
//! peer rather than "nothing to say". Under tensor parallelism a group of ranks also
//! runs gather rounds among themselves only. The graph does not know which transport it
//! has: [`InProcess`] (threads of one process, here), gRPC streams between processes and
//! NCCL between GPUs implement the same trait.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One round of one step: messages are matched by it, stale ones are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Round {
    /// Cluster-wide step number, increasing.
    pub step: u64,
    pub layer: u32,
    /// Which round of the layer, below [`PHASES`]: 0–3 and 6 are a tensor-parallel
    /// group's gathers, 4 the dispatch, 5 the combine (see the graph).
    pub phase: u8,
}

/// Rounds per layer.
pub const PHASES: u8 = 7;

/// Activation rows for one peer: `blocks` of `(expert, rows)` laid out back to back in
/// `data` (f32, `hidden` columns each).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    pub blocks: Vec<(u32, u32)>,
    pub data: Vec<f32>,
}

impl Rows {
    pub fn n_rows(&self) -> usize {
        self.blocks.iter().map(|&(_, r)| r as usize).sum()
    }

    /// Little-endian bytes: block count, `(expert, rows)` pairs, then the f32 data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.write_bytes(&mut b);
        b
    }

    /// Appends [`Rows::to_bytes`] to `out` (after a transport's own header).
    pub fn write_bytes(&self, out: &mut Vec<u8>) {
        out.reserve(4 + 8 * self.blocks.len() + 4 * self.data.len());
        out.extend((self.blocks.len() as u32).to_le_bytes());
        for &(e, r) in &self.blocks {
            out.extend(e.to_le_bytes());
            out.extend(r.to_le_bytes());
        }
        extend_f32_le(out, &self.data);
    }

    /// The inverse of [`Rows::to_bytes`]; `None` for bytes it did not make. Empty bytes
    /// are an empty message.
    pub fn from_bytes(b: &[u8]) -> Option<Rows> {
        if b.is_empty() {
            return Some(Rows::default());
        }
        let u32_at = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?))
        };
        let n = u32_at(0)? as usize;
        let head = 4usize.checked_add(n.checked_mul(8)?)?;
        if head > b.len() || !(b.len() - head).is_multiple_of(4) {
            return None;
        }
        let blocks = (0..n)
            .map(|i| Some((u32_at(4 + 8 * i)?, u32_at(8 + 8 * i)?)))
            .collect::<Option<Vec<_>>>()?;
        let data = f32_from_le(&b[head..])?;
        Some(Rows { blocks, data })
    }
}

/// Appends `v` as little-endian bytes (one copy on little-endian machines: activation
/// messages are megabytes in a prefill).
pub fn extend_f32_le(out: &mut Vec<u8>, v: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(v));
    } else {
        for x in v {
            out.extend(x.to_le_bytes());
        }
    }
}

/// f32 values of little-endian bytes; `None` when the length is not a multiple of 4.
pub fn f32_from_le(b: &[u8]) -> Option<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    Some(if cfg!(target_endian = "little") {
        // Copies into an f32 vector whatever the bytes' alignment.
        bytemuck::pod_collect_to_vec(b)
    } else {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExchangeError {
    #[error("peer {peer} sent nothing for step {step} layer {layer} within {secs} s")]
    Timeout {
        peer: usize,
        step: u64,
        layer: u32,
        secs: u64,
    },
    #[error("peer {peer} is gone: {reason}")]
    PeerLost { peer: usize, reason: String },
    #[error("peer {peer} sent a malformed message: {reason}")]
    Malformed { peer: usize, reason: String },
    #[error("expert {expert} of layer {layer} is not held here")]
    NotHeld { layer: usize, expert: usize },
}

/// A transport between the `world` workers of an expert-parallel group.
///
/// `send_to`/`recv_from` are a round among some of the ranks (a tensor-parallel
/// group's gathers); `send`/`recv` are a round among all of them. Every rank of a
/// round takes part in it, and a rank awaits its rounds in increasing order (a
/// mailbox drops what is older than the round awaited).
pub trait Exchange: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Starts sending `rows[d]` to every rank `d` of `peers` (indexed by rank; this
    /// rank's own entry and those of ranks outside `peers` are ignored); returns
    /// without waiting for delivery, so compute overlaps it.
    fn send_to(
        &mut self,
        round: Round,
        peers: &[usize],
        rows: Vec<Rows>,
    ) -> Result<(), ExchangeError>;
    /// Waits for the message of `round` from every rank of `peers`; returns them by
    /// rank (the others empty). Messages of earlier rounds are discarded.
    fn recv_from(&mut self, round: Round, peers: &[usize]) -> Result<Vec<Rows>, ExchangeError>;
    /// [`Exchange::send_to`] every other rank.
    fn send(&mut self, round: Round, rows: Vec<Rows>) -> Result<(), ExchangeError> {
        let all = others(self.rank(), self.world());
        self.send_to(round, &all, rows)
    }
    /// [`Exchange::recv_from`] every other rank.
    fn recv(&mut self, round: Round) -> Result<Vec<Rows>, ExchangeError> {
        let all = others(self.rank(), self.world());
        self.recv_from(round, &all)
    }
}

/// Every rank of `0..world` but `rank`.
pub fn others(rank: usize, world: usize) -> Vec<usize> {
    (0..world).filter(|&r| r != rank).collect()
}

/// Rounds a mailbox keeps ahead of the one awaited (two per layer of a few steps).
pub const MAX_PENDING_ROUNDS: usize = 1024;

/// One delivered message: sender rank, round, rows.
pub type Delivery = (usize, Round, Rows);

/// Collects messages by round for transports that deliver into one queue: keeps those
/// of later rounds, drops those of earlier ones, and times out on a silent peer.
#[derive(Debug)]
pub struct Mailbox {
    rank: usize,
    world: usize,
    pending: BTreeMap<Round, Vec<Option<Rows>>>,
    timeout: Duration,
}

impl Mailbox {
    pub fn new(rank: usize, world: usize, timeout: Duration) -> Self {
        Self {
            rank,
            world,
            pending: BTreeMap::new(),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Files a message; returns false when it came from an unknown rank, or when too
    /// many rounds are already waiting (a peer far ahead or misbehaving).
    pub fn put(&mut self, from: usize, round: Round, rows: Rows) -> bool {
        if from >= self.world || from == self.rank {
            return false;
        }
        if self.pending.len() >= MAX_PENDING_ROUNDS && !self.pending.contains_key(&round) {
            return false;
        }
        let slot = self
            .pending
            .entry(round)
            .or_insert_with(|| vec![None; self.world]);
        slot[from] = Some(rows);
        true
    }

    /// Waits for the messages of `round` from every rank of `from`, pulling messages
    /// with `next` (which waits at most the given time and returns `Ok(None)` when it
    /// timed out).
    pub fn wait(
        &mut self,
        round: Round,
        from: &[usize],
        next: &mut dyn FnMut(Duration) -> Result<Option<Delivery>, ExchangeError>,
    ) -> Result<Vec<Rows>, ExchangeError> {
        let deadline = Instant::now() + self.timeout;
        // Earlier rounds can no longer be asked for: an aborted step's leftovers.
        self.pending = self.pending.split_off(&round);
        loop {
            let have = self.pending.get(&round);
            let missing = from
                .iter()
                .copied()
                .find(|&r| r != self.rank && r < self.world && have.is_none_or(|h| h[r].is_none()));
            let Some(missing) = missing else {
                let got = self.pending.remove(&round).unwrap_or_default();
                return Ok(got.into_iter().map(Option::unwrap_or_default).collect());
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(ExchangeError::Timeout {
                    peer: missing,
                    step: round.step,
                    layer: round.layer,
                    secs: self.timeout.as_secs(),
                });
            }
            if let Some((from, r, rows)) = next(deadline - now)?
                && r >= round
            {
                self.put(from, r, rows);
            }
        }
    }
}

/// The exchange between threads of one process, over channels.
#[derive(Debug)]
pub struct InProcess {
    rank: usize,
    peers: Vec<mpsc::Sender<Delivery>>,
    inbox: mpsc::Receiver<Delivery>,
    mailbox: Mailbox,
}

impl InProcess {
    /// A connected group of `world` ends, one per rank.
    pub fn group(world: usize, timeout: Duration) -> Vec<InProcess> {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..world).map(|_| mpsc::channel()).unzip();
        rxs.into_iter()
            .enumerate()
            .map(|(rank, inbox)| InProcess {
                rank,
                peers: txs.clone(),
                inbox,
                mailbox: Mailbox::new(rank, world, timeout),
            })
            .collect()
    }
}

impl Exchange for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.peers.len()
    }

    fn send_to(
        &mut self,
        round: Round,
        peers: &[usize],
        rows: Vec<Rows>,
    ) -> Result<(), ExchangeError> {
        for (peer, r) in rows.into_iter().enumerate() {
            if peer == self.rank || !peers.contains(&peer) {
                continue;
            }
            self.peers[peer]
                .send((self.rank, round, r))
                .map_err(|_| ExchangeError::PeerLost {
                    peer,
                    reason: "its channel is closed".into(),
                })?;
        }
        Ok(())
    }

    fn recv_from(&mut self, round: Round, peers: &[usize]) -> Result<Vec<Rows>, ExchangeError> {
        let inbox = &self.inbox;
        self.mailbox
            .wait(round, peers, &mut |d| match inbox.recv_timeout(d) {
                Ok(m) => Ok(Some(m)),
                Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(ExchangeError::PeerLost {
                    peer: usize::MAX,
                    reason: "every peer is gone".into(),
                }),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(step: u64, layer: u32) -> Round {
        Round {
            step,
            layer,
            phase: 0,
        }
    }

    fn rows(v: f32) -> Rows {
        Rows {
            blocks: vec![(0, 1)],
            data: vec![v],
        }
    }

    #[test]
    fn rounds_are_matched_and_stale_messages_dropped() {
        let mut g = InProcess::group(3, Duration::from_secs(5));
        let (mut a, mut b, mut c) = (g.remove(0), g.remove(0), g.remove(0));
        // A leftover of an aborted step 1, then step 2 messages out of order.
        b.send(round(1, 0), vec![rows(9.0), Rows::default(), rows(9.0)])
            .unwrap();
        c.send(round(2, 1), vec![rows(3.0), rows(3.0), Rows::default()])
            .unwrap();
        b.send(round(2, 0), vec![rows(1.0), Rows::default(), rows(1.0)])
            .unwrap();
        c.send(round(2, 0), vec![rows(2.0), rows(2.0), Rows::default()])
            .unwrap();
        let got = a.recv(round(2, 0)).unwrap();
        assert_eq!(got, vec![Rows::default(), rows(1.0), rows(2.0)]);
        b.send(round(2, 1), vec![rows(4.0), Rows::default(), rows(4.0)])
            .unwrap();
        let got = a.recv(round(2, 1)).unwrap();
        assert_eq!(got, vec![Rows::default(), rows(4.0), rows(3.0)]);
    }

    #[test]
    fn rows_round_trip_through_bytes_and_bad_bytes_are_refused() {
        let r = Rows {
            blocks: vec![(3, 2), (7, 1)],
            data: vec![1.5, -2.0, 0.25, 8.0, 1e-3, -0.0],
        };
        assert_eq!(Rows::from_bytes(&r.to_bytes()), Some(r.clone()));
        assert_eq!(Rows::from_bytes(&[]), Some(Rows::default()));
        let b = r.to_bytes();
        assert_eq!(Rows::from_bytes(&b[..b.len() - 1]), None);
        assert_eq!(Rows::from_bytes(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
    }

    #[test]
    fn a_silent_peer_is_a_timeout_naming_it() {
        let mut g = InProcess::group(3, Duration::from_millis(50));
        let (mut a, mut b) = (g.remove(0), g.remove(0));
        b.send(round(1, 4), vec![rows(1.0), Rows::default(), rows(1.0)])
            .unwrap();
        let err = a.recv(round(1, 4)).unwrap_err();
        assert!(
            matches!(
                err,
                ExchangeError::Timeout {
                    peer: 2,
                    step: 1,
                    layer: 4,
                    ..
                }
            ),
            "{err}"
        );
    }
}
