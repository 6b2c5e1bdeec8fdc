//! Mirror modules in the daemon: the effects of becoming primary and of
//! stopping being primary (VIP, gratuitous ARP, scripts), run off the engine
//! task; the decisions are the pure core's (`crate::mirror`).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use tokio::task::JoinHandle;

use crate::{
    modlog::ModuleLog,
    script::{self, ScriptEnv},
    sys::{arp, vip},
};

/// What the effects need to know.
#[derive(Debug, Clone)]
pub(super) struct MirrorJob {
    pub(super) module_dir: PathBuf,
    pub(super) interface: Option<String>,
    /// IPv4 and IPv6 VIPs.
    pub(super) vips: Vec<IpAddr>,
    pub(super) garp_count: u32,
    pub(super) garp_interval: Duration,
    /// `Some((interval, elapse))` when `arp_reroute` is on.
    pub(super) reroute: Option<(Duration, Duration)>,
    pub(super) tcp_reset: bool,
    pub(super) env: ScriptEnv,
    pub(super) nice_timeout: Duration,
    pub(super) force_timeout: Duration,
    pub(super) log: ModuleLog,
    /// Becomes true on `forcestop`: the running `prestart`, `start_prim` or
    /// nice `stop_prim` is killed, and the stop goes straight to `stop_prim
    /// force`.
    pub(super) force: tokio::sync::watch::Receiver<bool>,
}

/// The module's VIPs are up on this node.
#[derive(Debug)]
pub struct PrimaryUp {
    pub(super) iface: Option<vip::Interface>,
    /// Periodic gratuitous ARP (`arp_reroute`), stopped with the primary.
    pub(super) reroute: Option<JoinHandle<()>>,
    /// The replicated directories, mounted before `start_prim`.
    pub(super) rfs: Vec<crate::rfs::Primary>,
}

impl MirrorJob {
    /// True once `forcestop` was asked.
    fn forced(&self) -> bool {
        *self.force.borrow()
    }

    /// Completes when `forcestop` is asked (never if the module is gone).
    async fn until_forced(&self) {
        let mut rx = self.force.clone();
        if rx.wait_for(|forced| *forced).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs a script, logging failure; `Ok(())` when absent or successful.
/// `interruptible`: killed as soon as `forcestop` is asked.
async fn script(
    job: &MirrorJob,
    name: &str,
    args: &[&str],
    role: &str,
    timeout: Duration,
    interruptible: bool,
) -> Result<(), String> {
    let cancel = async {
        if interruptible {
            job.until_forced().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    script::run_until(
        &job.module_dir,
        name,
        args,
        role,
        &job.env,
        timeout,
        &job.log,
        cancel,
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// `prestart`: before the module runs in any role; the engine holds
/// `start_prim` until it finished.
pub(super) async fn prestart(job: MirrorJob) -> Result<(), String> {
    script(&job, "prestart", &[], "none", job.nice_timeout, true).await
}

/// `poststop`: once the module stopped in every role, after `stop_prim`.
pub(super) async fn poststop(job: MirrorJob) -> Result<(), String> {
    script(&job, "poststop", &[], "none", job.nice_timeout, false).await
}

/// Becomes primary: VIP added on the interface of its subnet, announced by
/// gratuitous ARP from this node's MAC, then `start_prim`.
pub(super) async fn primary_up(job: MirrorJob) -> Result<PrimaryUp, String> {
    if job.forced() {
        return Err("forcestop asked: not becoming primary".to_owned());
    }
    let mut iface = None;
    if let Some(first) = job.vips.first().copied() {
        let handle = vip::connect().map_err(|e| e.to_string())?;
        let i = vip::find_interface(&handle, first, job.interface.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        for v in &job.vips {
            // Each VIP with the prefix of its own family's subnet there.
            let prefix = if v.is_ipv6() == first.is_ipv6() {
                i.prefix
            } else {
                vip::find_interface(&handle, *v, Some(&i.name))
                    .await
                    .map_or(vip::host_prefix(*v), |o| o.prefix)
            };
            vip::add(&handle, &i, *v, prefix)
                .await
                .map_err(|e| e.to_string())?;
            job.log.info(&format!("VIP {v}/{prefix} set on {}", i.name));
        }
        announce(&i, &job.vips, job.garp_count, job.garp_interval, &job.log).await;
        iface = Some(i);
    }
    let reroute = match (&iface, job.reroute) {
        (Some(i), Some((every, elapse))) => {
            let (i, vips, log) = (i.clone(), job.vips.clone(), job.log.clone());
            Some(tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                while start.elapsed() < elapse {
                    tokio::time::sleep(every).await;
                    announce(&i, &vips, 1, Duration::ZERO, &log).await;
                }
            }))
        }
        _ => None,
    };
    if let Err(e) = script(&job, "start_prim", &[], "prim", job.nice_timeout, true).await {
        // Nothing is handed to the engine: release what was taken here.
        if let Some(h) = &reroute {
            h.abort();
        }
        let mut errors = vec![e];
        if let Some(i) = &iface {
            remove_vips(&job, i, &mut errors).await;
        }
        return Err(errors.join("; "));
    }
    Ok(PrimaryUp {
        iface,
        reroute,
        rfs: Vec::new(),
    })
}

/// Stops being primary: `stop_prim` (then `stop_prim force` if it fails,
/// times out or `forcestop` interrupts it; `forcestop` asked before: `stop_prim
/// force` alone), TCP connections to the VIP reset when configured (while
/// the VIP is still here, so that the resets reach the clients), VIP
/// removed.
pub(super) async fn primary_down(job: MirrorJob, up: Option<PrimaryUp>) -> Result<(), String> {
    let mut errors = Vec::new();
    if let Some(h) = up.as_ref().and_then(|u| u.reroute.as_ref()) {
        h.abort();
    }
    let run_force = if job.forced() {
        job.log
            .info("forcestop: stop_prim force without the nice stop_prim");
        true
    } else if let Err(e) = script(&job, "stop_prim", &[], "prim", job.nice_timeout, true).await {
        job.log.error(&format!("{e}: running stop_prim force"));
        true
    } else {
        false
    };
    if run_force {
        let force = script(
            &job,
            "stop_prim",
            &["force"],
            "prim",
            job.force_timeout,
            false,
        );
        if let Err(e) = force.await {
            errors.push(e);
        }
    }
    let iface = up.and_then(|u| u.iface);
    if let Some(i) = &iface {
        if job.tcp_reset {
            for v in &job.vips {
                reset_connections(*v, &job.log).await;
            }
        }
        remove_vips(&job, i, &mut errors).await;
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Removes the module's VIPs from `i`, collecting failures in `errors`.
async fn remove_vips(job: &MirrorJob, i: &vip::Interface, errors: &mut Vec<String>) {
    match vip::connect() {
        Ok(handle) => {
            for v in &job.vips {
                if let Err(e) = vip::remove(&handle, i, *v).await {
                    errors.push(e.to_string());
                } else {
                    job.log.info(&format!("VIP {v} removed from {}", i.name));
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
}

/// At daemon start: VIPs of mirror modules left on this node by a daemon
/// that died while primary are removed (the module starts in STOP here, so
/// the node must not answer for them).
pub(super) async fn remove_leftover_vips(modules: &[(String, Vec<IpAddr>, Option<String>)]) {
    let Ok(handle) = vip::connect() else { return };
    for (name, vips, interface) in modules {
        let Some(first) = vips.first() else { continue };
        let Ok(i) = vip::find_interface(&handle, *first, interface.as_deref()).await else {
            continue;
        };
        for v in vips {
            if vip::remove(&handle, &i, *v).await.is_ok() {
                tracing::info!(module = %name, vip = %v, "leftover VIP removed at start");
            }
        }
    }
}

/// Gratuitous ARPs (IPv4) and unsolicited neighbour advertisements (IPv6)
/// for every VIP at the interface's MAC.
async fn announce(
    i: &vip::Interface,
    vips: &[IpAddr],
    count: u32,
    interval: Duration,
    log: &ModuleLog,
) {
    for n in 0..count.max(1) {
        for v in vips {
            if let Err(e) = arp::send_frame(i.index, &arp::announcement(i.mac, i.mac, *v)) {
                log.error(&format!("announcing {v} on {}: {e}", i.name));
                return;
            }
        }
        if n + 1 < count {
            tokio::time::sleep(interval).await;
        }
    }
}

/// `tcp_reset`: kills the sockets still bound to the VIP (`ss -K`, through
/// the kernel's `SOCK_DESTROY`), so clients reconnect at once to the new
/// primary instead of waiting for a timeout.
async fn reset_connections(v: IpAddr, log: &ModuleLog) {
    let out = tokio::process::Command::new("ss")
        .args(["-K", "src", &v.to_string()])
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => log.info(&format!("TCP connections of {v} reset")),
        Ok(o) => log.error(&format!(
            "tcp_reset for {v}: ss -K failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => log.error(&format!("tcp_reset for {v}: {e}")),
    }
}
