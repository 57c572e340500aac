//! The files a pod's containers see for names, upstream's way: `/etc/resolv.conf` per `dnsPolicy` and
//! `dnsConfig`, the kubelet-managed `/etc/hosts` (pod IP, FQDN, hostAliases) and `/etc/hostname`.

use k8s_openapi::api::core::v1::{Pod, PodSpec};

/// Upstream's limits on what a resolv.conf may hold.
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCH: usize = 32;

/// What the node knows about DNS.
#[derive(Debug, Clone, Default)]
pub struct NodeDns {
    /// `clusterDNS`.
    pub cluster_dns: Vec<String>,
    /// `clusterDomain`.
    pub cluster_domain: Option<String>,
    /// The node's own resolv.conf (`--resolv-conf`, `/etc/resolv.conf`).
    pub host_resolv_conf: String,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Resolv {
    nameservers: Vec<String>,
    searches: Vec<String>,
    options: Vec<String>,
}

fn parse(text: &str) -> Resolv {
    let mut r = Resolv::default();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.starts_with(';')) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => r.nameservers.extend(words.next().map(str::to_string)),
            Some("search") | Some("domain") => r.searches = words.map(str::to_string).collect(),
            Some("options") => r.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    r
}

/// The pod's resolv.conf, or an error for a policy upstream's validation would refuse.
pub fn resolv_conf(pod: &Pod, node: &NodeDns) -> Result<String, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        "Default" | "None" => false,
        other => return Err(format!("unsupported dnsPolicy {other:?}")),
    };
    let mut r = match policy {
        "None" => Resolv::default(),
        _ if cluster && !node.cluster_dns.is_empty() => {
            let domain = node.cluster_domain.clone().unwrap_or_else(|| "cluster.local".into());
            let host = parse(&node.host_resolv_conf);
            let mut searches = vec![format!("{namespace}.svc.{domain}"), format!("svc.{domain}"), domain];
            searches.extend(host.searches);
            Resolv { nameservers: node.cluster_dns.clone(), searches, options: vec!["ndots:5".into()] }
        }
        // `Default`, or ClusterFirst without clusterDNS (upstream falls back the same way, with an event).
        _ => parse(&node.host_resolv_conf),
    };
    if let Some(config) = spec.dns_config.as_ref() {
        for ns in config.nameservers.iter().flatten() {
            if !r.nameservers.contains(ns) {
                r.nameservers.push(ns.clone());
            }
        }
        for search in config.searches.iter().flatten() {
            if !r.searches.contains(search) {
                r.searches.push(search.clone());
            }
        }
        for option in config.options.iter().flatten() {
            let rendered = match &option.value {
                Some(v) => format!("{}:{v}", option.name.clone().unwrap_or_default()),
                None => option.name.clone().unwrap_or_default(),
            };
            let name = rendered.split(':').next().unwrap_or_default().to_string();
            r.options.retain(|o| o.split(':').next() != Some(name.as_str()));
            r.options.push(rendered);
        }
    }
    if policy == "None" && r.nameservers.is_empty() {
        return Err("dnsPolicy None needs dnsConfig.nameservers".into());
    }
    r.nameservers.truncate(MAX_NAMESERVERS);
    r.searches.truncate(MAX_SEARCH);
    let mut out = String::new();
    if !r.searches.is_empty() {
        out.push_str(&format!("search {}\n", r.searches.join(" ")));
    }
    for ns in &r.nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    if !r.options.is_empty() {
        out.push_str(&format!("options {}\n", r.options.join(" ")));
    }
    Ok(out)
}

/// The pod's hostname: `spec.hostnameOverride`, else `spec.hostname`, else its name, cut to 63 characters as
/// upstream does (the node's name for hostNetwork pods).
pub fn hostname(pod: &Pod, node_name: &str) -> String {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return node_name.to_string();
    }
    let name = spec
        .and_then(|s| s.hostname_override.clone().or_else(|| s.hostname.clone().filter(|h| !h.is_empty())))
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    truncate_hostname(&name)
}

/// Upstream's cap: 63 characters (a hostname is at most 64 bytes with its NUL), not ending in `-` or `.`.
pub fn truncate_hostname(name: &str) -> String {
    const MAX: usize = 63;
    if name.len() <= MAX {
        return name.to_string();
    }
    let cut = name.char_indices().nth(MAX).map_or(name, |(i, _)| &name[..i]);
    cut.trim_end_matches(['-', '.']).to_string()
}

/// The kubelet-managed `/etc/hosts`; for hostNetwork pods the node's own file with the aliases appended.
pub fn hosts(pod: &Pod, pod_ips: &[String], domain: &str, node_hosts: &str, node_name: &str) -> String {
    let spec: PodSpec = pod.spec.clone().unwrap_or_default();
    let mut out = String::new();
    if spec.host_network.unwrap_or(false) {
        out.push_str(node_hosts);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
    } else {
        out.push_str(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        );
        out.push_str(
            "fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
        );
        let name = hostname(pod, node_name);
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        for ip in pod_ips {
            match &spec.subdomain {
                // With hostnameOverride the pod has no domain (upstream).
                Some(sub) if !sub.is_empty() && spec.hostname_override.is_none() => {
                    out.push_str(&format!("{ip}\t{name}.{sub}.{namespace}.svc.{domain}\t{name}\n"))
                }
                _ => out.push_str(&format!("{ip}\t{name}\n")),
            }
        }
    }
    let aliases = spec.host_aliases.unwrap_or_default();
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            out.push_str(&format!("{}\t{}\n", alias.ip, alias.hostnames.unwrap_or_default().join("\t")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["containers"] = serde_json::json!([{"name": "c"}]);
        serde_json::from_value(serde_json::json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": spec}))
            .unwrap()
    }

    fn node() -> NodeDns {
        NodeDns {
            cluster_dns: vec!["10.96.0.10".into()],
            cluster_domain: Some("cluster.local".into()),
            host_resolv_conf:
                "# host\nsearch corp.example\nnameserver 192.168.1.1\nnameserver 192.168.1.2\noptions edns0\n".into(),
        }
    }

    #[test]
    fn each_dns_policy() {
        let cluster = resolv_conf(&pod(serde_json::json!({})), &node()).unwrap();
        assert_eq!(
            cluster,
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        let default = resolv_conf(&pod(serde_json::json!({"dnsPolicy": "Default"})), &node()).unwrap();
        assert_eq!(default, "search corp.example\nnameserver 192.168.1.1\nnameserver 192.168.1.2\noptions edns0\n");
        // hostNetwork: ClusterFirst means the node's; ClusterFirstWithHostNet the cluster's.
        let host = resolv_conf(&pod(serde_json::json!({"hostNetwork": true})), &node()).unwrap();
        assert_eq!(host, default);
        let with = resolv_conf(
            &pod(serde_json::json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"})),
            &node(),
        );
        assert_eq!(with.unwrap(), cluster);
        let none = pod(serde_json::json!({"dnsPolicy": "None", "dnsConfig": {
            "nameservers": ["1.1.1.1"], "searches": ["a.example"], "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]
        }}));
        assert_eq!(
            resolv_conf(&none, &node()).unwrap(),
            "search a.example\nnameserver 1.1.1.1\noptions ndots:2 rotate\n"
        );
        let merged = pod(
            serde_json::json!({"dnsConfig": {"nameservers": ["10.96.0.10", "8.8.8.8"], "options": [{"name": "ndots", "value": "1"}]}}),
        );
        let merged = resolv_conf(&merged, &node()).unwrap();
        assert!(merged.contains("nameserver 10.96.0.10\nnameserver 8.8.8.8\noptions ndots:1\n"), "{merged}");
        assert!(resolv_conf(&pod(serde_json::json!({"dnsPolicy": "None"})), &node()).is_err());
        assert!(resolv_conf(&pod(serde_json::json!({"dnsPolicy": "Sometimes"})), &node()).is_err());
        let no_cluster_dns = NodeDns { cluster_dns: Vec::new(), ..node() };
        assert_eq!(resolv_conf(&pod(serde_json::json!({})), &no_cluster_dns).unwrap(), default);
    }

    #[test]
    fn hosts_file_with_aliases_and_subdomain() {
        let p = pod(serde_json::json!({"hostname": "h1", "subdomain": "sub", "hostAliases": [
            {"ip": "10.1.2.3", "hostnames": ["foo.local", "bar.local"]}
        ]}));
        let text = hosts(&p, &["10.88.0.7".into()], "cluster.local", "", "node1");
        assert!(text.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"), "{text}");
        assert!(text.contains("10.88.0.7\th1.sub.shop.svc.cluster.local\th1\n"), "{text}");
        assert!(text.ends_with("\n# Entries added by HostAliases.\n10.1.2.3\tfoo.local\tbar.local\n"), "{text}");
        let host =
            pod(serde_json::json!({"hostNetwork": true, "hostAliases": [{"ip": "10.9.9.9", "hostnames": ["x"]}]}));
        let text = hosts(&host, &[], "cluster.local", "127.0.0.1 localhost", "node1");
        assert_eq!(text, "127.0.0.1 localhost\n\n# Entries added by HostAliases.\n10.9.9.9\tx\n");
        assert_eq!(hostname(&host, "node1"), "node1");
        assert_eq!(hostname(&pod(serde_json::json!({})), "node1"), "web");
        let over = pod(serde_json::json!({"hostname": "h1", "hostnameOverride": "my.host", "subdomain": "sub"}));
        assert_eq!(hostname(&over, "node1"), "my.host");
        let hosts_file = hosts(&over, &["10.0.0.5".into()], "cluster.local", "", "node1");
        assert!(hosts_file.ends_with("10.0.0.5\tmy.host\n"), "{hosts_file}");
    }

    #[test]
    fn long_pod_names_make_63_character_hostnames() {
        let name = format!("{}-{}", "a".repeat(62), "b".repeat(7));
        assert_eq!(name.len(), 70);
        let mut p = pod(serde_json::json!({}));
        p.metadata.name = Some(name);
        // 63 characters would end in '-': upstream trims it.
        assert_eq!(hostname(&p, "node1"), "a".repeat(62));
        assert_eq!(truncate_hostname(&"x".repeat(63)), "x".repeat(63));
    }
}
