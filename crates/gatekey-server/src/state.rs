//! Shared control-plane state handed to every handler.

use std::sync::Arc;

use crate::config::Config;
use crate::registry::Registry;
use crate::store::Store;

pub struct State {
    pub config: Config,
    pub store: Store,
    pub registry: Registry,
}

pub type AppState = Arc<State>;
