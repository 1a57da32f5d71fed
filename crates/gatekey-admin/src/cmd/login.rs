//! `login` (check the key, then save server, key and CA) and `logout`.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::cli::{self, Context};
use crate::client::{Client, ClientConfig};
use crate::config::FileConfig;
use crate::error::ClientError;
use crate::exit;
use crate::stdio;

fn settings_path(ctx: &Context) -> Result<PathBuf, ClientError> {
    ctx.file_path.clone().ok_or_else(|| {
        ClientError::Config("cannot locate the settings file: set HOME or XDG_CONFIG_HOME".into())
    })
}

pub async fn login(ctx: &Context) -> Result<i32, ClientError> {
    let path = settings_path(ctx)?;
    let settings = ctx.settings();
    let server = settings.server.clone().ok_or(ClientError::MissingServer)?;
    // A relative CA path would break when the CLI runs from another directory.
    let ca_cert = match settings.ca_cert.clone() {
        Some(p) => Some(
            std::path::absolute(&p).map_err(|e| ClientError::io(format!("{}", p.display()), e))?,
        ),
        None => None,
    };
    // A key saved earlier is not reused: logging in is how it gets replaced.
    let key = match ctx
        .flags
        .api_key
        .clone()
        .or_else(|| ctx.env.api_key.clone())
    {
        Some(key) => key,
        None if std::io::stdin().is_terminal() => prompt_key().await?,
        None => return Err(ClientError::MissingApiKey),
    };
    if key.is_empty() {
        return Err(ClientError::MissingApiKey);
    }
    let client = Client::new(ClientConfig {
        server: server.clone(),
        api_key: Some(key.clone()),
        ca_cert: ca_cert.clone(),
        timeout: ctx.timeout,
    })?;
    // Check before saving: a wrong key or an untrusted certificate fails here.
    client.list_agents(false).await?;

    let mut file = FileConfig::load(&path)?;
    file.server = Some(client.server().to_string());
    file.api_key = Some(key);
    file.ca_cert = ca_cert;
    file.save(&path)?;
    cli::print(&format!(
        "Logged in to {}; settings saved to {}\n",
        client.server(),
        path.display()
    ))?;
    Ok(exit::OK)
}

/// Asks for the key on the terminal without echo. Ctrl-C puts the terminal
/// back before leaving.
async fn prompt_key() -> Result<String, ClientError> {
    let _restore = stdio::RestoreTermios::capture();
    let mut read = tokio::task::spawn_blocking(|| stdio::read_secret("API key: "));
    tokio::select! {
        result = &mut read => match result {
            Ok(Ok(key)) => Ok(key),
            Ok(Err(e)) => Err(ClientError::io("reading the API key", e)),
            Err(e) => Err(ClientError::io("reading the API key", std::io::Error::other(e))),
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!();
            Err(ClientError::Cancelled)
        }
    }
}

pub fn logout(ctx: &Context) -> Result<i32, ClientError> {
    let path = settings_path(ctx)?;
    let mut file = FileConfig::load(&path)?;
    if file.api_key.take().is_none() {
        cli::print(&format!("No API key saved in {}.\n", path.display()))?;
        return Ok(exit::OK);
    }
    file.save(&path)?;
    cli::print(&format!("Removed the API key from {}.\n", path.display()))?;
    if ctx.env.api_key.is_some() {
        cli::warn("GATEKEY_API_KEY is still set in the environment");
    }
    Ok(exit::OK)
}
