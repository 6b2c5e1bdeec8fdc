//! Checkers (SPEC §7) as tasks: each probes on its interval and reports
//! every result to the engine, which decides what a failure means (a farm
//! node leaves the farm; a mirror module restarts, stops or waits per the
//! checker's `action`).
//!
//! Ids: `tcp<i>`, `ping<i>`, `intf<i>`, `ip<i>`, `errd<i>`, `custom.<name>`
//! (set by `safekit set -r custom.<name> -v up|down`), `module<i>`.

use std::{net::SocketAddr, os::unix::fs::MetadataExt as _, path::Path, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle};

use super::engine::Event;
use crate::{
    config::{CheckAction, ModuleConfig, When},
    script::ScriptEnv,
};

/// When a checker applies and what its failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct CheckMeta {
    pub(super) when: When,
    pub(super) action: CheckAction,
}

/// `when`/`action` of checker `id` in `cfg`.
pub(super) fn meta(cfg: &ModuleConfig, id: &str) -> Option<CheckMeta> {
    let idx = |prefix: &str| {
        id.strip_prefix(prefix)
            .and_then(|n| n.parse::<usize>().ok())
    };
    if let Some(name) = id.strip_prefix("custom.") {
        return cfg
            .check_custom
            .iter()
            .find(|c| c.name == name)
            .map(|c| CheckMeta {
                when: c.when,
                action: c.action,
            });
    }
    if let Some(i) = idx("tcp") {
        return cfg.check_tcp.get(i).map(|c| CheckMeta {
            when: c.when,
            action: c.action,
        });
    }
    if let Some(i) = idx("ping") {
        return cfg.check_ping.get(i).map(|c| CheckMeta {
            when: c.when,
            action: c.action,
        });
    }
    if let Some(i) = idx("intf") {
        return cfg.check_intf.get(i).map(|c| CheckMeta {
            when: c.when,
            action: c.action,
        });
    }
    if let Some(i) = idx("ip") {
        return cfg.check_ip.get(i).map(|c| CheckMeta {
            when: c.when,
            action: c.action,
        });
    }
    if let Some(i) = idx("errd") {
        return cfg.errd.get(i).map(|c| CheckMeta {
            when: c.class,
            action: c.action,
        });
    }
    if let Some(i) = idx("module") {
        return cfg.check_module.get(i).map(|c| CheckMeta {
            when: c.when,
            action: c.action,
        });
    }
    None
}

/// Every checker of `cfg`: id, what it checks and how often (`None`: on
/// command, custom resources), for `state -v`.
pub(super) fn describe(cfg: &ModuleConfig) -> Vec<(String, String, Option<Duration>)> {
    let mut out = Vec::new();
    for (i, c) in cfg.check_tcp.iter().enumerate() {
        out.push((
            format!("tcp{i}"),
            format!("tcp {}:{}", c.host, c.port),
            Some(c.interval),
        ));
    }
    for (i, c) in cfg.check_ping.iter().enumerate() {
        out.push((
            format!("ping{i}"),
            format!("ping {}", c.host),
            Some(c.interval),
        ));
    }
    for (i, c) in cfg.check_intf.iter().enumerate() {
        out.push((
            format!("intf{i}"),
            format!("intf {}", c.interface),
            Some(c.interval),
        ));
    }
    for (i, c) in cfg.check_ip.iter().enumerate() {
        out.push((format!("ip{i}"), format!("ip {}", c.addr), Some(c.interval)));
    }
    for (i, c) in cfg.errd.iter().enumerate() {
        out.push((
            format!("errd{i}"),
            format!("errd {}", c.name),
            Some(cfg.errd_poll_interval),
        ));
    }
    for (i, c) in cfg.check_module.iter().enumerate() {
        out.push((
            format!("module{i}"),
            format!("module {}", c.name),
            Some(c.interval),
        ));
    }
    for c in &cfg.check_custom {
        out.push((
            format!("custom.{}", c.name),
            format!("custom {}", c.name),
            None,
        ));
    }
    out
}

#[expect(clippy::too_many_lines, reason = "one block per checker kind")]
/// Starts the checkers of a module whose `when` is in `active`; aborting
/// the handles stops them (custom checker scripts are killed).
pub(super) fn spawn(
    cfg: &ModuleConfig,
    active: &[When],
    tx: &mpsc::Sender<Event>,
    env: &ScriptEnv,
    module_dir: &Path,
) -> Vec<JoinHandle<()>> {
    let on = |w: &When| active.contains(w);
    let mut out = Vec::new();
    for c in cfg.check_custom.iter().filter(|c| on(&c.when)) {
        let path = if c.exec.is_absolute() {
            c.exec.clone()
        } else {
            module_dir.join("bin").join(&c.exec)
        };
        out.push(spawn_custom(
            cfg.name.clone(),
            c.name.clone(),
            path,
            c.args.clone(),
            env.clone(),
            tx.clone(),
        ));
    }
    let module = cfg.name.clone();
    for (i, c) in cfg
        .check_tcp
        .iter()
        .enumerate()
        .filter(|(_, c)| on(&c.when))
    {
        let (host, port, timeout) = (c.host.clone(), c.port, c.timeout);
        out.push(spawn_loop(
            &module,
            format!("tcp{i}"),
            format!("tcp {}:{}", c.host, c.port),
            c.interval,
            tx,
            move || {
                let host = host.clone();
                async move { tcp_probe(&host, port, timeout).await }
            },
        ));
    }
    for (i, c) in cfg
        .check_ping
        .iter()
        .enumerate()
        .filter(|(_, c)| on(&c.when))
    {
        let (host, timeout) = (c.host.clone(), c.timeout);
        out.push(spawn_loop(
            &module,
            format!("ping{i}"),
            format!("ping {}", c.host),
            c.interval,
            tx,
            move || {
                let host = host.clone();
                async move { ping(&host, timeout).await }
            },
        ));
    }
    for (i, c) in cfg
        .check_intf
        .iter()
        .enumerate()
        .filter(|(_, c)| on(&c.when))
    {
        let name = c.interface.clone();
        out.push(spawn_loop(
            &module,
            format!("intf{i}"),
            format!("interface {}", c.interface),
            c.interval,
            tx,
            move || {
                let name = name.clone();
                async move { link_up(&name) }
            },
        ));
    }
    for (i, c) in cfg.check_ip.iter().enumerate().filter(|(_, c)| on(&c.when)) {
        let addr = c.addr;
        out.push(spawn_loop(
            &module,
            format!("ip{i}"),
            format!("address {}", c.addr),
            c.interval,
            tx,
            move || async move {
                // Binding succeeds only on a local address.
                std::net::UdpSocket::bind(SocketAddr::new(addr, 0))
                    .map(|_| ())
                    .map_err(|e| format!("{addr} is not on this node: {e}"))
            },
        ));
    }
    for (i, c) in cfg.errd.iter().enumerate().filter(|(_, c)| on(&c.class)) {
        let (name, atleast) = (c.name.clone(), c.atleast);
        out.push(spawn_loop(
            &module,
            format!("errd{i}"),
            format!("process {}", c.name),
            cfg.errd_poll_interval,
            tx,
            move || {
                let name = name.clone();
                async move {
                    let n = count_processes(&name);
                    if n >= atleast {
                        Ok(())
                    } else {
                        Err(format!(
                            "{n} process(es) named {name}, at least {atleast} expected"
                        ))
                    }
                }
            },
        ));
    }
    out
}

/// A custom checker: its script runs for as long as the checker is active
/// and reports with `safekit set -r custom.<name> -v up|down`. Refused (and
/// reported down) when the script is not secure.
fn spawn_custom(
    module: String,
    name: String,
    path: std::path::PathBuf,
    args: Vec<String>,
    env: ScriptEnv,
    tx: mpsc::Sender<Event>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let id = format!("custom.{name}");
        let what = format!("custom {name}");
        let report = |result: Result<(), String>| Event::Check {
            module: module.clone(),
            id: id.clone(),
            what: what.clone(),
            result,
        };
        if let Err(e) = crate::script::check_security(&path) {
            let _ = tx.send(report(Err(e.to_string()))).await;
            return;
        }
        let child = tokio::process::Command::new(&path)
            .args(&args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("SAFE", &env.root)
            .env("SAFE_ROOT", &env.root)
            .env("SAFEKIT_ROOT", &env.root)
            .env("SAFEMODULE", &env.module)
            .env("SAFE_NODE", &env.node)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match child {
            // Held until this task is aborted, which kills it.
            Ok(mut c) => {
                let _ = c.wait().await;
            }
            Err(e) => {
                let _ = tx
                    .send(report(Err(format!("cannot run {}: {e}", path.display()))))
                    .await;
            }
        }
    })
}

fn spawn_loop<F, Fut>(
    module: &str,
    id: String,
    what: String,
    interval: Duration,
    tx: &mpsc::Sender<Event>,
    probe: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let module = module.to_owned();
    let tx = tx.clone();
    tokio::spawn(async move {
        loop {
            let result = probe().await;
            let ev = Event::Check {
                module: module.clone(),
                id: id.clone(),
                what: what.clone(),
                result,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    })
}

async fn tcp_probe(host: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| format!("{host} has no address"))?;
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect {addr}: {e}")),
        Err(_) => Err(format!("connect {addr}: no answer within {timeout:?}")),
    }
}

/// One ICMP echo through the system `ping` (iputils).
pub(super) async fn ping(host: &str, timeout: Duration) -> Result<(), String> {
    let secs = timeout.as_secs_f64().max(0.2);
    let out = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        tokio::process::Command::new("ping")
            .args(["-n", "-q", "-c", "1", "-W", &format!("{secs:.1}"), host])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("ping {host}: no answer within {timeout:?}"))?
    .map_err(|e| format!("running ping: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{host} does not answer ping"))
    }
}

fn link_up(name: &str) -> Result<(), String> {
    let state = std::fs::read_to_string(format!("/sys/class/net/{name}/operstate"))
        .map_err(|e| format!("interface {name}: {e}"))?;
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap_or_default();
    let admin_up =
        u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).is_ok_and(|f| f & 1 != 0);
    match state.trim() {
        "up" | "unknown" if admin_up => Ok(()),
        s => Err(format!("interface {name} is {s}")),
    }
}

/// Processes named `name` (as in /proc/PID/comm) in this node's network
/// namespace: nodes sharing a machine (the lab) do not see each other's.
pub(super) fn count_processes(name: &str) -> u32 {
    let own_ns = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for e in dir.filter_map(Result::ok) {
        let p = e.path();
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let ns = std::fs::metadata(Path::new(&p).join("ns/net"))
            .map(|m| m.ino())
            .ok();
        if own_ns.is_none() || ns == own_ns {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_test_process() {
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(count_processes(me.trim_end()) >= 1);
        assert_eq!(count_processes("no-such-proc-x"), 0);
    }

    #[test]
    fn loopback_is_up() {
        assert!(link_up("lo").is_ok());
        assert!(link_up("nosuchif0").is_err());
    }
}
