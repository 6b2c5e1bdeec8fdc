//! Who may use the REST API and console (SPEC §9): users with a role in
//! `/etc/safekit/users.toml` (Argon2id password hashes) and bearer API keys
//! in `/etc/safekit/apikeys.toml` (stored as BLAKE3 hashes of the token).
//!
//! Both files are part of the configuration directory, written 0600 with
//! write-fsync-rename; every node reads its own copy, so a key or user made
//! on one node is valid on every node that has the same files (copy the
//! configuration directory, as for the rest of the configuration).
//!
//! The daemon reads the files at each request (they are small), so
//! `safekit user` and `safekit apikey` take effect at once.

use std::{
    fmt,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use argon2::{
    Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString,
};
use serde::{Deserialize, Serialize};

/// File of the users, in the config dir.
pub const USERS_FILE: &str = "users.toml";
/// File of the API keys, in the config dir.
pub const APIKEYS_FILE: &str = "apikeys.toml";
/// Prefix of every API key token.
pub const TOKEN_PREFIX: &str = "skk_";
/// Shortest password accepted by `safekit user add|passwd`.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password (Argon2 hashes anything; a bound keeps requests small).
pub const MAX_PASSWORD_LEN: usize = 1024;

/// What a user or key may do. Ordered: each role includes the ones below.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: states, logs, configuration, events.
    Monitor,
    /// Read and the control verbs (start, stop, swap, ...).
    Control,
    /// Everything: configuration check and apply, snapshots.
    Admin,
}

impl Role {
    /// Lower-case name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Role::Monitor => "monitor",
            Role::Control => "control",
            Role::Admin => "admin",
        }
    }

    /// The role called `s`.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        match s {
            "monitor" => Ok(Role::Monitor),
            "control" => Ok(Role::Control),
            "admin" => Ok(Role::Admin),
            other => Err(AuthError::BadRole(other.to_owned())),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the users and keys files.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not a role.
    #[error("{0:?} is not a role: use monitor, control or admin")]
    BadRole(String),
    /// Not a user or key name.
    #[error("{0:?} is not a valid name: use 1 to 32 ASCII letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// Password too short or too long.
    #[error(
        "the password must have {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} bytes (got {0}); it is read from stdin, one line"
    )]
    BadPassword(usize),
    /// `user add` of an existing user.
    #[error("user {0:?} exists already (use safekit user passwd to change the password)")]
    UserExists(String),
    /// No such user.
    #[error("no user {0:?}")]
    NoUser(String),
    /// `apikey create` of an existing name.
    #[error("an API key named {0:?} exists already")]
    KeyExists(String),
    /// No such key.
    #[error("no API key named {0:?}")]
    NoKey(String),
    /// Reading or writing a file.
    #[error("{op} {path}: {source}")]
    Io {
        /// Operation.
        op: &'static str,
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("{path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Hashing failed (never with valid parameters).
    #[error("password hashing: {0}")]
    Hash(String),
}

/// One user of `users.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Argon2id PHC string (salted).
    pub hash: String,
}

/// `users.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Users {
    /// Every user.
    #[serde(default)]
    pub user: Vec<User>,
}

/// One API key of `apikeys.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The operator's name for it.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Public part of the token (`skk_<id>_...`), to find its entry.
    pub id: String,
    /// BLAKE3 of the whole token, hex.
    pub hash: String,
    /// When it was made (RFC 3339).
    pub created: String,
}

/// `apikeys.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeys {
    /// Every key.
    #[serde(default)]
    pub key: Vec<ApiKey>,
}

/// Checks a user or key name.
pub fn check_name(name: &str) -> Result<(), AuthError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::BadName(name.to_owned()))
    }
}

/// The password hasher: Argon2id, 19 MiB, 2 passes (OWASP's minimum).
fn argon2() -> Argon2<'static> {
    Argon2::default()
}

/// Salted Argon2id hash of `password` (PHC string).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&password.len()) {
        return Err(AuthError::BadPassword(password.len()));
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// A hash of a password nobody has, verified when the user does not
/// exist, so that a login takes as long whether the user exists or not.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FmZWtpdGR1bW15c2FsdA$0TT0tqHzfWFKQ8EJ5wnn4G2N4WxHnPLjBWJ8qf9jFuM";

/// True when `password` matches the PHC string `hash` (constant time).
#[must_use]
pub fn verify_password(password: &str, hash: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    PasswordHash::new(hash).is_ok_and(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
}

impl Users {
    /// The user `name` whose password is `password`. Costs one Argon2
    /// verification whether the user exists or not.
    #[must_use]
    pub fn login(&self, name: &str, password: &str) -> Option<&User> {
        if let Some(u) = self.user.iter().find(|u| u.name == name) {
            verify_password(password, &u.hash).then_some(u)
        } else {
            let _ = verify_password(password, DUMMY_HASH);
            None
        }
    }

    /// The user `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&User> {
        self.user.iter().find(|u| u.name == name)
    }

    /// Adds a user.
    pub fn add(&mut self, name: &str, role: Role, password: &str) -> Result<(), AuthError> {
        check_name(name)?;
        if self.get(name).is_some() {
            return Err(AuthError::UserExists(name.to_owned()));
        }
        let hash = hash_password(password)?;
        self.user.push(User {
            name: name.to_owned(),
            role,
            hash,
        });
        Ok(())
    }

    /// Removes a user.
    pub fn remove(&mut self, name: &str) -> Result<(), AuthError> {
        let before = self.user.len();
        self.user.retain(|u| u.name != name);
        if self.user.len() == before {
            return Err(AuthError::NoUser(name.to_owned()));
        }
        Ok(())
    }

    /// Changes a user's password (and role, if given).
    pub fn passwd(
        &mut self,
        name: &str,
        password: &str,
        role: Option<Role>,
    ) -> Result<(), AuthError> {
        let hash = hash_password(password)?;
        let u = self
            .user
            .iter_mut()
            .find(|u| u.name == name)
            .ok_or_else(|| AuthError::NoUser(name.to_owned()))?;
        u.hash = hash;
        if let Some(r) = role {
            u.role = r;
        }
        Ok(())
    }
}

/// BLAKE3 of a token, hex. Tokens carry 256 random bits: a fast hash is
/// enough (no dictionary to guess from).
fn token_hash(token: &str) -> blake3::Hash {
    blake3::hash(token.as_bytes())
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `n` random bytes, hex.
pub fn random_hex(n: usize) -> Result<String, AuthError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(hex(&b))
}

impl ApiKeys {
    /// Makes a key; returns the token, shown once (only its hash is kept).
    pub fn create(&mut self, name: &str, role: Role) -> Result<String, AuthError> {
        check_name(name)?;
        if self.key.iter().any(|k| k.name == name) {
            return Err(AuthError::KeyExists(name.to_owned()));
        }
        let id = random_hex(6)?;
        let token = format!("{TOKEN_PREFIX}{id}_{}", random_hex(32)?);
        self.key.push(ApiKey {
            name: name.to_owned(),
            role,
            id,
            hash: token_hash(&token).to_hex().to_string(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        });
        Ok(token)
    }

    /// Removes a key by name.
    pub fn remove(&mut self, name: &str) -> Result<(), AuthError> {
        let before = self.key.len();
        self.key.retain(|k| k.name != name);
        if self.key.len() == before {
            return Err(AuthError::NoKey(name.to_owned()));
        }
        Ok(())
    }

    /// The key whose token this is (hash compared in constant time).
    #[must_use]
    pub fn check(&self, token: &str) -> Option<&ApiKey> {
        let id = token.strip_prefix(TOKEN_PREFIX)?.split('_').next()?;
        let hash = token_hash(token);
        self.key.iter().find(|k| {
            k.id == id && blake3::Hash::from_hex(&k.hash).is_ok_and(|stored| stored == hash)
        })
    }
}

/// Reads a TOML file of type `T`; a missing file is an empty one.
fn read_toml<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, AuthError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| AuthError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(AuthError::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `text` to `path` mode 0600: temporary file, fsync, rename,
/// fsync of the directory.
fn write_private(path: &Path, text: &str) -> Result<(), AuthError> {
    let io = |op, source| AuthError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("chmod", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming", e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn to_toml<T: Serialize>(v: &T, path: &Path) -> Result<String, AuthError> {
    toml::to_string(v).map_err(|e| AuthError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads `users.toml` of config dir `etc`.
pub fn load_users(etc: &Path) -> Result<Users, AuthError> {
    read_toml(&etc.join(USERS_FILE))
}

/// Writes `users.toml` of config dir `etc`.
pub fn save_users(etc: &Path, users: &Users) -> Result<(), AuthError> {
    let path = etc.join(USERS_FILE);
    write_private(&path, &to_toml(users, &path)?)
}

/// Reads `apikeys.toml` of config dir `etc`.
pub fn load_keys(etc: &Path) -> Result<ApiKeys, AuthError> {
    read_toml(&etc.join(APIKEYS_FILE))
}

/// Writes `apikeys.toml` of config dir `etc`.
pub fn save_keys(etc: &Path, keys: &ApiKeys) -> Result<(), AuthError> {
    let path = etc.join(APIKEYS_FILE);
    write_private(&path, &to_toml(keys, &path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_salted_and_verified() {
        let mut users = Users::default();
        users.add("alice", Role::Admin, "correct horse").unwrap();
        users.add("bob", Role::Monitor, "correct horse").unwrap();
        assert_ne!(users.user[0].hash, users.user[1].hash, "salted");
        assert!(users.user[0].hash.starts_with("$argon2id$"));
        assert_eq!(
            users.login("alice", "correct horse").map(|u| u.role),
            Some(Role::Admin)
        );
        assert!(users.login("alice", "wrong horse").is_none());
        assert!(users.login("nobody", "correct horse").is_none());
        assert!(matches!(
            users.add("alice", Role::Admin, "whatever1"),
            Err(AuthError::UserExists(_))
        ));
        assert!(matches!(
            users.add("carol", Role::Admin, "short"),
            Err(AuthError::BadPassword(5))
        ));
        assert!(matches!(
            users.add("a b", Role::Admin, "long enough"),
            Err(AuthError::BadName(_))
        ));
        users.passwd("alice", "another one", None).unwrap();
        assert!(users.login("alice", "correct horse").is_none());
        assert!(users.login("alice", "another one").is_some());
        users.remove("alice").unwrap();
        assert!(users.login("alice", "another one").is_none());
    }

    #[test]
    fn dummy_hash_is_a_valid_phc_string() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn api_keys_are_stored_hashed_and_checked() {
        let mut keys = ApiKeys::default();
        let token = keys.create("ci", Role::Control).unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        let text = toml::to_string(&keys).unwrap();
        assert!(
            !text.contains(&token[TOKEN_PREFIX.len() + 13..]),
            "secret not stored"
        );
        assert_eq!(keys.check(&token).map(|k| k.role), Some(Role::Control));
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('0') { '1' } else { '0' });
        assert!(keys.check(&forged).is_none());
        assert!(keys.check("skk_").is_none());
        assert!(keys.check("").is_none());
        keys.remove("ci").unwrap();
        assert!(keys.check(&token).is_none());
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Control && Role::Control > Role::Monitor);
        assert_eq!(Role::parse("control").unwrap(), Role::Control);
        assert!(Role::parse("root").is_err());
    }
}
