//! The gatekey binaries (`src/bin`) and [`testkit`]: real control-plane and
//! agent processes on loopback, for the integration tests and the benchmarks.

pub mod bench;
mod bench_echo;
pub mod sim;
pub mod testkit;
