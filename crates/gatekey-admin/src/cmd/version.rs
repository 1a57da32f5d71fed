//! `version`: the client's version, and the server's when it can be reached.

use serde_json::json;

use crate::cli::{self, Context};
use crate::error::ClientError;
use crate::exit;
use crate::output;

pub async fn run(ctx: &Context) -> Result<i32, ClientError> {
    let client_version = gatekey_proto::VERSION;
    // A missing or unreachable server is not an error here: the client's
    // version is still worth printing.
    let server = match ctx.client() {
        Ok(client) => Some(
            client
                .version()
                .await
                .map(|v| (client.server().to_string(), v)),
        ),
        Err(ClientError::MissingServer) => None,
        Err(e) => Some(Err(e)),
    };
    let server_ok = match &server {
        Some(Ok((url, v))) => Some((url.clone(), v.clone())),
        _ => None,
    };
    let value = json!({
        "client": { "version": client_version },
        "server": server_ok.as_ref().map(|(url, v)| json!({ "url": url, "version": v })),
    });
    if let Some(text) = output::structured(ctx.output, &value)? {
        cli::print(&text)?;
    } else {
        let mut text = format!("Client: gatekey-admin {client_version}\n");
        if let Some((url, v)) = &server_ok {
            let link = match v.link_protocol.as_slice() {
                [lo, hi] => format!(", agent link protocol {lo}-{hi}"),
                _ => String::new(),
            };
            text.push_str(&format!(
                "Server: gatekey-server {} at {url}{link}\n",
                v.version
            ));
        }
        cli::print(&text)?;
    }
    if let Some(Err(e)) = server {
        cli::warn(&format!("server version unavailable: {e}"));
    }
    Ok(exit::OK)
}
