//! The node's default IP when `--node-ip` is not given: upstream's rule, an IPv4 address of the interface that
//! carries the default route; without one, the first address of an interface that is neither loopback nor a
//! bridge or veth that nodelet or another runtime made (`nodelet0`, `cni0`, `docker0`...); else 127.0.0.1.

use std::net::Ipv4Addr;

/// Interfaces that belong to pod networks, never the node's own address.
fn made_by_a_runtime(interface: &str) -> bool {
    ["nodelet", "cni", "docker", "veth", "flannel", "cali", "kube-bridge", "virbr"]
        .iter()
        .any(|p| interface.starts_with(p))
}

/// The interface of the default route in `/proc/net/route` (destination and mask 0), lowest metric first.
pub fn default_route_interface(routes: &str) -> Option<&str> {
    routes
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let default = f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000");
            let metric: u32 = f.get(6)?.parse().ok()?;
            default.then_some((metric, *f.first()?))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, interface)| interface)
}

/// Picks the node IP from the route table and the interfaces' IPv4 addresses.
pub fn default_node_ip(routes: &str, addresses: &[(String, Ipv4Addr)]) -> Ipv4Addr {
    let usable = |ip: &Ipv4Addr| !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified();
    if let Some(interface) = default_route_interface(routes)
        && let Some((_, ip)) = addresses.iter().find(|(name, ip)| name == interface && usable(ip))
    {
        return *ip;
    }
    addresses
        .iter()
        .find(|(name, ip)| usable(ip) && !made_by_a_runtime(name) && name != "lo")
        .map_or(Ipv4Addr::LOCALHOST, |(_, ip)| *ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_route_interface_wins_and_runtime_bridges_never_do() {
        let routes = format!(
            "{HEADER}nodelet0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\neth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\neth0\t00000000\t01000A0A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        );
        assert_eq!(default_route_interface(&routes), Some("eth0"));
        let addresses = vec![
            ("lo".to_string(), ip("127.0.0.1")),
            ("nodelet0".to_string(), ip("10.88.0.1")),
            ("eth1".to_string(), ip("192.168.1.5")),
            ("eth0".to_string(), ip("10.10.0.7")),
        ];
        assert_eq!(default_node_ip(&routes, &addresses), ip("10.10.0.7"));
        // No default route: not the bridge that comes first, the host's own interface.
        assert_eq!(default_node_ip(HEADER, &addresses), ip("192.168.1.5"));
        assert_eq!(default_node_ip(HEADER, &addresses[..2]), Ipv4Addr::LOCALHOST);
    }
}
