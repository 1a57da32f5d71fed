//! The admin API's objects (docs/api.md), as the client reads and writes
//! them. Unknown fields are kept in `extra` so `-o json` shows everything
//! a newer server sends.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A node as the agent registry sees it (`GET /api/v1/agents`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    /// `gateway`, `hub`, `spoke` or `device`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub connected: bool,
    /// RFC 3339.
    #[serde(default)]
    pub connected_at: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub remote_addr: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// The effective switch: node config and control plane both allow sessions.
    #[serde(default)]
    pub session_enabled: bool,
    /// The node's own `session_enabled`; `None` while it never connected.
    #[serde(default)]
    pub session_enabled_agent: Option<bool>,
    #[serde(default)]
    pub session_enabled_control_plane: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A registered node (`/api/v1/gateways`, `/api/v1/mesh/hubs`, …).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The control plane's switch for this node.
    #[serde(default)]
    pub session_enabled: bool,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub last_seen: Option<String>,
    /// Only in the answer to `create`: the agent's token, shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The four kinds of node, each with its own API path and CLI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeType {
    Gateway,
    Hub,
    Spoke,
    Device,
}

impl NodeType {
    pub const ALL: [NodeType; 4] = [
        NodeType::Gateway,
        NodeType::Hub,
        NodeType::Spoke,
        NodeType::Device,
    ];

    /// The API collection path.
    pub fn path(self) -> &'static str {
        match self {
            NodeType::Gateway => "/api/v1/gateways",
            NodeType::Hub => "/api/v1/mesh/hubs",
            NodeType::Spoke => "/api/v1/mesh/spokes",
            NodeType::Device => "/api/v1/devices",
        }
    }

    /// The `type` field's value.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeType::Gateway => "gateway",
            NodeType::Hub => "hub",
            NodeType::Spoke => "spoke",
            NodeType::Device => "device",
        }
    }

    /// The CLI command that manages this type (`mesh hub`, …).
    pub fn command(self) -> &'static str {
        match self {
            NodeType::Gateway => "gateway",
            NodeType::Hub => "mesh hub",
            NodeType::Spoke => "mesh spoke",
            NodeType::Device => "device",
        }
    }

    /// Where the agent's config lives on the node.
    pub fn config_file(self) -> &'static str {
        match self {
            NodeType::Gateway => "/etc/gatekey/gateway.yaml",
            NodeType::Hub => "/etc/gatekey/hub.yaml",
            NodeType::Spoke => "/etc/gatekey/spoke.yaml",
            NodeType::Device => "/etc/gatekey/device.yaml",
        }
    }

    pub fn parse(s: &str) -> Option<NodeType> {
        NodeType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for NodeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /api/v1/agents/{ref}/exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// A shell command line, run as `/bin/sh -c` on the node.
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Text fed to the command's stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// The answer to a one-shot exec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// A live exec or console session (`GET /api/v1/sessions`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveSession {
    /// `s_…`; what `session kill` takes.
    pub id: String,
    /// The agent's name.
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub agent_id: String,
    /// `console` or `exec`.
    #[serde(default)]
    pub kind: String,
    /// `exclusive` or `shared` (more than one participant).
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub participants: Vec<Participant>,
    /// RFC 3339.
    #[serde(default)]
    pub started_at: Option<String>,
    /// Client input, in bytes.
    #[serde(default)]
    pub bytes_in: u64,
    /// Output, in bytes (counted once, however many watch).
    #[serde(default)]
    pub bytes_out: u64,
    /// The command line of an exec session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl LiveSession {
    /// The users in the session: `users`, else the participants' names.
    pub fn user_names(&self) -> Vec<&str> {
        if !self.users.is_empty() {
            return self.users.iter().map(String::as_str).collect();
        }
        let mut names: Vec<&str> = Vec::new();
        for p in &self.participants {
            if !names.contains(&p.user.as_str()) {
                names.push(&p.user);
            }
        }
        names
    }
}

/// One client attached to a live session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    pub user: String,
    /// `interactive` or `observe`.
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub remote_addr: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub joined_at: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `{"sessions": [...]}`, the answer of `GET /api/v1/sessions`.
#[derive(Debug, Deserialize)]
pub(crate) struct Sessions {
    #[serde(default)]
    pub sessions: Vec<LiveSession>,
}

/// `GET /api/v1/replicas`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Replicas {
    pub installation: String,
    pub items: Vec<Replica>,
}

/// One control-plane replica, as the one answering hears it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Replica {
    pub id: String,
    /// The replica that answered.
    #[serde(default)]
    pub this: bool,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub protocol: u32,
    /// Agent links it holds; absent for keys limited by scopes.
    #[serde(default)]
    pub agents: Option<u64>,
    #[serde(default)]
    pub last_heard_ms: u64,
}

/// `GET /api/v1/version`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerVersion {
    pub version: String,
    /// Oldest and newest agent-link protocol versions the server speaks.
    #[serde(default)]
    pub link_protocol: Vec<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A user's role (docs/api.md "Users, roles and scopes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    // Everything.
    Admin,
    // Lists; sessions on nodes in its scope.
    Operator,
    // Lists and the audit log.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user (`/api/v1/users`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    #[serde(default)]
    pub id: String,
    pub name: String,
    /// `admin`, `operator` or `viewer`.
    #[serde(default)]
    pub role: String,
    /// Node scopes (`spoke:dc-*`, `control-plane`); empty: unrestricted.
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub has_password: bool,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub updated_at: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An API key (`/api/v1/apikeys`); the secret itself only in the answer
/// that created it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    /// `k_…`; what `apikey revoke` takes.
    pub id: String,
    /// The owner's name.
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub name: String,
    /// The key's first characters (`gka_1a2b…`), to recognise it.
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub revoked_at: Option<String>,
    #[serde(default)]
    pub last_used_at: Option<String>,
    /// Only in the answer to create and login: the key, shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ApiKey {
    /// `revoked`, `expired` or `active` at `now`.
    pub fn status(&self, now: time::OffsetDateTime) -> &'static str {
        let parse = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        };
        if self.revoked_at.as_deref().is_some_and(|t| !t.is_empty()) {
            "revoked"
        } else if self
            .expires_at
            .as_deref()
            .and_then(parse)
            .is_some_and(|t| t <= now)
        {
            "expired"
        } else {
            "active"
        }
    }
}

/// `GET /api/v1/whoami`: the caller and the key it used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Whoami {
    pub user: User,
    pub key: ApiKey,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One record of the audit log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    /// RFC 3339, milliseconds.
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub action: String,
    /// `ok`, `denied` or `failed`.
    #[serde(default)]
    pub outcome: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub remote_addr: Option<String>,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Free-form, per action (command, exit code, …).
    #[serde(default)]
    pub detail: Value,
    #[serde(default)]
    pub prev_hash: String,
    #[serde(default)]
    pub hash: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One page of `GET /api/v1/audit`, newest first.
#[derive(Debug, Deserialize)]
pub struct AuditPage {
    pub items: Vec<AuditRecord>,
    /// Pass as `before` for the next (older) page; `None` at the end.
    #[serde(default)]
    pub next_before: Option<i64>,
}

/// `GET /api/v1/audit/verify`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditVerification {
    pub ok: bool,
    #[serde(default)]
    pub records: u64,
    #[serde(default)]
    pub first_seq: Option<i64>,
    #[serde(default)]
    pub last_seq: Option<i64>,
    #[serde(default)]
    pub head_hash: String,
    /// Where the chain starts after retention removed older records.
    #[serde(default)]
    pub anchor: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_bad_seq: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `{"items": [...]}`, the shape of every list answer.
#[derive(Debug, Deserialize)]
pub(crate) struct Items<T> {
    pub items: Vec<T>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_round_trips_unknown_fields() {
        let raw = r#"{"id":"a1b2c3d4","name":"hub-1","type":"hub","connected":true,
            "connected_at":"2024-01-15T10:30:45Z","last_seen":"2024-01-15T10:30:45Z",
            "remote_addr":"10.0.0.7:53122","version":"0.1.0","hostname":"hub-1.local",
            "session_enabled":true,"session_enabled_agent":null,"session_enabled_control_plane":true,
            "labels":{"site":"dc1"}}"#;
        let agent: Agent = serde_json::from_str(raw).unwrap();
        assert_eq!(agent.kind, "hub");
        assert_eq!(agent.session_enabled_agent, None);
        let back = serde_json::to_value(&agent).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(raw).unwrap());
    }

    #[test]
    fn live_sessions_round_trip() {
        let raw = r#"{"id":"s_3f9c","agent":"hub-1","agent_id":"a1b2c3d4","kind":"console","mode":"shared",
            "users":["admin","bob"],
            "participants":[{"user":"admin","mode":"interactive","remote_addr":"10.0.0.5:51234","joined_at":"2026-11-22T21:40:00Z"},
                            {"user":"bob","mode":"observe","remote_addr":"10.0.0.7:40100","joined_at":"2026-11-22T21:41:02Z","new":1}],
            "started_at":"2026-11-22T21:40:00Z","bytes_in":120,"bytes_out":48213,"tty":true}"#;
        let s: LiveSession = serde_json::from_str(raw).unwrap();
        assert_eq!(s.participants[1].mode, "observe");
        assert_eq!(s.user_names(), ["admin", "bob"]);
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(raw).unwrap());

        // A minimal record, users from the participants.
        let s: LiveSession = serde_json::from_str(
            r#"{"id":"s_1","kind":"exec","command":"ls","participants":[{"user":"a"},{"user":"a"},{"user":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(s.user_names(), ["a", "b"]);
        assert_eq!(s.command.as_deref(), Some("ls"));
    }

    #[test]
    fn identity_objects_round_trip() {
        let raw = r#"{"id":"k_1","user":"bob","name":"laptop","prefix":"gka_1a2b","scopes":[],
            "created_at":"2026-11-01T10:00:00Z","expires_at":null,"revoked_at":null,"last_used_at":null,
            "kind":"api","key":"gka_1a2bsecret"}"#;
        let k: ApiKey = serde_json::from_str(raw).unwrap();
        assert_eq!(k.key.as_deref(), Some("gka_1a2bsecret"));
        let back = serde_json::to_value(&k).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(raw).unwrap());
        let now = time::OffsetDateTime::now_utc();
        assert_eq!(k.status(now), "active");
        let expired = ApiKey {
            expires_at: Some("2020-01-01T00:00:00Z".into()),
            ..k.clone()
        };
        assert_eq!(expired.status(now), "expired");
        let revoked = ApiKey {
            revoked_at: Some("2026-11-02T00:00:00Z".into()),
            ..expired
        };
        assert_eq!(revoked.status(now), "revoked");
        assert_eq!(serde_json::to_value(Role::Operator).unwrap(), "operator");
    }

    #[test]
    fn node_types() {
        for t in NodeType::ALL {
            assert_eq!(NodeType::parse(t.as_str()), Some(t));
        }
        assert_eq!(NodeType::Spoke.path(), "/api/v1/mesh/spokes");
        assert_eq!(NodeType::Hub.command(), "mesh hub");
    }
}

/// `GET /api/v1/troubleshoot`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TroubleshootList {
    pub tools: Vec<TroubleshootTool>,
    pub locations: Vec<TroubleshootLocation>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TroubleshootTool {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TroubleshootLocation {
    /// What `--location` takes: `control-plane` or `TYPE:ID`.
    pub location: String,
    pub label: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}
