//! The client commands of the `flotilla` binary, shaped after etcdctl 3.4 so habits carry
//! over: same command names and flags, same `-w simple|json|table` output, same exit codes
//! (1 error, 3 invalid input, 4 unsupported output format).
//!
//! The binary flattens [`GlobalArgs`] and [`ClientCommand`] into its own parser and calls
//! [`run`]:
//!
//! ```ignore
//! #[derive(clap::Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     global: flotilla_client::cli::GlobalArgs,
//!     #[command(subcommand)]
//!     command: Command,
//! }
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     Serve(ServeArgs),
//!     #[command(flatten)]
//!     Client(flotilla_client::cli::ClientCommand),
//! }
//! // Command::Client(command) => flotilla_client::cli::run(&cli.global, command).await
//! ```

mod bench;
mod lease;
mod lock;
mod output;
mod txn;
mod watch;

use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand, ValueEnum};
use flotilla_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, range_request::SortOrder,
    range_request::SortTarget,
};

pub use bench::{BenchArgs, BenchReport};
pub use lease::LeaseCommand;
pub use output::OutputFormat;
pub use watch::WatchArgs;

use crate::{Client, ClientConfig, ClientError, Credentials, SessionPolicy, prefix_range_end};

/// etcd's local-cluster convention, which `flotilla dev` follows.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379";

/// etcdctl's exit codes.
const EXIT_ERROR: u8 = 1;
const EXIT_INVALID_INPUT: u8 = 3;
const EXIT_BAD_FEATURE: u8 = 4;

/// Flags shared by every client command.
#[derive(Args, Clone, Debug)]
pub struct GlobalArgs {
    /// gRPC endpoints, comma-separated.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINTS
    )]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(
        short = 'w',
        long = "write-out",
        global = true,
        value_enum,
        default_value = "simple"
    )]
    pub write_out: OutputFormat,
    /// Timeout of establishing a connection (e.g. 2s, 500ms).
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// Timeout of a command, retries included.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub command_timeout: Duration,
    /// TLS: the CA that signed the servers' certificates (PEM); endpoints without a scheme
    /// are then dialed over https.
    #[arg(long, id = "tls_cacert", global = true, env = "FLOTILLA_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
    /// TLS: a client certificate (PEM), for servers with client certificate authentication.
    #[arg(long, id = "tls_cert", global = true, env = "FLOTILLA_CERT")]
    pub cert: Option<std::path::PathBuf>,
    /// TLS: the key of --cert (PEM).
    // Its own id: subcommands have a `key` argument of their own.
    #[arg(long = "key", id = "tls_key", global = true, env = "FLOTILLA_KEY")]
    pub key: Option<std::path::PathBuf>,
    /// TLS: accept any server certificate (servers started with --auto-tls). Encrypts, but
    /// does not authenticate the server.
    #[arg(long, global = true, env = "FLOTILLA_INSECURE_SKIP_TLS_VERIFY")]
    pub insecure_skip_tls_verify: bool,
    /// Authentication: `user:password`, or `user` with --password (etcdctl's flag). The
    /// client authenticates first and sends the token with every request.
    #[arg(long, global = true, env = "FLOTILLA_USER")]
    pub user: Option<String>,
    /// The password of --user, when it is not given as `user:password`.
    #[arg(long, global = true, env = "FLOTILLA_PASSWORD")]
    pub password: Option<String>,
}

impl GlobalArgs {
    /// The client configuration these flags describe. The CLI does not route writes to the
    /// leader: any member forwards them, and a one-shot command saves the lookup.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new(self.endpoints.iter().map(|endpoint| endpoint.trim()))
            .with_dial_timeout(self.dial_timeout)
            .with_call_timeout(self.command_timeout)
            .with_sessions(SessionPolicy::Sessions { pool_size: 1 })
            .with_leader_routing(false)
            .with_tls(self.tls())
            .with_credentials(self.credentials())
    }

    /// The user and password of --user (and --password), if given.
    pub fn credentials(&self) -> Option<Credentials> {
        let user = self.user.as_ref()?;
        let (user, password) = match (user.split_once(':'), &self.password) {
            (Some((user, password)), _) => (user, password),
            (None, Some(password)) => (user.as_str(), password.as_str()),
            (None, None) => (user.as_str(), ""),
        };
        Some(Credentials {
            user: user.to_string(),
            password: password.to_string(),
        })
    }

    /// The TLS settings, if any TLS flag was given.
    pub fn tls(&self) -> Option<flotilla_tls::ClientTls> {
        let given = self.cacert.is_some()
            || self.cert.is_some()
            || self.key.is_some()
            || self.insecure_skip_tls_verify;
        given.then(|| flotilla_tls::ClientTls {
            trusted_ca: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            insecure_skip_verify: self.insecure_skip_tls_verify,
        })
    }

    /// One eagerly connected channel to `endpoint` (TLS as the flags say), for commands that
    /// talk to one member directly.
    pub async fn connect_one(&self, endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
        use anyhow::Context;
        let tls = self.tls().map(|tls| tls.config()).transpose()?;
        let url = crate::normalize_url(endpoint, tls.is_some())?;
        let builder = tonic::transport::Endpoint::from_shared(url)
            .with_context(|| format!("invalid endpoint {endpoint:?}"))?
            .connect_timeout(self.dial_timeout)
            .tcp_nodelay(true);
        let channel = match tls {
            Some(config) => {
                builder
                    .connect_with_connector(flotilla_tls::TlsConnector { config })
                    .await
            }
            None => builder.connect().await,
        };
        channel.with_context(|| format!("cannot connect to {endpoint}"))
    }
}

/// The client commands.
#[derive(Subcommand, Clone, Debug)]
pub enum ClientCommand {
    /// Puts the given key into the store (the value is read from stdin if omitted).
    Put(PutArgs),
    /// Gets the key or a range of keys.
    Get(GetArgs),
    /// Removes the key or a range of keys.
    Del(DelArgs),
    /// Runs a transaction read from stdin: compares, blank line, success requests, blank
    /// line, failure requests.
    Txn(TxnArgs),
    /// Compacts the event history up to a revision.
    #[command(visible_alias = "compaction")]
    Compact(CompactArgs),
    /// Membership: list, add, remove, promote.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Watches a key or range and prints its events (history first with `--rev`).
    Watch(WatchArgs),
    /// Leases: grant, revoke, timetolive, list, keep-alive.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Status of each endpoint: id, leader, term, raft index, applied index, revision, db
    /// size.
    Status,
    /// Transfers leadership to the member with the given id (hex).
    MoveLeader(MoveLeaderArgs),
    /// Measures write (and optionally read) throughput and latency through the etcd API.
    Bench(BenchArgs),
    /// Acquires a named lock (the Lock service), holds it until interrupted or while a
    /// command runs.
    Lock(lock::LockArgs),
    /// Campaigns in a named election (the Election service), or with -l prints its leaders.
    Elect(lock::ElectArgs),
}

#[derive(Args, Clone, Debug)]
pub struct PutArgs {
    pub key: String,
    pub value: Option<String>,
    /// Also return the previous key-value pair.
    #[arg(long)]
    pub prev_kv: bool,
    /// Attach the key to a lease (hex id).
    #[arg(long, value_parser = parse_hex_i64, default_value = "0")]
    pub lease: i64,
}

#[derive(Args, Clone, Debug)]
pub struct GetArgs {
    pub key: String,
    /// End of the range [key, range_end).
    pub range_end: Option<String>,
    /// Get keys with a matching prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Get keys greater than or equal to the given key.
    #[arg(long)]
    pub from_key: bool,
    /// Read at this revision (0: latest).
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Maximum number of results (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Linearizable (l) or serializable (s).
    #[arg(long, value_enum, default_value = "l")]
    pub consistency: Consistency,
    /// Get only the keys.
    #[arg(long)]
    pub keys_only: bool,
    /// Get only the count.
    #[arg(long)]
    pub count_only: bool,
    /// Only write values (simple format).
    #[arg(long)]
    pub print_value_only: bool,
    /// Sort target.
    #[arg(long, value_enum)]
    pub sort_by: Option<SortBy>,
    /// Order of results.
    #[arg(long, value_enum)]
    pub order: Option<Order>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    #[value(name = "l")]
    Linearizable,
    #[value(name = "s")]
    Serializable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum SortBy {
    Create,
    Key,
    Modify,
    Value,
    Version,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum Order {
    Ascend,
    Descend,
}

#[derive(Args, Clone, Debug)]
pub struct DelArgs {
    pub key: String,
    pub range_end: Option<String>,
    /// Delete keys with a matching prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Delete keys greater than or equal to the given key.
    #[arg(long)]
    pub from_key: bool,
    /// Return the deleted key-value pairs.
    #[arg(long)]
    pub prev_kv: bool,
}

#[derive(Args, Clone, Debug)]
pub struct TxnArgs {
    /// Prompt for each section.
    #[arg(short, long)]
    pub interactive: bool,
}

#[derive(Args, Clone, Debug)]
pub struct CompactArgs {
    pub revision: i64,
    /// Wait until the compaction is physically applied.
    #[arg(long)]
    pub physical: bool,
}

#[derive(Subcommand, Clone, Debug)]
pub enum MemberCommand {
    /// Lists all members.
    List,
    /// Adds a member.
    Add {
        name: String,
        /// Comma-separated peer URLs of the new member.
        #[arg(long, value_delimiter = ',', required = true)]
        peer_urls: Vec<String>,
        /// Add as a learner (non-voting).
        #[arg(long)]
        learner: bool,
    },
    /// Removes a member (hex id).
    Remove {
        #[arg(value_parser = parse_member_id)]
        id: u64,
    },
    /// Promotes a learner to a voting member (hex id).
    Promote {
        #[arg(value_parser = parse_member_id)]
        id: u64,
    },
    /// Updates a member's peer URLs (hex id).
    Update {
        #[arg(value_parser = parse_member_id)]
        id: u64,
        #[arg(long, value_delimiter = ',', required = true)]
        peer_urls: Vec<String>,
    },
}

#[derive(Args, Clone, Debug)]
pub struct MoveLeaderArgs {
    /// The new leader's member id (hex).
    #[arg(value_parser = parse_member_id)]
    pub id: u64,
}

/// Bad input from the user (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// An output format the command does not offer (exit code 4).
#[derive(Debug, thiserror::Error)]
#[error("{0} not supported as output format")]
struct Unsupported(&'static str);

/// Runs a command with the process's stdin and stdout. Errors are printed to stderr as
/// etcdctl prints them ("Error: ...") and become etcdctl's exit codes, so the caller only
/// returns the code.
pub async fn run(global: &GlobalArgs, command: ClientCommand) -> anyhow::Result<ExitCode> {
    // Not a StdinLock: that is not Send, and the binary may spawn this future.
    let mut input = io::BufReader::new(io::stdin());
    run_with_io(global, command, &mut input, &mut io::stdout()).await
}

/// [`run`] with the given input and output, for tests and embedding.
pub async fn run_with_io(
    global: &GlobalArgs,
    command: ClientCommand,
    input: &mut (dyn BufRead + Send),
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let result = execute(global, command, input, out).await;
    out.flush()?;
    Ok(match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("Error: {error}");
            ExitCode::from(exit_code(&error))
        }
    })
}

fn exit_code(error: &anyhow::Error) -> u8 {
    if error.is::<InvalidInput>() {
        EXIT_INVALID_INPUT
    } else if error.is::<Unsupported>() {
        EXIT_BAD_FEATURE
    } else {
        EXIT_ERROR
    }
}

async fn execute(
    global: &GlobalArgs,
    command: ClientCommand,
    input: &mut (dyn BufRead + Send),
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let format = global.write_out;
    if let ClientCommand::Bench(args) = command {
        return bench::run(global, &args, out).await;
    }
    let client = Client::connect(global.client_config()).await?;
    let code = match command {
        ClientCommand::Put(args) => put(&client, format, args, input, out).await?,
        ClientCommand::Get(args) => get(&client, format, &args, out).await?,
        ClientCommand::Del(args) => delete(&client, format, &args, out).await?,
        ClientCommand::Txn(args) => txn(&client, format, &args, input, out).await?,
        ClientCommand::Compact(args) => compact(&client, format, &args, out).await?,
        ClientCommand::Member(command) => member(&client, format, command, out).await?,
        ClientCommand::Watch(args) => watch::run(&client, format, &args, out).await?,
        ClientCommand::Lease(command) => lease::run(&client, format, command, out).await?,
        ClientCommand::Status => status(&client, format, out).await?,
        ClientCommand::MoveLeader(args) => move_leader(&client, format, &args, out).await?,
        ClientCommand::Lock(args) => lock::lock(&client, &args, out).await?,
        ClientCommand::Elect(args) => lock::elect(&client, &args, out).await?,
        ClientCommand::Bench(_) => unreachable!("handled above"),
    };
    client.close().await;
    Ok(code)
}

/// Refuses `-w table` where etcdctl has no table either.
fn no_table(format: OutputFormat) -> anyhow::Result<()> {
    if format == OutputFormat::Table {
        return Err(Unsupported("table").into());
    }
    Ok(())
}

impl PutArgs {
    fn to_request(&self) -> Result<PutRequest, InvalidInput> {
        let value = self.value.clone().ok_or_else(|| {
            InvalidInput("put command needs 1 argument and input from stdin or 2 arguments".into())
        })?;
        Ok(PutRequest {
            key: self.key.clone().into(),
            value: value.into(),
            lease: self.lease,
            prev_kv: self.prev_kv,
            ..Default::default()
        })
    }
}

/// The `range_end` a key argument, an explicit end and `--prefix`/`--from-key` select.
fn range_end_of(
    key: &str,
    range_end: &Option<String>,
    prefix: bool,
    from_key: bool,
) -> Result<(Bytes, Bytes), InvalidInput> {
    if [range_end.is_some(), prefix, from_key]
        .iter()
        .filter(|set| **set)
        .count()
        > 1
    {
        return Err(InvalidInput(
            "`range_end`, --prefix and --from-key exclude each other".into(),
        ));
    }
    let key_bytes = Bytes::from(key.to_string());
    Ok(if prefix && key.is_empty() {
        // Every key: etcdctl sends "\0".."\0".
        (Bytes::from_static(b"\0"), Bytes::from_static(b"\0"))
    } else if prefix {
        let end = prefix_range_end(key.as_bytes());
        (key_bytes, end)
    } else if from_key {
        let key_bytes = if key.is_empty() {
            Bytes::from_static(b"\0")
        } else {
            key_bytes
        };
        (key_bytes, Bytes::from_static(b"\0"))
    } else {
        let end = range_end.clone().map(Bytes::from).unwrap_or_default();
        (key_bytes, end)
    })
}

impl GetArgs {
    fn to_request(&self) -> Result<RangeRequest, InvalidInput> {
        let (key, range_end) =
            range_end_of(&self.key, &self.range_end, self.prefix, self.from_key)?;
        let sort_target = match self.sort_by.unwrap_or(SortBy::Key) {
            SortBy::Create => SortTarget::Create,
            SortBy::Key => SortTarget::Key,
            SortBy::Modify => SortTarget::Mod,
            SortBy::Value => SortTarget::Value,
            SortBy::Version => SortTarget::Version,
        };
        let sort_order = match (self.order, self.sort_by) {
            (Some(Order::Ascend), _) => SortOrder::Ascend,
            (Some(Order::Descend), _) => SortOrder::Descend,
            // Sorting by anything but the key means ascending, as in etcdctl.
            (None, Some(by)) if by != SortBy::Key => SortOrder::Ascend,
            (None, _) => SortOrder::None,
        };
        Ok(RangeRequest {
            key,
            range_end,
            limit: self.limit,
            revision: self.rev,
            sort_order: sort_order as i32,
            sort_target: sort_target as i32,
            serializable: self.consistency == Consistency::Serializable,
            keys_only: self.keys_only,
            count_only: self.count_only,
            ..Default::default()
        })
    }
}

impl DelArgs {
    fn to_request(&self) -> Result<DeleteRangeRequest, InvalidInput> {
        let (key, range_end) =
            range_end_of(&self.key, &self.range_end, self.prefix, self.from_key)?;
        Ok(DeleteRangeRequest {
            key,
            range_end,
            prev_kv: self.prev_kv,
        })
    }
}

async fn put(
    client: &Client,
    format: OutputFormat,
    mut args: PutArgs,
    input: &mut (dyn BufRead + Send),
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    no_table(format)?;
    if args.value.is_none() {
        let mut value = String::new();
        input.read_to_string(&mut value)?;
        args.value = Some(value);
    }
    let response = client.put_request(args.to_request()?).await?;
    match format {
        OutputFormat::Json => output::write_json(out, &output::put_json(&response))?,
        _ => output::simple_put(out, &response)?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(
    client: &Client,
    format: OutputFormat,
    args: &GetArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    no_table(format)?;
    let response = client.range(args.to_request()?).await?;
    match format {
        OutputFormat::Json => output::write_json(out, &output::range_json(&response))?,
        _ if args.count_only => writeln!(out, "{}", response.count)?,
        _ => output::simple_range(out, &response, args.print_value_only)?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn delete(
    client: &Client,
    format: OutputFormat,
    args: &DelArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    no_table(format)?;
    let response = client.delete_range(args.to_request()?).await?;
    match format {
        OutputFormat::Json => output::write_json(out, &output::delete_json(&response))?,
        _ => output::simple_delete(out, &response)?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn txn(
    client: &Client,
    format: OutputFormat,
    args: &TxnArgs,
    input: &mut (dyn BufRead + Send),
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    no_table(format)?;
    let prompts: Option<&mut dyn Write> = if args.interactive {
        Some(&mut *out)
    } else {
        None
    };
    let request = txn::read_txn(input, prompts)?;
    let response = client.txn(request).await?;
    match format {
        OutputFormat::Json => output::write_json(out, &output::txn_json(&response))?,
        _ => output::simple_txn(out, &response)?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn compact(
    client: &Client,
    format: OutputFormat,
    args: &CompactArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    no_table(format)?;
    let request = flotilla_proto::etcdserverpb::CompactionRequest {
        revision: args.revision,
        physical: args.physical,
    };
    let response = client.compact_request(request).await?;
    match format {
        OutputFormat::Json => {
            output::write_json(out, &output::header_only_json(response.header.as_ref()))?
        }
        _ => writeln!(out, "compacted revision {}", args.revision)?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn member(
    client: &Client,
    format: OutputFormat,
    command: MemberCommand,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let (header, members, message) = match command {
        MemberCommand::List => {
            let response = client.member_list().await?;
            let rows = output::member_rows(&response.members);
            match format {
                OutputFormat::Json => output::write_json(
                    out,
                    &output::members_json(response.header.as_ref(), &response.members),
                )?,
                OutputFormat::Table => {
                    write!(out, "{}", output::table(&output::MEMBER_HEADERS, &rows))?
                }
                OutputFormat::Simple => output::simple_members(out, &response.members)?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        MemberCommand::Add {
            name,
            peer_urls,
            learner,
        } => {
            no_table(format)?;
            let response = client.member_add(peer_urls, learner).await?;
            if format == OutputFormat::Json {
                let mut value = output::members_json(response.header.as_ref(), &response.members);
                if let Some(member) = &response.member {
                    value["member"] = output::member_json(member);
                }
                output::write_json(out, &value)?;
                return Ok(ExitCode::SUCCESS);
            }
            let cluster_id = response
                .header
                .as_ref()
                .map_or(0, |header| header.cluster_id);
            let added = response.member.clone().unwrap_or_default();
            writeln!(
                out,
                "Member {:>16x} added to cluster {cluster_id:>16x}\n",
                added.id
            )?;
            write_new_member_environment(out, &name, &added, &response.members)?;
            return Ok(ExitCode::SUCCESS);
        }
        MemberCommand::Remove { id } => {
            let response = client.member_remove(id).await?;
            (
                response.header,
                response.members,
                format!("Member {id:>16x} removed from"),
            )
        }
        MemberCommand::Promote { id } => {
            let response = client.member_promote(id).await?;
            (
                response.header,
                response.members,
                format!("Member {id:>16x} promoted in"),
            )
        }
        MemberCommand::Update { id, peer_urls } => {
            let response = client.member_update(id, peer_urls).await?;
            (
                response.header,
                response.members,
                format!("Member {id:>16x} updated in"),
            )
        }
    };
    match format {
        OutputFormat::Json => {
            output::write_json(out, &output::members_json(header.as_ref(), &members))?
        }
        OutputFormat::Table => return Err(Unsupported("table").into()),
        OutputFormat::Simple => {
            let cluster_id = header.as_ref().map_or(0, |header| header.cluster_id);
            writeln!(out, "{message} cluster {cluster_id:>16x}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What to start the new member with, as etcdctl prints it, in `flotilla serve`'s
/// environment variables.
fn write_new_member_environment(
    out: &mut (dyn Write + Send),
    name: &str,
    added: &flotilla_proto::etcdserverpb::Member,
    members: &[flotilla_proto::etcdserverpb::Member],
) -> io::Result<()> {
    let initial_cluster: Vec<String> = members
        .iter()
        .flat_map(|member| {
            let member_name = if member.id == added.id {
                name
            } else {
                &member.name
            };
            member
                .peer_urls
                .iter()
                .map(move |url| format!("{member_name}={url}"))
        })
        .collect();
    writeln!(out, "FLOTILLA_NAME=\"{name}\"")?;
    writeln!(
        out,
        "FLOTILLA_INITIAL_CLUSTER=\"{}\"",
        initial_cluster.join(",")
    )?;
    writeln!(
        out,
        "FLOTILLA_INITIAL_ADVERTISE_PEER_URLS=\"{}\"",
        added.peer_urls.join(",")
    )?;
    writeln!(out, "FLOTILLA_INITIAL_CLUSTER_STATE=\"existing\"")
}

async fn status(
    client: &Client,
    format: OutputFormat,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let statuses = client.endpoint_statuses().await;
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    let mut failed = false;
    for entry in &statuses {
        match &entry.status {
            Ok(status) => {
                rows.push(output::status_row(&entry.endpoint, status));
                json_rows.push(serde_json::json!({
                    "Endpoint": entry.endpoint,
                    "Status": output::status_json(status),
                }));
            }
            Err(error) => {
                failed = true;
                eprintln!(
                    "Failed to get the status of endpoint {} ({error})",
                    entry.endpoint
                );
            }
        }
    }
    match format {
        OutputFormat::Json => output::write_json(out, &serde_json::Value::Array(json_rows))?,
        OutputFormat::Table => write!(out, "{}", output::table(&output::STATUS_HEADERS, &rows))?,
        OutputFormat::Simple => {
            for row in rows {
                writeln!(out, "{}", row.join(", "))?;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(EXIT_ERROR)
    } else {
        ExitCode::SUCCESS
    })
}

async fn move_leader(
    client: &Client,
    format: OutputFormat,
    args: &MoveLeaderArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    no_table(format)?;
    let former_leader = client.move_leader(args.id).await?;
    writeln!(
        out,
        "Leadership transferred from {former_leader:x} to {:x}",
        args.id
    )?;
    Ok(ExitCode::SUCCESS)
}

/// etcdctl-style durations: `2s`, `500ms`, `1m`, `1.5s`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|character: char| !(character.is_ascii_digit() || character == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (expected e.g. 2s, 500ms)"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "us" | "µs" => number / 1_000_000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use h, m, s, ms, us)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds)
        .map_err(|error| format!("invalid duration {text:?}: {error}"))
}

/// Member ids are hex, as etcdctl prints and parses them.
fn parse_member_id(text: &str) -> Result<u64, String> {
    u64::from_str_radix(text, 16).map_err(|_| format!("bad member ID arg ({text:?} is not hex)"))
}

fn parse_hex_i64(text: &str) -> Result<i64, String> {
    i64::from_str_radix(text, 16).map_err(|_| format!("bad lease ID ({text:?} is not hex)"))
}

/// The error's outcome, for callers that report it (e.g. the chaos harness via the CLI).
pub fn describe_outcome(error: &ClientError) -> &'static str {
    match error.outcome() {
        crate::Outcome::Applied => "applied",
        crate::Outcome::NotApplied => "not applied",
        crate::Outcome::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> TestCli {
        TestCli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn global_flags_anywhere_and_defaults() {
        let cli = parse(&["get", "k", "-w", "json", "--endpoints", "a:1,b:2"]);
        assert_eq!(cli.global.write_out, OutputFormat::Json);
        assert_eq!(cli.global.endpoints, ["a:1", "b:2"]);
        let cli = parse(&["status"]);
        if std::env::var_os("FLOTILLA_ENDPOINTS").is_none() {
            assert_eq!(cli.global.endpoints.join(","), DEFAULT_ENDPOINTS);
        }
        assert_eq!(cli.global.command_timeout, Duration::from_secs(5));
    }

    #[test]
    fn get_flags_become_a_range_request() {
        let ClientCommand::Get(args) = parse(&[
            "get",
            "f",
            "--prefix",
            "--rev",
            "7",
            "--limit",
            "2",
            "--consistency",
            "s",
            "--keys-only",
        ])
        .command
        else {
            panic!("not a get");
        };
        let request = args.to_request().unwrap();
        assert_eq!(
            (&request.key[..], &request.range_end[..]),
            (&b"f"[..], &b"g"[..])
        );
        assert_eq!((request.revision, request.limit), (7, 2));
        assert!(request.serializable && request.keys_only);
        let ClientCommand::Get(all) = parse(&["get", "", "--prefix"]).command else {
            panic!()
        };
        let request = all.to_request().unwrap();
        assert_eq!(
            (&request.key[..], &request.range_end[..]),
            (&b"\0"[..], &b"\0"[..])
        );
        let ClientCommand::Get(from) = parse(&["get", "a", "--from-key"]).command else {
            panic!()
        };
        assert_eq!(&from.to_request().unwrap().range_end[..], b"\0");
        let ClientCommand::Get(both) = parse(&["get", "a", "--from-key", "--prefix"]).command
        else {
            panic!()
        };
        assert!(both.to_request().is_err());
    }

    #[test]
    fn sorting_by_a_target_other_than_key_ascends() {
        let ClientCommand::Get(args) =
            parse(&["get", "a", "--prefix", "--sort-by", "MODIFY"]).command
        else {
            panic!()
        };
        let request = args.to_request().unwrap();
        assert_eq!(request.sort_target, SortTarget::Mod as i32);
        assert_eq!(request.sort_order, SortOrder::Ascend as i32);
    }

    #[test]
    fn member_commands_take_hex_ids() {
        let ClientCommand::Member(MemberCommand::Remove { id }) =
            parse(&["member", "remove", "bdae9bbc11dd390d"]).command
        else {
            panic!()
        };
        assert_eq!(id, 0xbdae9bbc11dd390d);
        let ClientCommand::Member(MemberCommand::Add {
            peer_urls, learner, ..
        }) = parse(&[
            "member",
            "add",
            "n4",
            "--peer-urls",
            "http://127.0.0.1:42380",
            "--learner",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(peer_urls, ["http://127.0.0.1:42380"]);
        assert!(learner);
        assert!(TestCli::try_parse_from(["flotilla", "member", "remove", "xyz"]).is_err());
    }

    #[test]
    fn new_member_environment_lists_the_cluster() {
        use flotilla_proto::etcdserverpb::Member;
        let old = Member {
            id: 1,
            name: "a".into(),
            peer_urls: vec!["http://p1".into()],
            ..Default::default()
        };
        let new = Member {
            id: 2,
            peer_urls: vec!["http://p2".into()],
            ..Default::default()
        };
        let mut out = Vec::new();
        write_new_member_environment(&mut out, "b", &new, &[old, new.clone()]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "FLOTILLA_NAME=\"b\"\nFLOTILLA_INITIAL_CLUSTER=\"a=http://p1,b=http://p2\"\n\
             FLOTILLA_INITIAL_ADVERTISE_PEER_URLS=\"http://p2\"\nFLOTILLA_INITIAL_CLUSTER_STATE=\"existing\"\n"
        );
    }
}
