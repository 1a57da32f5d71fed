//! The gatekey binaries (`src/bin`) and [`testkit`]: real control-plane and
//! agent processes on loopback, for the integration tests and the benchmarks.

pub mod bench;
pub mod sim;
pub mod testkit;
