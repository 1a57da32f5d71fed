//! User passwords: argon2id with a random salt, PHC strings in the database.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

pub const MIN_LEN: usize = 8;
pub const MAX_LEN: usize = 1024;

/// Checks a new password's length; the error is for the user.
pub fn check(password: &str) -> Result<(), String> {
    if password.len() < MIN_LEN || password.len() > MAX_LEN {
        return Err(format!(
            "a password must be {MIN_LEN} to {MAX_LEN} bytes long"
        ));
    }
    Ok(())
}

/// Hashes a password (tens of milliseconds of CPU: call off the async threads).
pub fn hash(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no system randomness".to_string())?;
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("password hashing failed: {e}"))
}

/// Whether `password` matches a stored PHC string.
pub fn verify(password: &str, stored: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), stored)
        .is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_and_verify() {
        let h = super::hash("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(super::verify("correct horse", &h));
        assert!(!super::verify("wrong horse", &h));
        assert!(!super::verify("correct horse", "not a hash"));
        assert!(super::check("short").is_err());
    }
}
