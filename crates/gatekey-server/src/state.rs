//! Shared control-plane state handed to every handler.

use std::sync::Arc;

use crate::config::Config;
use crate::live::Sessions;
use crate::registry::Registry;
use crate::store::Store;

pub struct State {
    pub config: Config,
    pub store: Store,
    pub registry: Registry,
    pub sessions: Sessions,
}

pub type AppState = Arc<State>;

impl State {
    /// The timeouts of a session of this kind.
    pub fn session_timeouts(&self, console: bool) -> crate::relay::Timeouts {
        let nonzero = |d: std::time::Duration| (!d.is_zero()).then_some(d);
        crate::relay::Timeouts {
            close: self.config.request_timeout,
            heartbeat_interval: self.config.heartbeat_interval,
            heartbeat_timeout: self.config.heartbeat_timeout,
            idle: if console {
                nonzero(self.config.console_idle_timeout)
            } else {
                None
            },
            max_duration: nonzero(self.config.session_max_duration),
        }
    }
}
