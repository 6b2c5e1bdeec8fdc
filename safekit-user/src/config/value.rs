//! Leaf values of the TOML files, checked as they are deserialized so that a
//! bad value is reported at its own line with what is allowed: durations,
//! names, addresses, bounded integers, MAC addresses, bandwidths, paths.

use std::{
    fmt::{self, Write as _},
    marker::PhantomData,
    net::IpAddr,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Units a duration may use.
pub const DURATION_UNITS: &str = "ms, s, m, h, d";
/// The longest duration accepted anywhere.
pub const MAX_DURATION: Duration = Duration::from_hours(365 * 24);
/// Longest cluster, LAN and module name.
pub(super) const MAX_NAME_LEN: usize = 32;
/// Longest node name (a host name label).
pub(super) const MAX_NODE_NAME_LEN: usize = 63;
/// Longest network interface name (Linux `IFNAMSIZ` - 1).
pub(super) const MAX_IFNAME_LEN: usize = 15;

/// Parses "700ms", "30s", "5m", "24h", "1d" and sums like "1h30m".
/// Zero and anything above [`MAX_DURATION`] are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let hint = format!(
        "write a whole number and a unit, e.g. \"700ms\", \"30s\", \"5m\", \"24h\" or \"1h30m\" (units: {DURATION_UNITS})"
    );
    let bad = |why: &str| format!("invalid duration {s:?}: {why}; {hint}");
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let n: u128 = rest[..digits]
            .parse()
            .map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let ms_per_unit: u128 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(bad("missing unit")),
            u if u.starts_with('.') || u.starts_with(',') => {
                return Err(bad(
                    "fractions are not allowed (use a smaller unit: \"1500ms\")",
                ));
            }
            u => return Err(bad(&format!("unknown unit {u:?}"))),
        };
        total = total.saturating_add(n.saturating_mul(ms_per_unit));
        rest = &rest[unit_len..];
    }
    if total == 0 {
        return Err(format!("invalid duration {s:?}: must be greater than 0"));
    }
    let max_ms = MAX_DURATION.as_millis();
    if total > max_ms {
        return Err(format!(
            "invalid duration {s:?}: at most {}",
            format_duration(MAX_DURATION)
        ));
    }
    let ms = u64::try_from(total).unwrap_or(u64::MAX);
    Ok(Duration::from_millis(ms))
}

/// Writes a duration the way the config does ("700ms", "30s", "1h30m").
#[must_use]
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 || !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = ms / 1000;
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if s >= len {
            let _ = write!(out, "{}{unit}", s / len);
            s %= len;
        }
    }
    out
}

/// Parses a bandwidth: a whole number of bytes per second, optionally with a
/// unit (`B`, `K`/`KB`/`kB`, `M`/`MB`, `G`/`GB` are powers of 1000; `KiB`,
/// `MiB`, `GiB` powers of 1024) and an optional `/s`: "100MB/s", "512KiB".
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "invalid bandwidth {s:?}: {why}; write bytes per second, e.g. 50000000, \"100MB/s\" or \"512KiB/s\" (units: B, KB, MB, GB, KiB, MiB, GiB)"
        )
    };
    let body = s.strip_suffix("/s").unwrap_or(s);
    let digits = body
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(body.len());
    if digits == 0 {
        return Err(bad("expected a number"));
    }
    let n: u64 = body[..digits]
        .parse()
        .map_err(|_| bad("number too large"))?;
    let unit: u64 = match &body[digits..] {
        "" | "B" => 1,
        "K" | "KB" | "kB" => 1000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => return Err(bad(&format!("unknown unit {u:?}"))),
    };
    let bytes = n.checked_mul(unit).ok_or_else(|| bad("too large"))?;
    if bytes == 0 {
        return Err(format!("invalid bandwidth {s:?}: must be greater than 0"));
    }
    Ok(bytes)
}

/// Checks a name: 1 to `max` ASCII letters, digits, `-` or `_`.
pub(super) fn check_name(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty()
        || s.len() > max
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "invalid name {s:?}: use 1 to {max} ASCII letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// Checks a network interface name the way the Linux kernel does.
pub(super) fn check_ifname(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > MAX_IFNAME_LEN
        || s == "."
        || s == ".."
        || s.chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "invalid interface name {s:?}: 1 to {MAX_IFNAME_LEN} characters, no '/', ':' or spaces"
        ));
    }
    Ok(())
}

/// Checks a host: an IP address or a DNS name.
pub(super) fn check_host(s: &str) -> Result<(), String> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "invalid host {s:?}: an IP address (\"10.0.0.1\") or a DNS name (\"db.example.com\")"
        ));
    }
    Ok(())
}

/// Parses "5A:FE:0A:0A:00:C8" (or with `-`); refuses multicast and zero.
pub(super) fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || {
        format!(
            "invalid MAC address {s:?}: six hex bytes separated by ':', e.g. \"5A:FE:0A:0A:00:C8\""
        )
    };
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!(
            "invalid MAC address {s:?}: a multicast address (lowest bit of the first byte set); the VIP needs a unicast MAC"
        ));
    }
    if mac == [0; 6] {
        return Err(format!("invalid MAC address {s:?}: all zero"));
    }
    Ok(mac)
}

/// Writes a MAC address as `5A:FE:0A:0A:00:C8`.
#[must_use]
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Checks and normalises an absolute path (no `..`, not `/`).
pub(super) fn check_abs_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if s.contains('\0') {
        return Err(format!("invalid path {s:?}: contains a NUL byte"));
    }
    if !p.is_absolute() {
        return Err(format!(
            "relative path {s:?}: must be an absolute path such as \"/srv/web/data\""
        ));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("invalid path {s:?}: '..' is not allowed"));
    }
    let normal: PathBuf = p.components().collect();
    if normal == Path::new("/") {
        return Err(format!("invalid path {s:?}: cannot be the root directory"));
    }
    Ok(normal)
}

/// Implements `Deserialize` for a newtype read from a TOML string and checked
/// by `$check` (`fn(&str) -> Result<$inner, String>`).
macro_rules! string_value {
    ($(#[$doc:meta])* $name:ident($inner:ty), $expecting:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
        pub(super) struct $name(pub(super) $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$name, E> {
                        let check: fn(&str) -> Result<$inner, String> = $check;
                        check(s).map($name).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

string_value!(
    /// A duration string ("700ms").
    Dur(Duration),
    "a duration string such as \"700ms\", \"30s\", \"5m\" or \"24h\"",
    parse_duration
);

string_value!(
    /// A cluster, LAN or module name.
    Name(String),
    "a name (letters, digits, '-', '_')",
    |s| check_name(s, MAX_NAME_LEN).map(|()| s.to_owned())
);

string_value!(
    /// A node name.
    NodeName(String),
    "a node name (letters, digits, '-', '_')",
    |s| check_name(s, MAX_NODE_NAME_LEN).map(|()| s.to_owned())
);

string_value!(
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    "an IP address string such as \"10.0.0.1\"",
    |s| s.parse().map_err(|_| format!(
        "invalid IP address {s:?}: expected an IPv4 address such as \"10.0.0.1\" or an IPv6 address such as \"fd00::1\""
    ))
);

string_value!(
    /// An arbitrating witness: "IP:port", or "IP" (port 8889).
    Arbiter(std::net::SocketAddr),
    "an arbiter address string such as \"10.0.0.254:8889\"",
    |s| s
        .parse::<std::net::SocketAddr>()
        .or_else(|_| {
            s.parse::<IpAddr>()
                .map(|ip| std::net::SocketAddr::new(ip, crate::witness::DEFAULT_PORT))
        })
        .map_err(|_| format!(
            "invalid arbiter {s:?}: expected \"IP:port\" such as \"10.0.0.254:8889\" (or an IP alone for port {})",
            crate::witness::DEFAULT_PORT
        ))
);

string_value!(
    /// A network interface name.
    IfName(String),
    "an interface name such as \"eth0\"",
    |s| check_ifname(s).map(|()| s.to_owned())
);

string_value!(
    /// An IP address or DNS name.
    Host(String),
    "a host (IP address or DNS name) string",
    |s| check_host(s).map(|()| s.to_owned())
);

string_value!(
    /// A MAC address.
    Mac([u8; 6]),
    "a MAC address string such as \"5A:FE:0A:0A:00:C8\"",
    parse_mac
);

string_value!(
    /// An absolute path.
    AbsPath(PathBuf),
    "an absolute path string such as \"/srv/web/data\"",
    check_abs_path
);

string_value!(
    /// A non-empty string without NUL bytes.
    Text(String),
    "a string",
    |s| if s.is_empty() {
        Err("must not be empty".to_owned())
    } else if s.contains('\0') {
        Err("must not contain a NUL byte".to_owned())
    } else {
        Ok(s.to_owned())
    }
);

/// A bandwidth in bytes per second: an integer or a string with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bandwidth(pub(super) u64);

impl<'de> Deserialize<'de> for Bandwidth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Bandwidth;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes per second, as an integer or a string such as \"100MB/s\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bandwidth, E> {
                match u64::try_from(v) {
                    Ok(n) if n > 0 => Ok(Bandwidth(n)),
                    _ => Err(E::custom(format!(
                        "invalid bandwidth {v}: must be greater than 0 (bytes per second)"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bandwidth, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Bandwidth, E> {
                parse_bandwidth(s).map(Bandwidth).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// An integer in `MIN..=MAX`, converted to `T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Int<T, const MIN: i64, const MAX: i64>(pub(super) T);

impl<'de, T: TryFrom<i64>, const MIN: i64, const MAX: i64> Deserialize<'de> for Int<T, MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const MIN: i64, const MAX: i64>(PhantomData<T>);
        impl<T: TryFrom<i64>, const MIN: i64, const MAX: i64> Visitor<'_> for V<T, MIN, MAX> {
            type Value = Int<T, MIN, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an integer from {MIN} to {MAX}")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                let out_of_range =
                    || E::custom(format!("{v} is out of range: allowed {MIN} to {MAX}"));
                if !(MIN..=MAX).contains(&v) {
                    return Err(out_of_range());
                }
                T::try_from(v).map(Int).map_err(|_| out_of_range())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                match i64::try_from(v) {
                    Ok(v) => self.visit_i64(v),
                    Err(_) => Err(E::custom(format!(
                        "{v} is out of range: allowed {MIN} to {MAX}"
                    ))),
                }
            }
        }
        d.deserialize_i64(V(PhantomData))
    }
}

/// A TCP or UDP port, 1 to 65535.
pub(super) type Port = Int<u16, 1, 65535>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("700ms"), Ok(Duration::from_millis(700)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_hours(24)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_hours(24)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_mins(90)));
        for bad in [
            "",
            "30",
            "s",
            "1.5s",
            "3 s",
            "10x",
            "0s",
            "400d",
            "99999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let e = parse_duration("700xs").unwrap_err();
        assert!(
            e.contains("unknown unit \"xs\"") && e.contains(DURATION_UNITS),
            "{e}"
        );
        assert_eq!(format_duration(Duration::from_millis(700)), "700ms");
        assert_eq!(format_duration(Duration::from_mins(90)), "1h30m");
        assert_eq!(format_duration(Duration::from_hours(24)), "1d");
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("100MB/s"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("512KiB/s"), Ok(512 * 1024));
        assert_eq!(parse_bandwidth("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("1000"), Ok(1000));
        for bad in ["", "MB/s", "10Mb/s", "0MB", "1.5MB", "99999999999GB"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_hosts_macs_paths() {
        assert!(check_name("web_1-a", 32).is_ok());
        assert!(check_name("", 32).is_err());
        assert!(check_name("a.b", 32).is_err());
        assert!(check_name(&"a".repeat(33), 32).is_err());
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("eth0:1").is_err());
        assert!(check_ifname("averyveryverylongname").is_err());
        assert!(check_host("127.0.0.1").is_ok());
        assert!(check_host("db.example.com").is_ok());
        assert!(check_host("bad host").is_err());
        assert_eq!(
            parse_mac("5A:FE:0a:0A:00:C8"),
            Ok([0x5A, 0xFE, 0x0A, 0x0A, 0x00, 0xC8])
        );
        assert!(parse_mac("01:00:5E:00:00:01").is_err());
        assert!(parse_mac("5A:FE:0A:0A:00").is_err());
        assert_eq!(
            format_mac(&[0x5A, 0xFE, 0x0A, 0x0A, 0x00, 0xC8]),
            "5A:FE:0A:0A:00:C8"
        );
        assert_eq!(
            check_abs_path("/srv/web/data/"),
            Ok(PathBuf::from("/srv/web/data"))
        );
        assert!(check_abs_path("srv/web").is_err());
        assert!(check_abs_path("/srv/../etc").is_err());
        assert!(check_abs_path("/").is_err());
    }
}
