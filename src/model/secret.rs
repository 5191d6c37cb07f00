//! API key secrets: generation, the checksummed format, and hashing.
//!
//! A secret is `PREFIX` + 43 base62 characters (256 random bits) + 6 base62
//! characters holding the CRC32 of everything before them, the format GitHub
//! uses for its tokens. The checksum lets a mistyped or truncated secret be
//! rejected without touching the database, and lets secret scanners recognise
//! leaked keys. Only the SHA-256 of a secret is ever stored.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::model::invalid::Invalid;

/// The default secret prefix.
pub const DEFAULT_SECRET_PREFIX: &str = "kt_";

/// The number of random base62 characters: 43 × log2(62) ≈ 256.1 bits.
const BODY_LEN: usize = 43;
/// The number of base62 characters of the checksum: 62^6 > 2^32.
const CHECKSUM_LEN: usize = 6;
/// How many characters of the body the display prefix shows.
const DISPLAY_BODY_CHARS: usize = 4;
/// The longest prefix accepted.
const MAX_PREFIX_LEN: usize = 16;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// An API key's secret. It is shown once, when the key is created or rotated.
///
/// `Debug` and `Display` never print it; [`Secret::expose`] does, for the one
/// place it must be shown.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, to hand to the key's owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first characters of the secret, safe to show and store, so people
    /// can tell keys apart.
    pub fn display_prefix(&self) -> String {
        let prefix_len = self.0.len() - BODY_LEN - CHECKSUM_LEN;
        self.0[..prefix_len + DISPLAY_BODY_CHARS].to_owned()
    }

    pub(crate) fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted secret>")
    }
}

/// The SHA-256 of a secret: what the database stores and looks up.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SecretHash(pub(crate) [u8; 32]);

impl SecretHash {
    fn of(secret: &str) -> SecretHash {
        SecretHash(Sha256::digest(secret.as_bytes()).into())
    }
}

/// Why no secret could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GenerateError {
    /// The prefix breaks its rules.
    #[error(transparent)]
    Prefix(Invalid),
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Random(#[source] getrandom::Error),
}

/// Checks a secret prefix: 1 to 16 ASCII letters, digits or `_`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), Invalid> {
    if prefix.is_empty()
        || prefix.len() > MAX_PREFIX_LEN
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Invalid::new(
            "secret_prefix",
            format!("must be 1 to {MAX_PREFIX_LEN} ASCII letters, digits or underscores"),
        ));
    }
    Ok(())
}

/// Generates a new secret with `prefix` from the operating system's random
/// source.
pub(crate) fn generate(prefix: &str) -> Result<Secret, GenerateError> {
    validate_prefix(prefix).map_err(GenerateError::Prefix)?;
    let mut secret = String::with_capacity(prefix.len() + BODY_LEN + CHECKSUM_LEN);
    secret.push_str(prefix);
    let mut filled = 0;
    let mut random = [0u8; 64];
    while filled < BODY_LEN {
        getrandom::fill(&mut random).map_err(GenerateError::Random)?;
        // Rejection sampling: 248 = 4 × 62, so each kept byte is uniform.
        for byte in random.iter().filter(|&&b| b < 248) {
            if filled == BODY_LEN {
                break;
            }
            secret.push(char::from(BASE62[usize::from(byte % 62)]));
            filled += 1;
        }
    }
    let checksum = encode_checksum(crc32fast::hash(secret.as_bytes()));
    secret.push_str(&checksum);
    Ok(Secret(secret))
}

fn encode_checksum(crc: u32) -> String {
    checksum_digits(crc)
        .iter()
        .map(|&b| char::from(b))
        .collect()
}

fn checksum_digits(mut crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut digits = [b'0'; CHECKSUM_LEN];
    for digit in digits.iter_mut().rev() {
        *digit = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    digits
}

/// Why a presented secret was rejected without a database look-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// Wrong prefix, length or characters.
    Shape,
    /// Well-formed, but the checksum does not match: a typo or a truncation.
    Checksum,
}

/// Checks the shape and checksum of a presented secret and returns its hash.
pub(crate) fn parse(prefix: &str, presented: &str) -> std::result::Result<SecretHash, Malformed> {
    let expected_len = prefix.len() + BODY_LEN + CHECKSUM_LEN;
    if presented.len() != expected_len || !presented.starts_with(prefix) {
        return Err(Malformed::Shape);
    }
    let rest = &presented.as_bytes()[prefix.len()..];
    if !rest.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Malformed::Shape);
    }
    let (signed, checksum) = presented.split_at(prefix.len() + BODY_LEN);
    if checksum_digits(crc32fast::hash(signed.as_bytes())) != checksum.as_bytes() {
        return Err(Malformed::Checksum);
    }
    Ok(SecretHash::of(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secret_parses_and_hashes_to_its_hash() -> Result<(), GenerateError> {
        let secret = generate(DEFAULT_SECRET_PREFIX)?;
        assert_eq!(secret.expose().len(), 3 + 43 + 6);
        assert!(secret.expose().starts_with("kt_"));
        assert_eq!(secret.display_prefix().len(), 7);
        assert!(secret.expose().starts_with(&secret.display_prefix()));
        let parsed = parse(DEFAULT_SECRET_PREFIX, secret.expose());
        assert!(parsed == Ok(secret.hash()));
        Ok(())
    }

    #[test]
    fn two_secrets_differ() -> Result<(), GenerateError> {
        assert_ne!(generate("kt_")?.expose(), generate("kt_")?.expose());
        Ok(())
    }

    #[test]
    fn every_single_character_typo_is_caught() -> Result<(), Box<dyn std::error::Error>> {
        let secret = generate("kt_")?;
        let text = secret.expose();
        for position in 3..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[position] = if bytes[position] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes)?;
            assert!(parse("kt_", &typo).is_err(), "typo at {position} accepted");
        }
        Ok(())
    }

    #[test]
    fn wrong_shapes_are_malformed() {
        for presented in [
            "",
            "kt_",
            "xx_abc",
            "kt_!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        ] {
            assert!(matches!(parse("kt_", presented), Err(Malformed::Shape)));
        }
    }

    #[test]
    fn debug_and_display_redact() -> Result<(), GenerateError> {
        let secret = generate("kt_")?;
        let body = &secret.expose()[3..];
        assert!(!format!("{secret:?}").contains(body));
        assert!(!format!("{secret}").contains(body));
        assert!(!format!("{secret:#?}").contains(body));
        Ok(())
    }

    #[test]
    fn bad_prefixes_are_refused() {
        for prefix in ["", "has space", "toolongprefix_xyz", "ü_"] {
            assert!(validate_prefix(prefix).is_err(), "{prefix:?} accepted");
        }
        assert!(validate_prefix("sk_live_").is_ok());
    }
}
