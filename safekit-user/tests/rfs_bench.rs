//! Throughput through the replicating mount vs the plain directory, side by
//! side in one run (root, FUSE). A benchmark, not a pass/fail test:
//! `cargo test --release -p safekit-user --test rfs_bench -- --ignored --nocapture`.

use std::{
    fs::{self, File},
    io::{Read, Write},
    path::Path,
    time::{Duration, Instant},
};

use safekit::{
    config::AsyncMode,
    rfs::{LinkState, Primary, PrimaryParams, SecondaryConfig, serve},
};

const KEY: [u8; 32] = [5; 32];
const TOTAL: usize = 256 << 20;

fn write_file(dir: &Path, block: usize) -> f64 {
    let buf = vec![0x5au8; block];
    let start = Instant::now();
    let mut f = File::create(dir.join("bench")).expect("create");
    for _ in 0..TOTAL / block {
        f.write_all(&buf).expect("write");
    }
    f.sync_all().expect("fsync");
    mbps(start.elapsed())
}

fn read_file(dir: &Path) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut f = File::open(dir.join("bench")).expect("open");
    while f.read(&mut buf).expect("read") > 0 {}
    mbps(start.elapsed())
}

#[expect(clippy::cast_precision_loss, reason = "a rate")]
fn mbps(d: Duration) -> f64 {
    TOTAL as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn throughput_mount_vs_plain() {
    let base = std::env::temp_dir().join(format!("rfs-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    let (a, b, r) = (base.join("a"), base.join("b"), base.join("r"));
    for d in [&a, &b, &r] {
        fs::create_dir_all(d).expect("mkdir");
    }
    for mode in [AsyncMode::Second, AsyncMode::None] {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let l = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        rt.spawn(serve(
            l,
            SecondaryConfig {
                dirs: vec![("/bench".into(), b.clone())],
                key: KEY.to_vec(),
                async_mode: mode,
                handshake_timeout: Duration::from_secs(5),
            },
            None,
        ));
        let (p, _ev) =
            Primary::start(&a, Some(addr), &KEY, PrimaryParams::new("/bench")).expect("start");
        assert_eq!(p.state(), LinkState::Connected);
        for block in [1 << 20, 64 << 10] {
            let plain = write_file(&r, block);
            let mount = write_file(&a, block);
            println!(
                "async={mode:?} write {}KiB blocks: plain {plain:.0} MB/s, mount {mount:.0} MB/s ({:.0}%)",
                block >> 10,
                100.0 * mount / plain
            );
        }
        let plain = read_file(&r);
        let mount = read_file(&a);
        println!("read: plain {plain:.0} MB/s, mount {mount:.0} MB/s");
        assert_eq!(p.state(), LinkState::Connected);
        p.stop().expect("stop");
    }
    let _ = fs::remove_dir_all(&base);
}
