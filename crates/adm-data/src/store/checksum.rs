//! XXH64 (seed 0), the shard checksum.
//!
//! A fast (several GB/s, word-at-a-time over four independent lanes) non-cryptographic 64-bit
//! hash with a public specification, so a shard can be checked without this crate:
//! `xxhsum -H64 shard-....safetensors` prints the value the manifest records.
//! Specification: <https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md>.

use std::fs::File;
use std::io::Read;
use std::path::Path;

const PRIME_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME_5: u64 = 0x27D4_EB2F_1656_67C5;
const STRIPE: usize = 32;

fn read_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(PRIME_2))
        .rotate_left(31)
        .wrapping_mul(PRIME_1)
}

fn merge_round(acc: u64, lane_acc: u64) -> u64 {
    (acc ^ round(0, lane_acc))
        .wrapping_mul(PRIME_1)
        .wrapping_add(PRIME_4)
}

/// Streaming XXH64 with seed 0: feed bytes with [`Xxh64::update`] in chunks of any size.
#[derive(Debug, Clone)]
pub struct Xxh64 {
    lanes: [u64; 4],
    pending: [u8; STRIPE],
    pending_len: usize,
    total_len: u64,
}

impl Default for Xxh64 {
    fn default() -> Self {
        Self {
            lanes: [
                PRIME_1.wrapping_add(PRIME_2),
                PRIME_2,
                0,
                PRIME_1.wrapping_neg(),
            ],
            pending: [0; STRIPE],
            pending_len: 0,
            total_len: 0,
        }
    }
}

impl Xxh64 {
    pub fn new() -> Self {
        Self::default()
    }

    fn consume_stripe(&mut self, stripe: &[u8]) {
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            *lane = round(*lane, read_u64(&stripe[8 * i..]));
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total_len += bytes.len() as u64;
        if self.pending_len > 0 {
            let take = (STRIPE - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < STRIPE {
                return;
            }
            let stripe = self.pending;
            self.consume_stripe(&stripe);
            self.pending_len = 0;
        }
        let mut stripes = bytes.chunks_exact(STRIPE);
        for stripe in &mut stripes {
            self.consume_stripe(stripe);
        }
        let rest = stripes.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    pub fn finish(&self) -> u64 {
        let mut hash = if self.total_len >= STRIPE as u64 {
            let [a, b, c, d] = self.lanes;
            let mixed = a
                .rotate_left(1)
                .wrapping_add(b.rotate_left(7))
                .wrapping_add(c.rotate_left(12))
                .wrapping_add(d.rotate_left(18));
            self.lanes
                .iter()
                .fold(mixed, |acc, &lane| merge_round(acc, lane))
        } else {
            PRIME_5
        };
        hash = hash.wrapping_add(self.total_len);

        let mut tail = &self.pending[..self.pending_len];
        while tail.len() >= 8 {
            hash ^= round(0, read_u64(tail));
            hash = hash
                .rotate_left(27)
                .wrapping_mul(PRIME_1)
                .wrapping_add(PRIME_4);
            tail = &tail[8..];
        }
        if tail.len() >= 4 {
            let mut word = [0u8; 4];
            word.copy_from_slice(&tail[..4]);
            hash ^= u64::from(u32::from_le_bytes(word)).wrapping_mul(PRIME_1);
            hash = hash
                .rotate_left(23)
                .wrapping_mul(PRIME_2)
                .wrapping_add(PRIME_3);
            tail = &tail[4..];
        }
        for &byte in tail {
            hash ^= u64::from(byte).wrapping_mul(PRIME_5);
            hash = hash.rotate_left(11).wrapping_mul(PRIME_1);
        }

        hash ^= hash >> 33;
        hash = hash.wrapping_mul(PRIME_2);
        hash ^= hash >> 29;
        hash = hash.wrapping_mul(PRIME_3);
        hash ^ (hash >> 32)
    }
}

/// XXH64 (seed 0) of a whole buffer.
pub fn xxh64(bytes: &[u8]) -> u64 {
    let mut hasher = Xxh64::new();
    hasher.update(bytes);
    hasher.finish()
}

/// XXH64 (seed 0) of a file, streamed.
pub(crate) fn xxh64_file(path: &Path) -> std::io::Result<u64> {
    let mut file = File::open(path)?;
    let mut hasher = Xxh64::new();
    let mut chunk = vec![0u8; 4 << 20];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(hasher.finish()),
            Ok(n) => hasher.update(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_vectors() {
        assert_eq!(xxh64(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            xxh64(b"Nobody inspects the spammish repetition"),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn streaming_in_any_chunking_equals_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let whole = xxh64(&data);
        for chunk in [1, 3, 8, 31, 32, 33, 100, 999] {
            let mut hasher = Xxh64::new();
            data.chunks(chunk).for_each(|c| hasher.update(c));
            assert_eq!(hasher.finish(), whole, "chunk size {chunk}");
        }
        assert_ne!(xxh64(&data[..999]), whole);
    }
}
