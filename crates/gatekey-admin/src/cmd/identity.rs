//! `user create|list|update|delete`, `apikey create|list|revoke` and
//! `whoami` (docs/api.md "Users, roles and scopes").

use crate::api::{ApiKey, User, Whoami};
use crate::cli::{self, ApiKeyCommand, Context, UserCommand};
use crate::client::{NewApiKey, NewUser, UserPatch};
use crate::error::ClientError;
use crate::exit;
use crate::output::{self, OutputFormat};

/// Shortest and longest password the control plane takes, in bytes.
const PASSWORD_BYTES: std::ops::RangeInclusive<usize> = 8..=1024;

pub async fn user(ctx: &Context, command: UserCommand) -> Result<i32, ClientError> {
    match command {
        UserCommand::Create {
            name,
            role,
            scopes,
            password,
            password_stdin,
        } => {
            crate::client::check_user_name(&name)?;
            validate_scopes(&scopes)?;
            let client = ctx.client()?;
            let password = if password || password_stdin {
                Some(read_password(&name, password_stdin, true).await?)
            } else {
                None
            };
            let user = client
                .create_user(&NewUser {
                    name,
                    role,
                    scopes,
                    password,
                })
                .await?;
            match output::structured(ctx.output, &user)? {
                Some(text) => cli::print(&text)?,
                None => cli::print(&created_user_text(&user))?,
            }
        }
        UserCommand::List => {
            let users = ctx.client()?.list_users().await?;
            match output::structured(ctx.output, &users)? {
                Some(text) => cli::print(&text)?,
                None if users.is_empty() => cli::warn("no user is visible to this key"),
                None => cli::print(&output::users_table(&users))?,
            }
        }
        UserCommand::Update {
            name,
            role,
            scopes,
            clear_scopes,
            password,
            password_stdin,
            no_password,
        } => {
            crate::client::check_user_name(&name)?;
            validate_scopes(&scopes)?;
            let client = ctx.client()?;
            let mut patch = UserPatch {
                role,
                scopes: if clear_scopes {
                    Some(Vec::new())
                } else if scopes.is_empty() {
                    None
                } else {
                    Some(scopes)
                },
                password: None,
            };
            if no_password {
                patch.password = Some(None);
            } else if password || password_stdin {
                patch.password = Some(Some(read_password(&name, password_stdin, true).await?));
            }
            let user = client.update_user(&name, &patch).await?;
            match output::structured(ctx.output, &user)? {
                Some(text) => cli::print(&text)?,
                None => cli::print(&updated_user_text(&user, &patch))?,
            }
        }
        UserCommand::Delete { name } => {
            ctx.client()?.delete_user(&name).await?;
            if ctx.output == OutputFormat::Table {
                cli::print(&format!(
                    "Deleted user {name}; its API keys no longer work.\n"
                ))?;
            }
        }
    }
    Ok(exit::OK)
}

pub async fn apikey(ctx: &Context, command: ApiKeyCommand) -> Result<i32, ClientError> {
    match command {
        ApiKeyCommand::Create {
            user,
            name,
            expires,
            scopes,
        } => {
            if let Some(user) = &user {
                crate::client::check_user_name(user)?;
            }
            validate_scopes(&scopes)?;
            let expires_in_seconds = match expires {
                Some(d) if d.as_secs() == 0 => {
                    return Err(ClientError::InvalidArgument(
                        "--expires must be at least 1s".into(),
                    ));
                }
                Some(d) => Some(d.as_secs()),
                None => None,
            };
            let key = ctx
                .client()?
                .create_api_key(&NewApiKey {
                    user,
                    name,
                    expires_in_seconds,
                    scopes,
                })
                .await?;
            match output::structured(ctx.output, &key)? {
                Some(text) => cli::print(&text)?,
                None => cli::print(&created_key_text(&key)?)?,
            }
        }
        ApiKeyCommand::List { user } => {
            let keys = ctx.client()?.list_api_keys(user.as_deref()).await?;
            match output::structured(ctx.output, &keys)? {
                Some(text) => cli::print(&text)?,
                None if keys.is_empty() => cli::warn(&match user {
                    Some(user) => format!("{user} has no API key"),
                    None => "no API key is visible to this key".into(),
                }),
                None => cli::print(&output::api_keys_table(
                    &keys,
                    time::OffsetDateTime::now_utc(),
                ))?,
            }
        }
        ApiKeyCommand::Revoke { id } => {
            ctx.client()?.revoke_api_key(&id).await?;
            if ctx.output == OutputFormat::Table {
                cli::print(&format!("Revoked API key {id}; it no longer works.\n"))?;
            }
        }
    }
    Ok(exit::OK)
}

pub async fn whoami(ctx: &Context) -> Result<i32, ClientError> {
    let client = ctx.client()?;
    let me = client.whoami().await?;
    match output::structured(ctx.output, &me)? {
        Some(text) => cli::print(&text)?,
        None => cli::print(&whoami_text(&me, client.server()))?,
    }
    Ok(exit::OK)
}

/// Reads a password: from the first line of stdin with `from_stdin` or
/// when stdin is not a terminal, else asked for on the terminal without
/// echo (twice with `confirm`). Checked for the documented length.
pub(crate) async fn read_password(
    user: &str,
    from_stdin: bool,
    confirm: bool,
) -> Result<String, ClientError> {
    let password = if from_stdin || !cli::stdin_is_terminal() {
        cli::read_stdin_line("password")?
    } else {
        let prompt = format!("Password for {user}: ");
        let first = super::login::prompt_secret(&prompt, "the password").await?;
        if confirm {
            let again =
                super::login::prompt_secret("Repeat the password: ", "the password").await?;
            if again != first {
                return Err(ClientError::InvalidArgument(
                    "the passwords do not match".into(),
                ));
            }
        }
        first
    };
    if !PASSWORD_BYTES.contains(&password.len()) {
        return Err(ClientError::InvalidArgument(format!(
            "a password must be {}-{} bytes long",
            PASSWORD_BYTES.start(),
            PASSWORD_BYTES.end()
        )));
    }
    Ok(password)
}

/// Checks `--scope` patterns as the control plane does: `TYPE:GLOB` with
/// TYPE gateway, hub, spoke, device or `*` and GLOB of letters, digits,
/// `-_.` and the wildcards `*?`, or the word `control-plane`.
pub(crate) fn validate_scopes(scopes: &[String]) -> Result<(), ClientError> {
    for scope in scopes {
        validate_scope(scope).map_err(|why| {
            ClientError::InvalidArgument(format!(
                "invalid --scope {scope:?}: {why} (use TYPE:PATTERN with TYPE gateway, hub, spoke, device or *, e.g. spoke:dc-*, or control-plane)"
            ))
        })?;
    }
    Ok(())
}

fn validate_scope(scope: &str) -> Result<(), &'static str> {
    if scope == "control-plane" {
        return Ok(());
    }
    let (kind, glob) = scope.split_once(':').ok_or("no ':'")?;
    if !matches!(kind, "gateway" | "hub" | "spoke" | "device" | "*") {
        return Err("unknown node type");
    }
    if glob.is_empty() || glob.len() > 128 {
        return Err("empty or too long pattern");
    }
    if !glob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.*?".contains(&b))
    {
        return Err("patterns use letters, digits, - _ . and the wildcards * ?");
    }
    Ok(())
}

fn created_user_text(user: &User) -> String {
    let how = if user.has_password {
        format!("may log in with `gatekey-admin login --user {}`", user.name)
    } else {
        format!(
            "has no password: give it a key with `gatekey-admin apikey create --user {}`",
            user.name
        )
    };
    format!(
        "Created user {} ({}), reaching {}; it {how}.\n",
        user.name,
        user.role,
        output::scopes_text(&user.scopes)
    )
}

fn updated_user_text(user: &User, patch: &UserPatch) -> String {
    let password = match &patch.password {
        Some(Some(_)) => "password changed",
        Some(None) => "password removed",
        None if user.has_password => "has a password",
        None => "no password",
    };
    format!(
        "Updated user {}: {}, reaching {}, {password}.\n",
        user.name,
        user.role,
        output::scopes_text(&user.scopes)
    )
}

/// What `apikey create` prints: the key, once, and that it will not be
/// shown again.
fn created_key_text(key: &ApiKey) -> Result<String, ClientError> {
    let Some(secret) = key.key.as_deref().filter(|k| !k.is_empty()) else {
        return Err(ClientError::Protocol(format!(
            "the control plane created API key {} but sent no key",
            key.id
        )));
    };
    let label = if key.name.is_empty() {
        String::new()
    } else {
        format!(" ({})", key.name)
    };
    let expiry = match key.expires_at.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => format!("expires {}", output::format_minute(t)),
        None => "never expires".into(),
    };
    let scopes = if key.scopes.is_empty() {
        String::new()
    } else {
        format!(", limited to {}", key.scopes.join(","))
    };
    Ok(format!(
        "API key for {user}{label}, {expiry}{scopes}:\n  {secret}\nStore it now: it is not shown again (id {id}).\n",
        user = key.user,
        id = key.id,
    ))
}

fn whoami_text(me: &Whoami, server: &str) -> String {
    let key = &me.key;
    let mut key_line = if key.name.is_empty() {
        key.id.clone()
    } else {
        format!("{} ({})", key.name, key.id)
    };
    match key.expires_at.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => key_line.push_str(&format!(", expires {}", output::format_minute(t))),
        None => key_line.push_str(", never expires"),
    }
    let mut text = format!(
        "User:    {}\nRole:    {}\nScopes:  {}\n",
        me.user.name,
        me.user.role,
        output::scopes_text(&me.user.scopes)
    );
    if !key.scopes.is_empty() {
        text.push_str(&format!(
            "         key limited to {}\n",
            key.scopes.join(",")
        ));
    }
    text.push_str(&format!("Key:     {key_line}\nServer:  {server}\n"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_checked_like_the_server() {
        for good in [
            "spoke:dc-*",
            "hub:*",
            "*:lab-?",
            "gateway:gw.west_1",
            "control-plane",
        ] {
            assert!(validate_scopes(&[good.to_string()]).is_ok(), "{good}");
        }
        for bad in [
            "spoke",
            "router:x",
            "hub:",
            "hub:a/b",
            "hub: x",
            "Control-Plane",
        ] {
            let e = validate_scopes(&[bad.to_string()]).unwrap_err();
            assert_eq!(e.exit_code(), exit::INVALID_ARGUMENT, "{bad}");
            assert!(e.to_string().starts_with("invalid --scope "), "{e}");
        }
    }

    #[test]
    fn created_key_is_shown_once_with_a_warning() {
        let key: ApiKey = serde_json::from_value(serde_json::json!({
            "id": "k_1a2b", "user": "bob", "name": "laptop", "prefix": "gka_1a2b",
            "scopes": [], "created_at": "2026-11-01T10:00:00Z",
            "expires_at": "2026-12-01T10:00:00Z", "key": "gka_1a2bsecret"
        }))
        .unwrap();
        assert_eq!(
            created_key_text(&key).unwrap(),
            "API key for bob (laptop), expires 2026-12-01 10:00 UTC:\n  gka_1a2bsecret\n\
             Store it now: it is not shown again (id k_1a2b).\n"
        );
        let no_key = ApiKey { key: None, ..key };
        assert!(created_key_text(&no_key).is_err());
    }

    #[test]
    fn whoami_lines() {
        let me: Whoami = serde_json::from_value(serde_json::json!({
            "user": {"id": "u_1", "name": "bob", "role": "operator", "scopes": ["spoke:dc-*"]},
            "key": {"id": "k_1", "user": "bob", "name": "login", "scopes": ["spoke:dc-1"],
                    "expires_at": null}
        }))
        .unwrap();
        assert_eq!(
            whoami_text(&me, "https://cp:8443"),
            "User:    bob\nRole:    operator\nScopes:  spoke:dc-*\n         key limited to spoke:dc-1\n\
             Key:     login (k_1), never expires\nServer:  https://cp:8443\n"
        );
    }
}
