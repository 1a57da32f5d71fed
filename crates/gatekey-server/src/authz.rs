//! What a caller may do: roles, and scopes that limit a user or a key to
//! some nodes. Pure logic; the API calls it on every request.

use crate::store::NodeType;

/// A user's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Operator,
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => true,
            Role::Operator => matches!(action, List | Exec | Console | Troubleshoot | KillSession),
            Role::Viewer => matches!(action, List | ReadAudit),
        }
    }
}

/// Things a caller may be allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// See agents, nodes and live sessions (within scope).
    List,
    Exec,
    Console,
    Troubleshoot,
    KillSession,
    ManageNodes,
    ManageUsers,
    ReadAudit,
}

impl Action {
    /// The verb for refusal messages.
    pub fn verb(self) -> &'static str {
        match self {
            Action::List => "list",
            Action::Exec => "exec",
            Action::Console => "open a console",
            Action::Troubleshoot => "troubleshoot",
            Action::KillSession => "kill sessions",
            Action::ManageNodes => "manage nodes",
            Action::ManageUsers => "manage users and keys",
            Action::ReadAudit => "read the audit log",
        }
    }
}

/// One scope pattern: `TYPE:GLOB` or `control-plane`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Node {
        node_type: Option<NodeType>,
        glob: String,
    },
    ControlPlane,
}

/// The word for the control plane as a troubleshooting location and scope.
pub const CONTROL_PLANE: &str = "control-plane";

impl Scope {
    /// Parses a pattern; the error says what is expected.
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s == CONTROL_PLANE {
            return Ok(Scope::ControlPlane);
        }
        let bad = |why: &str| {
            format!(
                "invalid scope {s:?}: {why} (use TYPE:PATTERN with TYPE gateway, hub, spoke, device or *, e.g. spoke:dc-*, or control-plane)"
            )
        };
        let (t, glob) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let node_type = match t {
            "*" => None,
            t => Some(NodeType::parse(t).ok_or_else(|| bad("unknown node type"))?),
        };
        if glob.is_empty() || glob.len() > 128 {
            return Err(bad("empty or too long pattern"));
        }
        if !glob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.*?".contains(&b))
        {
            return Err(bad(
                "patterns use letters, digits, - _ . and the wildcards * ?",
            ));
        }
        Ok(Scope::Node {
            node_type,
            glob: glob.to_string(),
        })
    }

    fn reaches_node(&self, node_type: NodeType, name: &str) -> bool {
        match self {
            Scope::Node { node_type: t, glob } => {
                t.is_none_or(|t| t == node_type) && glob_match(glob.as_bytes(), name.as_bytes())
            }
            Scope::ControlPlane => false,
        }
    }
}

/// Parses a list of patterns.
pub fn parse_scopes(patterns: &[String]) -> Result<Vec<Scope>, String> {
    patterns.iter().map(|p| Scope::parse(p)).collect()
}

/// What a caller can reach: its user's scopes and its key's, both of which
/// must allow a target (an empty list allows everything).
#[derive(Clone, Debug, Default)]
pub struct Reach {
    pub user: Vec<Scope>,
    pub key: Vec<Scope>,
}

/// A target of an action.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    Node(NodeType, &'a str),
    ControlPlane,
}

impl Reach {
    pub fn allows(&self, target: Target<'_>) -> bool {
        let one = |scopes: &[Scope]| {
            scopes.is_empty()
                || scopes.iter().any(|s| match target {
                    Target::Node(t, name) => s.reaches_node(t, name),
                    Target::ControlPlane => *s == Scope::ControlPlane,
                })
        };
        one(&self.user) && one(&self.key)
    }

    pub fn unrestricted(&self) -> bool {
        self.user.is_empty() && self.key.is_empty()
    }
}

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matcher with one backtrack point: linear in practice, no recursion.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        for a in [
            Action::List,
            Action::Exec,
            Action::Console,
            Action::Troubleshoot,
            Action::KillSession,
            Action::ManageNodes,
            Action::ManageUsers,
            Action::ReadAudit,
        ] {
            assert!(Role::Admin.allows(a));
        }
        assert!(Role::Operator.allows(Action::Exec));
        assert!(!Role::Operator.allows(Action::ManageNodes));
        assert!(!Role::Operator.allows(Action::ReadAudit));
        assert!(Role::Viewer.allows(Action::ReadAudit));
        assert!(!Role::Viewer.allows(Action::Exec));
        assert!(!Role::Viewer.allows(Action::Console));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"dc-*", b"dc-1"));
        assert!(glob_match(b"dc-*", b"dc-"));
        assert!(!glob_match(b"dc-*", b"lab-1"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"h?b-*-x", b"hub-west-x"));
        assert!(!glob_match(b"h?b", b"hb"));
        assert!(glob_match(b"*a*b*c", b"xxaxxbxxc"));
        assert!(!glob_match(b"*a*b*c", b"xxaxxbxx"));
        assert!(glob_match(
            b"a*a*a*a*b",
            &[b'a'; 20].iter().chain(b"b").copied().collect::<Vec<_>>()
        ));
    }

    #[test]
    fn scopes() {
        assert!(Scope::parse("spoke:dc-*").is_ok());
        assert!(Scope::parse("*:*").is_ok());
        assert_eq!(Scope::parse("control-plane"), Ok(Scope::ControlPlane));
        for bad in ["spoke", "router:x", "hub:", "hub:a b", "hub:$(x)"] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        let reach = Reach {
            user: parse_scopes(&["spoke:dc-*".into(), "hub:*".into()]).unwrap(),
            key: vec![],
        };
        assert!(reach.allows(Target::Node(NodeType::Spoke, "dc-1")));
        assert!(reach.allows(Target::Node(NodeType::Hub, "hub-9")));
        assert!(!reach.allows(Target::Node(NodeType::Spoke, "lab-1")));
        assert!(!reach.allows(Target::Node(NodeType::Gateway, "dc-1")));
        assert!(!reach.allows(Target::ControlPlane));
        // A key narrows its user, never widens it.
        let narrowed = Reach {
            key: parse_scopes(&["*:dc-1".into()]).unwrap(),
            ..reach.clone()
        };
        assert!(narrowed.allows(Target::Node(NodeType::Spoke, "dc-1")));
        assert!(!narrowed.allows(Target::Node(NodeType::Spoke, "dc-2")));
        assert!(!narrowed.allows(Target::Node(NodeType::Hub, "hub-9")));
        let everything = Reach::default();
        assert!(everything.allows(Target::ControlPlane));
        assert!(everything.unrestricted());
    }
}
