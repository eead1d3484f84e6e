//! Refuses outbound requests to addresses inside the network Tidings runs in, unless
//! allow-listed. The check runs on the addresses a name resolves to, in the resolver the HTTP
//! client connects with, so a name that resolves differently later (DNS rebinding) is checked
//! again at connect time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// An IP network, `address/prefix`; a bare address is the network of that address alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network(ipnet::IpNet);

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.contains('/') {
            return trimmed.parse::<ipnet::IpNet>().map(Self).map_err(|_| {
                format!("{text:?} is not a network (address/prefix with a valid prefix length)")
            });
        }
        let address: IpAddr =
            trimmed.parse().map_err(|_| format!("{text:?} is not an IP address or network"))?;
        Ok(Self(ipnet::IpNet::from(address)))
    }
}

impl Network {
    /// Returns whether `ip` lies in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

/// Returns why `ip` is refused by default, or `None` when it is public.
pub fn blocked_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return blocked_v4(v4);
            }
            let segments = v6.segments();
            let first = segments[0];
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // NAT64 (64:ff9b::/96) embeds an IPv4 address that a gateway then reaches.
                return Some("NAT64");
            }
            if segments[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                return Some("IPv4-compatible IPv6");
            }
            if first == 0x2002 {
                return Some("6to4");
            }
            if first == 0x2001 && segments[1] == 0 {
                return Some("Teredo");
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
                Some("cloud metadata")
            } else {
                None
            }
        }
    }
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some(if ip == Ipv4Addr::new(169, 254, 169, 254) { "cloud metadata" } else { "link-local" })
    } else if a == 100 && (64..128).contains(&b) {
        Some("carrier-grade NAT")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_unspecified() || ip.is_broadcast() || a == 0 {
        Some("unspecified or broadcast")
    } else if a >= 240 {
        Some("reserved")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol assignments")
    } else {
        None
    }
}

/// The outbound address policy: blocked ranges unless allow-listed.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    allow: Arc<Vec<Network>>,
}

impl Guard {
    /// Returns a guard that lets the given networks through.
    pub fn new(allow: Vec<Network>) -> Self {
        Self { allow: Arc::new(allow) }
    }

    /// Returns why a connection to `ip` is refused, or `None` when allowed.
    pub fn check(&self, ip: IpAddr) -> Option<&'static str> {
        if self.allow.iter().any(|net| net.contains(ip)) { None } else { blocked_reason(ip) }
    }
}

/// A resolver for reqwest that drops refused addresses and fails when none is left.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    /// The policy.
    pub guard: Guard,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                addrs.iter().copied().filter(|a| guard.check(a.ip()).is_none()).collect();
            if allowed.is_empty() {
                let reason =
                    addrs.first().and_then(|a| guard.check(a.ip())).unwrap_or("unresolvable");
                return Err(Box::new(Blocked(format!(
                    "{host} resolves to a {reason} address, which is not allowed"
                ))) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A destination refused by the guard.
#[derive(Debug)]
pub struct Blocked(pub String);

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Blocked {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_blocked_and_public_ones_are_not() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "::7f00:1",
            "2002:7f00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "192.0.0.8",
        ] {
            assert!(blocked_reason(ip.parse().expect("ip")).is_some(), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(blocked_reason(ip.parse().expect("ip")).is_none(), "{ip}");
        }
    }

    #[test]
    fn the_allow_list_lets_networks_through() {
        let guard =
            Guard::new(vec!["127.0.0.0/8".parse().expect("net"), "::1".parse().expect("net")]);
        assert!(guard.check("127.0.0.1".parse().expect("ip")).is_none());
        assert!(guard.check("::1".parse().expect("ip")).is_none());
        assert!(guard.check("10.0.0.1".parse().expect("ip")).is_some());
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("/8".parse::<Network>().is_err());
        assert!("10.0.0.0/x".parse::<Network>().is_err());
        let net = |text: &str| text.parse::<Network>().expect("network");
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        assert!(net("10.1.2.3/8").contains(ip("10.200.0.1")), "host bits do not matter");
        assert!(net(" 192.168.1.7 ").contains(ip("192.168.1.7")));
        assert!(!net(" 192.168.1.7 ").contains(ip("192.168.1.8")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!net("0.0.0.0/0").contains(ip("::1")), "an IPv4 network holds no IPv6 address");
        assert!(net("fd00::/8").contains(ip("fd12::1")));
    }
}
