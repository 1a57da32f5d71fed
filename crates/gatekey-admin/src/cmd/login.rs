//! `login` (check the key, or log in with a password, then save server,
//! key and CA) and `logout`.

use std::path::PathBuf;

use crate::cli::{self, Context, LoginArgs};
use crate::client::{Client, ClientConfig};
use crate::config::FileConfig;
use crate::error::ClientError;
use crate::exit;
use crate::output;
use crate::stdio;

fn settings_path(ctx: &Context) -> Result<PathBuf, ClientError> {
    ctx.file_path.clone().ok_or_else(|| {
        ClientError::Config("cannot locate the settings file: set HOME or XDG_CONFIG_HOME".into())
    })
}

pub async fn login(ctx: &Context, args: LoginArgs) -> Result<i32, ClientError> {
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
    if let Some(user) = args.user {
        if ctx.flags.api_key.is_some() {
            return Err(ClientError::InvalidArgument(
                "--user logs in with a password: leave out --api-key".into(),
            ));
        }
        crate::client::check_user_name(&user)?;
        let client = Client::new(ClientConfig {
            server,
            api_key: None,
            ca_cert: ca_cert.clone(),
            timeout: ctx.timeout,
        })?;
        let password = super::identity::read_password(&user, args.password_stdin, false).await?;
        let key = client.login(&user, &password).await?;
        let Some(secret) = key.key.clone().filter(|k| !k.is_empty()) else {
            return Err(ClientError::Protocol(
                "the control plane accepted the login but sent no key".into(),
            ));
        };
        save(&path, client.server(), secret, ca_cert)?;
        let expiry = match key.expires_at.as_deref() {
            Some(t) => format!("expires {}", output::format_minute(t)),
            None => "does not expire".into(),
        };
        cli::print(&format!(
            "Logged in to {} as {user} (key {}, {expiry}); settings saved to {}\n",
            client.server(),
            key.id,
            path.display()
        ))?;
        return Ok(exit::OK);
    }
    // A key saved earlier is not reused: logging in is how it gets replaced.
    let key = match ctx
        .flags
        .api_key
        .clone()
        .or_else(|| ctx.env.api_key.clone())
    {
        Some(key) => key,
        None if cli::stdin_is_terminal() => prompt_secret("API key: ", "the API key")
            .await?
            .trim()
            .to_string(),
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

    save(&path, client.server(), key, ca_cert)?;
    cli::print(&format!(
        "Logged in to {}; settings saved to {}\n",
        client.server(),
        path.display()
    ))?;
    Ok(exit::OK)
}

fn save(
    path: &std::path::Path,
    server: &str,
    key: String,
    ca_cert: Option<PathBuf>,
) -> Result<(), ClientError> {
    let mut file = FileConfig::load(path)?;
    file.server = Some(server.to_string());
    file.api_key = Some(key);
    file.ca_cert = ca_cert;
    file.save(path)
}

/// Asks for a secret on the terminal without echo (only the line ending is
/// removed). Ctrl-C puts the terminal back before leaving.
pub(crate) async fn prompt_secret(prompt: &str, what: &str) -> Result<String, ClientError> {
    let _restore = stdio::RestoreTermios::capture();
    let prompt = prompt.to_string();
    let mut read = tokio::task::spawn_blocking(move || stdio::read_secret_line(&prompt));
    let context = format!("reading {what}");
    tokio::select! {
        result = &mut read => match result {
            Ok(Ok(secret)) => Ok(secret),
            Ok(Err(e)) => Err(ClientError::io(context, e)),
            Err(e) => Err(ClientError::io(context, std::io::Error::other(e))),
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!();
            Err(ClientError::Cancelled)
        }
    }
}

/// Ends the login on the control plane (`POST /api/v1/logout` revokes a
/// key that `login --user` made), then removes the key from the settings
/// file. A control plane that cannot be told does not stop the removal.
pub async fn logout(ctx: &Context) -> Result<i32, ClientError> {
    let path = settings_path(ctx)?;
    let mut file = FileConfig::load(&path)?;
    let Some(key) = file.api_key.take() else {
        cli::print(&format!("No API key saved in {}.\n", path.display()))?;
        return Ok(exit::OK);
    };
    let settings = ctx.settings();
    match settings.server.clone().filter(|s| !s.is_empty()) {
        None => cli::warn("no control plane URL: the key was not revoked there"),
        Some(server) => {
            let told = match Client::new(ClientConfig {
                server: server.clone(),
                api_key: Some(key),
                ca_cert: settings.ca_cert.clone(),
                timeout: ctx.timeout,
            }) {
                Ok(client) => client.logout().await,
                Err(e) => Err(e),
            };
            match told {
                Ok(()) => {}
                Err(ClientError::Api(api)) if api.status == 401 => cli::warn(&format!(
                    "{server} no longer accepts the saved key ({}); removing it anyway",
                    api.message
                )),
                Err(e) => cli::warn(&format!(
                    "could not log out on {server} ({e}); removing the key anyway"
                )),
            }
        }
    }
    file.save(&path)?;
    cli::print(&format!("Removed the API key from {}.\n", path.display()))?;
    if ctx.env.api_key.is_some() {
        cli::warn("GATEKEY_API_KEY is still set in the environment");
    }
    Ok(exit::OK)
}
