//! `gatekey-bench [all|smoke|SCENARIO]`: see `gatekey::bench`.

fn main() {
    std::process::exit(gatekey::bench::main());
}
