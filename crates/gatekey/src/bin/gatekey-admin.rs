//! `gatekey-admin`: see the gatekey-admin crate.

fn main() {
    std::process::exit(gatekey_admin::main());
}
