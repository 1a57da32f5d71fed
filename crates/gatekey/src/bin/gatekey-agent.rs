//! `gatekey-agent --config FILE [--check]`: see `gatekey_agent::cli`.

fn main() {
    std::process::exit(gatekey_agent::cli::main());
}
