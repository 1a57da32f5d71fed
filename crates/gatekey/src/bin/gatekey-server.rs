fn main() {
    std::process::exit(gatekey_server::cli::main());
}
