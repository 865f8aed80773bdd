//! The CPU backend: plain Rust kernels, multi-threaded with rayon.
//!
//! It is the numerical oracle for device backends and a usable engine on its own
//! for small models. Activations are f32; under [`Precision::Bf16`] each operation
//! rounds its output to bf16 where a bf16 reference model would store a tensor.

pub mod gemm;

use rayon::prelude::*;

use crate::backend::{AttnSeq, Backend, KvSpec, Precision, ScoreScale};
use crate::numeric::{DType, bf16_bits_to_f32, f32_to_bf16_bits, round_bf16};
use crate::weight::HostMatrix;

/// An activation matrix in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Paged KV cache in host memory: per cache layer, `[slot, kv_head, head_dim]` for K
/// and for V, stored as bf16 bits or f32.
#[derive(Debug)]
pub struct CpuKv {
    pub spec: KvSpec,
    k: KvData,
    v: KvData,
}

#[derive(Debug)]
enum KvData {
    Bf16(Vec<u16>),
    F32(Vec<f32>),
}

impl KvData {
    fn new(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::BF16 | DType::F16 => KvData::Bf16(vec![0; len]),
            DType::F32 => KvData::F32(vec![0.0; len]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvData::Bf16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = f32_to_bf16_bits(x);
                }
            }
            KvData::F32(d) => d[at..at + src.len()].copy_from_slice(src),
        }
    }

    fn read(&self, at: usize, dst: &mut [f32]) {
        match self {
            KvData::Bf16(d) => {
                let n = dst.len();
                for (o, &b) in dst.iter_mut().zip(&d[at..at + n]) {
                    *o = bf16_bits_to_f32(b);
                }
            }
            KvData::F32(d) => {
                let n = dst.len();
                dst.copy_from_slice(&d[at..at + n])
            }
        }
    }

    fn copy_within(&mut self, from: usize, to: usize, len: usize) {
        match self {
            KvData::Bf16(d) => d.copy_within(from..from + len, to),
            KvData::F32(d) => d.copy_within(from..from + len, to),
        }
    }
}

impl CpuKv {
    fn offset(&self, layer: usize, slot: usize) -> usize {
        let s = &self.spec;
        (layer * s.capacity_tokens() + slot) * s.n_kv_heads * s.head_dim
    }

    /// Reads K and V of one slot (all kv heads) into `k` and `v`.
    pub fn read_slot(&self, layer: usize, slot: usize, k: &mut [f32], v: &mut [f32]) {
        let at = self.offset(layer, slot);
        self.k.read(at, k);
        self.v.read(at, v);
    }
}

/// A forward batch on the CPU: the sequences, and every row's position and new slot.
#[derive(Clone, Debug)]
pub struct CpuBatch {
    pub seqs: Vec<AttnSeq>,
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub new_slots: Vec<usize>,
}

impl CpuBatch {
    /// Flattens `seqs` (which cover the rows in order) into per-row positions and slots.
    pub fn new(seqs: Vec<AttnSeq>) -> Self {
        let mut positions = Vec::new();
        let mut new_slots = Vec::new();
        for s in &seqs {
            assert_eq!(
                s.rows.start,
                positions.len(),
                "batch rows must be contiguous"
            );
            positions.extend(s.first_pos..s.first_pos + s.rows.len());
            new_slots.extend_from_slice(&s.slots[s.first_pos..s.first_pos + s.rows.len()]);
        }
        Self {
            seqs,
            tokens: Vec::new(),
            positions,
            new_slots,
        }
    }
}

/// The CPU backend.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    precision: Precision,
}

impl CpuBackend {
    pub fn new(precision: Precision) -> Self {
        Self { precision }
    }

    #[inline]
    fn r(&self, x: f32) -> f32 {
        match self.precision {
            Precision::F32 => x,
            Precision::Bf16 => round_bf16(x),
        }
    }

    fn round_all(&self, xs: &mut [f32]) {
        if self.precision == Precision::Bf16 {
            xs.iter_mut().for_each(|x| *x = round_bf16(*x));
        }
    }
}

/// Dot product with 8 independent lanes and a fixed final order.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n8 = a.len() / 8 * 8;
    let mut lanes = [0f32; 8];
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Mean of squares with 8 lanes (fp32), as RMSNorm needs.
#[inline]
fn mean_sq(x: &[f32]) -> f32 {
    dot(x, x) / x.len() as f32
}

impl CpuBackend {
    fn rms_norm_row(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let inv = 1.0 / (mean_sq(x) + eps).sqrt();
        for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
            *o = self.r(wi * self.r(xi * inv));
        }
    }
}

impl Backend for CpuBackend {
    type Weight = HostMatrix;
    type Vector = Vec<f32>;
    type Act = CpuTensor;
    type Kv = CpuKv;
    type Batch = CpuBatch;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn load_matrix(&self, host: &HostMatrix) -> HostMatrix {
        match (self.precision, host.dtype) {
            (Precision::Bf16, DType::F32 | DType::F16) => host.cast(DType::BF16),
            _ => host.clone(),
        }
    }

    fn load_vector(&self, values: &[f32]) -> Vec<f32> {
        values.iter().map(|&x| self.r(x)).collect()
    }

    fn weight_bytes(&self, w: &HostMatrix) -> usize {
        w.size_bytes()
    }

    fn slice_rows(&self, w: &HostMatrix, rows: std::ops::Range<usize>) -> HostMatrix {
        w.row_range(rows).expect("row range inside the weight")
    }

    fn alloc_kv(&self, spec: KvSpec) -> CpuKv {
        let len = spec.n_cache_layers * spec.capacity_tokens() * spec.n_kv_heads * spec.head_dim;
        CpuKv {
            spec,
            k: KvData::new(spec.dtype, len),
            v: KvData::new(spec.dtype, len),
        }
    }

    fn zeros(&self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> CpuTensor {
        assert_eq!(data.len(), rows * cols);
        CpuTensor {
            rows,
            cols,
            data: data.to_vec(),
        }
    }

    fn download(&self, a: &CpuTensor) -> Vec<f32> {
        a.data.clone()
    }

    fn download_rows(&self, a: &CpuTensor, groups: &[usize]) -> Vec<Vec<f32>> {
        crate::backend::split_rows(&a.data, a.cols, groups)
    }

    fn shape(&self, a: &CpuTensor) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn embed(&self, table: &HostMatrix, ids: &[u32]) -> CpuTensor {
        let mut data = Vec::with_capacity(ids.len() * table.cols);
        for &id in ids {
            assert!((id as usize) < table.rows, "token id {id} out of range");
            data.extend(table.row_f32(id as usize));
        }
        CpuTensor {
            rows: ids.len(),
            cols: table.cols,
            data,
        }
    }

    fn matmul(&self, x: &CpuTensor, w: &HostMatrix) -> CpuTensor {
        let mut out = self.zeros(x.rows, w.rows);
        gemm::matmul(&x.data, x.rows, w, &mut out.data);
        self.round_all(&mut out.data);
        out
    }

    fn matmul_fp32(&self, x: &CpuTensor, w: &HostMatrix) -> CpuTensor {
        let mut out = self.zeros(x.rows, w.rows);
        gemm::matmul(&x.data, x.rows, w, &mut out.data);
        out
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        CpuTensor {
            rows: rows.len(),
            cols: x.cols,
            data,
        }
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32) -> CpuTensor {
        let g = w.len();
        assert_eq!(
            x.cols % g,
            0,
            "rms_norm: width {} not a multiple of {g}",
            x.cols
        );
        let mut out = self.zeros(x.rows, x.cols);
        out.data
            .par_chunks_mut(g)
            .zip(x.data.par_chunks(g))
            .with_min_len(64)
            .for_each(|(o, xi)| self.rms_norm_row(xi, w, eps, o));
        out
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols));
        for (a, &b) in x.data.iter_mut().zip(&y.data) {
            *a = self.r(*a + b);
        }
    }

    fn swiglu(&self, gate: &CpuTensor, up: &CpuTensor) -> CpuTensor {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols));
        let data = gate
            .data
            .iter()
            .zip(&up.data)
            .map(|(&g, &u)| {
                let silu = self.r(g / (1.0 + (-g).exp()));
                self.r(silu * u)
            })
            .collect();
        CpuTensor {
            rows: gate.rows,
            cols: gate.cols,
            data,
        }
    }

    fn rope(&self, x: &mut CpuTensor, head_dim: usize, positions: &[usize], inv_freq: &[f32]) {
        let half = head_dim / 2;
        assert_eq!(inv_freq.len(), half);
        assert_eq!(positions.len(), x.rows);
        assert_eq!(x.cols % head_dim, 0);
        let cols = x.cols;
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (r, &pos) in positions.iter().enumerate() {
            // Angles in fp32 (t * inv_freq), cos/sin rounded to the storage type.
            for i in 0..half {
                let a = pos as f32 * inv_freq[i];
                cos[i] = self.r(a.cos());
                sin[i] = self.r(a.sin());
            }
            let row = &mut x.data[r * cols..(r + 1) * cols];
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (x1, x2) = (head[i], head[i + half]);
                    head[i] = self.r(self.r(x1 * cos[i]) + self.r(-x2 * sin[i]));
                    head[i + half] = self.r(self.r(x2 * cos[i]) + self.r(x1 * sin[i]));
                }
            }
        }
    }

    fn write_kv(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        slots: &[usize],
    ) {
        let width = kv.spec.n_kv_heads * kv.spec.head_dim;
        assert_eq!(k.cols, width);
        assert_eq!(v.cols, width);
        assert_eq!(k.rows, slots.len());
        assert!(layer < kv.spec.n_cache_layers);
        for (r, &slot) in slots.iter().enumerate() {
            assert!(
                slot < kv.spec.capacity_tokens(),
                "kv slot {slot} out of range"
            );
            let at = kv.offset(layer, slot);
            kv.k.write(at, k.row(r));
            kv.v.write(at, v.row(r));
        }
    }

    fn batch(&self, seqs: Vec<AttnSeq>, tokens: &[u32]) -> CpuBatch {
        let mut b = CpuBatch::new(seqs);
        b.tokens = tokens.to_vec();
        b
    }

    fn embed_batch(&self, table: &HostMatrix, batch: &CpuBatch) -> CpuTensor {
        self.embed(table, &batch.tokens)
    }

    fn attn_prep(
        &self,
        q: &mut CpuTensor,
        new_kv: Option<(CpuTensor, CpuTensor)>,
        kv: &mut CpuKv,
        layer: usize,
        head_dim: usize,
        inv_freq: &[f32],
        q_norm: Option<(&Vec<f32>, f32)>,
        batch: &CpuBatch,
    ) {
        self.rope(q, head_dim, &batch.positions, inv_freq);
        if let Some((mut k, v)) = new_kv {
            self.rope(&mut k, head_dim, &batch.positions, inv_freq);
            self.write_kv(kv, layer, &k, &v, &batch.new_slots);
        }
        if let Some((w, eps)) = q_norm {
            *q = self.rms_norm(q, w, eps);
        }
    }

    fn attention(
        &self,
        q: &CpuTensor,
        kv: &CpuKv,
        layer: usize,
        n_heads: usize,
        key_norm: Option<(&Vec<f32>, f32)>,
        scale: ScoreScale,
        batch: &CpuBatch,
    ) -> CpuTensor {
        let seqs = &batch.seqs;
        let spec = kv.spec;
        let (d, n_kv) = (spec.head_dim, spec.n_kv_heads);
        assert_eq!(q.cols, n_heads * d);
        assert_eq!(n_heads % n_kv, 0);
        let group = n_heads / n_kv;
        // Scores as the eager references form them: (q·k) stored, then scaled.
        let sqrt_d = (d as f32).sqrt();
        let inv_sqrt_d = (d as f64).powf(-0.5) as f32;
        // One task per (sequence, kv head): gather its keys (key-normed) and values once,
        // then serve the `group` query heads that share them.
        let tasks: Vec<(usize, usize)> = (0..seqs.len())
            .flat_map(|s| (0..n_kv).map(move |h| (s, h)))
            .collect();
        let results: Vec<(usize, usize, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(s, kvh)| {
                let seq = &seqs[s];
                let n_new = seq.rows.len();
                let ctx = seq.first_pos + n_new;
                assert_eq!(
                    seq.slots.len(),
                    ctx,
                    "attention: slots do not cover the context"
                );
                let mut keys = vec![0f32; ctx * d];
                let mut vals = vec![0f32; ctx * d];
                let mut kbuf = vec![0f32; n_kv * d];
                let mut vbuf = vec![0f32; n_kv * d];
                for (p, &slot) in seq.slots.iter().enumerate() {
                    kv.read_slot(layer, slot, &mut kbuf, &mut vbuf);
                    let kk = &kbuf[kvh * d..(kvh + 1) * d];
                    match key_norm {
                        Some((w, eps)) => {
                            self.rms_norm_row(kk, w, eps, &mut keys[p * d..(p + 1) * d])
                        }
                        None => keys[p * d..(p + 1) * d].copy_from_slice(kk),
                    }
                    vals[p * d..(p + 1) * d].copy_from_slice(&vbuf[kvh * d..(kvh + 1) * d]);
                }
                let mut out = vec![0f32; n_new * group * d];
                let mut scores = vec![0f32; ctx];
                for i in 0..n_new {
                    let pos = seq.first_pos + i;
                    let qrow = q.row(seq.rows.start + i);
                    for g in 0..group {
                        let h = kvh * group + g;
                        let qh = &qrow[h * d..(h + 1) * d];
                        let mut max = f32::NEG_INFINITY;
                        for j in 0..=pos {
                            let qk = self.r(dot(qh, &keys[j * d..(j + 1) * d]));
                            let sc = match scale {
                                ScoreScale::DivSqrt => self.r(qk / sqrt_d),
                                ScoreScale::MulInvSqrt => self.r(qk * inv_sqrt_d),
                            };
                            scores[j] = sc;
                            max = max.max(sc);
                        }
                        let mut sum = 0f32;
                        for sc in &mut scores[..=pos] {
                            *sc = (*sc - max).exp();
                            sum += *sc;
                        }
                        let o = &mut out[(i * group + g) * d..(i * group + g + 1) * d];
                        for j in 0..=pos {
                            let p = self.r(scores[j] / sum);
                            for (oo, &vv) in o.iter_mut().zip(&vals[j * d..(j + 1) * d]) {
                                *oo += p * vv;
                            }
                        }
                        for oo in o.iter_mut() {
                            *oo = self.r(*oo);
                        }
                    }
                }
                (s, kvh, out)
            })
            .collect();
        let mut out = self.zeros(q.rows, q.cols);
        for (s, kvh, o) in results {
            let seq = &seqs[s];
            for i in 0..seq.rows.len() {
                let row = seq.rows.start + i;
                let dst = &mut out.data[row * q.cols + kvh * group * d..][..group * d];
                dst.copy_from_slice(&o[i * group * d..(i + 1) * group * d]);
            }
        }
        out
    }

    fn moe_counted(
        &self,
        h: &Self::Act,
        router: &Self::Weight,
        routing: crate::backend::Routing,
        shared: Option<crate::backend::MlpRef<'_, Self::Weight>>,
        experts: &[crate::backend::MlpRef<'_, Self::Weight>],
        load: crate::backend::LayerLoad<'_>,
    ) -> (Self::Act, bool) {
        let counts = Some(load.counts);
        let out = crate::backend::moe_on_host(self, h, router, routing, shared, experts, counts);
        (out, true)
    }

    fn route(
        &self,
        logits: &CpuTensor,
        k: usize,
        renormalize: bool,
        round_weights: bool,
    ) -> (Vec<u32>, Vec<f32>) {
        let e = logits.cols;
        assert!(k >= 1 && k <= e, "route: k={k} with {e} experts");
        let mut experts = Vec::with_capacity(logits.rows * k);
        let mut weights = Vec::with_capacity(logits.rows * k);
        let mut p = vec![0f32; e];
        let mut taken = vec![false; e];
        for r in 0..logits.rows {
            let row = logits.row(r);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (pi, &l) in p.iter_mut().zip(row) {
                *pi = (l - max).exp();
                sum += *pi;
            }
            p.iter_mut().for_each(|x| *x /= sum);
            taken.iter_mut().for_each(|t| *t = false);
            let start = weights.len();
            for _ in 0..k {
                let mut best = usize::MAX;
                for i in 0..e {
                    if !taken[i] && (best == usize::MAX || p[i] > p[best]) {
                        best = i;
                    }
                }
                taken[best] = true;
                experts.push(best as u32);
                weights.push(p[best]);
            }
            if renormalize {
                let s: f32 = weights[start..].iter().sum();
                weights[start..].iter_mut().for_each(|w| *w /= s);
            }
            if round_weights {
                weights[start..].iter_mut().for_each(|w| *w = self.r(*w));
            }
        }
        (experts, weights)
    }

    fn combine(&self, out: &mut CpuTensor, src: &CpuTensor, weights: &[f32], k: usize) {
        assert_eq!(src.rows, out.rows * k);
        assert_eq!(weights.len(), src.rows);
        let cols = out.cols;
        let mut acc = vec![0f32; cols];
        for r in 0..out.rows {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for j in 0..k {
                let w = weights[r * k + j];
                for (a, &s) in acc.iter_mut().zip(src.row(r * k + j)) {
                    *a += w * s;
                }
            }
            for (o, &a) in out.data[r * cols..(r + 1) * cols].iter_mut().zip(&acc) {
                *o = self.r(*o + self.r(a));
            }
        }
    }

    fn scatter_rows(&self, dst: &mut CpuTensor, src: &CpuTensor, at: &[usize]) {
        assert_eq!(src.rows, at.len());
        assert_eq!(src.cols, dst.cols);
        let cols = dst.cols;
        for (i, &r) in at.iter().enumerate() {
            dst.data[r * cols..(r + 1) * cols].copy_from_slice(src.row(i));
        }
    }

    fn copy_kv(&self, kv: &mut CpuKv, from: &[usize], to: &[usize]) {
        assert_eq!(from.len(), to.len());
        let width = kv.spec.n_kv_heads * kv.spec.head_dim;
        for layer in 0..kv.spec.n_cache_layers {
            for (&f, &t) in from.iter().zip(to) {
                let (a, b) = (kv.offset(layer, f), kv.offset(layer, t));
                kv.k.copy_within(a, b, width);
                kv.v.copy_within(a, b, width);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: usize, cols: usize, data: Vec<f32>) -> CpuTensor {
        CpuTensor { rows, cols, data }
    }

    #[test]
    fn rms_norm_matches_formula_and_groups() {
        let b = CpuBackend::new(Precision::F32);
        let x = t(1, 4, vec![1.0, 2.0, 3.0, 4.0]);
        let y = b.rms_norm(&x, &vec![1.0, 1.0], 0.0);
        let (a, c) = ((2.5f32).sqrt(), (12.5f32).sqrt());
        let want = [1.0 / a, 2.0 / a, 3.0 / c, 4.0 / c];
        for (g, w) in y.data.iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_i_and_i_plus_half() {
        let b = CpuBackend::new(Precision::F32);
        let mut x = t(1, 4, vec![1.0, 0.0, 0.0, 0.0]);
        // inv_freq[0] = 1 rad per position; position 1 rotates (x0, x2) by 1 radian.
        b.rope(&mut x, 4, &[1], &[1.0, 0.0]);
        assert!((x.data[0] - 1f32.cos()).abs() < 1e-6);
        assert!((x.data[2] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(x.data[1], 0.0);
    }

    #[test]
    fn route_breaks_ties_low_and_renormalizes_only_when_asked() {
        let b = CpuBackend::new(Precision::F32);
        let l = t(1, 4, vec![1.0, 3.0, 3.0, 0.0]);
        let (e, w) = b.route(&l, 1, false, true);
        assert_eq!(e, vec![1]);
        assert!(w[0] < 0.5);
        let (e, w) = b.route(&l, 2, true, true);
        assert_eq!(e, vec![1, 2]);
        assert!((w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn attention_is_causal_and_uses_gqa_groups() {
        let b = CpuBackend::new(Precision::F32);
        let spec = KvSpec {
            n_cache_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            block_size: 4,
            n_blocks: 2,
            dtype: DType::F32,
        };
        let mut kv = b.alloc_kv(spec);
        let k = t(2, 2, vec![1.0, 0.0, 0.0, 1.0]);
        let v = t(2, 2, vec![10.0, 0.0, 0.0, 20.0]);
        b.write_kv(&mut kv, 0, &k, &v, &[5, 6]);
        let q = t(2, 4, vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]);
        let seq = AttnSeq {
            rows: 0..2,
            first_pos: 0,
            slots: vec![5, 6],
        };
        let o = b.attention(
            &q,
            &kv,
            0,
            2,
            None,
            ScoreScale::DivSqrt,
            &b.batch(vec![seq], &[0]),
        );
        // Token 0 sees only value 0, for both query heads of the group.
        assert_eq!(&o.data[0..4], &[10.0, 0.0, 10.0, 0.0]);
        // Token 1 mixes both values; head 1 (query (0,1)) prefers key 1.
        assert!(o.data[7] > o.data[3]);
    }
}
