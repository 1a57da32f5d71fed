//! `cargo run --manifest-path tools/protogen/Cargo.toml [-- --check]`
//!
//! Generates crates/gatekey-proto/src/gen/*.rs from proto/ with prost-build
//! (needs `protoc` on PATH). With `--check`, fails if the checked-in code differs.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out_dir = root.join("crates/gatekey-proto/src/gen");
    let tmp = std::env::temp_dir().join(format!("gatekey-protogen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("create temp dir");
    let protos = [root.join("proto/gatekey/link/v1/link.proto")];
    let mut config = prost_build::Config::new();
    config.out_dir(&tmp);
    config.bytes(["."]);
    if let Err(e) = config.compile_protos(&protos, &[root.join("proto")]) {
        eprintln!("protogen: {e}");
        return ExitCode::from(2);
    }
    let mut stale = false;
    for entry in std::fs::read_dir(&tmp).expect("read temp dir") {
        let generated = entry.expect("dir entry").path();
        let name = generated.file_name().expect("file name").to_owned();
        let target = out_dir.join(&name);
        let new = std::fs::read(&generated).expect("read generated");
        if check {
            if std::fs::read(&target).ok().as_deref() != Some(&new[..]) {
                eprintln!("protogen: {} is out of date; run tools/protogen", display(&target, &root));
                stale = true;
            }
        } else {
            std::fs::write(&target, new).expect("write generated");
            println!("wrote {}", display(&target, &root));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if stale { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn display(path: &Path, root: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).display().to_string()
}
