//! `cluster.toml`: the cluster name, its key file, LANs, nodes and ports.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

use super::{
    error::{ConfigErrors, Diag},
    recover,
    value::{Dur, Ip, Name, NodeName, Port, Text},
};

/// File name of the cluster configuration in the config dir.
pub const CLUSTER_FILE: &str = "cluster.toml";
/// Default `key_file`, relative to the config dir.
pub const DEFAULT_KEY_FILE: &str = "cluster.key";
/// Shortest accepted cluster key, in bytes.
pub const MIN_KEY_LEN: usize = 32;
/// Longest accepted cluster key file, in bytes.
pub const MAX_KEY_LEN: usize = 64 * 1024;
/// Fewest nodes in a cluster.
pub const MIN_NODES: usize = 2;
/// Node names reserved for the keywords of `defaultprim` and `splitbrain_keep`.
pub const RESERVED_NODE_NAMES: [&str; 3] = ["alone", "lastprim", "former_prim"];
/// Default `[lan] heartbeat`.
pub const DEFAULT_LAN_HEARTBEAT: bool = true;
/// Default `[lan] replication`.
pub const DEFAULT_LAN_REPLICATION: bool = false;
/// Default UDP heartbeat port.
pub const DEFAULT_HEARTBEAT_PORT: u16 = 8888;
/// Default TCP replication port.
pub const DEFAULT_REPLICATION_PORT: u16 = 5600;
/// Default TCP HTTP port (health check, REST API, metrics, console).
pub const DEFAULT_HTTP_PORT: u16 = 9010;
/// Default TCP HTTPS port.
pub const DEFAULT_HTTPS_PORT: u16 = 9453;
/// Default `[api] metrics_anonymous`: `/metrics` needs credentials.
pub const DEFAULT_METRICS_ANONYMOUS: bool = false;
/// Default `[api] session_ttl`: a console login lasts a working day.
pub const DEFAULT_SESSION_TTL: std::time::Duration = std::time::Duration::from_hours(8);
/// Shortest `[api] session_ttl`.
pub const MIN_SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest `[api] session_ttl`.
pub const MAX_SESSION_TTL: std::time::Duration = std::time::Duration::from_hours(24 * 7);

/// The validated `cluster.toml`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Cluster name; heartbeats of another cluster are ignored.
    pub name: String,
    /// The key file, resolved against the config dir.
    pub key_file: PathBuf,
    /// The cluster key (at least [`MIN_KEY_LEN`] bytes); filled by
    /// [`super::load`] only, empty after [`super::parse_cluster`].
    pub key: Vec<u8>,
    /// LANs, in file order.
    pub lans: Vec<Lan>,
    /// Nodes, in file order.
    pub nodes: Vec<Node>,
    /// Ports.
    pub ports: Ports,
    /// The REST API and console (`[api]`).
    pub api: Api,
}

/// `[api]`: REST API, console and metrics access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Api {
    /// `/metrics` answers without credentials.
    pub metrics_anonymous: bool,
    /// A console session lasts this long after its login.
    pub session_ttl: std::time::Duration,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            metrics_anonymous: DEFAULT_METRICS_ANONYMOUS,
            session_ttl: DEFAULT_SESSION_TTL,
        }
    }
}

impl fmt::Debug for ClusterConfig {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("name", &self.name)
            .field("key_file", &self.key_file)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .field("lans", &self.lans)
            .field("nodes", &self.nodes)
            .field("ports", &self.ports)
            .field("api", &self.api)
            .finish()
    }
}

/// A network joining the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lan {
    /// LAN name, the key of [`Node::addrs`].
    pub name: String,
    /// Replication traffic uses this LAN (at most one LAN).
    pub replication: bool,
    /// Heartbeats are sent on this LAN.
    pub heartbeat: bool,
}

/// A cluster node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// The node's address on each LAN (one per LAN, every LAN).
    pub addrs: BTreeMap<String, IpAddr>,
}

/// Ports used by every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// UDP heartbeats.
    pub heartbeat: u16,
    /// TCP replication and resynchronisation.
    pub replication: u16,
    /// TCP HTTP: health check, REST API, metrics, console.
    pub http: u16,
    /// TCP HTTPS.
    pub https: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            heartbeat: DEFAULT_HEARTBEAT_PORT,
            replication: DEFAULT_REPLICATION_PORT,
            http: DEFAULT_HTTP_PORT,
            https: DEFAULT_HTTPS_PORT,
        }
    }
}

impl ClusterConfig {
    /// The node of that name.
    #[must_use]
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node that has this address on some LAN.
    #[must_use]
    pub fn node_by_addr(&self, addr: IpAddr) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.addrs.values().any(|a| *a == addr))
    }

    /// The LAN of that name.
    #[must_use]
    pub fn lan(&self, name: &str) -> Option<&Lan> {
        self.lans.iter().find(|l| l.name == name)
    }

    /// The LAN that carries replication, if any.
    #[must_use]
    pub fn replication_lan(&self) -> Option<&Lan> {
        self.lans.iter().find(|l| l.replication)
    }

    /// The LANs that carry heartbeats.
    pub fn heartbeat_lans(&self) -> impl Iterator<Item = &Lan> {
        self.lans.iter().filter(|l| l.heartbeat)
    }
}

// ---- raw ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<Spanned<Name>>,
    key_file: Option<Spanned<Text>>,
    lan: Option<Vec<Spanned<RawLan>>>,
    node: Option<Vec<Spanned<RawNode>>>,
    ports: Option<Spanned<RawPorts>>,
    api: Option<Spanned<RawApi>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    metrics_anonymous: Option<Spanned<bool>>,
    session_ttl: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLan {
    name: Option<Spanned<Name>>,
    replication: Option<Spanned<bool>>,
    heartbeat: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<Spanned<NodeName>>,
    addrs: Option<Spanned<BTreeMap<Spanned<String>, Spanned<Ip>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    heartbeat: Option<Spanned<Port>>,
    replication: Option<Spanned<Port>>,
    http: Option<Spanned<Port>>,
    https: Option<Spanned<Port>>,
}

/// A parsed cluster file and where its `key_file` was written.
pub(super) struct ParsedCluster {
    pub(super) config: ClusterConfig,
    /// Line of `key_file`, for errors about the key.
    pub(super) key_file_line: Option<usize>,
}

/// Parses and validates `cluster.toml` (without reading the key).
pub(super) fn parse(file: &Path, text: &str) -> Result<ParsedCluster, ConfigErrors> {
    let mut diag = Diag::new(file, text);
    let raw: Option<RawCluster> = recover::deserialize(text, &mut diag);
    let parsed = raw.map(|raw| validate(raw, file, &mut diag));
    match parsed {
        Some(p) if diag.is_ok() => Ok(p),
        _ => Err(ConfigErrors(diag.into_errors())),
    }
}

fn validate(raw: RawCluster, file: &Path, diag: &mut Diag) -> ParsedCluster {
    let name = if let Some(n) = raw.name {
        n.into_inner().0
    } else {
        diag.missing(None, "name", "the cluster name, e.g. name = \"prod\"");
        String::new()
    };
    let etc = file.parent().unwrap_or_else(|| Path::new("."));
    let (key_file, key_file_line) = match &raw.key_file {
        Some(k) => (etc.join(&k.get_ref().0), diag.span_line(&k.span())),
        None => (etc.join(DEFAULT_KEY_FILE), None),
    };

    let lans = validate_lans(raw.lan.unwrap_or_default(), diag);
    let nodes = validate_nodes(raw.node.unwrap_or_default(), &lans, diag);
    let ports = validate_ports(raw.ports, diag);
    let api = validate_api(raw.api, diag);

    ParsedCluster {
        config: ClusterConfig {
            name,
            key_file,
            key: Vec::new(),
            lans,
            nodes,
            ports,
            api,
        },
        key_file_line,
    }
}

fn validate_lans(raw: Vec<Spanned<RawLan>>, diag: &mut Diag) -> Vec<Lan> {
    if raw.is_empty() && !diag.has_error_at("lan") {
        diag.error(
            None,
            "lan",
            "no LAN defined: add at least one [[lan]] with a name, e.g. [[lan]] name = \"default\" replication = true",
        );
    }
    let mut lans: Vec<Lan> = Vec::new();
    let mut replication: Option<String> = None;
    for (i, l) in raw.into_iter().enumerate() {
        let table = l.span();
        let l = l.into_inner();
        let key = format!("lan[{i}]");
        let Some(name) = l.name else {
            diag.missing(
                Some(&table),
                &format!("{key}.name"),
                "each [[lan]] needs a name, e.g. name = \"default\"",
            );
            continue;
        };
        let name_span = name.span();
        let name = name.into_inner().0;
        if lans.iter().any(|x| x.name == name) {
            diag.error(
                Some(&name_span),
                format!("{key}.name"),
                format!("duplicate LAN name {name:?}: each [[lan]] needs its own name"),
            );
            continue;
        }
        let repl = l.replication.as_ref().is_some_and(|r| *r.get_ref());
        if repl {
            if let Some(first) = &replication {
                diag.error(
                    l.replication.as_ref().map(Spanned::span).as_ref(),
                    format!("{key}.replication"),
                    format!(
                        "LAN {first:?} already carries replication: at most one LAN may have replication = true"
                    ),
                );
            } else {
                replication = Some(name.clone());
            }
        }
        lans.push(Lan {
            name,
            replication: l
                .replication
                .map_or(DEFAULT_LAN_REPLICATION, Spanned::into_inner),
            heartbeat: l
                .heartbeat
                .map_or(DEFAULT_LAN_HEARTBEAT, Spanned::into_inner),
        });
    }
    if !lans.is_empty() && !lans.iter().any(|l| l.heartbeat) {
        diag.error(
            None,
            "lan",
            "no LAN carries heartbeats: at least one [[lan]] needs heartbeat = true (the default)",
        );
    }
    lans
}

fn validate_nodes(raw: Vec<Spanned<RawNode>>, lans: &[Lan], diag: &mut Diag) -> Vec<Node> {
    let raw_count = raw.len();
    let mut nodes: Vec<Node> = Vec::new();
    // address -> (node, LAN) that first used it
    let mut seen: BTreeMap<IpAddr, (String, String)> = BTreeMap::new();
    for (i, n) in raw.into_iter().enumerate() {
        let table = n.span();
        let n = n.into_inner();
        let key = format!("node[{i}]");
        let name = if let Some(name) = n.name {
            let span = name.span();
            let name = name.into_inner().0;
            if RESERVED_NODE_NAMES.contains(&name.as_str()) {
                diag.error(
                    Some(&span),
                    format!("{key}.name"),
                    format!("{name:?} is reserved (a keyword of defaultprim or splitbrain_keep): choose another node name"),
                );
            } else if nodes.iter().any(|x| x.name == name) {
                diag.error(
                    Some(&span),
                    format!("{key}.name"),
                    format!("duplicate node name {name:?}: each [[node]] needs its own name"),
                );
            }
            name
        } else {
            diag.missing(
                Some(&table),
                &format!("{key}.name"),
                "each [[node]] needs a name, e.g. name = \"node1\"",
            );
            String::new()
        };
        let addrs = if let Some(a) = n.addrs {
            node_addrs(a, &key, &name, lans, &mut seen, diag)
        } else {
            diag.missing(
                Some(&table),
                &format!("{key}.addrs"),
                "the node's address on each LAN, e.g. addrs = { default = \"10.0.0.1\" }",
            );
            BTreeMap::new()
        };
        nodes.push(Node { name, addrs });
    }
    if raw_count < MIN_NODES && !diag.has_error_at("node") {
        diag.error(
            None,
            "node",
            format!(
                "a cluster needs at least {MIN_NODES} nodes, found {raw_count}: add [[node]] tables"
            ),
        );
    }
    nodes
}

/// The `addrs` of node `key`: one unique, usable address on every LAN.
fn node_addrs(
    raw: Spanned<BTreeMap<Spanned<String>, Spanned<Ip>>>,
    key: &str,
    node: &str,
    lans: &[Lan],
    seen: &mut BTreeMap<IpAddr, (String, String)>,
    diag: &mut Diag,
) -> BTreeMap<String, IpAddr> {
    let lan_names = lans
        .iter()
        .map(|l| format!("{:?}", l.name))
        .collect::<Vec<_>>()
        .join(", ");
    let table = raw.span();
    let mut addrs = BTreeMap::new();
    for (lan, addr) in raw.into_inner() {
        let lan_span = lan.span();
        let lan = lan.into_inner();
        let addr_key = format!("{key}.addrs.{lan}");
        if lans.iter().all(|l| l.name != lan) {
            diag.error(
                Some(&lan_span),
                addr_key,
                format!("LAN {lan:?} is not defined in [[lan]]; defined: {lan_names}"),
            );
            continue;
        }
        let addr_span = addr.span();
        let ip = addr.into_inner().0;
        if let Some(why) = unusable_node_addr(ip) {
            diag.error(Some(&addr_span), addr_key, why);
            continue;
        }
        if let Some((other, other_lan)) = seen.get(&ip) {
            diag.error(
                Some(&addr_span),
                addr_key,
                format!(
                    "address {ip} is already node {other:?}'s address on LAN {other_lan:?}: addresses must be unique"
                ),
            );
            continue;
        }
        seen.insert(ip, (node.to_owned(), lan.clone()));
        addrs.insert(lan, ip);
    }
    for lan in lans {
        let addr_key = format!("{key}.addrs.{}", lan.name);
        if !addrs.contains_key(&lan.name) && !diag.has_error_at(&addr_key) {
            diag.error(
                Some(&table),
                format!("{key}.addrs"),
                format!(
                    "no address on LAN {:?}: every node needs one address on every LAN ({lan_names})",
                    lan.name
                ),
            );
        }
    }
    addrs
}

/// Why a node cannot use this address, if it cannot.
fn unusable_node_addr(ip: IpAddr) -> Option<String> {
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    bad.then(|| {
        format!("{ip} cannot be a node address: use the node's unicast address on that LAN")
    })
}

fn validate_api(raw: Option<Spanned<RawApi>>, diag: &mut Diag) -> Api {
    let Some(raw) = raw else {
        return Api::default();
    };
    let raw = raw.into_inner();
    let session_ttl = match raw.session_ttl {
        None => DEFAULT_SESSION_TTL,
        Some(t) => {
            let span = t.span();
            let ttl = t.into_inner().0;
            if (MIN_SESSION_TTL..=MAX_SESSION_TTL).contains(&ttl) {
                ttl
            } else {
                diag.error(
                    Some(&span),
                    "api.session_ttl",
                    "a console session lasts from \"1s\" to \"168h\" (7 days)",
                );
                DEFAULT_SESSION_TTL
            }
        }
    };
    Api {
        metrics_anonymous: raw
            .metrics_anonymous
            .map_or(DEFAULT_METRICS_ANONYMOUS, Spanned::into_inner),
        session_ttl,
    }
}

fn validate_ports(raw: Option<Spanned<RawPorts>>, diag: &mut Diag) -> Ports {
    let Some(raw) = raw else {
        return Ports::default();
    };
    let raw = raw.into_inner();
    let get = |p: Option<Spanned<Port>>, default: u16| {
        p.map_or((default, None), |p| (p.get_ref().0, Some(p.span())))
    };
    let (heartbeat, _) = get(raw.heartbeat, DEFAULT_HEARTBEAT_PORT);
    let tcp = [
        (
            "replication",
            get(raw.replication, DEFAULT_REPLICATION_PORT),
        ),
        ("http", get(raw.http, DEFAULT_HTTP_PORT)),
        ("https", get(raw.https, DEFAULT_HTTPS_PORT)),
    ];
    // The three TCP ports must differ (heartbeats are UDP); the error goes
    // to whichever of a clashing pair was written.
    for (i, (name, (port, span))) in tcp.iter().enumerate() {
        for (other, (other_port, other_span)) in &tcp[..i] {
            if port != other_port {
                continue;
            }
            let (at, key, with) = if span.is_some() {
                (span, name, other)
            } else {
                (other_span, other, name)
            };
            diag.error(
                at.as_ref(),
                format!("ports.{key}"),
                format!("TCP port {port} is also the {with} port: the TCP ports must differ"),
            );
        }
    }
    let [(_, (replication, _)), (_, (http, _)), (_, (https, _))] = tcp;
    Ports {
        heartbeat,
        replication,
        http,
        https,
    }
}
