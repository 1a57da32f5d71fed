//! Agent tokens and API keys: random, prefixed, stored hashed, compared in
//! constant time.
//!
//! A secret looks like `hub_` + 16 hex (lookup id) + 48 hex (secret). The
//! control plane stores the lookup id and SHA-256 of the secret part: it
//! finds the row by id and compares hashes in constant time, so neither the
//! database index nor the comparison leaks the secret.

use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;

const LOOKUP_HEX: usize = 16;
const SECRET_HEX: usize = 48;

/// Prefix of administrator API keys.
pub const API_KEY_PREFIX: &str = "gka_";

/// A freshly generated secret: show `token` once, store the rest.
pub struct NewSecret {
    pub token: String,
    pub lookup_id: String,
    pub hash: String,
}

/// A presented secret, split into its parts.
pub struct Presented<'a> {
    pub prefix: &'a str,
    pub lookup_id: &'a str,
    secret: &'a str,
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("system random source");
    hex(&buf)
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Generates a secret with `prefix` (e.g. `hub_`).
pub fn generate(prefix: &str) -> NewSecret {
    let lookup_id = random_hex(LOOKUP_HEX / 2);
    let secret = random_hex(SECRET_HEX / 2);
    NewSecret {
        token: format!("{prefix}{lookup_id}{secret}"),
        hash: sha256_hex(secret.as_bytes()),
        lookup_id,
    }
}

/// Splits a presented secret; `None` when it cannot be one of ours.
pub fn parse(token: &str) -> Option<Presented<'_>> {
    let underscore = token.find('_')?;
    let (prefix, rest) = token.split_at(underscore + 1);
    if rest.len() != LOOKUP_HEX + SECRET_HEX || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let (lookup_id, secret) = rest.split_at(LOOKUP_HEX);
    Some(Presented {
        prefix,
        lookup_id,
        secret,
    })
}

impl Presented<'_> {
    /// Whether the secret matches a stored hash, in constant time.
    pub fn matches(&self, stored_hash: &str) -> bool {
        let h = sha256_hex(self.secret.as_bytes());
        h.as_bytes().ct_eq(stored_hash.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = generate("hub_");
        assert!(s.token.starts_with("hub_"));
        let p = parse(&s.token).unwrap();
        assert_eq!(p.prefix, "hub_");
        assert_eq!(p.lookup_id, s.lookup_id);
        assert!(p.matches(&s.hash));
        let other = generate("hub_");
        assert!(!p.matches(&other.hash));
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse("hub_xxxxx").is_none());
        assert!(parse("nounderscore").is_none());
        assert!(parse(&format!("gw_{}", "z".repeat(64))).is_none());
        assert!(parse("").is_none());
    }
}
