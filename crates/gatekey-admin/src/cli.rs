//! The command line: clap definitions and dispatch to `cmd/*`. Every
//! failure ends as one line on stderr, `gatekey-admin: …`, and an exit code
//! from [`crate::exit`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};

use crate::api::NodeType;
use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::cmd;
use crate::config::{FileConfig, Overrides, Settings};
use crate::error::ClientError;
use crate::exit;
use crate::output::OutputFormat;
use crate::stream::ConsoleMode;

const GLOBAL: &str = "Global options";

/// Remote sessions on gatekey nodes: list connected agents, run commands,
/// manage gateways, mesh hubs and spokes, and devices.
#[derive(Debug, Parser)]
#[command(
    name = "gatekey-admin",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Control plane URL, https://HOST[:PORT] [env: GATEKEY_SERVER]
    #[arg(long, global = true, value_name = "URL", help_heading = GLOBAL)]
    pub server: Option<String>,
    /// Admin API key [env: GATEKEY_API_KEY]
    #[arg(long, global = true, value_name = "KEY", help_heading = GLOBAL)]
    pub api_key: Option<String>,
    /// CA certificate (PEM) to trust for the control plane, e.g. DATA_DIR/tls/ca.pem [env: GATEKEY_CA_CERT]
    #[arg(long, global = true, value_name = "FILE", help_heading = GLOBAL)]
    pub ca_cert: Option<PathBuf>,
    /// Output format
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = OutputFormat::Table, help_heading = GLOBAL)]
    pub output: OutputFormat,
    /// How long to wait for the control plane to connect and answer
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration, default_value = "30s", help_heading = GLOBAL)]
    pub request_timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check and save the control plane URL, API key and CA certificate
    /// (in ~/.config/gatekey/admin.yaml)
    Login,
    /// Remove the saved API key
    Logout,
    /// Remote sessions on connected agents
    #[command(subcommand)]
    Session(SessionCommand),
    /// Gateways
    #[command(subcommand)]
    Gateway(NodeCommand),
    /// Mesh hubs and spokes
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Edge devices
    #[command(subcommand)]
    Device(NodeCommand),
    /// Show the client's and the control plane's versions
    Version,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// List connected agents with remote sessions enabled
    List {
        /// List every connected agent, with whether sessions are enabled
        #[arg(long)]
        all: bool,
    },
    /// Run a command on an agent, streaming its output
    Exec(ExecArgs),
    /// Open an interactive shell on an agent (or run `-- CMD…` in a terminal
    /// there); leave with `exit`, or `~.` after a newline
    Connect(ConnectArgs),
    /// List live exec and console sessions
    Active,
    /// End a live session for everyone in it
    Kill {
        /// Session id (see `gatekey-admin session active`)
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Join the agent's open console: everybody sees the same output and may type
    #[arg(long, conflicts_with_all = ["observe", "force"])]
    pub share: bool,
    /// Watch the agent's open console without typing into it
    #[arg(long, conflicts_with = "force")]
    pub observe: bool,
    /// Take over the agent's open console: its users are disconnected and told who took over
    #[arg(long)]
    pub force: bool,
    /// No terminal on the node even when stdin and stdout are one: stdin is
    /// forwarded until end-of-file, stdout and stderr stay apart, no `~` escapes
    #[arg(short = 'T', long)]
    pub notty: bool,
    /// Agent name or id
    #[arg(value_name = "AGENT")]
    pub agent: String,
    /// Program and arguments to run instead of the node's shell, after `--`
    #[arg(
        value_name = "CMD",
        last = true,
        conflicts_with_all = ["share", "observe"]
    )]
    pub command: Vec<String>,
}

impl ConnectArgs {
    pub fn mode(&self) -> ConsoleMode {
        if self.share {
            ConsoleMode::Share
        } else if self.observe {
            ConsoleMode::Observe
        } else {
            ConsoleMode::Exclusive
        }
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Kill the remote command after this long (e.g. 30s, 5m; default: the agent's, 60s)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Do not forward stdin even when it is not a terminal
    #[arg(short = 'n', long)]
    pub no_stdin: bool,
    /// Agent name or id
    #[arg(value_name = "AGENT")]
    pub agent: String,
    /// Command line, run with /bin/sh -c on the node (several words are joined with spaces)
    #[arg(
        value_name = "COMMAND",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Mesh hubs
    #[command(subcommand)]
    Hub(NodeCommand),
    /// Mesh spokes
    #[command(subcommand)]
    Spoke(NodeCommand),
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Register a node and print its agent token (shown only once)
    Create {
        /// Node name
        name: String,
        /// Node id (default: 8 random hex characters)
        #[arg(long)]
        id: Option<String>,
        /// Allow remote sessions from the control plane's side
        #[arg(long, value_name = "true|false", action = ArgAction::Set, value_parser = BoolishValueParser::new())]
        session: Option<bool>,
    },
    /// List nodes
    List,
    /// Show one node
    Get {
        /// Node id or name
        id: String,
    },
    /// Turn remote sessions on or off on the control plane's side
    Update {
        /// Node id or name
        id: String,
        /// Allow remote sessions
        #[arg(long, value_name = "true|false", required = true, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
        session: Option<bool>,
    },
    /// Delete a node: its agent is disconnected and its token stops working
    Delete {
        /// Node id or name
        id: String,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    gatekey_proto::duration::parse(s)
}

/// What every command needs: the settings layers, the output format.
#[derive(Debug, Clone)]
pub struct Context {
    pub flags: Overrides,
    pub env: Overrides,
    pub file: FileConfig,
    /// `None` when neither HOME nor XDG_CONFIG_HOME is set.
    pub file_path: Option<PathBuf>,
    pub output: OutputFormat,
    pub timeout: Duration,
}

impl Context {
    pub fn settings(&self) -> Settings {
        Settings::resolve(&self.flags, &self.env, &self.file)
    }

    pub fn client(&self) -> Result<Client, ClientError> {
        Client::new(self.settings().client_config(self.timeout)?)
    }
}

/// Parses `args` (program name first) and runs the command; returns the
/// exit code. Usage errors and `--help` print clap's own text.
pub async fn run_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(cli) => run(cli).await,
        Err(e) => {
            let _ = e.print();
            if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            }
        }
    }
}

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> i32 {
    let file_path = FileConfig::default_path();
    let file = match file_path.as_deref().map(FileConfig::load).transpose() {
        Ok(file) => file.unwrap_or_default(),
        Err(e) => return report(&e),
    };
    let ctx = Context {
        flags: Overrides {
            server: cli.server,
            api_key: cli.api_key,
            ca_cert: cli.ca_cert,
        },
        env: Overrides::from_env(),
        file,
        file_path,
        output: cli.output,
        timeout: if cli.request_timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            cli.request_timeout
        },
    };
    let result = match cli.command {
        Command::Login => cmd::login::login(&ctx).await,
        Command::Logout => cmd::login::logout(&ctx),
        Command::Session(SessionCommand::List { all }) => cmd::session::list(&ctx, all).await,
        Command::Session(SessionCommand::Exec(args)) => cmd::session::exec(&ctx, args).await,
        Command::Session(SessionCommand::Connect(args)) => cmd::session::connect(&ctx, args).await,
        Command::Session(SessionCommand::Active) => cmd::session::active(&ctx).await,
        Command::Session(SessionCommand::Kill { id }) => cmd::session::kill(&ctx, &id).await,
        Command::Gateway(c) => cmd::node::run(&ctx, NodeType::Gateway, c).await,
        Command::Mesh(MeshCommand::Hub(c)) => cmd::node::run(&ctx, NodeType::Hub, c).await,
        Command::Mesh(MeshCommand::Spoke(c)) => cmd::node::run(&ctx, NodeType::Spoke, c).await,
        Command::Device(c) => cmd::node::run(&ctx, NodeType::Device, c).await,
        Command::Version => cmd::version::run(&ctx).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// Prints the one-line error and returns its exit code. A closed stdout
/// (`… | head`) ends quietly, as for any Unix filter.
pub fn report(e: &ClientError) -> i32 {
    if !matches!(e, ClientError::BrokenPipe) {
        warn(&e.to_string());
    }
    e.exit_code()
}

/// One line on stderr, prefixed with the program name.
pub fn warn(message: &str) {
    let _ = writeln!(std::io::stderr(), "gatekey-admin: {message}");
}

/// Writes to stdout; a closed stdout becomes [`ClientError::BrokenPipe`].
pub fn print(text: &str) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => ClientError::BrokenPipe,
            _ => ClientError::io("writing stdout", e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gatekey-admin").chain(args.iter().copied()))
    }

    fn node_command(cli: Cli) -> (NodeType, NodeCommand) {
        match cli.command {
            Command::Gateway(c) => (NodeType::Gateway, c),
            Command::Mesh(MeshCommand::Hub(c)) => (NodeType::Hub, c),
            Command::Mesh(MeshCommand::Spoke(c)) => (NodeType::Spoke, c),
            Command::Device(c) => (NodeType::Device, c),
            other => panic!("not a node command: {other:?}"),
        }
    }

    #[test]
    fn session_flag_with_equals_or_space() {
        for (args, kind, want) in [
            (
                &["gateway", "update", "gw-1", "--session=true"][..],
                NodeType::Gateway,
                true,
            ),
            (
                &["mesh", "hub", "update", "hub-1", "--session=false"][..],
                NodeType::Hub,
                false,
            ),
            (
                &["mesh", "spoke", "update", "s-1", "--session", "true"][..],
                NodeType::Spoke,
                true,
            ),
            (
                &["device", "update", "d-1", "--session", "false"][..],
                NodeType::Device,
                false,
            ),
        ] {
            let (got_kind, cmd) = node_command(parse(args).unwrap());
            assert_eq!(got_kind, kind);
            match cmd {
                NodeCommand::Update { session, .. } => assert_eq!(session, Some(want), "{args:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn update_needs_a_session_value() {
        assert!(parse(&["gateway", "update", "gw-1"]).is_err());
        assert!(parse(&["gateway", "update", "gw-1", "--session"]).is_err());
        assert!(parse(&["gateway", "update", "gw-1", "--session=maybe"]).is_err());
    }

    #[test]
    fn create_flags() {
        let (_, cmd) = node_command(
            parse(&[
                "mesh",
                "hub",
                "create",
                "hub-1",
                "--id",
                "h1",
                "--session",
                "false",
            ])
            .unwrap(),
        );
        match cmd {
            NodeCommand::Create { name, id, session } => {
                assert_eq!(
                    (name.as_str(), id.as_deref(), session),
                    ("hub-1", Some("h1"), Some(false))
                );
            }
            other => panic!("{other:?}"),
        }
        let (_, cmd) = node_command(parse(&["gateway", "create", "gw-1"]).unwrap());
        assert!(matches!(
            cmd,
            NodeCommand::Create {
                session: None,
                id: None,
                ..
            }
        ));
    }

    fn exec_args(args: &[&str]) -> ExecArgs {
        match parse(args).unwrap().command {
            Command::Session(SessionCommand::Exec(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_takes_the_rest_as_the_command() {
        let a = exec_args(&["session", "exec", "hub-1", "ls", "-la"]);
        assert_eq!(a.agent, "hub-1");
        assert_eq!(a.command, ["ls", "-la"]);
        let a = exec_args(&["session", "exec", "hub-1", "ip addr"]);
        assert_eq!(a.command, ["ip addr"]);
        let a = exec_args(&["session", "exec", "spoke-datacenter", "ping -c 3 10.0.0.1"]);
        assert_eq!(a.command.join(" "), "ping -c 3 10.0.0.1");
        // Options of the remote command stay with it, even ours.
        let a = exec_args(&["session", "exec", "hub-1", "grep", "-r", "--timeout", "x"]);
        assert_eq!(a.command, ["grep", "-r", "--timeout", "x"]);
        assert_eq!(a.timeout, None);
        let a = exec_args(&[
            "session",
            "exec",
            "--timeout",
            "5s",
            "-n",
            "hub-1",
            "sleep",
            "10",
        ]);
        assert_eq!(a.timeout, Some(Duration::from_secs(5)));
        assert!(a.no_stdin);
        let a = exec_args(&["-o", "json", "session", "exec", "hub-1", "--", "ls", "-la"]);
        assert_eq!(a.command, ["ls", "-la"]);
        assert!(parse(&["session", "exec", "hub-1"]).is_err());
        assert!(parse(&["session", "exec", "--timeout", "5x", "hub-1", "ls"]).is_err());
    }

    fn connect_args(args: &[&str]) -> ConnectArgs {
        match parse(args).unwrap().command {
            Command::Session(SessionCommand::Connect(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connect_flags_and_command() {
        let a = connect_args(&["session", "connect", "hub-1"]);
        assert_eq!(a.agent, "hub-1");
        assert!(a.command.is_empty());
        assert_eq!(a.mode(), ConsoleMode::Exclusive);
        assert!(!a.force && !a.notty);

        let a = connect_args(&["session", "connect", "hub-1", "--share"]);
        assert_eq!(a.mode(), ConsoleMode::Share);
        let a = connect_args(&["session", "connect", "--observe", "hub-1"]);
        assert_eq!(a.mode(), ConsoleMode::Observe);
        let a = connect_args(&["session", "connect", "hub-1", "--force", "--notty"]);
        assert!(a.force && a.notty);
        assert_eq!(a.mode(), ConsoleMode::Exclusive);
        assert!(connect_args(&["session", "connect", "-T", "hub-1"]).notty);

        // The command comes after `--`, its options stay with it.
        let a = connect_args(&[
            "session", "connect", "hub-1", "--force", "--", "top", "-d", "1", "--share",
        ]);
        assert_eq!(a.command, ["top", "-d", "1", "--share"]);
        assert!(a.force && !a.share);
        let a = connect_args(&["-o", "json", "session", "connect", "hub-1", "--", "ls"]);
        assert_eq!(a.command, ["ls"]);
    }

    #[test]
    fn connect_usage_errors() {
        for bad in [
            &["session", "connect"][..],
            &["session", "connect", "hub-1", "--share", "--observe"],
            &["session", "connect", "hub-1", "--share", "--force"],
            &["session", "connect", "hub-1", "--observe", "--force"],
            // A command needs `--`, and joining an open console runs none.
            &["session", "connect", "hub-1", "top"],
            &["session", "connect", "hub-1", "--share", "--", "top"],
            &["session", "connect", "hub-1", "--observe", "--", "top"],
            &["session", "connect", "hub-1", "--bogus"],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.use_stderr(), "{bad:?} should be a usage error");
        }
    }

    #[test]
    fn active_and_kill() {
        let cli = parse(&["session", "active", "-o", "json"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert!(matches!(
            cli.command,
            Command::Session(SessionCommand::Active)
        ));
        match parse(&["session", "kill", "s_3f9c01"]).unwrap().command {
            Command::Session(SessionCommand::Kill { id }) => assert_eq!(id, "s_3f9c01"),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["session", "kill"]).is_err());
        assert!(parse(&["session", "kill", "a", "b"]).is_err());
        assert!(parse(&["session", "active", "extra"]).is_err());
    }

    #[test]
    fn session_help_lists_the_new_commands() {
        let e = parse(&["session", "--help"]).unwrap_err();
        assert!(!e.use_stderr());
        let text = e.to_string();
        for command in ["connect", "active", "kill", "exec", "list"] {
            assert!(text.contains(command), "{command} missing:\n{text}");
        }
        let text = parse(&["session", "connect", "--help"])
            .unwrap_err()
            .to_string();
        for flag in [
            "--share",
            "--observe",
            "--force",
            "--notty",
            "[-- <CMD>...]",
        ] {
            assert!(text.contains(flag), "{flag} missing:\n{text}");
        }
    }

    #[test]
    fn global_flags_anywhere_before_the_command() {
        let cli = parse(&[
            "session",
            "list",
            "--all",
            "-o",
            "yaml",
            "--server",
            "https://cp:8443",
        ])
        .unwrap();
        assert_eq!(cli.output, OutputFormat::Yaml);
        assert_eq!(cli.server.as_deref(), Some("https://cp:8443"));
        assert!(matches!(
            cli.command,
            Command::Session(SessionCommand::List { all: true })
        ));
        let cli = parse(&[
            "login",
            "--server",
            "https://cp",
            "--api-key",
            "k",
            "--ca-cert",
            "/ca.pem",
        ])
        .unwrap();
        assert_eq!(cli.api_key.as_deref(), Some("k"));
        assert_eq!(cli.ca_cert, Some(PathBuf::from("/ca.pem")));
        assert!(matches!(cli.command, Command::Login));
    }

    #[test]
    fn usage_errors_exit_2() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(run_args(["gatekey-admin", "nonsense"])),
            exit::USAGE
        );
    }
}
