//! Module scripts (SPEC §7): `prestart`, `start_prim`, `stop_prim`,
//! `start_both`, `stop_both`, `poststop` in `modules/<AM>/bin/`.
//!
//! A script runs only when it and its directory are owned by root and not
//! writable by group or others (keepalived's `check_security`), with a clean
//! environment (`PATH`, `SAFE`, `SAFE_ROOT`, `SAFEMODULE`, `SAFE_NODE`,
//! `SAFE_ROLE`), in its own process group, with a timeout after which the
//! whole group is killed. Its stdout and stderr go to the module log. With
//! module cgroups, it enters its module's cgroup before it executes, and so
//! does whatever it leaves running (`crate::sys::cgroup`).

use std::{
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::modlog::ModuleLog;

/// Why a script did not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// Ownership or permissions unsafe: refused.
    #[error("refusing to run {path}: {why}")]
    Insecure {
        /// Script path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Could not start it.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// Script path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// It ran past its timeout and was killed.
    #[error("{path} timed out after {timeout:?} and was killed")]
    Timeout {
        /// Script path.
        path: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// Stopped before it finished (`forcestop`); its process group killed.
    #[error("{path} interrupted by forcestop and killed")]
    Cancelled {
        /// Script path.
        path: PathBuf,
    },
    /// It exited non-zero.
    #[error("{path} failed: {status}")]
    Failed {
        /// Script path.
        path: PathBuf,
        /// Exit status.
        status: std::process::ExitStatus,
    },
}

/// What a script is told.
#[derive(Debug, Clone)]
pub struct ScriptEnv {
    /// Node root (`SAFE_ROOT`, `SAFE`).
    pub root: PathBuf,
    /// Module name (`SAFEMODULE`).
    pub module: String,
    /// This node's name (`SAFE_NODE`).
    pub node: String,
    /// Directory holding the `safekit` binaries, put first in `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// The module's cgroup (cgroup v2 directory) the script runs in; `None`
    /// where the node has no module cgroups.
    pub cgroup: Option<PathBuf>,
}

/// Checks that `path` and its directory are root-owned and not writable by
/// group or others.
pub fn check_security(path: &Path) -> Result<(), ScriptError> {
    let insecure = |why: String| ScriptError::Insecure {
        path: path.to_path_buf(),
        why,
    };
    for p in [Some(path), path.parent()].into_iter().flatten() {
        let md = std::fs::metadata(p).map_err(|e| insecure(format!("{}: {e}", p.display())))?;
        if md.uid() != 0 {
            return Err(insecure(format!(
                "{} is owned by uid {}, not root",
                p.display(),
                md.uid()
            )));
        }
        if md.mode() & 0o022 != 0 {
            return Err(insecure(format!(
                "{} is writable by group or others (mode {:o})",
                p.display(),
                md.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

/// Copies a script's output into the module log, line by line.
fn pump<R>(r: Option<R>, log: ModuleLog, prefix: &'static str)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let Some(r) = r else { return };
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            log.info(&format!("{prefix}{l}"));
        }
    });
}

/// Runs `bin/<name> [args]` of the module if it exists. `Ok(false)`: no such
/// script (nothing to do).
pub async fn run(
    module_dir: &Path,
    name: &str,
    args: &[&str],
    role: &str,
    env: &ScriptEnv,
    timeout: Duration,
    log: &ModuleLog,
) -> Result<bool, ScriptError> {
    let never = std::future::pending::<()>();
    run_until(module_dir, name, args, role, env, timeout, log, never).await
}

/// Like [`run`], and also stopped (process group killed,
/// [`ScriptError::Cancelled`]) as soon as `cancel` completes.
#[expect(
    clippy::too_many_arguments,
    reason = "run's arguments plus the cancellation; a struct would only rename them"
)]
pub async fn run_until(
    module_dir: &Path,
    name: &str,
    args: &[&str],
    role: &str,
    env: &ScriptEnv,
    timeout: Duration,
    log: &ModuleLog,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<bool, ScriptError> {
    let path = module_dir.join("bin").join(name);
    if !path.exists() {
        return Ok(false);
    }
    check_security(&path)?;
    let mut search = vec![];
    if let Some(b) = &env.bin_dir {
        search.push(b.display().to_string());
    }
    search.push("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned());
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(args)
        .env_clear()
        .env("PATH", search.join(":"))
        .env("SAFE", &env.root)
        .env("SAFE_ROOT", &env.root)
        .env("SAFEKIT_ROOT", &env.root)
        .env("SAFEMODULE", &env.module)
        .env("SAFE_NODE", &env.node)
        .env("SAFE_ROLE", role)
        .current_dir(module_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    // Opened here, written by the child between fork and exec: the script
    // is in its module's cgroup before its first instruction.
    let procs = match &env.cgroup {
        Some(cg) => Some(
            crate::sys::cgroup::open_procs(cg).map_err(|e| ScriptError::Spawn {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?,
        ),
        None => None,
    };
    if let Some(fd) = &procs {
        let raw = fd.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec; it only
        // calls write(2) (async-signal-safe, no allocation) on an fd that
        // `procs` keeps open until the spawn returned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(raw, b"0".as_ptr().cast(), 1) == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    log.info(&format!("running {name} {}", args.join(" ")));
    let mut child = cmd.spawn().map_err(|source| ScriptError::Spawn {
        path: path.clone(),
        source,
    })?;
    drop(procs);
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());
    let out = child.stdout.take();
    let err = child.stderr.take();
    // A script that starts a daemon in the background leaves it holding the
    // pipes: the pumps are never awaited, they end with the last writer.
    pump(out, log.clone(), "");
    pump(err, log.clone(), "stderr: ");
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, child.wait()) => r.map_err(|_| ScriptError::Timeout {
            path: path.clone(),
            timeout,
        }),
        () = cancel => Err(ScriptError::Cancelled { path: path.clone() }),
    };
    let status = match outcome {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ScriptError::Spawn { path, source }),
        Err(e) => {
            if let Some(pg) = pgid {
                // SAFETY: kill(2) on the process group we created; no memory.
                unsafe { libc::kill(-pg, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            return Err(e);
        }
    };
    if status.success() {
        Ok(true)
    } else {
        Err(ScriptError::Failed { path, status })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn module_dir(script: &str, mode: u32) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        std::fs::create_dir_all(d.0.join("bin")).unwrap();
        let p = d.0.join("bin/start_both");
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        std::fs::set_permissions(d.0.join("bin"), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    mod tempdir {
        pub(super) struct Dir(pub(super) std::path::PathBuf);
        impl Dir {
            pub(super) fn new() -> Self {
                let p = std::env::temp_dir().join(format!(
                    "safekit-script-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn env() -> ScriptEnv {
        ScriptEnv {
            root: "/tmp".into(),
            module: "web".into(),
            node: "node1".into(),
            bin_dir: None,
            cgroup: None,
        }
    }

    #[tokio::test]
    async fn output_reaches_the_log_and_env_is_set() {
        let d = module_dir(
            "#!/bin/sh\necho \"hello $SAFEMODULE $SAFE_NODE $SAFE_ROLE $1\"\n",
            0o755,
        );
        let log = ModuleLog::new(d.0.join("m.log"));
        let ran = run(
            &d.0,
            "start_both",
            &["x"],
            "both",
            &env(),
            Duration::from_secs(5),
            &log,
        )
        .await
        .unwrap();
        assert!(ran);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = std::fs::read_to_string(d.0.join("m.log")).unwrap();
        assert!(text.contains("hello web node1 both x"), "{text}");
        assert!(
            !run(
                &d.0,
                "stop_both",
                &[],
                "both",
                &env(),
                Duration::from_secs(1),
                &log
            )
            .await
            .unwrap()
        );
    }

    #[tokio::test]
    async fn writable_by_others_is_refused_and_timeouts_kill() {
        let d = module_dir("#!/bin/sh\nexit 0\n", 0o757);
        let log = ModuleLog::new(d.0.join("m.log"));
        let r = run(
            &d.0,
            "start_both",
            &[],
            "both",
            &env(),
            Duration::from_secs(5),
            &log,
        )
        .await;
        assert!(matches!(r, Err(ScriptError::Insecure { .. })), "{r:?}");
        let d = module_dir("#!/bin/sh\nsleep 30\n", 0o755);
        let r = run(
            &d.0,
            "start_both",
            &[],
            "both",
            &env(),
            Duration::from_millis(200),
            &log,
        )
        .await;
        assert!(matches!(r, Err(ScriptError::Timeout { .. })), "{r:?}");
        let d = module_dir("#!/bin/sh\nexit 3\n", 0o755);
        let r = run(
            &d.0,
            "start_both",
            &[],
            "both",
            &env(),
            Duration::from_secs(5),
            &log,
        )
        .await;
        assert!(matches!(r, Err(ScriptError::Failed { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_cancelled_script_is_killed_at_once() {
        let d = module_dir(
            "#!/bin/sh\necho $$ > \"$SAFE_ROOT/pid\"\nexec sleep 30\n",
            0o755,
        );
        let log = ModuleLog::new(d.0.join("m.log"));
        let mut e = env();
        e.root.clone_from(&d.0);
        let pid_file = d.0.join("pid");
        let cancel = async {
            for _ in 0..200 {
                if std::fs::read_to_string(&pid_file).is_ok_and(|p| !p.trim().is_empty()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let start = std::time::Instant::now();
        let r = run_until(
            &d.0,
            "start_both",
            &[],
            "both",
            &e,
            Duration::from_secs(20),
            &log,
            cancel,
        )
        .await;
        assert!(matches!(r, Err(ScriptError::Cancelled { .. })), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "the script's process survived"
        );
    }
}
