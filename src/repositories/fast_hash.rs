//! A fast hash for the repositories' in-memory maps.

/// Hashes the keys of the repositories' in-memory maps: key row ids, key ids and
/// secret hashes, looked up on every resolve or recorded event. Their values
/// are chosen by SQLite or by keytally (row ids, random UUIDs, SHA-256 of
/// stored secrets), never by a caller, and a caller's look-up never inserts,
/// so a multiplicative hash serves where SipHash's resistance to chosen keys
/// would only cost time.
#[derive(Default, Clone, Copy)]
pub(crate) struct BuildFastHasher;

#[derive(Default)]
pub(crate) struct FastHasher(u64);

impl std::hash::BuildHasher for BuildFastHasher {
    type Hasher = FastHasher;

    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(word);
            self.write_u64(u64::from_le_bytes(buf));
        }
        for &byte in words.remainder() {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }

    fn write_i64(&mut self, value: i64) {
        self.write_u64(value as u64);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}
