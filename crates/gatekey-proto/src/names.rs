//! Node names and ids: what an agent may call itself and an admin may type.

use crate::limits;

/// Longest node name or id.
pub const MAX_NAME: usize = 63;

/// Checks a node name or id: 1–63 characters of `A-Z a-z 0-9 . _ -`, starting
/// with a letter or digit. Returns a message naming the problem.
pub fn validate(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} must not be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!("{kind} is longer than {MAX_NAME} characters"));
    }
    let first = name.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(format!("{kind} {name:?} must start with a letter or digit"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{kind} {:?} contains {c:?}; use letters, digits, '.', '_' and '-'",
            name.escape_default().to_string()
        ));
    }
    Ok(())
}

/// Checks a command line for exec: not empty, not too long, no NUL byte.
pub fn validate_command(cmd: &str) -> Result<(), String> {
    if cmd.trim().is_empty() {
        return Err("command must not be empty".into());
    }
    if cmd.len() > limits::MAX_COMMAND {
        return Err(format!(
            "command is longer than {} bytes",
            limits::MAX_COMMAND
        ));
    }
    if cmd.contains('\0') {
        return Err("command contains a NUL byte".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate("name", "hub-1").is_ok());
        assert!(validate("name", "spoke.datacenter_2").is_ok());
        assert!(validate("name", "").is_err());
        assert!(validate("name", "-x").is_err());
        assert!(validate("name", "a b").is_err());
        assert!(validate("name", "héllo").is_err());
        assert!(validate("name", &"a".repeat(64)).is_err());
        assert!(validate("name", &"a".repeat(63)).is_ok());
    }

    #[test]
    fn commands() {
        assert!(validate_command("ip addr").is_ok());
        assert!(validate_command("  ").is_err());
        assert!(validate_command("a\0b").is_err());
        assert!(validate_command(&"x".repeat(limits::MAX_COMMAND + 1)).is_err());
    }
}
