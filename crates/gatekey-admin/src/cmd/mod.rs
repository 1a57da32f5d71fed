//! One module per command group; each returns the exit code or an error
//! that [`crate::cli::report`] prints.

pub mod audit;
pub mod identity;
pub mod login;
pub mod node;
pub mod replica;
pub mod session;
pub mod troubleshoot;
pub mod version;
