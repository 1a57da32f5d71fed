//! Where the CLI's settings come from, in order of precedence:
//! command-line flags, then the environment (`GATEKEY_SERVER`,
//! `GATEKEY_API_KEY`, `GATEKEY_CA_CERT`), then the file written by
//! `gatekey-admin login` (`$XDG_CONFIG_HOME/gatekey/admin.yaml`, by default
//! `~/.config/gatekey/admin.yaml`). Inputs are explicit values so the rules
//! can be tested without touching the process environment.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::ClientConfig;
use crate::error::ClientError;

pub const ENV_SERVER: &str = "GATEKEY_SERVER";
pub const ENV_API_KEY: &str = "GATEKEY_API_KEY";
pub const ENV_CA_CERT: &str = "GATEKEY_CA_CERT";

/// One layer of settings (the flags, or the environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub server: Option<String>,
    pub api_key: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

impl Overrides {
    /// The process environment.
    pub fn from_env() -> Overrides {
        Overrides::from_lookup(|name| std::env::var_os(name))
    }

    /// Any environment-like source; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Overrides {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        Overrides {
            server: get(ENV_SERVER).map(|v| v.to_string_lossy().into_owned()),
            api_key: get(ENV_API_KEY).map(|v| v.to_string_lossy().into_owned()),
            ca_cert: get(ENV_CA_CERT).map(PathBuf::from),
        }
    }
}

/// The settings file. Keys other than these three are kept as they are
/// when `login`/`logout` rewrite it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// A relative path is taken relative to the file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, yaml_serde::Value>,
}

impl FileConfig {
    /// `$XDG_CONFIG_HOME/gatekey/admin.yaml`, else `$HOME/.config/gatekey/admin.yaml`.
    pub fn default_path() -> Option<PathBuf> {
        FileConfig::path_from(
            std::env::var_os("XDG_CONFIG_HOME"),
            std::env::var_os("HOME"),
        )
    }

    pub fn path_from(xdg_config_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
        // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
        let base = match xdg_config_home.map(PathBuf::from) {
            Some(dir) if dir.is_absolute() => dir,
            _ => PathBuf::from(home.filter(|h| !h.is_empty())?).join(".config"),
        };
        Some(base.join("gatekey").join("admin.yaml"))
    }

    /// Reads the file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<FileConfig, ClientError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
            Err(e) => {
                return Err(ClientError::io(
                    format!("cannot read {}", path.display()),
                    e,
                ));
            }
        };
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        let mut config: FileConfig = yaml_serde::from_str(&text).map_err(|e| {
            ClientError::Config(format!("invalid settings file {}: {e}", path.display()))
        })?;
        if let (Some(ca), Some(dir)) = (&config.ca_cert, path.parent())
            && ca.is_relative()
        {
            config.ca_cert = Some(dir.join(ca));
        }
        Ok(config)
    }

    /// Writes the file atomically, readable by its owner only (it holds an
    /// API key): directory 0700, file 0600.
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        let err = |what: &str, e| ClientError::io(format!("cannot {what} {}", path.display()), e);
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err("create the directory of", e))?;
        let text = yaml_serde::to_string(self)
            .map_err(|e| ClientError::Config(format!("cannot encode settings: {e}")))?;
        let tmp = dir.join(format!(".admin.yaml.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode above only applies to new files.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            err("write", e)
        })
    }
}

/// The settings in effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub server: Option<String>,
    pub api_key: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

impl Settings {
    /// Flags win over the environment, which wins over the file, per setting.
    pub fn resolve(flags: &Overrides, env: &Overrides, file: &FileConfig) -> Settings {
        Settings {
            server: flags
                .server
                .clone()
                .or_else(|| env.server.clone())
                .or_else(|| file.server.clone()),
            api_key: flags
                .api_key
                .clone()
                .or_else(|| env.api_key.clone())
                .or_else(|| file.api_key.clone()),
            ca_cert: flags
                .ca_cert
                .clone()
                .or_else(|| env.ca_cert.clone())
                .or_else(|| file.ca_cert.clone()),
        }
    }

    /// The client configuration; fails when no server is known.
    pub fn client_config(&self, timeout: Duration) -> Result<ClientConfig, ClientError> {
        let server = self
            .server
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(ClientError::MissingServer)?;
        Ok(ClientConfig {
            server,
            api_key: self.api_key.clone(),
            ca_cert: self.ca_cert.clone(),
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(server: Option<&str>, key: Option<&str>, ca: Option<&str>) -> Overrides {
        Overrides {
            server: server.map(Into::into),
            api_key: key.map(Into::into),
            ca_cert: ca.map(PathBuf::from),
        }
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let file = FileConfig {
            server: Some("https://file".into()),
            api_key: Some("file-key".into()),
            ca_cert: Some("/file/ca.pem".into()),
            ..Default::default()
        };
        let env = layer(Some("https://env"), Some("env-key"), None);
        let flags = layer(Some("https://flag"), None, None);
        let s = Settings::resolve(&flags, &env, &file);
        assert_eq!(s.server.as_deref(), Some("https://flag"));
        assert_eq!(s.api_key.as_deref(), Some("env-key"));
        assert_eq!(s.ca_cert, Some(PathBuf::from("/file/ca.pem")));

        let s = Settings::resolve(&Overrides::default(), &Overrides::default(), &file);
        assert_eq!(s.server.as_deref(), Some("https://file"));
        let s = Settings::resolve(
            &Overrides::default(),
            &Overrides::default(),
            &FileConfig::default(),
        );
        assert_eq!(s, Settings::default());
        let e = s.client_config(Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::MissingServer));
        assert!(
            e.to_string().contains("--server") && e.to_string().contains("gatekey-admin login")
        );
    }

    #[test]
    fn env_lookup_ignores_empty_values() {
        let env = Overrides::from_lookup(|name| match name {
            ENV_SERVER => Some("https://env:8443".into()),
            ENV_API_KEY => Some("".into()),
            _ => None,
        });
        assert_eq!(env, layer(Some("https://env:8443"), None, None));
    }

    #[test]
    fn default_path_honours_xdg() {
        assert_eq!(
            FileConfig::path_from(Some("/x/cfg".into()), Some("/home/u".into())),
            Some(PathBuf::from("/x/cfg/gatekey/admin.yaml"))
        );
        assert_eq!(
            FileConfig::path_from(None, Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.config/gatekey/admin.yaml"))
        );
        assert_eq!(
            FileConfig::path_from(Some("relative".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.config/gatekey/admin.yaml"))
        );
        assert_eq!(FileConfig::path_from(None, None), None);
    }

    #[test]
    fn save_and_load_round_trip_privately() {
        let dir = std::env::temp_dir().join(format!("gatekey-admin-config-{}", std::process::id()));
        let path = dir.join("gatekey").join("admin.yaml");
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(FileConfig::load(&path).unwrap(), FileConfig::default());

        let mut config = FileConfig {
            server: Some("https://cp:8443".into()),
            api_key: Some("gka_secret".into()),
            ca_cert: Some("ca.pem".into()),
            ..Default::default()
        };
        config
            .extra
            .insert("color".into(), yaml_serde::Value::Bool(false));
        config.save(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("server: https://cp:8443") && text.contains("api_key: gka_secret"),
            "{text}"
        );

        let back = FileConfig::load(&path).unwrap();
        assert_eq!(back.ca_cert, Some(path.parent().unwrap().join("ca.pem")));
        assert_eq!(
            back.extra.get("color"),
            Some(&yaml_serde::Value::Bool(false))
        );
        fs::write(&path, "server: [").unwrap();
        assert!(matches!(
            FileConfig::load(&path),
            Err(ClientError::Config(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
