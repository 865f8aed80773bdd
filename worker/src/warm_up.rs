//! Recording step shapes before serving ([`crate::Executor::warm_up`]).
//!
//! A backend that records steps (CUDA graphs) runs a shape it has not recorded yet
//! eagerly three times, the third time recording it: two to four times a replay's
//! time. Left to serving, the first requests at each batch size, verification depth
//! and context bound pay for it, and so does the first speculation after a batch size
//! changes: a server started cold decodes its first requests slower than its later
//! ones, and the speculation guard measures warm-ups where it should measure steady
//! steps. A warm-up runs dummy steps of the likely shapes at start-up instead, on the
//! KV cache's scratch slots, so that the first real steps replay.

use hyserve_kernels::RecordKey;

/// What a warm-up records.
#[derive(Clone, Debug, PartialEq)]
pub struct WarmUp {
    /// Most sequences one step runs (the scheduler's `max_running`): every batch size
    /// the backend pads a step of `1..=max_batch` sequences to.
    pub max_batch: usize,
    /// Verifications of `1..=max_depth` proposed tokens per sequence are recorded
    /// besides decode steps (0: none). Only speculation of uniform depth repeats such
    /// shapes; the draft model's own decode steps are recorded too where there is one.
    pub max_depth: usize,
    /// Longest contexts to record at, smallest first: a recording serves the steps
    /// whose longest context is under the same power-of-two bound.
    pub contexts: Vec<usize>,
    /// Most shapes recorded (the backend keeps at most its recording capacity).
    pub max_shapes: usize,
    /// Most bytes the recorded steps' outputs (their logits, kept with each recording)
    /// take together.
    pub max_bytes: usize,
}

impl WarmUp {
    /// Shapes recorded when a warm-up is asked for without a number: two thirds of the
    /// CUDA backend's 96 recordings, so that serving keeps room for shapes of its own.
    pub const DEFAULT_SHAPES: usize = 64;
    /// Context bounds recorded by default (bounds above the model's context are left
    /// out).
    pub const DEFAULT_CONTEXTS: [usize; 2] = [256, 512];
    /// Bytes of recorded outputs at most by default.
    pub const DEFAULT_BYTES: usize = 1 << 30;

    /// The default warm-up of a server running `max_batch` sequences a step, verifying
    /// up to `max_depth` tokens per sequence, with contexts up to `max_context`.
    pub fn new(max_batch: usize, max_depth: usize, max_context: usize) -> Self {
        let contexts = Self::DEFAULT_CONTEXTS
            .iter()
            .enumerate()
            .filter(|&(i, _)| i == 0 || Self::DEFAULT_CONTEXTS[i - 1] < max_context)
            .map(|(_, &c)| c.min(max_context.max(1)))
            .collect();
        Self {
            max_batch,
            max_depth,
            contexts,
            max_shapes: Self::DEFAULT_SHAPES,
            max_bytes: Self::DEFAULT_BYTES,
        }
    }
}

/// One step shape a warm-up records: `batch` sequences of `rows` tokens each (1: a
/// decode step; more: a verification, logits for every row) whose longest context is
/// `context`, through the target model or the draft model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub draft: bool,
    pub batch: usize,
    pub rows: usize,
    pub context: usize,
}

impl Shape {
    /// The shapes of one batch-size series share everything else: where one is not
    /// recordable (too many routed rows for the recordable MoE path), the larger ones
    /// of the series are not either.
    pub fn series(&self) -> (bool, usize, usize) {
        (self.draft, self.rows, self.context)
    }
}

/// What a warm-up did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WarmedUp {
    /// Shapes recorded.
    pub shapes: usize,
    /// Dummy forward passes run (each recorded shape takes the backend's eager runs,
    /// its recording, and one replay that confirms it).
    pub passes: usize,
    /// Bytes of the recorded outputs.
    pub bytes: usize,
    pub seconds: f64,
}

/// The shapes `plan` asks for, most useful first: the target model's decode steps,
/// the draft model's (`draft`), then verifications by depth, shallowest first (deep
/// ones pay only at high acceptance, and are the first a budget leaves out); each at
/// every context bound, smallest first, and every padded batch size, smallest first.
/// `padded(draft, n, rows)` is the batch a step of `n` sequences of `rows` rows runs
/// as ([`hyserve_kernels::Backend::padded_sequences`]).
pub fn shapes(
    plan: &WarmUp,
    draft: bool,
    padded: &dyn Fn(bool, usize, usize) -> usize,
) -> Vec<Shape> {
    let mut series = vec![(false, 1)];
    if draft && plan.max_depth > 0 {
        series.push((true, 1));
    }
    // Deeper verifications are never recorded (nor fit the scratch slots).
    let deepest = plan.max_depth.min(RecordKey::MAX_SEQ_ROWS - 1);
    series.extend((1..=deepest).map(|d| (false, 1 + d)));
    let mut out = Vec::new();
    for (is_draft, rows) in series {
        for &context in &plan.contexts {
            if context < rows {
                continue;
            }
            let mut last = 0;
            for n in 1..=plan.max_batch {
                let batch = padded(is_draft, n, rows);
                if batch > last {
                    last = batch;
                    out.push(Shape {
                        draft: is_draft,
                        batch,
                        rows,
                        context,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padding as the CUDA backend does it: up to 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48,
    /// 64, unless that takes a step past 128 routed rows.
    fn padded(_draft: bool, n: usize, rows: usize) -> usize {
        let p = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
            .into_iter()
            .find(|&b| b >= n)
            .unwrap_or(n.next_multiple_of(32));
        if p * rows > 128 { n } else { p }
    }

    #[test]
    fn shapes_come_by_kind_then_context_then_batch() {
        let plan = WarmUp::new(8, 2, 2048);
        assert_eq!(plan.contexts, [256, 512]);
        let got = shapes(&plan, true, &padded);
        let series: Vec<(bool, usize, usize)> = got.iter().map(Shape::series).collect();
        // Target decode, draft decode, depth 1, depth 2; per context, 6 batch sizes each.
        let mut want = Vec::new();
        for s in [(false, 1), (true, 1), (false, 2), (false, 3)] {
            for c in [256, 512] {
                want.extend(std::iter::repeat_n((s.0, s.1, c), 6));
            }
        }
        assert_eq!(series, want);
        let batches: Vec<usize> = got[..6].iter().map(|s| s.batch).collect();
        assert_eq!(batches, [1, 2, 3, 4, 6, 8]);
    }

    #[test]
    fn unpadded_sizes_past_the_recordable_limit_each_appear_once() {
        // Verifying 5 tokens (6 rows): 21 sequences fit 128 routed rows, and 22 would be
        // padded to 24 (144 rows), so 17 and up run unpadded, each its own shape (22 and
        // up are not recordable at all: the warm-up finds that out on 22 and skips the
        // rest of the series).
        let got = shapes(&WarmUp::new(24, 5, 256), false, &padded);
        let six: Vec<usize> = got
            .iter()
            .filter(|s| s.rows == 6)
            .map(|s| s.batch)
            .collect();
        assert_eq!(
            six,
            [1, 2, 3, 4, 6, 8, 12, 16, 17, 18, 19, 20, 21, 22, 23, 24]
        );
        // No draft model, or no speculation: target decode steps only, where asked.
        assert!(got.iter().all(|s| !s.draft));
        let plain = shapes(&WarmUp::new(4, 0, 256), true, &padded);
        assert!(plain.iter().all(|s| s.rows == 1 && !s.draft));
        assert_eq!(plain.len(), 4);
        // Past 15 proposals a verification is never recorded: not planned either.
        let deep = shapes(&WarmUp::new(1, 40, 256), false, &padded);
        assert_eq!(deep.iter().map(|s| s.rows).max(), Some(16));
    }

    #[test]
    fn contexts_stop_at_the_model_s_context() {
        assert_eq!(WarmUp::new(1, 0, 2048).contexts, [256, 512]);
        assert_eq!(WarmUp::new(1, 0, 300).contexts, [256, 300]);
        assert_eq!(WarmUp::new(1, 0, 256).contexts, [256]);
        assert_eq!(WarmUp::new(1, 0, 100).contexts, [100]);
    }
}
