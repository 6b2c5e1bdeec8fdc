//! The web console in a real browser (issue 10): headless Chromium
//! (Debian's `/usr/bin/chromium`) driven by playwright-core
//! (`tests/console/drive.mjs`, installed by `cargo xtask setup` from the
//! npm lockfile) from the client namespace, over HTTPS, against two
//! daemons running a replicated mirror module (`skap3`, 10.77.143.0/24):
//! a wrong password is refused on the login form; after logging in the
//! cluster view shows node1 PRIM and node2 SECOND in green; `swap` from
//! the menu (confirmed) exchanges the roles on the page without a reload;
//! on the module page, `stop` then `second fullsync` of node1 resynchronises
//! a 96 MiB tree (capped at 16 MiB/s) and the progress bar is seen
//! advancing through increasing values until node1 is SECOND green again;
//! the primary's tcp checker shows up with its last result;
//! a bad `pulse` in the configuration editor is reported at its line, the
//! line marked in the gutter; apply answers it is not available yet.
//! Screenshots go to `target/console-shots/`. Needs root, FUSE, chromium
//! and node.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{LabModule, lab::bin_dir, serial, wait_for};

const TREE_FILES: usize = 24;
const FILE_MIB: usize = 4;

fn module() -> LabModule {
    LabModule {
        name: "web".into(),
        toml: r#"[service]
mode = "mirror"
defaultprim = "node1"

[heart]
pulse = "100ms"
timeout = "1s"

[rfs]
send_timeout = "2s"
resync_bandwidth = "16MiB/s"
resync_workers = 2
[[rfs.dir]]
path = "/srv/data"

[[check.tcp]]
host = "127.0.0.1"
port = 9010
interval = "1s"
timeout = "500ms"
"#
        .into(),
        scripts: vec![],
    }
}

/// Line of `pulse` in the module file: where the console must report the
/// error.
fn pulse_line() -> usize {
    module()
        .toml
        .lines()
        .position(|l| l.starts_with("pulse"))
        .unwrap()
        + 1
}

/// Detaches every mount at or below `base`, deepest first.
fn unmount_under(base: &Path) {
    for _ in 0..20 {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(base))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort();
        for p in points.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Detaches the lab's mounts when the test ends, before the lab goes.
struct Mounts(PathBuf);

impl Drop for Mounts {
    fn drop(&mut self) {
        unmount_under(&self.0);
    }
}

fn safekit_stdin(root: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(bin_dir().join("safekit"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn safekit");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `safekit state -m web -lq` on node `i`.
fn lq(lab: &common::Lab, i: usize) -> Option<i32> {
    lab.safekit(i, &["state", "-m", "web", "-lq"])
        .unwrap()
        .status
        .code()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one lab: tree, users, certificates, daemons, then the browser"
)]
fn console_login_colours_swap_resync_and_config_error() {
    let _g = serial();
    let console_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console");
    assert!(
        console_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing in {}: run cargo xtask setup",
        console_dir.display()
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run cargo xtask setup"
    );
    let dir = PathBuf::from("/tmp/safekit-test-skap3");
    unmount_under(&dir);
    // Declared first, dropped last: after the lab killed the daemons.
    let _mounts = Mounts(dir.clone());
    let mut lab = common::lab("skap3", 143, 2, vec![module()]);
    let n1 = lab.root(1);
    // The tree to replicate, on node1 before its first start.
    let data = n1.join("srv/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(lab.root(2).join("srv/data")).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..TREE_FILES {
        let mut buf = vec![0u8; FILE_MIB << 20];
        for chunk in buf.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(data.join(format!("file{i:02}")), &buf).unwrap();
    }
    let (ok, out) = safekit_stdin(
        &n1,
        &[
            "user",
            "add",
            "admin",
            "--role",
            "admin",
            "--password-stdin",
        ],
        "console password\n",
    );
    assert!(ok, "{out}");
    let (ok, out) = safekit_stdin(&n1, &["certs", "init"], "");
    assert!(ok, "{out}");
    for f in ["users.toml", "tls"] {
        let st = Command::new("cp")
            .arg("-a")
            .arg(n1.join("etc/safekit").join(f))
            .arg(lab.root(2).join("etc/safekit"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    lab.start_daemon(1).unwrap();
    lab.start_daemon(2).unwrap();
    let out = lab.safekit(1, &["prim", "-m", "web"]).unwrap();
    assert!(out.status.success(), "prim: {out:?}");
    let out = lab.safekit(2, &["start", "-m", "web"]).unwrap();
    assert!(out.status.success(), "start: {out:?}");
    assert!(
        wait_for(Duration::from_secs(60), || {
            lq(&lab, 1) == Some(3) && {
                let s = common::status(&lab, 2);
                s.module("web").is_some_and(|m| {
                    m.colour == safekit::status::Colour::Green
                        && m.rfs.iter().all(|d| d.link == "in sync")
                })
            }
        })
        .is_some(),
        "node1 PRIM, node2 SECOND in sync"
    );

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-shots");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = lab.dir().join("chromium-profile");
    let _ = std::fs::remove_dir_all(&profile);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.spec().client_ns(), "node"])
        .arg(console_dir.join("drive.mjs"))
        .current_dir(&console_dir)
        .env(
            "SK_URL",
            format!("https://{}:9453/", lab.spec().node_addr(1)),
        )
        .env("SK_USER", "admin")
        .env("SK_PASS", "console password")
        .env("SK_SHOTS", &shots)
        .env("SK_PROFILE", &profile)
        .env("SK_BAD_LINE", pulse_line().to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running node");
    let mut text = String::new();
    let mut killed_node2 = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        println!("{line}");
        if line == "waiting: kill node2" {
            lab.kill_daemon(2);
            killed_node2 = true;
        }
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "browser test failed:\n{text}");
    assert!(killed_node2, "{text}");
    for shot in [
        "1-cluster.png",
        "2-swapped.png",
        "3-resync.png",
        "4-resynced.png",
        "5-config-error.png",
        "6-node2-unreachable.png",
    ] {
        let meta = std::fs::metadata(shots.join(shot)).expect(shot);
        assert!(meta.len() > 1000, "{shot} is empty");
    }
    // node1, in sync when node2 died, takes over.
    assert!(
        wait_for(Duration::from_secs(20), || lq(&lab, 1) == Some(2)).is_some(),
        "node1 ALONE"
    );
    let _ = std::fs::remove_dir_all(&profile);
    drop(lab);
}
