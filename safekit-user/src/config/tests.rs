//! Tests of the configuration: the shipped examples (SPEC Appendix A) parse
//! into the expected values; every kind of bad config gives an error naming
//! the file, the line and the key; one bad value never hides another.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use super::*;
use crate::status::ModuleState;

const CLUSTER: &str = include_str!("../../../conf/cluster.toml");
const WEB: &str = include_str!("../../../conf/modules/web/module.toml");
const FRONT: &str = include_str!("../../../conf/modules/front/module.toml");

const CLUSTER_FILE_PATH: &str = "/etc/safekit/cluster.toml";
const MODULE_FILE_PATH: &str = "/etc/safekit/modules/m/module.toml";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn cluster() -> ClusterConfig {
    parse_cluster(Path::new(CLUSTER_FILE_PATH), CLUSTER).unwrap()
}

/// A cluster of three nodes on two LANs (the second without heartbeats).
fn cluster3() -> ClusterConfig {
    parse_cluster(
        Path::new(CLUSTER_FILE_PATH),
        r#"
name = "c3"
[[lan]]
name = "default"
replication = true
[[lan]]
name = "admin"
heartbeat = false
[[node]]
name = "node1"
addrs = { default = "10.0.0.1", admin = "10.1.0.1" }
[[node]]
name = "node2"
addrs = { default = "10.0.0.2", admin = "10.1.0.2" }
[[node]]
name = "node3"
addrs = { default = "10.0.0.3", admin = "10.1.0.3" }
"#,
    )
    .unwrap()
}

fn cluster_errors(text: &str) -> Vec<ConfigError> {
    match parse_cluster(Path::new(CLUSTER_FILE_PATH), text) {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(e) => e.0,
    }
}

fn module_errors_with(cluster: &ClusterConfig, text: &str) -> Vec<ConfigError> {
    match parse_module(Path::new(MODULE_FILE_PATH), "m", text, cluster) {
        Ok(m) => panic!("expected errors, got {m:?}"),
        Err(e) => e.0,
    }
}

fn module_errors(text: &str) -> Vec<ConfigError> {
    module_errors_with(&cluster(), text)
}

/// Asserts that `errors` is exactly one error, at `file:line`, key `key`,
/// whose message contains every `words`.
#[track_caller]
fn assert_one(errors: &[ConfigError], file: &str, line: usize, key: &str, words: &[&str]) {
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    assert_error(&errors[0], file, line, key, words);
}

#[track_caller]
fn assert_error(e: &ConfigError, file: &str, line: usize, key: &str, words: &[&str]) {
    assert_eq!(e.file, Path::new(file), "{e}");
    assert_eq!(e.line, Some(line), "{e}");
    assert_eq!(e.key, key, "{e}");
    for w in words {
        assert!(e.message.contains(w), "{e:?} should say {w:?}");
    }
    // The rendered form carries all three.
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{file}:{line}: {key}: ")),
        "{shown}"
    );
}

const MIRROR_HEAD: &str = "[service]\nmode = \"mirror\"\n";
const FARM_HEAD: &str = "[service]\nmode = \"farm\"\n[vip]\naddrs = [\"10.10.0.200\"]\n[[vip.rule]]\nproto = \"tcp\"\nport = 80\n";

// ---- the shipped examples -------------------------------------------------

#[test]
fn appendix_cluster_parses_into_expected_values() {
    let c = cluster();
    assert_eq!(
        c,
        ClusterConfig {
            name: "lab".into(),
            key_file: PathBuf::from("/etc/safekit/cluster.key"),
            key: Vec::new(),
            lans: vec![Lan {
                name: "default".into(),
                replication: true,
                heartbeat: true,
            }],
            nodes: vec![
                Node {
                    name: "node1".into(),
                    addrs: BTreeMap::from([("default".into(), ip("10.10.0.1"))]),
                },
                Node {
                    name: "node2".into(),
                    addrs: BTreeMap::from([("default".into(), ip("10.10.0.2"))]),
                },
            ],
            api: crate::config::Api::default(),
            ports: Ports {
                heartbeat: 8888,
                replication: 5600,
                http: 9010,
                https: 9453,
            },
        }
    );
    assert_eq!(c.node("node2").map(|n| n.name.as_str()), Some("node2"));
    assert_eq!(
        c.node_by_addr(ip("10.10.0.1")).map(|n| n.name.as_str()),
        Some("node1")
    );
    assert!(c.node_by_addr(ip("10.10.0.3")).is_none());
    assert_eq!(
        c.replication_lan().map(|l| l.name.as_str()),
        Some("default")
    );
}

#[test]
fn appendix_mirror_module_parses_into_expected_values() {
    let m = parse_module(
        Path::new("conf/modules/web/module.toml"),
        "web",
        WEB,
        &cluster(),
    )
    .unwrap();
    let expected = ModuleConfig {
        name: "web".into(),
        service: Service {
            mode: Mode::Mirror,
            nodes: vec!["node1".into(), "node2".into()],
            defaultprim: DefaultPrim::Alone,
            failover: true,
            maxloop: 3,
            loop_interval: Duration::from_hours(24),
            boot: false,
            splitbrain_keep: SplitBrainKeep::FormerPrim,
        },
        heart: Heart {
            pulse: ms(700),
            timeout: secs(30),
            lans: vec!["default".into()],
        },
        farm: None,
        vip: Some(Vip {
            addrs: vec![ip("10.10.0.100")],
            interface: None,
            arp_reroute: false,
            arp_interval: secs(60),
            arp_elapse: Duration::from_mins(20),
            garp_count: 3,
            garp_interval: ms(100),
            tcp_reset: false,
            mac: None,
            rules: vec![],
        }),
        rfs: Some(Rfs {
            dirs: vec![ReplicatedDir {
                path: PathBuf::from("/srv/web/data"),
                mode: DirMode::ReadOnly,
            }],
            exclude: vec![],
            async_mode: AsyncMode::Second,
            durability: Durability::Fsync,
            resync_workers: 6,
            resync_bandwidth: None,
            send_timeout: secs(10),
        }),
        errd_poll_interval: secs(10),
        errd: vec![ErrdProc {
            name: "webapp".into(),
            atleast: 1,
            action: CheckAction::Restart,
            class: ProcClass::Prim,
        }],
        check_tcp: vec![],
        check_ping: vec![],
        check_intf: vec![],
        check_ip: vec![],
        check_custom: vec![],
        check_module: vec![],
        splitbrain: Some(SplitBrain {
            witness: vec![ip("10.10.0.254")],
            arbiter: vec![],
            timeout: secs(5),
        }),
        user: User {
            nice_stop_timeout: secs(300),
            force_stop_timeout: secs(300),
        },
    };
    assert_eq!(m, expected);
    assert_eq!(
        m.heartbeat(),
        (ms(700), secs(30), &["default".to_owned()][..])
    );
}

#[test]
fn appendix_farm_module_parses_into_expected_values() {
    let m = parse_module(
        Path::new("conf/modules/front/module.toml"),
        "front",
        FRONT,
        &cluster(),
    )
    .unwrap();
    assert_eq!(m.mode(), Mode::Farm);
    assert_eq!(
        m.service.nodes,
        vec!["node1".to_owned(), "node2".to_owned()]
    );
    assert_eq!(
        m.farm,
        Some(Farm {
            pulse: ms(100),
            lost_after: 10,
            lans: vec!["default".into()],
            power: BTreeMap::from([("node1".into(), 1), ("node2".into(), 1)]),
            filter: super::FarmFilterBackend::Auto,
            drain_timeout: secs(30),
        })
    );
    assert_eq!(
        m.heartbeat().1,
        secs(1),
        "lost after 10 missed 100ms pulses"
    );
    let vip = m.vip.unwrap();
    assert_eq!(vip.addrs, vec![ip("10.10.0.200")]);
    // 5A:FE + 10.10.0.200 in hex.
    assert_eq!(vip.mac, Some([0x5A, 0xFE, 0x0A, 0x0A, 0x00, 0xC8]));
    assert_eq!(
        vip.rules,
        vec![Rule {
            proto: Proto::Tcp,
            port: 80,
            filter: Filter::ClientIpPort,
        }]
    );
    assert_eq!(
        m.check_tcp,
        vec![TcpCheck {
            host: "127.0.0.1".into(),
            port: 80,
            when: When::Both,
            action: CheckAction::Restart,
            interval: secs(1),
            timeout: ms(500),
        }]
    );
    assert!(m.rfs.is_none() && m.splitbrain.is_none() && m.errd.is_empty());
}

#[test]
fn every_key_of_the_reference_is_accepted() {
    // One module using every optional key (mirror), one farm likewise.
    let c = cluster3();
    let mirror = r#"
[service]
mode = "mirror"
nodes = ["node1", "node2"]
defaultprim = "node2"
failover = false
maxloop = 5
loop_interval = "1h30m"
boot = true
splitbrain_keep = "node1"

[heart]
pulse = "500ms"
timeout = "5s"
lans = ["default"]

[vip]
addrs = ["10.0.0.100", "10.0.0.101"]
interface = "eth0"
arp_reroute = true
arp_interval = "30s"
arp_elapse = "10m"
garp_count = 5
garp_interval = "200ms"
tcp_reset = true

[rfs]
async = "none"
durability = "every_write"
exclude = ["*.tmp", "cache/**"]
resync_workers = 4
resync_bandwidth = "100MB/s"
send_timeout = "20s"
[[rfs.dir]]
path = "/srv/a/"
[[rfs.dir]]
path = "/srv/b"
mode = "read_write"

[errd]
poll_interval = "5s"
[[errd.proc]]
name = "postgres"
atleast = 2
action = "stopstart"
class = "both"

[[check.tcp]]
host = "db.example.com"
port = 5432
when = "second"
action = "stop"
interval = "10s"
timeout = "3s"
[[check.ping]]
host = "10.0.0.254"
[[check.intf]]
interface = "eth0"
when = "pre"
action = "noaction"
interval = "2s"
[[check.ip]]
addr = "10.0.0.100"
[[check.custom]]
name = "appcheck"
exec = "checks/app.sh"
args = ["-v", "--deep"]
when = "prim"
action = "restart"
[[check.module]]
name = "other"
node = "node3"
states = ["UP", "alone"]
interval = "20s"
timeout = "10s"
[check.splitbrain]
witness = ["10.0.0.254", "10.0.0.253"]
timeout = "2s"

[user]
nice_stop_timeout = "1m"
force_stop_timeout = "30s"
"#;
    let m = parse_module(Path::new(MODULE_FILE_PATH), "db", mirror, &c).unwrap();
    assert_eq!(m.service.defaultprim, DefaultPrim::Node("node2".into()));
    assert_eq!(
        m.service.splitbrain_keep,
        SplitBrainKeep::Node("node1".into())
    );
    assert_eq!(m.service.loop_interval, secs(5400));
    assert!(!m.service.failover && m.service.boot);
    let rfs = m.rfs.unwrap();
    assert_eq!(rfs.dirs[0].path, PathBuf::from("/srv/a"));
    assert_eq!(rfs.dirs[1].mode, DirMode::ReadWrite);
    assert_eq!(rfs.async_mode, AsyncMode::None);
    assert_eq!(rfs.durability, Durability::EveryWrite);
    assert_eq!(rfs.resync_bandwidth, Some(100_000_000));
    assert_eq!(m.errd[0].class, ProcClass::Both);
    assert_eq!(m.check_ping[0].when, When::Pre);
    assert_eq!(m.check_ping[0].action, CheckAction::Wait);
    assert_eq!(m.check_ip[0].when, When::Prim);
    assert_eq!(m.check_custom[0].exec, PathBuf::from("checks/app.sh"));
    assert_eq!(
        m.check_module[0].states,
        vec![ModuleState::Up, ModuleState::Alone]
    );
    assert_eq!(m.user.nice_stop_timeout, secs(60));

    let farm = r#"
[service]
mode = "farm"
nodes = ["node1", "node2", "node3"]
[farm]
pulse = "50ms"
lost_after = 20
lans = ["default"]
power = { node1 = 2, node3 = 4 }
[vip]
addrs = ["10.0.0.200"]
mac = "5A:FE:00:00:00:01"
[[vip.rule]]
proto = "udp"
[[vip.rule]]
proto = "tcp"
port = 443
filter = "client_ip"
"#;
    let m = parse_module(Path::new(MODULE_FILE_PATH), "lb", farm, &c).unwrap();
    let f = m.farm.unwrap();
    assert_eq!(f.lost_timeout(), secs(1));
    assert_eq!(
        f.power,
        BTreeMap::from([
            ("node1".into(), 2),
            ("node2".into(), 1),
            ("node3".into(), 4)
        ])
    );
    let vip = m.vip.unwrap();
    assert_eq!(vip.mac, Some([0x5A, 0xFE, 0, 0, 0, 1]));
    assert_eq!(vip.rules[0].port, 0, "port defaults to any");
    assert_eq!(vip.rules[0].filter, Filter::ClientIp);
}

// ---- bad configs: one kind each -------------------------------------------

#[test]
fn unknown_key_lists_the_allowed_keys() {
    let errs =
        module_errors("[service]\nmode = \"mirror\"\n\n[heart]\npulse = \"1s\"\npulsee = \"2s\"\n");
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        6,
        "heart.pulsee",
        &["unknown key", "pulse", "timeout", "lans"],
    );
}

#[test]
fn bad_duration_unit_lists_the_allowed_units() {
    let errs = module_errors(&format!("{MIRROR_HEAD}[heart]\npulse = \"700xs\"\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "heart.pulse",
        &["\"700xs\"", "unknown unit \"xs\"", "ms, s, m, h, d"],
    );
}

#[test]
fn timeout_not_above_pulse() {
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[heart]\npulse = \"2s\"\ntimeout = \"2s\"\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        5,
        "heart.timeout",
        &["timeout 2s must be greater than pulse 2s"],
    );
    // Only the pulse written: the error is on the pulse.
    let errs = module_errors(&format!("{MIRROR_HEAD}[heart]\npulse = \"1m\"\n"));
    assert_one(&errs, MODULE_FILE_PATH, 4, "heart.pulse", &["30s", "1m"]);
}

#[test]
fn unknown_mode() {
    let errs = module_errors("[service]\nmode = \"mirorr\"\n");
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        2,
        "service.mode",
        &["`mirorr`", "`mirror`", "`farm`"],
    );
}

#[test]
fn defaultprim_names_a_missing_node() {
    let errs = module_errors("[service]\nmode = \"mirror\"\ndefaultprim = \"node9\"\n");
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        3,
        "service.defaultprim",
        &[
            "\"node9\"",
            "\"alone\"",
            "\"lastprim\"",
            "\"node1\", \"node2\"",
        ],
    );
}

#[test]
fn heartbeat_lan_not_in_cluster() {
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[heart]\nlans = [\"default\", \"private\"]\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "heart.lans[1]",
        &["\"private\"", "not defined in cluster.toml", "\"default\""],
    );
    // A LAN that exists but carries no heartbeats.
    let errs = module_errors_with(
        &cluster3(),
        "[service]\nmode = \"mirror\"\nnodes = [\"node1\", \"node2\"]\n[heart]\nlans = [\"admin\"]\n",
    );
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        5,
        "heart.lans[0]",
        &["heartbeat = false"],
    );
}

#[test]
fn farm_rule_with_bad_proto() {
    let errs = module_errors(
        "[service]\nmode = \"farm\"\n[vip]\naddrs = [\"10.10.0.200\"]\n[[vip.rule]]\nproto = \"tcp\"\nport = 80\n[[vip.rule]]\nproto = \"sctp\"\nport = 80\n",
    );
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        9,
        "vip.rule[1].proto",
        &["`sctp`", "`tcp`", "`udp`"],
    );
}

#[test]
fn port_out_of_range() {
    let errs = module_errors(&format!(
        "{FARM_HEAD}\n[[check.tcp]]\nhost = \"127.0.0.1\"\nport = 70000\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        11,
        "check.tcp[0].port",
        &["70000", "1 to 65535"],
    );
    let errs = cluster_errors(&format!("{CLUSTER}\n[ports]\nhttp = 0\n"));
    assert_one(
        &errs,
        CLUSTER_FILE_PATH,
        17,
        "ports.http",
        &["0 is out of range"],
    );
}

#[test]
fn relative_rfs_path() {
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[rfs]\n[[rfs.dir]]\npath = \"srv/data\"\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        5,
        "rfs.dir[0].path",
        &["relative path \"srv/data\"", "absolute"],
    );
}

#[test]
fn duplicate_node_name() {
    let errs = cluster_errors(&format!(
        "{CLUSTER}\n[[node]]\nname = \"node1\"\naddrs = {{ default = \"10.10.0.3\" }}\n"
    ));
    assert_one(
        &errs,
        CLUSTER_FILE_PATH,
        17,
        "node[2].name",
        &["duplicate node name \"node1\""],
    );
}

#[test]
fn node_missing_an_address_on_a_lan() {
    let errs = cluster_errors(
        r#"name = "c"
[[lan]]
name = "default"
[[lan]]
name = "private"
[[node]]
name = "node1"
addrs = { default = "10.0.0.1", private = "10.1.0.1" }
[[node]]
name = "node2"
addrs = { default = "10.0.0.2" }
"#,
    );
    assert_one(
        &errs,
        CLUSTER_FILE_PATH,
        11,
        "node[1].addrs",
        &["no address on LAN \"private\""],
    );
}

#[test]
fn bad_ip_address() {
    let errs = cluster_errors(&CLUSTER.replace("10.10.0.2", "10.10.0.300"));
    assert_one(
        &errs,
        CLUSTER_FILE_PATH,
        14,
        "node[1].addrs.default",
        &["invalid IP address \"10.10.0.300\"", "IPv4"],
    );
}

#[test]
fn toml_syntax_error_is_one_error_with_its_line() {
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[heart]\npulse = 700ms\ntimeout = \"1s\"\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "heart.pulse",
        &["TOML syntax error"],
    );
}

#[test]
fn wrong_type() {
    let errs = module_errors(&format!("{MIRROR_HEAD}[heart]\npulse = 700\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "heart.pulse",
        &[
            "invalid type: integer `700`",
            "duration string such as \"700ms\"",
        ],
    );
    let errs = module_errors(&format!("{MIRROR_HEAD}failover = \"yes\"\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        3,
        "service.failover",
        &["expected true or false"],
    );
    // A table where an array of tables is expected.
    let errs = module_errors(&format!("{MIRROR_HEAD}[rfs]\n[rfs.dir]\npath = \"/srv\"\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "rfs.dir",
        &["expected an array", "write [[rfs.dir]]"],
    );
    // A bad value removed while parsing is not also reported as missing.
    let errs = cluster_errors(&CLUSTER.replace("name = \"node2\"", "name = 2"));
    assert_one(
        &errs,
        CLUSTER_FILE_PATH,
        13,
        "node[1].name",
        &["invalid type"],
    );
}

#[test]
fn rfs_in_a_farm_module() {
    let errs = module_errors(&format!("{FARM_HEAD}[rfs]\n[[rfs.dir]]\npath = \"/srv\"\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        8,
        "rfs",
        &["only for mirror modules", "mode = \"farm\""],
    );
}

#[test]
fn heart_in_a_farm_and_farm_in_a_mirror() {
    let errs = module_errors(&format!("{FARM_HEAD}[heart]\npulse = \"1s\"\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        8,
        "heart",
        &["only for mirror modules"],
    );
    let errs = module_errors(&format!("{MIRROR_HEAD}[farm]\npulse = \"1s\"\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        3,
        "farm",
        &["only for farm modules"],
    );
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[vip]\naddrs = [\"10.10.0.100\"]\n[[vip.rule]]\nproto = \"tcp\"\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        5,
        "vip.rule",
        &["only for farm modules"],
    );
}

#[test]
fn farm_without_vip_or_rule() {
    let errs = module_errors("[service]\nmode = \"farm\"\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].key, "vip");
    assert!(errs[0].message.contains("[[vip.rule]]"));
    let errs = module_errors("[service]\nmode = \"farm\"\n[vip]\naddrs = [\"10.10.0.200\"]\n");
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        3,
        "vip.rule",
        &["at least one [[vip.rule]]"],
    );
}

#[test]
fn missing_required_key() {
    let errs = cluster_errors(&CLUSTER.replace("name = \"node2\"\n", ""));
    assert_one(
        &errs,
        CLUSTER_FILE_PATH,
        12,
        "node[1].name",
        &["missing required key"],
    );
    let errs = module_errors("[service]\nboot = true\n");
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        1,
        "service.mode",
        &["missing required key", "\"mirror\""],
    );
}

#[test]
fn power_for_a_node_outside_the_module() {
    let errs = module_errors(&format!(
        "{FARM_HEAD}[farm]\npower = {{ node1 = 2, node7 = 1 }}\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        9,
        "farm.power.node7",
        &["\"node7\"", "\"node1\", \"node2\""],
    );
}

#[test]
fn mirror_on_a_three_node_cluster_must_name_its_two_nodes() {
    let errs = module_errors_with(&cluster3(), MIRROR_HEAD);
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        1,
        "service.nodes",
        &["exactly 2 nodes", "here 3"],
    );
}

#[test]
fn check_actions_must_fit_when() {
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[[check.ping]]\nhost = \"10.0.0.254\"\naction = \"restart\"\n[[check.tcp]]\nhost = \"h\"\nport = 1\naction = \"wait\"\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(
        &errs[0],
        MODULE_FILE_PATH,
        5,
        "check.ping[0].action",
        &["\"wait\" or \"noaction\""],
    );
    assert_error(
        &errs[1],
        MODULE_FILE_PATH,
        9,
        "check.tcp[0].action",
        &["needs when = \"pre\""],
    );
    let errs = module_errors(&format!(
        "{FARM_HEAD}[[errd.proc]]\nname = \"nginx\"\nclass = \"prim\"\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        10,
        "errd.proc[0].class",
        &["\"both\" or \"pre\""],
    );
}

#[test]
fn splitbrain_witness_must_not_be_a_node() {
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[check.splitbrain]\nwitness = [\"10.10.0.254\", \"10.10.0.2\"]\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "check.splitbrain.witness[1]",
        &["node \"node2\""],
    );
}

#[test]
fn splitbrain_arbiter_is_checked() {
    let m = parse_module(
        Path::new(MODULE_FILE_PATH),
        "m",
        &format!(
            "{MIRROR_HEAD}[check.splitbrain]\narbiter = [\"10.10.0.254:9000\", \"10.10.0.253\"]\n"
        ),
        &cluster(),
    )
    .unwrap();
    let sb = m.splitbrain.unwrap();
    assert_eq!(sb.witness, Vec::<std::net::IpAddr>::new());
    assert_eq!(
        sb.arbiter,
        vec![
            "10.10.0.254:9000".parse().unwrap(),
            "10.10.0.253:8889".parse().unwrap()
        ]
    );
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[check.splitbrain]\narbiter = [\"10.10.0.2:8889\"]\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "check.splitbrain.arbiter[0]",
        &["node \"node2\"", "third machine"],
    );
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[check.splitbrain]\narbiter = [\"witness.lan\"]\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "check.splitbrain.arbiter[0]",
        &["IP:port"],
    );
    let errs = module_errors(&format!(
        "{MIRROR_HEAD}[check.splitbrain]\nwitness = [\"10.10.0.254\"]\narbiter = [\"10.10.0.253:8889\"]\n"
    ));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        5,
        "check.splitbrain.arbiter",
        &["exclude each other"],
    );
}

#[test]
fn vip_must_not_be_a_node_address() {
    let errs = module_errors(&format!("{MIRROR_HEAD}[vip]\naddrs = [\"10.10.0.1\"]\n"));
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        4,
        "vip.addrs[0]",
        &["node \"node1\""],
    );
}

#[test]
fn rfs_needs_a_replication_lan() {
    let c = parse_cluster(
        Path::new(CLUSTER_FILE_PATH),
        &CLUSTER.replace("replication = true", "replication = false"),
    )
    .unwrap();
    let errs = module_errors_with(&c, WEB);
    assert_one(
        &errs,
        MODULE_FILE_PATH,
        13,
        "rfs",
        &["replication = true in cluster.toml"],
    );
}

#[test]
fn two_replication_lans() {
    let errs = cluster_errors(&CLUSTER.replace(
        "[[node]]\nname = \"node1\"\naddrs = { default = \"10.10.0.1\" }",
        "[[lan]]\nname = \"second\"\nreplication = true\n[[node]]\nname = \"node1\"\naddrs = { default = \"10.10.0.1\", second = \"10.20.0.1\" }",
    ).replace("addrs = { default = \"10.10.0.2\" }", "addrs = { default = \"10.10.0.2\", second = \"10.20.0.2\" }"));
    assert_one(
        &errs,
        CLUSTER_FILE_PATH,
        10,
        "lan[1].replication",
        &["at most one LAN"],
    );
}

// ---- several errors ---------------------------------------------------------

#[test]
fn one_bad_value_does_not_hide_another() {
    let text = r#"[service]
mode = "mirror"
defaultprim = "node9"
maxloop = -1

[heart]
pulse = "7x"
bogus = 1
lans = ["default", "nope"]

[vip]
addrs = ["10.10.0.100", "not-an-ip"]

[rfs]
async = "sometimes"
durability = "never"
[[rfs.dir]]
path = "relative"
[[rfs.dir]]
path = "/ok"
mode = "rw"
"#;
    let errs = module_errors(text);
    let got: Vec<(Option<usize>, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (Some(3), "service.defaultprim"),
            (Some(4), "service.maxloop"),
            (Some(7), "heart.pulse"),
            (Some(8), "heart.bogus"),
            (Some(9), "heart.lans[1]"),
            (Some(12), "vip.addrs[1]"),
            (Some(15), "rfs.async"),
            (Some(16), "rfs.durability"),
            (Some(18), "rfs.dir[0].path"),
            (Some(21), "rfs.dir[1].mode"),
        ],
        "{errs:#?}"
    );
    let all = ConfigErrors(errs).to_string();
    assert_eq!(all.lines().count(), 10, "{all}");
    assert!(
        all.lines().all(|l| l.starts_with(MODULE_FILE_PATH)),
        "{all}"
    );

    let errs = cluster_errors(
        r#"name = "bad name"
[[lan]]
name = "default"
[[node]]
name = "node1"
addrs = { default = "10.0.0.1", other = "10.0.0.9" }
[[node]]
name = "node2"
addrs = { default = "10.0.0.1" }
[ports]
http = 5600
"#,
    );
    let got: Vec<(Option<usize>, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (Some(1), "name"),
            (Some(6), "node[0].addrs.other"),
            (Some(9), "node[1].addrs.default"),
            (Some(11), "ports.http"),
        ],
        "{errs:#?}"
    );
}

#[test]
fn display_of_an_error() {
    let e = ConfigError {
        file: PathBuf::from("/etc/safekit/cluster.toml"),
        line: Some(3),
        key: "heart.pulse".into(),
        message: "bad".into(),
    };
    assert_eq!(
        e.to_string(),
        "/etc/safekit/cluster.toml:3: heart.pulse: bad"
    );
    let e = ConfigError {
        line: None,
        key: String::new(),
        ..e
    };
    assert_eq!(e.to_string(), "/etc/safekit/cluster.toml: bad");
}

// ---- load() on a directory ----------------------------------------------------

/// A config dir under the temp dir, removed on drop.
struct TempEtc(PathBuf);

impl TempEtc {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("safekit-config-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        Self(dir)
    }

    fn write(&self, rel: &str, text: &[u8]) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }

    fn key(&self, len: usize, mode: u32) {
        let p = self.0.join("cluster.key");
        std::fs::write(&p, vec![0x5a; len]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The shipped example: cluster, web and front.
    fn example(name: &str) -> Self {
        let etc = Self::new(name);
        etc.write("cluster.toml", CLUSTER.as_bytes());
        etc.write("modules/web/module.toml", WEB.as_bytes());
        etc.write("modules/front/module.toml", FRONT.as_bytes());
        etc
    }
}

impl Drop for TempEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn load_reads_cluster_key_and_modules() {
    let etc = TempEtc::example("ok");
    etc.key(32, 0o600);
    etc.write("modules/.hidden/module.toml", b"garbage");
    etc.write("modules/README", b"not a module");
    let cfg = load(&etc.0).unwrap();
    assert_eq!(cfg.cluster.key, vec![0x5a; 32]);
    assert_eq!(cfg.cluster.key_file, etc.0.join("cluster.key"));
    assert_eq!(cfg.modules.keys().collect::<Vec<_>>(), vec!["front", "web"]);
    // The key never shows in Debug output.
    assert!(!format!("{:?}", cfg.cluster).contains("90, 90"));
}

#[test]
fn load_refuses_a_short_key_file() {
    let etc = TempEtc::example("shortkey");
    etc.key(16, 0o600);
    let errs = load(&etc.0).unwrap_err().0;
    let file = etc.0.join("cluster.toml");
    assert_one(
        &errs,
        file.to_str().unwrap(),
        2,
        "key_file",
        &["16 bytes", "at least 32", "head -c 32 /dev/urandom"],
    );
}

#[test]
fn load_refuses_a_key_readable_by_others_and_a_missing_key() {
    let etc = TempEtc::example("openkey");
    etc.key(32, 0o644);
    let errs = load(&etc.0).unwrap_err().0;
    let file = etc.0.join("cluster.toml");
    assert_one(
        &errs,
        file.to_str().unwrap(),
        2,
        "key_file",
        &["644", "chmod 600"],
    );
    std::fs::remove_file(etc.0.join("cluster.key")).unwrap();
    let errs = load(&etc.0).unwrap_err().0;
    assert_one(
        &errs,
        file.to_str().unwrap(),
        2,
        "key_file",
        &["cannot open key file"],
    );
}

#[test]
fn load_reports_errors_of_every_file() {
    let etc = TempEtc::example("many");
    etc.key(32, 0o600);
    // A second module with the web VIP, a module checker naming nothing, a
    // bad directory name, and a broken cluster file: all reported together.
    etc.write(
        "modules/api/module.toml",
        b"[service]\nmode = \"mirror\"\n[vip]\naddrs = [\"10.10.0.100\"]\n[[check.module]]\nname = \"ghost\"\n",
    );
    etc.write("modules/bad.name/module.toml", MIRROR_HEAD.as_bytes());
    let errs = load(&etc.0).unwrap_err().0;
    let api = etc.0.join("modules/api/module.toml");
    let web = etc.0.join("modules/web/module.toml");
    let found = |file: &Path, line: Option<usize>, key: &str| {
        errs.iter()
            .any(|e| e.file == file && e.line == line && e.key == key)
    };
    assert!(found(&api, Some(6), "check.module[0].name"), "{errs:#?}");
    // api sorts before web: web's VIP is the duplicate.
    assert!(found(&web, Some(11), "vip.addrs[0]"), "{errs:#?}");
    assert!(
        found(&etc.0.join("modules/bad.name/module.toml"), None, ""),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 3, "{errs:#?}");

    // cluster.toml broken: modules are still checked on their own.
    etc.write("cluster.toml", b"name = \"lab\"\n");
    etc.write(
        "modules/web/module.toml",
        format!("bogus = 1\n{WEB}").as_bytes(),
    );
    let errs = load(&etc.0).unwrap_err().0;
    let cluster = etc.0.join("cluster.toml");
    assert!(
        errs.iter().any(|e| e.file == cluster && e.key == "lan"),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.file == cluster && e.key == "node"),
        "{errs:#?}"
    );
    assert!(found_in(&errs, &web, "bogus"), "{errs:#?}");
}

fn found_in(errs: &[ConfigError], file: &Path, key: &str) -> bool {
    errs.iter().any(|e| e.file == file && e.key == key)
}

#[test]
fn load_without_a_cluster_file() {
    let etc = TempEtc::new("empty");
    let errs = load(&etc.0).unwrap_err().0;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].file, etc.0.join("cluster.toml"));
    assert!(errs[0].message.contains("cannot read"), "{errs:?}");
}

#[test]
fn farm_mac_defaults_from_the_first_vip() {
    let m = parse_module(Path::new(MODULE_FILE_PATH), "f", FARM_HEAD, &cluster()).unwrap();
    let [b0, b1, b2, b3] = Ipv4Addr::new(10, 10, 0, 200).octets();
    assert_eq!(m.vip.unwrap().mac, Some([0x5A, 0xFE, b0, b1, b2, b3]));
}
