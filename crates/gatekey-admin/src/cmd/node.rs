//! `gateway|mesh hub|mesh spoke|device create|list|get|update|delete`.

use serde::Serialize;

use crate::api::{Node, NodeType};
use crate::cli::{self, Context, NodeCommand};
use crate::error::ClientError;
use crate::exit;
use crate::output;

pub async fn run(ctx: &Context, kind: NodeType, command: NodeCommand) -> Result<i32, ClientError> {
    let client = ctx.client()?;
    match command {
        NodeCommand::Create { name, id, session } => {
            let node = client
                .create_node(kind, &name, id.as_deref(), session)
                .await?;
            match output::structured(ctx.output, &node)? {
                Some(text) => cli::print(&text)?,
                None => cli::print(&created_text(kind, &node, client.server())?)?,
            }
        }
        NodeCommand::List => {
            let nodes = client.list_nodes(kind).await?;
            match output::structured(ctx.output, &nodes)? {
                Some(text) => cli::print(&text)?,
                None if nodes.is_empty() => cli::warn(&format!("no {kind} is registered")),
                None => cli::print(&output::nodes_table(&nodes))?,
            }
        }
        NodeCommand::Get { id } => {
            let node = client.get_node(kind, &id).await?;
            match output::structured(ctx.output, &node)? {
                Some(text) => cli::print(&text)?,
                None => cli::print(&details_text(&node))?,
            }
        }
        NodeCommand::Update { id, session } => {
            let enabled = session.expect("clap requires --session");
            let node = client.update_node(kind, &id, enabled).await?;
            match output::structured(ctx.output, &node)? {
                Some(text) => cli::print(&text)?,
                None => cli::print(&format!(
                    "Remote sessions {} on {kind} {} ({}).\n",
                    if node.session_enabled {
                        "enabled"
                    } else {
                        "disabled"
                    },
                    node.name,
                    node.id
                ))?,
            }
        }
        NodeCommand::Delete { id } => {
            client.delete_node(kind, &id).await?;
            if ctx.output == output::OutputFormat::Table {
                cli::print(&format!(
                    "Deleted {kind} {id}; its agent is disconnected and its token no longer works.\n"
                ))?;
            }
        }
    }
    Ok(exit::OK)
}

/// What `create` prints for people: the token, once, and the agent config
/// to paste into the node's /etc/gatekey/<role>.yaml.
fn created_text(kind: NodeType, node: &Node, server: &str) -> Result<String, ClientError> {
    let Some(token) = node.token.as_deref() else {
        return Err(ClientError::Protocol(format!(
            "the control plane created {kind} {} but sent no token",
            node.id
        )));
    };
    #[derive(Serialize)]
    struct AgentConfig<'a> {
        name: &'a str,
        control_plane_url: &'a str,
        token: &'a str,
        session_enabled: bool,
    }
    // yaml_serde quotes values that would otherwise read as numbers or booleans.
    let snippet = output::to_yaml(&AgentConfig {
        name: &node.name,
        control_plane_url: server,
        token,
        session_enabled: true,
    })?;
    Ok(format!(
        "Created {kind} {name} (id {id}).\n\
         \n\
         Token (shown only this once; the control plane keeps only its hash):\n\
         \n    {token}\n\
         \n\
         Configuration for {file} on the node:\n\
         \n\
         {snippet}",
        name = node.name,
        id = node.id,
        file = kind.config_file(),
    ))
}

fn details_text(node: &Node) -> String {
    let rows = [
        ("ID", node.id.clone()),
        ("Name", node.name.clone()),
        ("Type", node.kind.clone()),
        (
            "Sessions",
            if node.session_enabled { "on" } else { "off" }.into(),
        ),
        (
            "Connected",
            if node.connected { "yes" } else { "no" }.into(),
        ),
        (
            "Last Seen",
            if node.last_seen.is_some() {
                output::format_time(node.last_seen.as_deref())
            } else {
                "never".into()
            },
        ),
        ("Created", output::format_time(node.created_at.as_deref())),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<10} {v}\n", format!("{k}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_prints_token_and_config() {
        let node = Node {
            id: "a1b2c3d4".into(),
            name: "hub-1".into(),
            kind: "hub".into(),
            token: Some("hub_xxxxx".into()),
            ..Default::default()
        };
        let text = created_text(NodeType::Hub, &node, "https://vpn.company.com").unwrap();
        assert!(
            text.starts_with("Created hub hub-1 (id a1b2c3d4).\n"),
            "{text}"
        );
        assert!(text.contains("shown only this once"), "{text}");
        assert!(text.contains("\n    hub_xxxxx\n"), "{text}");
        assert!(
            text.contains("Configuration for /etc/gatekey/hub.yaml on the node:"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "name: hub-1\ncontrol_plane_url: https://vpn.company.com\ntoken: hub_xxxxx\nsession_enabled: true\n"
            ),
            "{text}"
        );
        let numeric = Node {
            name: "123".into(),
            ..node
        };
        let text = created_text(NodeType::Hub, &numeric, "https://cp").unwrap();
        assert!(
            text.contains("name: '123'") || text.contains("name: \"123\""),
            "{text}"
        );
    }

    #[test]
    fn details() {
        let node = Node {
            id: "a1".into(),
            name: "gw".into(),
            kind: "gateway".into(),
            ..Default::default()
        };
        let text = details_text(&node);
        assert!(text.starts_with("ID:        a1\nName:      gw\n"), "{text}");
        assert!(text.contains("Last Seen: never\n"));
    }
}
