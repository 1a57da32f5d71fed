//! The agent's YAML configuration (`gatekey-agent --config FILE`).
//!
//! Every problem is reported in one line naming the file, the line and the
//! key, so an operator can fix it without reading source code:
//!
//! ```text
//! /etc/gatekey/hub.yaml:3: unknown key "sesion_enabled" (expected one of: name, control_plane_url, …)
//! /etc/gatekey/hub.yaml:5: session_enabled: expected true or false
//! ```
//!
//! Values are checked while deserializing (custom `deserialize_with`
//! functions), because only then does the YAML parser still know the line.
//! Checks that involve two keys run afterwards and find the line by key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatekey_proto::{duration, names, transport};
use serde::Deserialize;
use serde::de::{self, Deserializer, Error as _, Visitor};

/// What kind of node the agent runs on; must match the node its token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentType {
    Gateway,
    Hub,
    Spoke,
    Device,
}

impl AgentType {
    pub const ALL: [AgentType; 4] = [
        AgentType::Gateway,
        AgentType::Hub,
        AgentType::Spoke,
        AgentType::Device,
    ];

    /// The name used in configs and on the wire (`Hello.agent_type`).
    pub fn as_str(self) -> &'static str {
        match self {
            AgentType::Gateway => "gateway",
            AgentType::Hub => "hub",
            AgentType::Spoke => "spoke",
            AgentType::Device => "device",
        }
    }

    /// The prefix of this type's agent tokens.
    pub fn token_prefix(self) -> &'static str {
        match self {
            AgentType::Gateway => "gw_",
            AgentType::Hub => "hub_",
            AgentType::Spoke => "spoke_",
            AgentType::Device => "dev_",
        }
    }

    /// The type a token's prefix names, if any.
    pub fn from_token(token: &str) -> Option<AgentType> {
        AgentType::ALL
            .into_iter()
            .find(|t| token.starts_with(t.token_prefix()))
    }

    pub fn parse(s: &str) -> Option<AgentType> {
        AgentType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for AgentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent's settings. Fields are public so tests and embedders can adjust
/// a config built with [`Config::new`].
#[derive(Clone)]
pub struct Config {
    /// The file this was read from (named in hints such as "set ca_cert in FILE").
    pub path: Option<PathBuf>,
    pub name: String,
    pub control_plane_url: String,
    pub token: String,
    /// Informational (spokes): the hub this node's tunnel goes to.
    pub hub_endpoint: Option<String>,
    /// The node's own consent to remote sessions. Off unless the config says so.
    pub session_enabled: bool,
    pub agent_type: AgentType,
    /// A PEM file to trust instead of the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// Kill a command after this long; zero means never.
    pub command_timeout: Duration,
    pub max_sessions: u32,
    pub shell: PathBuf,
    /// The program of an interactive console; `None`: the agent user's login
    /// shell from the passwd database, else /bin/sh.
    pub console_shell: Option<PathBuf>,
    pub reconnect_max_backoff: Duration,
    pub connect_timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// After the main process exits, how long to keep reading output that
    /// leftover processes hold open before killing the group.
    pub exit_drain_timeout: Duration,
    pub log_level: String,
}

// The token is a secret: never print it, even in debug output.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("control_plane_url", &self.control_plane_url)
            .field("token", &"<redacted>")
            .field("agent_type", &self.agent_type)
            .field("session_enabled", &self.session_enabled)
            .field("hub_endpoint", &self.hub_endpoint)
            .field("ca_cert", &self.ca_cert)
            .field("command_timeout", &self.command_timeout)
            .field("max_sessions", &self.max_sessions)
            .field("shell", &self.shell)
            .field("console_shell", &self.console_shell)
            .field("reconnect_max_backoff", &self.reconnect_max_backoff)
            .field("connect_timeout", &self.connect_timeout)
            .field("kill_grace", &self.kill_grace)
            .field("exit_drain_timeout", &self.exit_drain_timeout)
            .field("log_level", &self.log_level)
            .finish()
    }
}

/// A configuration problem, shown as `FILE:LINE: message` (or `FILE: message`
/// when no single line is to blame).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    /// The key at fault, when one is.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every key the file may contain, in the order the error message lists them.
pub const KEYS: &[&str] = &[
    "name",
    "control_plane_url",
    "token",
    "type",
    "session_enabled",
    "hub_endpoint",
    "ca_cert",
    "command_timeout",
    "max_sessions",
    "shell",
    "console_shell",
    "reconnect_max_backoff",
    "connect_timeout",
    "kill_grace",
    "exit_drain_timeout",
    "log_level",
];

const MAX_SESSIONS_LIMIT: u32 = 10_000;

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// The file as written. Every value goes through a checking deserializer so a
/// bad value is reported at its line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(deserialize_with = "de_name")]
    name: String,
    #[serde(deserialize_with = "de_url")]
    control_plane_url: String,
    #[serde(deserialize_with = "de_token")]
    token: String,
    #[serde(rename = "type", default, deserialize_with = "de_type")]
    agent_type: Option<AgentType>,
    #[serde(default, deserialize_with = "de_bool")]
    session_enabled: bool,
    #[serde(default, deserialize_with = "de_opt_string")]
    hub_endpoint: Option<String>,
    #[serde(default, deserialize_with = "de_opt_string")]
    ca_cert: Option<String>,
    #[serde(default, deserialize_with = "de_duration")]
    command_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_max_sessions")]
    max_sessions: Option<u32>,
    #[serde(default, deserialize_with = "de_opt_string")]
    shell: Option<String>,
    #[serde(default, deserialize_with = "de_absolute_path")]
    console_shell: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    reconnect_max_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "de_positive_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    kill_grace: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    exit_drain_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_log_level")]
    log_level: Option<String>,
}

impl Config {
    /// A config with every optional key at its default, as if the file held
    /// only `name`, `control_plane_url` and `token`.
    pub fn new(name: &str, control_plane_url: &str, token: &str) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: "<config>".into(),
            line: None,
            key: Some(key.into()),
            message: format!("{key}: {message}"),
        };
        names::validate("node name", name).map_err(|e| err("name", e))?;
        transport::Endpoint::parse(control_plane_url)
            .map_err(|e| err("control_plane_url", e.to_string()))?;
        let agent_type =
            AgentType::from_token(token).ok_or_else(|| err("type", missing_type_message()))?;
        Ok(Config::with_defaults(
            name,
            control_plane_url,
            token,
            agent_type,
        ))
    }

    fn with_defaults(
        name: &str,
        control_plane_url: &str,
        token: &str,
        agent_type: AgentType,
    ) -> Config {
        Config {
            path: None,
            name: name.into(),
            control_plane_url: control_plane_url.into(),
            token: token.into(),
            hub_endpoint: None,
            session_enabled: false,
            agent_type,
            ca_cert: None,
            command_timeout: Duration::from_secs(60),
            max_sessions: 32,
            shell: PathBuf::from("/bin/sh"),
            console_shell: None,
            reconnect_max_backoff: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(2),
            exit_drain_timeout: Duration::from_secs(2),
            log_level: "info".into(),
        }
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::from_yaml(&text, path)
    }

    /// Parses config text; `path` names the file in errors and anchors a
    /// relative `ca_cert`.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(ConfigError {
                file,
                line: None,
                key: None,
                message: "the file is empty: set at least name, control_plane_url and token".into(),
            });
        }
        let raw: Raw = yaml_serde::from_str(text).map_err(|e| yaml_error(&file, text, &e))?;
        let at = |key: &str, message: String| ConfigError {
            file: file.clone(),
            line: line_of_key(text, key),
            key: Some(key.into()),
            message,
        };

        let inferred = AgentType::from_token(&raw.token);
        let agent_type = match (raw.agent_type, inferred) {
            (Some(t), Some(from_token)) if t != from_token => {
                return Err(at(
                    "type",
                    format!(
                        "type: {t} does not match the token, which is a {from_token} token ({}…): fix type or token",
                        from_token.token_prefix()
                    ),
                ));
            }
            (Some(t), _) => t,
            (None, Some(t)) => t,
            (None, None) => return Err(at("token", missing_type_message())),
        };

        let ca_cert = match raw.ca_cert {
            None => None,
            Some(p) => {
                // Relative to the config file, as kubeconfig does: the two usually live together.
                let p = PathBuf::from(p);
                let p = if p.is_relative() {
                    path.parent().unwrap_or(Path::new(".")).join(p)
                } else {
                    p
                };
                transport::load_certs(&p).map_err(|e| at("ca_cert", format!("ca_cert: {e}")))?;
                Some(p)
            }
        };
        let mut config =
            Config::with_defaults(&raw.name, &raw.control_plane_url, &raw.token, agent_type);
        config.path = Some(path.to_path_buf());
        config.hub_endpoint = raw.hub_endpoint;
        config.session_enabled = raw.session_enabled;
        config.ca_cert = ca_cert;
        if let Some(d) = raw.command_timeout {
            config.command_timeout = d;
        }
        if let Some(n) = raw.max_sessions {
            config.max_sessions = n;
        }
        if let Some(s) = raw.shell {
            config.shell = PathBuf::from(s);
        }
        config.console_shell = raw.console_shell;
        if let Some(d) = raw.reconnect_max_backoff {
            config.reconnect_max_backoff = d;
        }
        if let Some(d) = raw.connect_timeout {
            config.connect_timeout = d;
        }
        if let Some(d) = raw.kill_grace {
            config.kill_grace = d;
        }
        if let Some(d) = raw.exit_drain_timeout {
            config.exit_drain_timeout = d;
        }
        if let Some(l) = raw.log_level {
            config.log_level = l;
        }
        Ok(config)
    }

    /// Host and port of the control plane, from `control_plane_url`.
    pub fn endpoint(&self) -> Result<transport::Endpoint, ConfigError> {
        transport::Endpoint::parse(&self.control_plane_url).map_err(|e| ConfigError {
            file: self.file_display(),
            line: None,
            key: Some("control_plane_url".into()),
            message: format!("control_plane_url: {e}"),
        })
    }

    /// How to refer to the config file in hints.
    pub fn file_display(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "the agent's config".into(),
        }
    }

    /// One line summarising the config, for `--check` and the startup log.
    pub fn summary(&self) -> String {
        format!(
            "{} {} → {}, sessions {}, max {} sessions, command timeout {}",
            self.agent_type,
            self.name,
            self.control_plane_url,
            if self.session_enabled {
                "enabled"
            } else {
                "disabled"
            },
            self.max_sessions,
            if self.command_timeout.is_zero() {
                "none".to_string()
            } else {
                duration::format(self.command_timeout)
            },
        )
    }
}

fn missing_type_message() -> String {
    "cannot tell the node type: set `type: gateway|hub|spoke|device`, or use the token the control plane issued \
     (it starts with gw_, hub_, spoke_ or dev_)"
        .into()
}

/// Turns a YAML/serde error into one line naming the file, line and key.
fn yaml_error(file: &str, text: &str, e: &yaml_serde::Error) -> ConfigError {
    let mut line = e.location().map(|l| l.line());
    let mut message = strip_marks(&e.to_string());
    let mut key = None;

    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default().to_string();
        message = format!(
            "unknown key {field:?} (expected one of: {})",
            KEYS.join(", ")
        );
        line = line_of_key(text, &field).or(line);
        key = Some(field);
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or_default().to_string();
        message = format!(
            "missing required key {field:?} (every config needs name, control_plane_url and token)"
        );
        // No line holds a missing key; point at the end of the file, where it would go.
        line = Some(text.lines().count().max(1));
        key = Some(field);
    } else if message.contains("expected struct Raw") {
        message = format!(
            "expected a mapping of keys ({}), e.g. `name: hub-1`",
            KEYS.join(", ")
        );
    } else if let Some((k, _)) = message.split_once(": ")
        && KEYS.contains(&k)
    {
        key = Some(k.to_string());
    }
    ConfigError {
        file: file.to_string(),
        line,
        key,
        message,
    }
}

/// Removes the parser's " at line L column C" (we print the line ourselves).
fn strip_marks(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + " at line ".len()..];
        let skip = tail
            .split_once(" column ")
            .filter(|(l, _)| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
            .map(|(l, c)| {
                l.len() + " column ".len() + c.bytes().take_while(u8::is_ascii_digit).count()
            });
        match skip {
            Some(n) => rest = &tail[n..],
            None => {
                out.push_str(" at line ");
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The 1-based line of a top-level `key:` in the file.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

// ---- value checks ----
//
// Each check runs inside a serde visitor: the YAML parser attaches the value's
// line and key only to errors raised there, not to errors raised after the
// value has been read.

/// One YAML value as a check sees it.
enum Scalar {
    Str(String),
    Bool(bool),
    Int(i128),
    Float(f64),
    Null,
    List,
    Map,
}

impl Scalar {
    fn describe(&self) -> String {
        match self {
            Scalar::Str(s) => format!("{s:?}"),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Null => "nothing".into(),
            Scalar::List => "a list".into(),
            Scalar::Map => "a mapping".into(),
        }
    }

    /// The value as text: numbers are accepted where text is expected (`name: 123`).
    fn text(self, what: &str) -> Result<String, String> {
        match self {
            Scalar::Str(s) => Ok(s),
            Scalar::Int(n) => Ok(n.to_string()),
            Scalar::Float(f) => Ok(f.to_string()),
            other => Err(format!("expected {what}, found {}", other.describe())),
        }
    }
}

struct Check<F> {
    expecting: &'static str,
    check: F,
}

impl<'de, T, F: FnOnce(Scalar) -> Result<T, String>> Visitor<'de> for Check<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        (self.check)(Scalar::Bool(v)).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        (self.check)(Scalar::Int(v.into())).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.check)(Scalar::Int(v.into())).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.check)(Scalar::Float(v)).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.check)(Scalar::Str(v.to_string())).map_err(E::custom)
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        (self.check)(Scalar::Null).map_err(E::custom)
    }
    fn visit_none<E: de::Error>(self) -> Result<T, E> {
        (self.check)(Scalar::Null).map_err(E::custom)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        (self.check)(Scalar::List).map_err(A::Error::custom)
    }
    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<T, A::Error> {
        (self.check)(Scalar::Map).map_err(A::Error::custom)
    }
}

fn check<'de, D, T>(
    d: D,
    expecting: &'static str,
    check: impl FnOnce(Scalar) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    d.deserialize_any(Check { expecting, check })
}

fn de_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    check(d, "a node name", |v| {
        let s = v.text("the node name (e.g. hub-1)")?;
        names::validate("node name", &s)?;
        Ok(s)
    })
}

fn de_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    check(d, "a URL", |v| {
        let s = v.text("a URL such as https://vpn.company.com")?;
        transport::Endpoint::parse(&s).map_err(|e| e.to_string())?;
        Ok(s)
    })
}

fn de_token<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    check(d, "a token", |v| {
        let s = v.text("the token the control plane issued for this node")?;
        if s.trim().is_empty() {
            return Err(
                "must not be empty: paste the token the control plane issued for this node".into(),
            );
        }
        // It goes into an HTTP header; anything else would fail there, less clearly.
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "contains spaces or control characters; paste the token exactly as issued".into(),
            );
        }
        Ok(s)
    })
}

fn de_type<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AgentType>, D::Error> {
    check(d, "a node type", |v| {
        let s = v.text("gateway, hub, spoke or device")?;
        AgentType::parse(&s)
            .map(Some)
            .ok_or_else(|| format!("expected gateway, hub, spoke or device, found {s:?}"))
    })
}

fn de_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    check(d, "true or false", |v| match v {
        Scalar::Bool(b) => Ok(b),
        _ => Err("expected true or false".into()),
    })
}

fn de_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    check(d, "a string", |v| {
        let s = v.text("a string")?;
        if s.is_empty() {
            return Err("must not be empty (remove the key to use the default)".into());
        }
        Ok(Some(s))
    })
}

fn de_absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    check(d, "an absolute path", |v| {
        let s = v.text("an absolute path such as /bin/bash")?;
        if s.is_empty() {
            return Err("must not be empty (remove the key to use the default)".into());
        }
        // Run from the user's home directory: a relative path would mean
        // something else there than it seems to here.
        if !s.starts_with('/') {
            return Err(format!(
                "must be an absolute path such as /bin/bash, found {s:?}"
            ));
        }
        if s.contains('\0') {
            return Err("must not contain a NUL character".into());
        }
        Ok(Some(PathBuf::from(s)))
    })
}

fn de_max_sessions<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    check(d, "a number of sessions", |v| match v {
        Scalar::Int(n) if (1..=MAX_SESSIONS_LIMIT as i128).contains(&n) => Ok(Some(n as u32)),
        other => Err(format!(
            "expected a whole number from 1 to {MAX_SESSIONS_LIMIT}, found {}",
            other.describe()
        )),
    })
}

fn duration_of(v: Scalar) -> Result<Duration, String> {
    match v {
        Scalar::Int(n) => u64::try_from(n).map(Duration::from_secs).map_err(|_| {
            format!("invalid duration {n}: use e.g. 500ms, 60s, 30m, 2h (0 for none)")
        }),
        Scalar::Str(s) => duration::parse(&s),
        other => Err(format!(
            "expected a duration such as 60s, found {}",
            other.describe()
        )),
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    check(d, "a duration", |v| duration_of(v).map(Some))
}

fn de_positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    check(d, "a duration", |v| match duration_of(v)? {
        d if d.is_zero() => Err("must be longer than zero".into()),
        d => Ok(Some(d)),
    })
}

fn de_log_level<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    check(d, "a log level", |v| {
        let s = v.text("a log level")?;
        let bad = |detail: String| {
            format!("invalid log level {s:?}{detail}: use error, warn, info, debug or trace")
        };
        // A bare word would parse as a target filter and silence every log: only
        // level names may stand alone; `target=level` lists are for experts.
        if s.contains(['=', ',']) {
            tracing_subscriber::EnvFilter::try_new(&s).map_err(|e| bad(format!(" ({e})")))?;
        } else if !LEVELS.contains(&s.to_ascii_lowercase().as_str()) {
            return Err(bad(String::new()));
        }
        Ok(Some(s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB: &str = "/etc/gatekey/hub.yaml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, Path::new(HUB))
    }

    fn err(text: &str) -> ConfigError {
        parse(text).expect_err("config should be rejected")
    }

    #[test]
    fn documented_gateway_config() {
        let c = Config::from_yaml(
            "# /etc/gatekey/gateway.yaml\nname: gateway-1\ncontrol_plane_url: https://vpn.company.com\ntoken: gw_xxxxx\n\nsession_enabled: true\n",
            Path::new("/etc/gatekey/gateway.yaml"),
        )
        .unwrap();
        assert_eq!(c.name, "gateway-1");
        assert_eq!(c.agent_type, AgentType::Gateway);
        assert_eq!(c.token, "gw_xxxxx");
        assert!(c.session_enabled);
        assert_eq!(
            (
                c.endpoint().unwrap().host.as_str(),
                c.endpoint().unwrap().port
            ),
            ("vpn.company.com", 443)
        );
        // Defaults.
        assert_eq!(c.command_timeout, Duration::from_secs(60));
        assert_eq!(c.max_sessions, 32);
        assert_eq!(c.shell, PathBuf::from("/bin/sh"));
        assert_eq!(c.console_shell, None);
        assert_eq!(c.reconnect_max_backoff, Duration::from_secs(60));
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.kill_grace, Duration::from_secs(2));
        assert_eq!(c.exit_drain_timeout, Duration::from_secs(2));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.ca_cert, None);
        assert_eq!(c.hub_endpoint, None);
    }

    #[test]
    fn documented_hub_config() {
        let c = parse("# /etc/gatekey/hub.yaml\nname: hub-1\ncontrol_plane_url: https://vpn.company.com\ntoken: hub_xxxxx\n\nsession_enabled: true\n")
            .unwrap();
        assert_eq!(c.name, "hub-1");
        assert_eq!(c.agent_type, AgentType::Hub);
        assert!(c.session_enabled);
    }

    #[test]
    fn documented_spoke_config() {
        let c = Config::from_yaml(
            "# /etc/gatekey/spoke.yaml\nname: spoke-datacenter\ncontrol_plane_url: https://vpn.company.com\nhub_endpoint: hub.example.com:1194\ntoken: spoke_xxxxx\n\nsession_enabled: true\n",
            Path::new("/etc/gatekey/spoke.yaml"),
        )
        .unwrap();
        assert_eq!(c.name, "spoke-datacenter");
        assert_eq!(c.agent_type, AgentType::Spoke);
        assert_eq!(c.hub_endpoint.as_deref(), Some("hub.example.com:1194"));
        assert!(c.session_enabled);
    }

    #[test]
    fn sessions_are_opt_in() {
        let c = parse("name: hub-1\ncontrol_plane_url: https://vpn.company.com\ntoken: hub_x\n")
            .unwrap();
        assert!(!c.session_enabled);
    }

    #[test]
    fn type_inferred_from_token_prefix() {
        for (token, t) in [
            ("gw_a", "gateway"),
            ("hub_a", "hub"),
            ("spoke_a", "spoke"),
            ("dev_a", "device"),
        ] {
            let c = parse(&format!(
                "name: n1\ncontrol_plane_url: https://cp\ntoken: {token}\n"
            ))
            .unwrap();
            assert_eq!(c.agent_type.as_str(), t, "token {token}");
        }
        // An explicit type serves tokens without a known prefix.
        let c = parse("name: n1\ncontrol_plane_url: https://cp\ntoken: legacy123\ntype: spoke\n")
            .unwrap();
        assert_eq!(c.agent_type, AgentType::Spoke);
        assert_eq!(c.token, "legacy123");
    }

    #[test]
    fn no_type_and_no_prefix_is_an_error_at_the_token_line() {
        let e = err("name: n1\ncontrol_plane_url: https://cp\ntoken: abc\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("token"));
        assert!(
            e.to_string()
                .starts_with("/etc/gatekey/hub.yaml:3: cannot tell the node type"),
            "{e}"
        );
    }

    #[test]
    fn type_contradicting_token_is_an_error() {
        let e = err("name: n1\ncontrol_plane_url: https://cp\ntoken: gw_abc\ntype: hub\n");
        assert_eq!(e.line, Some(4));
        assert!(e.message.contains("gateway token"), "{e}");
    }

    #[test]
    fn optional_keys() {
        let c = parse(
            "name: n1\ncontrol_plane_url: https://cp.example:8443/\ntoken: dev_a\ncommand_timeout: 0\nmax_sessions: 4\nshell: /bin/bash\n\
             console_shell: /bin/zsh\nreconnect_max_backoff: 5m\nconnect_timeout: 3s\nkill_grace: 500ms\nexit_drain_timeout: 1s\nlog_level: info,gatekey_agent=debug\n",
        )
        .unwrap();
        assert_eq!(c.command_timeout, Duration::ZERO);
        assert_eq!(c.max_sessions, 4);
        assert_eq!(c.shell, PathBuf::from("/bin/bash"));
        assert_eq!(c.console_shell, Some(PathBuf::from("/bin/zsh")));
        assert_eq!(c.reconnect_max_backoff, Duration::from_secs(300));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.kill_grace, Duration::from_millis(500));
        assert_eq!(c.exit_drain_timeout, Duration::from_secs(1));
        assert_eq!(c.log_level, "info,gatekey_agent=debug");
        assert_eq!(c.endpoint().unwrap().port, 8443);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err(
            "name: hub-1\ncontrol_plane_url: https://vpn.company.com\nsesion_enabled: true\ntoken: hub_x\n",
        );
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("sesion_enabled"));
        let s = e.to_string();
        assert!(
            s.starts_with(r#"/etc/gatekey/hub.yaml:3: unknown key "sesion_enabled" (expected one of: name, control_plane_url, token, "#),
            "{s}"
        );
        assert!(!s.contains('\n'));
    }

    #[test]
    fn wrong_type_names_file_line_and_key() {
        let e = err(
            "name: hub-1\ncontrol_plane_url: https://vpn.company.com\ntoken: hub_x\n\nsession_enabled: yes please\n",
        );
        assert_eq!(
            e.to_string(),
            "/etc/gatekey/hub.yaml:5: session_enabled: expected true or false"
        );
        assert_eq!(e.key.as_deref(), Some("session_enabled"));

        let e =
            err("name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nmax_sessions: lots\n");
        assert_eq!(e.line, Some(4));
        assert!(
            e.to_string()
                .contains("max_sessions: expected a whole number"),
            "{e}"
        );

        let e = err("name: hub-1\ncontrol_plane_url: https://cp\ntoken: [a, b]\n");
        assert_eq!(e.line, Some(3));
        assert!(e.to_string().contains("token: expected the token"), "{e}");
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        let cases = [
            (
                "name: -hub\ncontrol_plane_url: https://cp\ntoken: hub_x\n",
                1,
                "name: node name \"-hub\" must start with a letter or digit",
            ),
            (
                "name: hub-1\ncontrol_plane_url: http://cp\ntoken: hub_x\n",
                2,
                "control_plane_url: invalid control plane URL",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\ncommand_timeout: 10x\n",
                4,
                "command_timeout: invalid duration",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\ntype: router\n",
                4,
                "type: expected gateway, hub, spoke or device",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nconnect_timeout: 0\n",
                4,
                "connect_timeout: must be longer than zero",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nlog_level: verbose\n",
                4,
                "log_level: invalid log level \"verbose\": use error",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nlog_level: gatekey=loud\n",
                4,
                "log_level: invalid log level",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nmax_sessions: 0\n",
                4,
                "max_sessions: expected a whole number",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nconsole_shell: bash\n",
                4,
                "console_shell: must be an absolute path such as /bin/bash, found \"bash\"",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\n\nconsole_shell: \"\"\n",
                5,
                "console_shell: must not be empty",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nconsole_shell: [/bin/sh]\n",
                4,
                "console_shell: expected an absolute path such as /bin/bash, found a list",
            ),
            (
                "name: hub-1\ncontrol_plane_url: https://cp\ntoken: hub_x\nca_cert: /nonexistent/ca.pem\n",
                4,
                "ca_cert: cannot read CA certificate /nonexistent/ca.pem",
            ),
        ];
        for (text, line, want) in cases {
            let e = err(text);
            let s = e.to_string();
            assert!(
                s.starts_with(&format!("{HUB}:{line}: {want}")),
                "got {s:?}, want {want:?} at line {line}"
            );
            assert!(!s.contains('\n'), "{s}");
            assert!(!s.contains(" at line "), "{s}");
        }
    }

    #[test]
    fn missing_required_key_names_file_and_key() {
        let e = err("name: hub-1\ncontrol_plane_url: https://cp\nsession_enabled: true\n");
        assert_eq!(e.key.as_deref(), Some("token"));
        assert_eq!(
            e.to_string(),
            "/etc/gatekey/hub.yaml:3: missing required key \"token\" (every config needs name, control_plane_url and token)"
        );
        let e = err("control_plane_url: https://cp\ntoken: hub_x\n");
        assert_eq!(e.key.as_deref(), Some("name"));
    }

    #[test]
    fn empty_and_malformed_files() {
        let e = err("# nothing here\n\n");
        assert_eq!(
            e.to_string(),
            "/etc/gatekey/hub.yaml: the file is empty: set at least name, control_plane_url and token"
        );
        let e = err("just a string\n");
        assert!(e.to_string().contains("expected a mapping of keys"), "{e}");
        let e = err("name: hub-1\ncontrol_plane_url: [https://cp\ntoken: hub_x\n");
        assert!(e.to_string().starts_with("/etc/gatekey/hub.yaml:"), "{e}");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn relative_ca_cert_is_next_to_the_config() {
        let dir = std::env::temp_dir().join(format!("gatekey-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Any syntactically valid PEM certificate block will do for loading.
        std::fs::write(
            dir.join("ca.pem"),
            "-----BEGIN CERTIFICATE-----\nMAo=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let c = Config::from_yaml(
            "name: n\ncontrol_plane_url: https://cp\ntoken: gw_x\nca_cert: ca.pem\n",
            &dir.join("agent.yaml"),
        )
        .unwrap();
        assert_eq!(c.ca_cert, Some(dir.join("ca.pem")));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn debug_output_hides_the_token() {
        let c = Config::new("n", "https://cp", "gw_secret").unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn strip_marks_removes_positions_only() {
        assert_eq!(strip_marks("x at line 3 column 7"), "x");
        assert_eq!(
            strip_marks("x at line 3 column 7, y at line 2 column 1"),
            "x, y"
        );
        assert_eq!(strip_marks("look at line noise"), "look at line noise");
    }
}
