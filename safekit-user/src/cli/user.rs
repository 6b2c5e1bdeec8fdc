//! `safekit user add|del|passwd|list` and `safekit apikey
//! create|list|del`: the REST API's users and keys in the node's config
//! dir (`users.toml`, `apikeys.toml`; copy them to every node).

use std::io::BufRead as _;

use clap::Subcommand;

use crate::{
    auth::{self, Role},
    paths::Paths,
};

fn role_arg(s: &str) -> Result<Role, String> {
    Role::parse(s).map_err(|e| e.to_string())
}

/// `safekit user ...`.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user; the password is read from stdin (one line).
    Add {
        /// Login name.
        name: String,
        /// monitor, control or admin.
        #[arg(long, value_parser = role_arg)]
        role: Role,
        /// Read the password from stdin (required: never on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Remove a user.
    Del {
        /// Login name.
        name: String,
    },
    /// Change a user's password (read from stdin) and optionally its role.
    Passwd {
        /// Login name.
        name: String,
        /// New role.
        #[arg(long, value_parser = role_arg)]
        role: Option<Role>,
        /// Read the password from stdin (required).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List users and roles.
    List,
}

/// `safekit apikey ...`.
#[derive(Subcommand, Debug)]
pub enum ApiKeyCommand {
    /// Make an API key; its token is printed once, alone on the last line.
    Create {
        /// monitor, control or admin.
        #[arg(long, value_parser = role_arg)]
        role: Role,
        /// A name for the key (to list and revoke it).
        #[arg(long)]
        name: String,
    },
    /// List keys (names, roles, creation; never the tokens).
    List,
    /// Revoke a key.
    Del {
        /// Its name.
        name: String,
    },
}

fn read_password() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the password from stdin: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

fn report(r: Result<String, String>) -> i32 {
    match r {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("safekit: {e}");
            1
        }
    }
}

pub(super) fn user(paths: &Paths, cmd: UserCommand) -> i32 {
    let etc = paths.etc();
    report((|| {
        let mut users = auth::load_users(&etc).map_err(|e| e.to_string())?;
        let msg = match cmd {
            UserCommand::Add { name, role, .. } => {
                let pw = read_password()?;
                users.add(&name, role, &pw).map_err(|e| e.to_string())?;
                format!("user {name} added with role {role}")
            }
            UserCommand::Del { name } => {
                users.remove(&name).map_err(|e| e.to_string())?;
                format!("user {name} removed")
            }
            UserCommand::Passwd { name, role, .. } => {
                let pw = read_password()?;
                users.passwd(&name, &pw, role).map_err(|e| e.to_string())?;
                format!("password of {name} changed")
            }
            UserCommand::List => {
                return Ok(users
                    .user
                    .iter()
                    .map(|u| format!("{}\t{}", u.name, u.role))
                    .collect::<Vec<_>>()
                    .join("\n"));
            }
        };
        auth::save_users(&etc, &users).map_err(|e| e.to_string())?;
        Ok(msg)
    })())
}

pub(super) fn apikey(paths: &Paths, cmd: ApiKeyCommand) -> i32 {
    let etc = paths.etc();
    report((|| {
        let mut keys = auth::load_keys(&etc).map_err(|e| e.to_string())?;
        let msg = match cmd {
            ApiKeyCommand::Create { role, name } => {
                let token = keys.create(&name, role).map_err(|e| e.to_string())?;
                auth::save_keys(&etc, &keys).map_err(|e| e.to_string())?;
                return Ok(format!(
                    "API key {name} created with role {role}; it is shown once, keep it:\n{token}"
                ));
            }
            ApiKeyCommand::List => {
                return Ok(keys
                    .key
                    .iter()
                    .map(|k| format!("{}\t{}\t{}", k.name, k.role, k.created))
                    .collect::<Vec<_>>()
                    .join("\n"));
            }
            ApiKeyCommand::Del { name } => {
                keys.remove(&name).map_err(|e| e.to_string())?;
                format!("API key {name} revoked")
            }
        };
        auth::save_keys(&etc, &keys).map_err(|e| e.to_string())?;
        Ok(msg)
    })())
}

/// `safekit certs ...`.
#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Make a cluster CA and a certificate per node in etc/safekit/tls.
    Init {
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn certs(paths: &Paths, cmd: &CertsCommand) -> i32 {
    let CertsCommand::Init { force } = cmd;
    let etc = paths.etc();
    let cluster = match std::fs::read_to_string(etc.join(crate::config::CLUSTER_FILE))
        .map_err(|e| format!("reading cluster.toml: {e}"))
        .and_then(|t| {
            crate::config::parse_cluster(&etc.join(crate::config::CLUSTER_FILE), &t)
                .map_err(|e| e.to_string())
        }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("safekit: {e}");
            return 1;
        }
    };
    report(
        crate::certs::init(&etc, &cluster, *force)
            .map(|files| {
                format!(
                    "wrote {}\ncopy {} to every node (keep ca.key private); clients trust ca.crt",
                    files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    etc.join(crate::certs::TLS_DIR).display()
                )
            })
            .map_err(|e| e.to_string()),
    )
}
