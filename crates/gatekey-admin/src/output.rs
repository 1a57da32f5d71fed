//! How results are shown: aligned tables for people (`-o table`, the
//! default), JSON or YAML of the API's objects for scripts.

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use serde_json::Value;

use crate::api::{Agent, ApiKey, AuditRecord, LiveSession, Node, User};
use crate::error::ClientError;

/// `-o/--output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
    Yaml,
}

/// A plain-text table: a header row, a row of dashes as wide as each column,
/// then the rows; columns separated by one space, the last one not padded.
/// A column is as wide as its header, its longest value, and its minimum
/// width, whichever is largest.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    min_widths: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns `(header, minimum width)`.
    pub fn new(columns: &[(&str, usize)]) -> Table {
        Table {
            headers: columns.iter().map(|(h, _)| h.to_string()).collect(),
            min_widths: columns.iter().map(|(_, w)| *w).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| {
                let longest = self.rows.iter().map(|r| width(&r[i])).max().unwrap_or(0);
                longest.max(width(&self.headers[i])).max(self.min_widths[i])
            })
            .collect();
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = String::new();
        for row in std::iter::once(&self.headers)
            .chain(std::iter::once(&dashes))
            .chain(&self.rows)
        {
            let last = row.len() - 1;
            for (i, cell) in row.iter().enumerate() {
                if i == last {
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.extend(std::iter::repeat_n(' ', widths[i] - width(cell) + 1));
                }
            }
            out.push('\n');
        }
        out
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, as the tables show times; an unparsable
/// value is shown as it came, a missing one as `-`.
pub fn format_time(rfc3339: Option<&str>) -> String {
    let Some(text) = rfc3339.filter(|t| !t.is_empty()) else {
        return "-".into();
    };
    let shown = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&shown).ok())
        .unwrap_or_else(|| text.to_string())
}

/// `YYYY-MM-DD HH:MM UTC`, for expiries; an unparsable value as it came.
pub fn format_minute(rfc3339: &str) -> String {
    let shown = format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    OffsetDateTime::parse(rfc3339, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&shown).ok())
        .unwrap_or_else(|| rfc3339.to_string())
}

/// A scope list for people: comma-separated, or `all nodes` when empty.
pub fn scopes_text(scopes: &[String]) -> String {
    if scopes.is_empty() {
        "all nodes".into()
    } else {
        scopes.join(",")
    }
}

/// The table of `user list`.
pub fn users_table(users: &[User]) -> String {
    let mut table = Table::new(&[
        ("NAME", 0),
        ("ROLE", 8),
        ("SCOPES", 0),
        ("PASSWORD", 0),
        ("CREATED", 19),
    ]);
    for u in users {
        table.push(vec![
            u.name.clone(),
            u.role.clone(),
            scopes_text(&u.scopes),
            if u.has_password { "yes" } else { "no" }.into(),
            format_time(u.created_at.as_deref()),
        ]);
    }
    table.render()
}

/// The table of `replica list`: the answering replica marked `*`, then
/// the installation id.
pub fn replicas_table(replicas: &crate::api::Replicas) -> String {
    let mut table = Table::new(&[
        ("REPLICA", 0),
        ("VERSION", 0),
        ("PROTOCOL", 0),
        ("AGENTS", 0),
        ("LAST HEARD", 0),
    ]);
    for r in &replicas.items {
        table.push(vec![
            if r.this {
                format!("{} *", r.id)
            } else {
                r.id.clone()
            },
            if r.version.is_empty() {
                "-".into()
            } else {
                r.version.clone()
            },
            r.protocol.to_string(),
            r.agents.map_or("-".into(), |n| n.to_string()),
            if r.this {
                "-".into()
            } else {
                format!("{:.1}s ago", r.last_heard_ms as f64 / 1000.0)
            },
        ]);
    }
    format!(
        "{}\ninstallation {}\n",
        table.render(),
        replicas.installation
    )
}

/// The table of `apikey list`; STATUS as of `now`.
pub fn api_keys_table(keys: &[ApiKey], now: OffsetDateTime) -> String {
    let mut table = Table::new(&[
        ("ID", 0),
        ("USER", 0),
        ("NAME", 0),
        ("PREFIX", 0),
        ("CREATED", 19),
        ("EXPIRES", 19),
        ("LAST USED", 19),
        ("STATUS", 0),
    ]);
    let or_never = |t: &Option<String>| match t.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => format_time(Some(t)),
        None => "never".into(),
    };
    for k in keys {
        table.push(vec![
            k.id.clone(),
            or_dash(&k.user),
            or_dash(&k.name),
            or_dash(&k.prefix),
            format_time(k.created_at.as_deref()),
            or_never(&k.expires_at),
            or_never(&k.last_used_at),
            k.status(now).into(),
        ]);
    }
    table.render()
}

/// The table of `audit list`, one line per record.
pub fn audit_table(records: &[AuditRecord]) -> String {
    let mut table = Table::new(&[
        ("TIME", 19),
        ("ACTION", 0),
        ("USER", 0),
        ("AGENT", 0),
        ("OUTCOME", 0),
        ("DETAIL", 0),
    ]);
    for r in records {
        table.push(vec![
            format_time(Some(&r.time)),
            or_dash(&one_line(&r.action, 40)),
            or_dash(&one_line(r.user.as_deref().unwrap_or(""), 32)),
            or_dash(&one_line(r.agent.as_deref().unwrap_or(""), 32)),
            or_dash(&one_line(&r.outcome, 16)),
            or_dash(&detail_summary(&r.detail)),
        ]);
    }
    table.render()
}

/// Keys of an audit record's detail shown first, in this order; the rest
/// follow alphabetically.
const DETAIL_ORDER: [&str; 16] = [
    "kind",
    "command",
    "exit_code",
    "signal",
    "timed_out",
    "mode",
    "reason",
    "name",
    "id",
    "user",
    "role",
    "scopes",
    "changed",
    "duration_ms",
    "bytes_in",
    "bytes_out",
];
/// Longest value shown in a detail summary, and longest summary.
const DETAIL_VALUE_MAX: usize = 40;
const DETAIL_MAX: usize = 100;

/// An audit record's detail on one short line: `key=value` pairs, the
/// telling ones first (`kind=exec command="ip addr" exit=0 duration=12ms
/// out=1.4KiB`), long values cut with `…`.
pub fn detail_summary(detail: &Value) -> String {
    let map = match detail {
        Value::Null => return String::new(),
        Value::Object(map) => map,
        other => return one_line(&compact(other), DETAIL_MAX),
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| {
        (
            DETAIL_ORDER
                .iter()
                .position(|o| o == k)
                .unwrap_or(DETAIL_ORDER.len()),
            k.as_str(),
        )
    });
    let mut parts = Vec::new();
    for key in keys {
        let value = &map[key];
        let part = match (key.as_str(), value) {
            (_, Value::Null) => continue,
            ("exit_code", v) => format!("exit={}", compact(v)),
            ("duration_ms", Value::Number(n)) if n.as_u64().is_some() => format!(
                "duration={}",
                gatekey_proto::duration::format(std::time::Duration::from_millis(
                    n.as_u64().unwrap_or(0)
                ))
            ),
            ("bytes_in" | "bytes_out", Value::Number(n)) if n.as_u64().is_some() => format!(
                "{}={}",
                key.trim_start_matches("bytes_"),
                human_bytes(n.as_u64().unwrap_or(0)).replace(' ', "")
            ),
            (_, v) => format!("{key}={}", one_line(&compact(v), DETAIL_VALUE_MAX)),
        };
        parts.push(part);
    }
    one_line(&parts.join(" "), DETAIL_MAX)
}

/// A JSON value as a short token: strings bare unless they hold spaces,
/// quotes, `=` or control characters (then JSON-quoted, so one line).
fn compact(v: &Value) -> String {
    match v {
        Value::String(s)
            if !s.is_empty()
                && !s
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=') =>
        {
            s.clone()
        }
        Value::Array(items) if items.iter().all(|i| matches!(i, Value::String(_))) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// `s` on one line (control characters escaped), cut to `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let clean: String = if s.chars().any(char::is_control) {
        s.chars().flat_map(char::escape_default).collect()
    } else {
        s.to_string()
    };
    match clean.char_indices().nth(max) {
        Some((i, _)) => {
            let cut = clean[..i].char_indices().nth(max - 1).map_or(i, |(j, _)| j);
            format!("{}…", &clean[..cut])
        }
        None => clean,
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// Why sessions are (not) available on an agent, for `session list --all`.
pub fn session_state(agent: &Agent) -> &'static str {
    let agent_off = agent.session_enabled_agent == Some(false);
    let control_plane_off = !agent.session_enabled_control_plane;
    match (agent.session_enabled, agent_off, control_plane_off) {
        (true, _, _) => "enabled",
        (false, true, true) => "disabled (agent config, control plane)",
        (false, true, false) => "disabled (agent config)",
        (false, false, true) => "disabled (control plane)",
        (false, false, false) => "disabled",
    }
}

/// The agents table, in the documented layout; `with_sessions` adds the
/// Sessions column (for `session list --all`).
pub fn agents_table(agents: &[Agent], with_sessions: bool) -> String {
    let mut columns = vec![
        ("Agent ID", 11),
        ("Type", 9),
        ("Node Name", 17),
        ("Connected", 19),
    ];
    if with_sessions {
        columns.push(("Sessions", 0));
    }
    let mut table = Table::new(&columns);
    for a in agents {
        let mut row = vec![
            a.id.clone(),
            a.kind.clone(),
            a.name.clone(),
            format_time(a.connected_at.as_deref()),
        ];
        if with_sessions {
            row.push(session_state(a).to_string());
        }
        table.push(row);
    }
    table.render()
}

/// The nodes table of `gateway list`, `mesh hub list`, …
pub fn nodes_table(nodes: &[Node]) -> String {
    let mut table = Table::new(&[
        ("ID", 11),
        ("Name", 17),
        ("Sessions", 0),
        ("Connected", 0),
        ("Last Seen", 19),
    ]);
    for n in nodes {
        let last_seen = if n.last_seen.is_some() {
            format_time(n.last_seen.as_deref())
        } else {
            "never".into()
        };
        table.push(vec![
            n.id.clone(),
            n.name.clone(),
            if n.session_enabled { "on" } else { "off" }.into(),
            if n.connected { "yes" } else { "no" }.into(),
            last_seen,
        ]);
    }
    table.render()
}

/// The table of `session active`.
pub fn sessions_table(sessions: &[LiveSession]) -> String {
    let mut table = Table::new(&[
        ("ID", 0),
        ("AGENT", 0),
        ("KIND", 0),
        ("USERS", 0),
        ("MODE", 0),
        ("STARTED", 19),
        ("IN", 0),
        ("OUT", 0),
    ]);
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    for s in sessions {
        let agent = if s.agent.is_empty() {
            &s.agent_id
        } else {
            &s.agent
        };
        table.push(vec![
            s.id.clone(),
            or_dash(agent),
            or_dash(&s.kind),
            or_dash(&s.user_names().join(",")),
            or_dash(&s.mode),
            format_time(s.started_at.as_deref()),
            human_bytes(s.bytes_in),
            human_bytes(s.bytes_out),
        ]);
    }
    table.render()
}

/// A byte count for people: `512 B`, `1.5 KiB`, `47 KiB`, `3.2 MiB`; one
/// decimal below 10 of a unit, whole numbers above.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 9.95 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// Pretty JSON with a final newline.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, ClientError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| ClientError::Protocol(e.to_string()))?;
    text.push('\n');
    Ok(text)
}

pub fn to_yaml<T: Serialize + ?Sized>(value: &T) -> Result<String, ClientError> {
    yaml_serde::to_string(value).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// The JSON or YAML form of `value`; `None` for tables (the caller renders).
pub fn structured<T: Serialize + ?Sized>(
    format: OutputFormat,
    value: &T,
) -> Result<Option<String>, ClientError> {
    match format {
        OutputFormat::Table => Ok(None),
        OutputFormat::Json => to_json(value).map(Some),
        OutputFormat::Yaml => to_yaml(value).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, kind: &str, name: &str, at: &str) -> Agent {
        Agent {
            id: id.into(),
            name: name.into(),
            kind: kind.into(),
            connected: true,
            connected_at: Some(at.into()),
            session_enabled: true,
            session_enabled_agent: Some(true),
            session_enabled_control_plane: true,
            ..Default::default()
        }
    }

    #[test]
    fn agents_table_matches_the_documented_layout() {
        let agents = [
            agent("hub-1", "hub", "hub-1", "2024-01-15T10:30:45Z"),
            agent(
                "spoke-dc",
                "spoke",
                "spoke-datacenter",
                "2024-01-15T10:32:12Z",
            ),
            agent("gw-west", "gateway", "gateway-west", "2024-01-15T10:28:00Z"),
        ];
        let expected = "\
Agent ID    Type      Node Name         Connected
----------- --------- ----------------- -------------------
hub-1       hub       hub-1             2024-01-15 10:30:45
spoke-dc    spoke     spoke-datacenter  2024-01-15 10:32:12
gw-west     gateway   gateway-west      2024-01-15 10:28:00
";
        assert_eq!(agents_table(&agents, false), expected);
    }

    #[test]
    fn columns_grow_with_their_values() {
        let agents = [agent(
            "a-much-longer-id",
            "hub",
            "a-node-name-longer-than-17",
            "2024-01-15T11:30:45+01:00",
        )];
        let expected = "\
Agent ID         Type      Node Name                  Connected
---------------- --------- -------------------------- -------------------
a-much-longer-id hub       a-node-name-longer-than-17 2024-01-15 10:30:45
";
        assert_eq!(agents_table(&agents, false), expected);
    }

    #[test]
    fn all_agents_show_why_sessions_are_off() {
        let mut off_agent = agent("s1", "spoke", "s1", "2024-01-15T10:30:45Z");
        off_agent.session_enabled = false;
        off_agent.session_enabled_agent = Some(false);
        let mut off_cp = agent("g1", "gateway", "g1", "2024-01-15T10:30:45Z");
        off_cp.session_enabled = false;
        off_cp.session_enabled_control_plane = false;
        let table = agents_table(
            &[
                agent("h1", "hub", "h1", "2024-01-15T10:30:45Z"),
                off_agent,
                off_cp,
            ],
            true,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "Agent ID    Type      Node Name         Connected           Sessions"
        );
        assert_eq!(
            lines[1],
            "----------- --------- ----------------- ------------------- ------------------------"
        );
        assert!(lines[2].ends_with(" enabled"));
        assert!(lines[3].ends_with(" disabled (agent config)"));
        assert!(lines[4].ends_with(" disabled (control plane)"));
    }

    #[test]
    fn nodes_table_layout() {
        let nodes = [
            Node {
                id: "a1b2c3d4".into(),
                name: "hub-1".into(),
                kind: "hub".into(),
                session_enabled: true,
                connected: true,
                last_seen: Some("2024-01-15T10:30:45Z".into()),
                ..Default::default()
            },
            Node {
                id: "e5f6a7b8".into(),
                name: "hub-2".into(),
                kind: "hub".into(),
                ..Default::default()
            },
        ];
        let expected = "\
ID          Name              Sessions Connected Last Seen
----------- ----------------- -------- --------- -------------------
a1b2c3d4    hub-1             on       yes       2024-01-15 10:30:45
e5f6a7b8    hub-2             off      no        never
";
        assert_eq!(nodes_table(&nodes), expected);
    }

    #[test]
    fn human_byte_counts() {
        for (n, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (10 * 1024 - 1, "10 KiB"),
            (48213, "47 KiB"),
            (1024 * 1024 - 1, "1.0 MiB"),
            (3 * 1024 * 1024 + 200 * 1024, "3.2 MiB"),
            (5 << 30, "5.0 GiB"),
            (u64::MAX, "16 EiB"),
        ] {
            assert_eq!(human_bytes(n), want, "{n}");
        }
    }

    #[test]
    fn sessions_table_layout() {
        let sessions: Vec<LiveSession> = serde_json::from_value(serde_json::json!([
            {"id": "s_3f9c01", "agent": "hub-1", "agent_id": "a1b2c3d4", "kind": "console",
             "mode": "shared", "users": ["admin", "bob"], "started_at": "2026-11-22T21:40:00Z",
             "bytes_in": 120, "bytes_out": 48213},
            {"id": "s_77", "agent": "", "agent_id": "e5f6a7b8", "kind": "exec", "mode": "exclusive",
             "participants": [{"user": "ci", "mode": "interactive"}], "command": "ip addr",
             "bytes_in": 0, "bytes_out": 2_000_000},
        ]))
        .unwrap();
        let expected = "\
ID       AGENT    KIND    USERS     MODE      STARTED             IN    OUT
-------- -------- ------- --------- --------- ------------------- ----- -------
s_3f9c01 hub-1    console admin,bob shared    2026-11-22 21:40:00 120 B 47 KiB
s_77     e5f6a7b8 exec    ci        exclusive -                   0 B   1.9 MiB
";
        assert_eq!(sessions_table(&sessions), expected);
    }

    #[test]
    fn users_table_layout() {
        let users: Vec<User> = serde_json::from_value(serde_json::json!([
            {"id": "u_1", "name": "admin", "role": "admin", "scopes": [], "has_password": false,
             "created_at": "2026-11-01T10:00:00Z"},
            {"id": "u_2", "name": "bob", "role": "operator", "scopes": ["spoke:dc-*", "hub:*"],
             "has_password": true, "created_at": "2026-11-02T10:00:00Z"},
        ]))
        .unwrap();
        let expected = "\
NAME  ROLE     SCOPES           PASSWORD CREATED
----- -------- ---------------- -------- -------------------
admin admin    all nodes        no       2026-11-01 10:00:00
bob   operator spoke:dc-*,hub:* yes      2026-11-02 10:00:00
";
        assert_eq!(users_table(&users), expected);
    }

    #[test]
    fn api_keys_table_layout() {
        let keys: Vec<ApiKey> = serde_json::from_value(serde_json::json!([
            {"id": "k_1", "user": "bob", "name": "laptop", "prefix": "gka_k_1", "scopes": [],
             "created_at": "2026-11-01T10:00:00Z", "expires_at": "2026-12-01T10:00:00Z",
             "revoked_at": null, "last_used_at": "2026-11-02T09:00:00Z"},
            {"id": "k_2", "user": "bob", "name": "ci", "prefix": "gka_k_2", "scopes": [],
             "created_at": "2026-11-01T10:00:00Z", "expires_at": null,
             "revoked_at": "2026-11-03T10:00:00Z", "last_used_at": null},
            {"id": "k_3", "user": "alice", "name": "login", "prefix": "gka_k_3", "scopes": [],
             "created_at": "2026-11-01T10:00:00Z", "expires_at": "2026-11-01T22:00:00Z",
             "revoked_at": null, "last_used_at": null},
        ]))
        .unwrap();
        let now = OffsetDateTime::parse("2026-11-15T00:00:00Z", &Rfc3339).unwrap();
        let expected = "\
ID  USER  NAME   PREFIX  CREATED             EXPIRES             LAST USED           STATUS
--- ----- ------ ------- ------------------- ------------------- ------------------- -------
k_1 bob   laptop gka_k_1 2026-11-01 10:00:00 2026-12-01 10:00:00 2026-11-02 09:00:00 active
k_2 bob   ci     gka_k_2 2026-11-01 10:00:00 never               never               revoked
k_3 alice login  gka_k_3 2026-11-01 10:00:00 2026-11-01 22:00:00 never               expired
";
        assert_eq!(api_keys_table(&keys, now), expected);
    }

    #[test]
    fn audit_table_layout() {
        let records: Vec<AuditRecord> = serde_json::from_value(serde_json::json!([
            {"seq": 43, "time": "2026-11-23T10:00:01.123Z", "action": "session.closed", "outcome": "ok",
             "user": "bob", "agent": "hub-1", "session_id": "s_3f9c",
             "detail": {"kind": "exec", "command": "ip addr", "exit_code": 0, "duration_ms": 12,
                        "bytes_in": 0, "bytes_out": 1432}},
            {"seq": 42, "time": "2026-11-23T09:59:00Z", "action": "auth.failed", "outcome": "denied",
             "user": "mallory", "agent": null, "detail": {"reason": "invalid user or password", "client": "cli"}},
            {"seq": 41, "time": "2026-11-23T09:58:00Z", "action": "audit.pruned", "outcome": "ok",
             "detail": null},
        ]))
        .unwrap();
        let expected = "\
TIME                ACTION         USER    AGENT OUTCOME DETAIL
------------------- -------------- ------- ----- ------- -----------------------------------------------------------------
2026-11-23 10:00:01 session.closed bob     hub-1 ok      kind=exec command=\"ip addr\" exit=0 duration=12ms in=0B out=1.4KiB
2026-11-23 09:59:00 auth.failed    mallory -     denied  reason=\"invalid user or password\" client=cli
2026-11-23 09:58:00 audit.pruned   -       -     ok      -
";
        assert_eq!(audit_table(&records), expected);
    }

    #[test]
    fn detail_summaries_stay_on_one_short_line() {
        let long = "x".repeat(200);
        let summary = detail_summary(&serde_json::json!({
            "command": format!("echo {long}\nrm -rf /"), "mode": "shared",
            "scopes": ["spoke:dc-*", "hub:*"], "extra": {"a": 1}
        }));
        // Each value is cut on its own; a newline in it is escaped.
        assert_eq!(
            summary,
            "command=\"echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx… mode=shared scopes=spoke:dc-*,hub:* extra={\"a\":1}"
        );
        let escaped = detail_summary(&serde_json::json!({"command": "a\nb"}));
        assert_eq!(escaped, "command=\"a\\nb\"");
        // So is the whole line.
        let many: serde_json::Map<String, Value> = (0..10)
            .map(|i| (format!("key{i}"), Value::String("v".repeat(30))))
            .collect();
        let summary = detail_summary(&Value::Object(many));
        assert_eq!(summary.chars().count(), DETAIL_MAX, "{summary}");
        assert!(summary.ends_with('…'), "{summary}");
        assert_eq!(detail_summary(&serde_json::json!("text")), "text");
        assert_eq!(detail_summary(&Value::Null), "");
        assert_eq!(
            detail_summary(&serde_json::json!({"kind": "console", "exit_code": null, "signal": 9})),
            "kind=console signal=9"
        );
    }

    #[test]
    fn minutes_for_expiries() {
        assert_eq!(
            format_minute("2026-12-01T11:00:30+01:00"),
            "2026-12-01 10:00 UTC"
        );
        assert_eq!(format_minute("soon"), "soon");
    }

    #[test]
    fn times() {
        assert_eq!(
            format_time(Some("2024-01-15T10:30:45.123456Z")),
            "2024-01-15 10:30:45"
        );
        assert_eq!(
            format_time(Some("2024-01-15T12:30:45+02:00")),
            "2024-01-15 10:30:45"
        );
        assert_eq!(format_time(Some("yesterday")), "yesterday");
        assert_eq!(format_time(None), "-");
    }

    #[test]
    fn structured_output() {
        let a = agent("hub-1", "hub", "hub-1", "2024-01-15T10:30:45Z");
        let json = structured(OutputFormat::Json, &[&a]).unwrap().unwrap();
        let back: Vec<Agent> = serde_json::from_str(&json).unwrap();
        assert_eq!(back[0], a);
        let yaml = structured(OutputFormat::Yaml, &a).unwrap().unwrap();
        assert!(
            yaml.contains("id: hub-1") && yaml.contains("type: hub"),
            "{yaml}"
        );
        assert_eq!(structured(OutputFormat::Table, &a).unwrap(), None);
    }
}
