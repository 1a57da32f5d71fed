//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod console_client;

use std::process::Output;

pub use gatekey::testkit::*;

pub fn bins() -> Bins {
    Bins {
        server: env!("CARGO_BIN_EXE_gatekey-server").into(),
        agent: env!("CARGO_BIN_EXE_gatekey-agent").into(),
        admin: env!("CARGO_BIN_EXE_gatekey-admin").into(),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts an exit code, showing the output when it differs.
#[track_caller]
pub fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// What `sh -c CMD` does locally: the agent runs on this machine as this
/// user, so a remote command must behave exactly the same.
pub fn local_sh(cmd: &str) -> Output {
    std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// A marker unlikely to appear in any other process's command line.
pub fn marker() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}.{:06}", 7000 + std::process::id() % 1000, n % 1_000_000)
}
