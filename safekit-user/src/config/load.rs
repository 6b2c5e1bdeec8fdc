//! Reading the config dir: `cluster.toml`, the key file, every
//! `modules/<AM>/module.toml`, and the checks that span several files.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read as _},
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use super::{
    Config,
    cluster::{self, CLUSTER_FILE, MAX_KEY_LEN, MIN_KEY_LEN},
    error::{ConfigError, ConfigErrors},
    module::{self, Extras, MAX_MODULES, MODULE_FILE},
    value::format_mac,
};

/// Directory of the modules in the config dir.
pub const MODULES_DIR: &str = "modules";

fn file_error(file: &Path, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line: None,
        key: key.to_owned(),
        message: message.into(),
    }
}

pub(super) fn load(etc: &Path) -> Result<Config, ConfigErrors> {
    let mut errors: Vec<ConfigError> = Vec::new();

    let cluster_file = etc.join(CLUSTER_FILE);
    let mut cluster = match fs::read_to_string(&cluster_file) {
        Ok(text) => match cluster::parse(&cluster_file, &text) {
            Ok(p) => Some(p),
            Err(e) => {
                errors.extend(e.0);
                None
            }
        },
        Err(e) => {
            errors.push(file_error(&cluster_file, "", format!("cannot read: {e}")));
            None
        }
    };
    if let Some(p) = &mut cluster {
        match read_key(&p.config.key_file) {
            Ok(key) => p.config.key = key,
            Err(message) => errors.push(ConfigError {
                file: cluster_file.clone(),
                line: p.key_file_line,
                key: "key_file".to_owned(),
                message,
            }),
        }
    }
    let cluster_config = cluster.as_ref().map(|p| &p.config);

    let modules_dir = etc.join(MODULES_DIR);
    let (names, dir_errors) = module_dirs(&modules_dir);
    errors.extend(dir_errors);
    let mut modules = BTreeMap::new();
    let mut extras: Vec<(String, PathBuf, Extras)> = Vec::new();
    for name in &names {
        let file = modules_dir.join(name).join(MODULE_FILE);
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(file_error(&file, "", format!("cannot read: {e}")));
                continue;
            }
        };
        let (result, extra) = module::parse(&file, name, &text, cluster_config);
        match result {
            Ok(m) => {
                modules.insert(name.clone(), m);
            }
            Err(e) => errors.extend(e.0),
        }
        extras.push((name.clone(), file, extra));
    }
    errors.extend(cross_module(&names, &extras));

    match cluster {
        Some(p) if errors.is_empty() => Ok(Config {
            cluster: p.config,
            modules,
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Reads the cluster key: a regular file, private to its owner, of at least
/// [`MIN_KEY_LEN`] bytes.
fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let how = format!(
        "make one with: head -c 32 /dev/urandom > {0}; chmod 600 {0}",
        path.display()
    );
    let mut f = fs::File::open(path)
        .map_err(|e| format!("cannot open key file {}: {e}; {how}", path.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot stat key file {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("key file {} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "key file {} has mode {mode:03o}: it must not be readable or writable by group or others; run chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    let mut key = Vec::new();
    let limit = u64::try_from(MAX_KEY_LEN).unwrap_or(u64::MAX) + 1;
    (&mut f)
        .take(limit)
        .read_to_end(&mut key)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "key file {} is larger than {MAX_KEY_LEN} bytes",
            path.display()
        ));
    }
    if key.len() < MIN_KEY_LEN {
        return Err(format!(
            "key file {} has {} bytes; at least {MIN_KEY_LEN} random bytes are needed; {how}",
            path.display(),
            key.len()
        ));
    }
    Ok(key)
}

/// Module names: the directories of `modules/` (hidden entries and plain
/// files are ignored), sorted.
fn module_dirs(dir: &Path) -> (Vec<String>, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (Vec::new(), errors),
        Err(e) => {
            errors.push(file_error(dir, "", format!("cannot read directory: {e}")));
            return (Vec::new(), errors);
        }
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                errors.push(file_error(dir, "", format!("cannot read directory: {e}")));
                continue;
            }
        };
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            errors.push(file_error(
                &path,
                "",
                "module directory name is not UTF-8: use 1 to 32 ASCII letters, digits, '-' or '_'",
            ));
            continue;
        };
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        names.push(name);
    }
    names.sort();
    if names.len() > MAX_MODULES {
        errors.push(file_error(
            dir,
            "",
            format!(
                "{} modules configured; at most {MAX_MODULES} are supported",
                names.len()
            ),
        ));
    }
    (names, errors)
}

/// Checks between modules: a VIP or a farm MAC belongs to one module only;
/// a `[[check.module]]` on this node names a configured module.
fn cross_module(names: &[String], extras: &[(String, PathBuf, Extras)]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut vips: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut macs: BTreeMap<[u8; 6], &str> = BTreeMap::new();
    for (name, file, extra) in extras {
        let at = |line: Option<usize>, key: &str, message: String| ConfigError {
            file: file.clone(),
            line,
            key: key.to_owned(),
            message,
        };
        for (ip, line, key) in &extra.vips {
            match vips.get(ip) {
                Some(other) if *other != name.as_str() => errors.push(at(
                    *line,
                    key,
                    format!("{ip} is already a virtual IP of module {other:?}"),
                )),
                _ => {
                    vips.insert(*ip, name);
                }
            }
        }
        if let Some((mac, line, key)) = &extra.mac {
            match macs.get(mac) {
                Some(other) => errors.push(at(
                    *line,
                    key,
                    format!(
                        "virtual MAC {} is already module {other:?}'s: set vip.mac to a unique address",
                        format_mac(mac)
                    ),
                )),
                None => {
                    macs.insert(*mac, name);
                }
            }
        }
        for (target, line, key) in &extra.module_refs {
            if !names.contains(target) {
                errors.push(at(
                    *line,
                    key,
                    format!(
                        "module {target:?} is not configured in {MODULES_DIR}/; configured: {}",
                        module::quoted(names)
                    ),
                ));
            }
        }
    }
    errors
}
