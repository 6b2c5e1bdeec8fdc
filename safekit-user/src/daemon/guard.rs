//! What a dead safekitd must not leave behind, and the guard that removes
//! it without the daemon.
//!
//! [`clean_leftovers`] kills every process of this node's module cgroups
//! (the applications started by `start_prim` or `start_both`), and removes
//! the VIPs of this node's modules (mirror: from loopback and from the
//! interface of their subnet; farm: from loopback). The daemon runs it at
//! start, before any module can start, so that `start_prim` and
//! `start_both` never meet a previous instance; the guard runs it when the
//! daemon dies.
//!
//! The guard is `safekitd --guard` (this binary again), started by the
//! daemon with the read end of a pipe as its stdin; the write end is the
//! daemon's only (close-on-exec: no script inherits it). The guard blocks
//! reading it. The daemon's death, however it happens (`kill -9`, a panic,
//! the OOM killer), closes the pipe: the guard reads end of file and cleans
//! at once. A clean shutdown writes `stop` first: the guard exits without
//! touching anything, the modules having been stopped by their scripts.
//! The guard ignores SIGTERM, SIGINT and SIGHUP (a service manager stopping
//! the daemon's group must not kill it before it cleaned). The daemon
//! restarts a guard that died, and records its pid in `run/safekit/guard.pid`.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use crate::{
    config::{Config, Mode},
    modlog::ModuleLog,
    paths::Paths,
    sys::{cgroup::Cgroups, vip},
};

/// The message a clean shutdown writes to the guard.
const STOP: &[u8] = b"stop\n";

/// The VIPs a module holds on this node: (module, mirror?, VIPs, named
/// interface).
fn module_vips(config: &Config, me: &str) -> Vec<(String, bool, Vec<IpAddr>, Option<String>)> {
    config
        .modules
        .values()
        .filter(|m| m.service.nodes.iter().any(|n| n == me))
        .filter_map(|m| {
            let v = m.vip.as_ref()?;
            let vips = v.addrs.clone();
            Some((
                m.name.clone(),
                m.mode() == Mode::Mirror,
                vips,
                v.interface.clone(),
            ))
        })
        .collect()
}

/// The IPv4 VIPs of this node's mirror modules (the lease table's set).
#[must_use]
pub fn mirror_vips(config: &Config, me: &str) -> Vec<Ipv4Addr> {
    module_vips(config, me)
        .into_iter()
        .filter(|(_, mirror, _, _)| *mirror)
        .flat_map(|(_, _, vips, _)| vips)
        .filter_map(|a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// Kills the applications left in this node's module cgroups and removes
/// the VIPs of its modules; `why` says who cleans (in the logs).
pub async fn clean_leftovers(
    paths: &Paths,
    config: &Config,
    me: &str,
    cgroups: Option<&Cgroups>,
    why: &str,
) {
    if let Some(cg) = cgroups {
        let (killed, errors) = cg.kill_all();
        for (module, n) in killed {
            tracing::warn!(module = %module, processes = n, "{why}: application left running killed");
            ModuleLog::new(paths.module_log(&module)).error(&format!(
                "{why}: {n} process(es) of the module's cgroup killed"
            ));
        }
        for e in errors {
            tracing::error!(error = %e, "{why}: killing a module cgroup");
        }
    }
    let handle = match vip::connect() {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "{why}: cannot remove VIPs");
            return;
        }
    };
    let lo = vip::loopback(&handle).await.ok();
    for (module, mirror, vips, interface) in module_vips(config, me) {
        let Some(first) = vips.first() else { continue };
        let mut places: Vec<vip::Interface> = lo.iter().cloned().collect();
        if mirror && let Ok(i) = vip::find_interface(&handle, *first, interface.as_deref()).await {
            places.push(i);
        }
        for v in &vips {
            for i in &places {
                if vip::remove(&handle, i, *v).await.is_ok_and(|n| n > 0) {
                    tracing::warn!(module = %module, vip = %v, interface = %i.name, "{why}: VIP left behind removed");
                    ModuleLog::new(paths.module_log(&module))
                        .info(&format!("{why}: VIP {v} removed from {}", i.name));
                }
            }
        }
    }
}

/// `safekitd --guard`: waits for the daemon's end on stdin, cleans after
/// it unless it stopped cleanly.
pub fn run_guard(paths: &Paths, me: &str) -> std::io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to SIG_IGN; no handler runs.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // The configuration as it was when the daemon started; read again at
    // its death (it may have been changed since).
    let initial = crate::config::load(&paths.etc()).ok();
    let mut said = Vec::new();
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if said.ends_with(STOP) {
        return Ok(());
    }
    tracing::error!("safekitd died: its guard stops the applications and removes the VIPs");
    let config = crate::config::load(&paths.etc()).ok().or(initial);
    let cgroups = Cgroups::open(paths.root(), &cgroup_fallback(paths)).ok();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if let Some(c) = &config {
            clean_leftovers(paths, c, me, cgroups.as_ref(), "safekitd died").await;
        } else {
            if let Some(cg) = &cgroups {
                let _ = cg.kill_all();
            }
            tracing::error!("no readable configuration: VIPs not removed");
        }
    });
    if let Some(cg) = &cgroups {
        cg.remove_empty();
    }
    Ok(())
}

/// Where the daemon mounts the cgroup2 hierarchy when its mount namespace
/// has none.
#[must_use]
pub fn cgroup_fallback(paths: &Paths) -> std::path::PathBuf {
    paths.run_dir().join("cgroup2")
}

fn guard_pid_file(paths: &Paths) -> std::path::PathBuf {
    paths.run_dir().join("guard.pid")
}

/// Before cleaning at start: a guard of a previous daemon may still be at
/// work; let it finish (at most 5 s) so it never cleans after this one.
pub fn wait_previous_guard(paths: &Paths) {
    let Ok(text) = std::fs::read_to_string(guard_pid_file(paths)) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return;
    };
    let is_guard = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.contains(&b"--guard".as_slice())
                && args.contains(&paths.root().as_os_str().as_encoded_bytes())
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while is_guard(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The running guard: stopped cleanly by [`GuardHandle::stop`].
#[derive(Debug)]
pub struct GuardHandle {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl GuardHandle {
    /// Starts the guard of this daemon (and restarts it if it dies).
    #[must_use]
    pub fn start(paths: &Paths, me: &str) -> Self {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let (paths, me) = (paths.clone(), me.to_owned());
        let task = tokio::spawn(async move {
            loop {
                match spawn_guard(&paths, &me) {
                    Ok((mut child, mut writer)) => {
                        tokio::select! {
                            status = child.wait() => {
                                tracing::error!(?status, "the guard exited: starting it again");
                            }
                            stop = &mut rx => {
                                use std::io::Write as _;
                                // Only an explicit clean stop says so: a
                                // handle dropped by a panic unwinding says
                                // nothing, and the guard cleans.
                                if stop.is_ok() {
                                    let _ = writer.write_all(STOP);
                                }
                                drop(writer);
                                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                                let _ = std::fs::remove_file(guard_pid_file(&paths));
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot start the guard"),
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = &mut rx => return,
                }
            }
        });
        Self {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Tells the guard the daemon stops cleanly and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

fn spawn_guard(
    paths: &Paths,
    me: &str,
) -> std::io::Result<(tokio::process::Child, std::io::PipeWriter)> {
    // Both ends close-on-exec; the read end becomes the guard's stdin.
    let (reader, writer) = std::io::pipe()?;
    // /proc/self/exe: still this program after a package upgrade replaced
    // the file.
    let child = tokio::process::Command::new("/proc/self/exe")
        .arg("--guard")
        .arg("--root")
        .arg(paths.root())
        .arg("--node")
        .arg(me)
        .stdin(std::process::Stdio::from(reader))
        .process_group(0)
        .kill_on_drop(false)
        .spawn()?;
    if let Some(pid) = child.id() {
        let _ = std::fs::write(guard_pid_file(paths), format!("{pid}\n"));
    }
    Ok((child, writer))
}
