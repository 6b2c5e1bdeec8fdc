//! Control protocol between `safekit` and `safekitd`: one JSON request and
//! one JSON response per line over the Unix socket `/run/safekit/safekitd.sock`
//! (root only: the socket is created mode 0600).

use std::{
    io::BufRead as _, io::Write as _, os::unix::net::UnixStream, path::Path, time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::status::NodeStatus;

/// A command for the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Status of every module.
    State,
    /// Start a module.
    Start {
        /// Module name.
        module: String,
    },
    /// Stop a module.
    Stop {
        /// Module name.
        module: String,
    },
    /// Stop every module and exit.
    Shutdown,
    /// A mirror module command.
    Mirror {
        /// Module.
        module: String,
        /// What to do.
        cmd: MirrorCmd,
        /// `fullsync`: the next resynchronisation copies everything.
        #[serde(default)]
        fullsync: bool,
    },
    /// Compare both copies of a mirror module's replicated directories
    /// (run on the primary).
    RfsVerify {
        /// Module.
        module: String,
    },
    /// Set a resource (`custom.<name>`) up or down: custom checkers.
    SetResource {
        /// Module.
        module: String,
        /// Resource name, e.g. `custom.db`.
        resource: String,
        /// Up (true) or down.
        up: bool,
    },
    /// `config apply` (`rollback`: the previous configuration): check this
    /// node's configuration and send it to every node.
    ConfigApply {
        /// Only this module's directory (with `cluster.toml`).
        #[serde(default)]
        module: Option<String>,
        /// Apply the version kept before the last change instead.
        #[serde(default)]
        rollback: bool,
    },
    /// Which node of a farm serves a client.
    FarmWhich {
        /// Farm module.
        module: String,
        /// Client address.
        client: std::net::IpAddr,
        /// Client port (for `client_ip_port` rules).
        port: Option<u16>,
        /// Destination port selecting the rule (default: the first rule).
        dport: Option<u16>,
    },
}

/// What `config apply` did on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ApplyOutcome {
    /// Written and reloaded; what the operator should know per module.
    Applied {
        /// Notes (changes applied now, or at the next start).
        notes: Vec<String>,
    },
    /// The node has this configuration already.
    Unchanged,
    /// Refused: nothing written.
    Refused {
        /// Why (file, line, key for an invalid configuration).
        error: String,
    },
    /// No answer.
    Unreachable {
        /// What failed.
        error: String,
    },
}

impl Request {
    /// The command as `safekit` spells it (`start -m web`, `prim -m web
    /// fullsync`), for the commands log; `None` for the read-only queries
    /// (`state`, `farm which-node`), which `waitstate` and monitoring poll
    /// and which change nothing.
    #[must_use]
    pub fn command_line(&self) -> Option<String> {
        Some(match self {
            Request::State | Request::FarmWhich { .. } => return None,
            Request::Start { module } => format!("start -m {module}"),
            Request::Stop { module } => format!("stop -m {module}"),
            Request::Shutdown => "shutdown".to_owned(),
            Request::Mirror {
                module,
                cmd,
                fullsync,
            } => format!(
                "{} -m {module}{}",
                cmd.name(),
                if *fullsync { " fullsync" } else { "" }
            ),
            Request::RfsVerify { module } => format!("rfs verify -m {module}"),
            Request::ConfigApply {
                module: _,
                rollback: true,
            } => "config rollback".to_owned(),
            Request::ConfigApply {
                module,
                rollback: false,
            } => match module {
                Some(m) => format!("config apply -m {m}"),
                None => "config apply".to_owned(),
            },
            Request::SetResource {
                module,
                resource,
                up,
            } => format!(
                "set -m {module} -r {resource} -v {}",
                if *up { "up" } else { "down" }
            ),
        })
    }
}

impl Response {
    /// One line for the commands log: `ok: ...` or `error: ...`.
    #[must_use]
    pub fn outcome(&self) -> String {
        let text = match self {
            Response::Ok { message } => format!("ok: {message}"),
            Response::Error { error } => format!("error: {error}"),
            Response::State { .. } | Response::Which { .. } => "ok".to_owned(),
            Response::Applied { nodes } => nodes
                .iter()
                .map(|(n, o)| match o {
                    ApplyOutcome::Applied { .. } => format!("{n} applied"),
                    ApplyOutcome::Unchanged => format!("{n} unchanged"),
                    ApplyOutcome::Refused { error } => format!("{n} refused: {error}"),
                    ApplyOutcome::Unreachable { error } => format!("{n} unreachable: {error}"),
                })
                .collect::<Vec<_>>()
                .join("; "),
            Response::Verified { dirs } => {
                let differences: usize = dirs.iter().map(|(_, _, d)| d.len()).sum();
                format!(
                    "ok: {} directories compared, {differences} differences",
                    dirs.len()
                )
            }
        };
        text.replace('\n', " / ")
    }
}

/// Mirror commands (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorCmd {
    /// Force primary (refused if the peer is primary).
    Prim,
    /// Force secondary (refused if the peer is not primary).
    Second,
    /// Primary even when data may be inconsistent.
    PrimForce,
    /// Exchange roles (run on the primary).
    Swap,
    /// Restart the application on this node, same role.
    Restart,
    /// Stop the module here, then start it again (it may fail over).
    StopStart,
    /// Stop at once, with `stop_prim force`.
    ForceStop,
}

impl MirrorCmd {
    /// The `safekit` subcommand.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            MirrorCmd::Prim => "prim",
            MirrorCmd::Second => "second",
            MirrorCmd::PrimForce => "primforce",
            MirrorCmd::Swap => "swap",
            MirrorCmd::Restart => "restart",
            MirrorCmd::StopStart => "stopstart",
            MirrorCmd::ForceStop => "forcestop",
        }
    }
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done; a message for the operator.
    Ok {
        /// What happened.
        message: String,
    },
    /// Refused or failed; nothing changed.
    Error {
        /// What is wrong.
        error: String,
    },
    /// Status snapshot.
    State {
        /// The node.
        status: NodeStatus,
    },
    /// Answer to `RfsVerify`: per directory, the differences (empty:
    /// equal) and the number of entries compared.
    Verified {
        /// (directory, entries on the primary, differences).
        dirs: Vec<(String, usize, Vec<String>)>,
    },
    /// Answer to `ConfigApply`: each node's outcome.
    Applied {
        /// (node, outcome), in the cluster's order.
        nodes: Vec<(String, ApplyOutcome)>,
    },
    /// Answer to `FarmWhich`.
    Which {
        /// The client's bucket.
        bucket: u32,
        /// Its owner under this node's current membership view.
        node: Option<String>,
        /// The filter used (`client_ip` or `client_ip_port`).
        filter: String,
    },
}

/// Longest control request the daemon reads (one JSON line); a longer one
/// is answered with an error and its connection closed.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Decodes one request line (without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes: refused"));
    }
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listening there.
    #[error("cannot reach safekitd at {path}: {source} (is safekitd running with this --root?)")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("talking to safekitd: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon answered something unreadable.
    #[error("unreadable answer from safekitd: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request and waits for the answer (blocking; for the CLI).
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}
