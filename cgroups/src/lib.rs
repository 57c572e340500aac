//! nodelet's cgroup layer: the kubelet's QoS hierarchy, resource limits, OOM events, PSI and stats, on pure
//! cgroup v2 hosts and on hybrid (v1 memory + unified) hosts.
