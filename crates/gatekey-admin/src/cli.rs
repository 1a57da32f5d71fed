//! The command line: clap definitions and dispatch to `cmd/*`. Every
//! failure ends as one line on stderr, `gatekey-admin: …`, and an exit code
//! from [`crate::exit`].

use std::cell::RefCell;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser, Subcommand};

use crate::api::{NodeType, Role};
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
    /// (in ~/.config/gatekey/admin.yaml); with --user, log in with a password
    Login(LoginArgs),
    /// End the login on the control plane and remove the saved API key
    Logout,
    /// Show who the API key in use belongs to: user, role, scopes, key
    Whoami,
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
    /// Users, their roles and scopes
    #[command(subcommand)]
    User(UserCommand),
    /// API keys
    #[command(subcommand, name = "apikey")]
    Apikey(ApiKeyCommand),
    /// The audit log: list, verify the hash chain, export
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Network diagnostics (ping, nslookup, traceroute, nc, nmap) from the
    /// control plane or any agent
    #[command(subcommand)]
    Troubleshoot(TroubleshootCommand),
    /// Control-plane replicas: which are up, their versions and agents
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Show the client's and the control plane's versions
    Version,
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// List the replicas the control plane hears (itself marked `*`)
    List,
}

#[derive(Debug, Subcommand)]
pub enum TroubleshootCommand {
    /// Test ICMP connectivity to a host
    Ping {
        host: String,
        /// Echo requests to send (default 4)
        #[arg(long, short = 'c', value_name = "N")]
        count: Option<u32>,
        /// Time between requests, in seconds or like 200ms (default 1)
        #[arg(long, short = 'i', value_name = "SECONDS")]
        interval: Option<String>,
        /// Wait for each reply, in seconds or like 500ms (default 2)
        #[arg(long, short = 'W', value_name = "SECONDS")]
        timeout: Option<String>,
        /// Payload bytes (default 56)
        #[arg(long, short = 's', value_name = "BYTES")]
        size: Option<u32>,
        #[command(flatten)]
        at: LocationArg,
    },
    /// Perform DNS lookup for a hostname (an address: reverse lookup)
    Nslookup {
        host: String,
        /// A, AAAA, CNAME, MX, TXT, NS, SOA or PTR (default A and AAAA)
        #[arg(long = "type", short = 't', value_name = "TYPE")]
        record_type: Option<String>,
        /// Ask this resolver (IP or IP:PORT) instead of the system's
        #[arg(long, value_name = "ADDRESS")]
        server: Option<String>,
        /// Overall time for the answer (default 5)
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<String>,
        #[command(flatten)]
        at: LocationArg,
    },
    /// Trace the route to a host
    Traceroute {
        host: String,
        /// Highest hop probed (default 30)
        #[arg(long, short = 'm', value_name = "N")]
        max_hops: Option<u32>,
        /// Probes per hop (default 3)
        #[arg(long, short = 'q', value_name = "N")]
        queries: Option<u32>,
        /// Wait for each probe's answer (default 3)
        #[arg(long, short = 'w', value_name = "SECONDS")]
        timeout: Option<String>,
        /// Probe with ICMP echo instead of UDP
        #[arg(long, short = 'I')]
        icmp: bool,
        /// Do not look up hop names
        #[arg(long, short = 'n')]
        numeric: bool,
        #[command(flatten)]
        at: LocationArg,
    },
    /// Test TCP connectivity to a port
    Nc {
        host: String,
        /// TCP port
        #[arg(long, short = 'p', value_name = "PORT")]
        port: u32,
        /// Connect timeout (default 5)
        #[arg(long, short = 'w', value_name = "SECONDS")]
        timeout: Option<String>,
        /// Show the first bytes the service sends
        #[arg(long)]
        banner: bool,
        #[command(flatten)]
        at: LocationArg,
    },
    /// Scan ports on a host (or a small CIDR)
    Nmap {
        host: String,
        /// Ports like 22,80,443,8000-8100 (default: common service ports)
        #[arg(long, short = 'p', value_name = "PORTS")]
        ports: Option<String>,
        /// Per-port connect timeout (default 1); no answer means filtered
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<String>,
        /// Probes in flight at once (default 64)
        #[arg(long, value_name = "N")]
        concurrency: Option<u32>,
        #[command(flatten)]
        at: LocationArg,
    },
    /// List the tools and where they can run
    List,
}

/// Where a troubleshooting tool runs.
#[derive(Debug, Args)]
pub struct LocationArg {
    /// control-plane, or TYPE:ID for a connected agent (gateway, hub, spoke or
    /// device; a name or an id)
    #[arg(long, value_name = "LOCATION", default_value = "control-plane")]
    pub location: String,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Log in as this user with its password (prompted for) instead of an
    /// API key; the control plane makes a key for this CLI, which is saved
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Read the password from the first line of stdin
    #[arg(long, requires = "user")]
    pub password_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user
    Create {
        /// User name: 1-64 of A-Z a-z 0-9 . _ -
        #[arg(value_name = "NAME")]
        name: String,
        /// What the user may do
        #[arg(long, value_enum)]
        role: Role,
        /// Limit the user to nodes matching TYPE:GLOB (TYPE gateway, hub,
        /// spoke, device or *), or control-plane; repeatable; none: all nodes
        #[arg(long = "scope", value_name = "PATTERN")]
        scopes: Vec<String>,
        /// Give the user a password (asked twice on a terminal, else read
        /// from the first line of stdin)
        #[arg(long)]
        password: bool,
        /// Read the password from the first line of stdin
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users
    List,
    /// Change a user's role, scopes or password
    #[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
    Update {
        /// User name
        #[arg(value_name = "NAME")]
        name: String,
        /// New role
        #[arg(long, value_enum, group = "change")]
        role: Option<Role>,
        /// Replace the scopes with these (repeatable)
        #[arg(long = "scope", value_name = "PATTERN", group = "change")]
        scopes: Vec<String>,
        /// Remove every scope: the user reaches all nodes
        #[arg(long, conflicts_with = "scopes", group = "change")]
        clear_scopes: bool,
        /// Set a new password (asked twice on a terminal, else read from stdin)
        #[arg(long, group = "change")]
        password: bool,
        /// Read the new password from the first line of stdin
        #[arg(long, group = "change")]
        password_stdin: bool,
        /// Remove the password: the user can only use API keys
        #[arg(long, conflicts_with_all = ["password", "password_stdin"], group = "change")]
        no_password: bool,
    },
    /// Delete a user; its API keys stop working (asks nothing)
    Delete {
        /// User name
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create an API key and print it (shown only this once)
    Create {
        /// Whose key (default: yours)
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// A label, e.g. the machine it is for (default: api)
        #[arg(long, value_name = "LABEL")]
        name: Option<String>,
        /// Make it expire after this long, e.g. 30d, 12h, 90m, 3600s (default: never)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires: Option<Duration>,
        /// Limit the key further to nodes matching TYPE:GLOB, or control-plane (repeatable)
        #[arg(long = "scope", value_name = "PATTERN")]
        scopes: Vec<String>,
    },
    /// List API keys (yours, or everyone's for an admin)
    List {
        /// Only this user's keys
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Revoke an API key: it stops working at once
    Revoke {
        /// Key id (see `gatekey-admin apikey list`)
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit records, newest first
    List {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// At most this many records (more than 1000 are fetched in pages)
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
    },
    /// Check the audit log's hash chain (exit 253 when it is broken)
    Verify,
    /// Write the matching records as JSON lines, oldest first
    Export {
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Write to FILE instead of stdout (-o/--output is the output format)
        #[arg(long, value_name = "FILE")]
        output_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct AuditFilterArgs {
    /// Only this action; `session` also matches every `session.*`
    #[arg(long, value_name = "ACTION")]
    pub action: Option<String>,
    /// Only records about this agent
    #[arg(long, value_name = "AGENT")]
    pub agent: Option<String>,
    /// Only records of this user
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// From this time: RFC 3339 (2026-11-23T10:00:00Z), a date (2026-11-23, UTC) or a time ago (1h, 7d)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Up to this time (same forms as --since)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
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
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => run(cli).await,
        Err(e) => {
            if SANDBOX.try_with(|_| ()).is_ok() {
                let text = e.to_string();
                if e.use_stderr() {
                    write_stderr(text.as_bytes());
                } else {
                    let _ = write_stdout(text.as_bytes());
                }
            } else {
                let _ = e.print();
            }
            if !e.use_stderr() {
                return exit::OK;
            }
            if let Some(hint) = usage_hint(&e, &args) {
                warn(hint);
            }
            exit::USAGE
        }
    }
}

/// A pointer for usage errors that clap cannot know to give.
fn usage_hint(e: &clap::Error, args: &[std::ffi::OsString]) -> Option<&'static str> {
    let invalid_output = e.kind() == clap::error::ErrorKind::InvalidValue
        && e.get(clap::error::ContextKind::InvalidArg)
            .is_some_and(|a| a.to_string().starts_with("--output"));
    let export = args.iter().any(|a| a == "audit") && args.iter().any(|a| a == "export");
    (invalid_output && export).then_some(
        "-o/--output is the output format; write the export to a file with --output-file FILE",
    )
}

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> i32 {
    let sandboxed = SANDBOX.try_with(|s| s.settings_file.clone()).ok();
    let (file_path, env) = match sandboxed {
        Some(path) => (path, Overrides::default()),
        None => (FileConfig::default_path(), Overrides::from_env()),
    };
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
        env,
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
        Command::Login(args) => cmd::login::login(&ctx, args).await,
        Command::Logout => cmd::login::logout(&ctx).await,
        Command::Whoami => cmd::identity::whoami(&ctx).await,
        Command::User(c) => cmd::identity::user(&ctx, c).await,
        Command::Apikey(c) => cmd::identity::apikey(&ctx, c).await,
        Command::Audit(c) => cmd::audit::run(&ctx, c).await,
        Command::Troubleshoot(c) => cmd::troubleshoot::run(&ctx, c).await,
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
        Command::Replica(c) => cmd::replica::run(&ctx, c).await,
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
    write_stderr(format!("gatekey-admin: {message}\n").as_bytes());
}

/// Writes to stdout; a closed stdout becomes [`ClientError::BrokenPipe`].
pub fn print(text: &str) -> Result<(), ClientError> {
    write_stdout(text.as_bytes())
}

/// Writes bytes to stdout (or a [`Sandbox`]'s) and flushes them.
pub fn write_stdout(bytes: &[u8]) -> Result<(), ClientError> {
    if SANDBOX
        .try_with(|s| s.stdout.borrow_mut().extend_from_slice(bytes))
        .is_ok()
    {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|_| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => ClientError::BrokenPipe,
            _ => ClientError::io("writing stdout", e),
        })
}

fn write_stderr(bytes: &[u8]) {
    if SANDBOX
        .try_with(|s| s.stderr.borrow_mut().extend_from_slice(bytes))
        .is_err()
    {
        let _ = std::io::stderr().write_all(bytes);
    }
}

/// Whether stdin is a terminal (never in a [`Sandbox`]).
pub(crate) fn stdin_is_terminal() -> bool {
    SANDBOX.try_with(|_| ()).is_err() && std::io::stdin().is_terminal()
}

/// Reads one line from stdin (a [`Sandbox`]'s in tests), without its line
/// ending; `what` names it in the error when stdin is empty.
pub(crate) fn read_stdin_line(what: &str) -> Result<String, ClientError> {
    let mut line = String::new();
    let read = match SANDBOX.try_with(|s| s.stdin.borrow_mut().read_line(&mut line)) {
        Ok(read) => read,
        Err(_) => std::io::stdin().lock().read_line(&mut line),
    };
    match read {
        Ok(0) => Err(ClientError::InvalidArgument(format!("no {what} on stdin"))),
        Ok(_) => Ok(crate::stdio::strip_line_ending(line)),
        Err(e) => Err(ClientError::io(format!("reading the {what} from stdin"), e)),
    }
}

tokio::task_local! {
    static SANDBOX: SandboxIo;
}

struct SandboxIo {
    stdin: RefCell<std::io::Cursor<Vec<u8>>>,
    stdout: RefCell<Vec<u8>>,
    stderr: RefCell<Vec<u8>>,
    settings_file: Option<PathBuf>,
}

/// A run of the command line in-process with its own stdin (never a
/// terminal), stdout, stderr and settings file, and no `GATEKEY_*`
/// environment: what the integration tests drive the commands with.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    pub stdin: Vec<u8>,
    /// The settings file `login` writes (none: as if HOME were unset).
    pub settings_file: Option<PathBuf>,
}

/// What a [`Sandbox`] run printed, and its exit code.
#[derive(Debug, Clone)]
pub struct SandboxRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Sandbox {
    /// Runs `args` (program name first).
    pub async fn run<I, T>(&self, args: I) -> SandboxRun
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let io = SandboxIo {
            stdin: RefCell::new(std::io::Cursor::new(self.stdin.clone())),
            stdout: RefCell::default(),
            stderr: RefCell::default(),
            settings_file: self.settings_file.clone(),
        };
        let (code, io) = SANDBOX
            .scope(io, async {
                let code = run_args(args).await;
                let io = SANDBOX.with(|s| {
                    (
                        String::from_utf8_lossy(&s.stdout.take()).into_owned(),
                        String::from_utf8_lossy(&s.stderr.take()).into_owned(),
                    )
                });
                (code, io)
            })
            .await;
        SandboxRun {
            code,
            stdout: io.0,
            stderr: io.1,
        }
    }
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
        assert!(matches!(
            cli.command,
            Command::Login(LoginArgs {
                user: None,
                password_stdin: false
            })
        ));
    }

    #[test]
    fn user_commands() {
        match parse(&[
            "user",
            "create",
            "bob",
            "--role",
            "operator",
            "--scope",
            "spoke:dc-*",
            "--scope",
            "hub:*",
            "--password",
        ])
        .unwrap()
        .command
        {
            Command::User(UserCommand::Create {
                name,
                role,
                scopes,
                password,
                password_stdin,
            }) => {
                assert_eq!((name.as_str(), role), ("bob", Role::Operator));
                assert_eq!(scopes, ["spoke:dc-*", "hub:*"]);
                assert!(password && !password_stdin);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["user", "update", "bob", "--clear-scopes", "--no-password"])
            .unwrap()
            .command
        {
            Command::User(UserCommand::Update {
                clear_scopes,
                no_password,
                role: None,
                ..
            }) => assert!(clear_scopes && no_password),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["user", "delete", "bob"]).unwrap().command,
            Command::User(UserCommand::Delete { .. })
        ));
        for bad in [
            &["user", "create", "bob"][..],
            &["user", "create", "bob", "--role", "root"],
            &["user", "create", "bob", "--role", "viewer", "--password=x"],
            &["user", "update", "bob"],
            &[
                "user",
                "update",
                "bob",
                "--scope",
                "hub:*",
                "--clear-scopes",
            ],
            &["user", "update", "bob", "--password", "--no-password"],
            &["user", "update", "bob", "--role", "superuser"],
            &["user", "delete"],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.use_stderr(), "{bad:?} should be a usage error");
        }
    }

    #[test]
    fn apikey_and_login_commands() {
        match parse(&[
            "apikey",
            "create",
            "--user",
            "bob",
            "--name",
            "laptop",
            "--expires",
            "30d",
            "--scope",
            "hub:*",
        ])
        .unwrap()
        .command
        {
            Command::Apikey(ApiKeyCommand::Create {
                user,
                name,
                expires,
                scopes,
            }) => {
                assert_eq!(user.as_deref(), Some("bob"));
                assert_eq!(name.as_deref(), Some("laptop"));
                assert_eq!(expires, Some(Duration::from_secs(30 * 86400)));
                assert_eq!(scopes, ["hub:*"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["apikey", "create", "--expires", "soon"]).is_err());
        assert!(matches!(
            parse(&["apikey", "revoke", "k_1"]).unwrap().command,
            Command::Apikey(ApiKeyCommand::Revoke { .. })
        ));
        match parse(&["login", "--user", "bob", "--password-stdin"])
            .unwrap()
            .command
        {
            Command::Login(LoginArgs {
                user: Some(user),
                password_stdin: true,
            }) => assert_eq!(user, "bob"),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["login", "--password-stdin"]).is_err());
        assert!(matches!(
            parse(&["whoami", "-o", "json"]).unwrap().command,
            Command::Whoami
        ));
    }

    #[test]
    fn audit_commands() {
        match parse(&["audit", "list", "--action", "session"])
            .unwrap()
            .command
        {
            Command::Audit(AuditCommand::List { filter, limit }) => {
                assert_eq!(filter.action.as_deref(), Some("session"));
                assert_eq!(limit, 100);
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "audit",
            "export",
            "--user",
            "bob",
            "--since",
            "7d",
            "--output-file",
            "a.ndjson",
        ])
        .unwrap()
        .command
        {
            Command::Audit(AuditCommand::Export {
                filter,
                output_file,
            }) => {
                assert_eq!(filter.since.as_deref(), Some("7d"));
                assert_eq!(output_file, Some(PathBuf::from("a.ndjson")));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["audit", "list", "--limit", "0"]).is_err());
        assert!(matches!(
            parse(&["audit", "verify", "-o", "json"]).unwrap().command,
            Command::Audit(AuditCommand::Verify)
        ));
        // -o/--output is the global output format; the export says where
        // a file goes instead.
        let args: Vec<std::ffi::OsString> =
            ["gatekey-admin", "audit", "export", "--output", "a.ndjson"]
                .into_iter()
                .map(Into::into)
                .collect();
        let e = Cli::try_parse_from(&args).unwrap_err();
        assert!(
            usage_hint(&e, &args)
                .unwrap()
                .contains("--output-file FILE")
        );
        let text = parse(&["--help"]).unwrap_err().to_string();
        for command in ["user", "apikey", "audit", "whoami"] {
            assert!(text.contains(command), "{command} missing:\n{text}");
        }
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
