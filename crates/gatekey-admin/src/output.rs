//! How results are shown: aligned tables for people (`-o table`, the
//! default), JSON or YAML of the API's objects for scripts.

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::api::{Agent, LiveSession, Node};
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
