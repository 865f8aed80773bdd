//! Scalar number formats: bf16/f16 conversion and the bf16 rounding points.
//!
//! A bf16 model in the reference framework stores every intermediate tensor in bf16.
//! We keep activations in f32 and round them to the nearest bf16 exactly where the
//! reference would store one, which reproduces its numbers without bf16 arithmetic.

use half::{bf16, f16};

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// Lower-case name as used on the command line and in configs.
    pub const fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Rounds an f32 to the nearest bf16 (ties to even) and returns it as f32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Rounds every element of `xs` to bf16 in place.
pub fn round_bf16_slice(xs: &mut [f32]) {
    for x in xs {
        *x = round_bf16(*x);
    }
}

/// bf16 bits (little-endian u16) to f32: exact.
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f16 bits to f32: exact.
#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// f32 to bf16 bits, round to nearest even.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// Decodes little-endian bytes of `dtype` into f32 values appended to `out`.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
    }
}

/// Encodes f32 values as little-endian bytes of `dtype` (rounding to nearest even).
pub fn encode(dtype: DType, xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * dtype.size_bytes());
    match dtype {
        DType::BF16 => xs
            .iter()
            .for_each(|&x| out.extend_from_slice(&f32_to_bf16_bits(x).to_le_bytes())),
        DType::F16 => xs
            .iter()
            .for_each(|&x| out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes())),
        DType::F32 => xs
            .iter()
            .for_each(|&x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 is exactly half way between two bf16 values (1 and 1 + 2^-7): ties to even.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(bf16_bits_to_f32(f32_to_bf16_bits(-2.5)), -2.5);
    }

    #[test]
    fn encode_decode_round_trip() {
        let xs = [0.0f32, 1.5, -3.25, 1e-3, 65504.0];
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let mut back = Vec::new();
            decode_into(dtype, &encode(dtype, &xs), &mut back);
            for (a, b) in xs.iter().zip(&back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{dtype}: {a} vs {b}");
            }
        }
    }
}
