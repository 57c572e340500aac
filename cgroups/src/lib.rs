//! nodelet's cgroup layer: the kubelet's QoS hierarchy, resource limits, OOM events, PSI and stats, on pure
//! cgroup v2 hosts and on hybrid (v1 memory + unified) hosts.
//!
//! So far: QoS classes, cgroup names and the kubelet's resource conversions ([`qos`]), PSI parsing and triggers
//! ([`psi`]), OOM kill events and records ([`oom`]), and killing, freezing and removing cgroups ([`control`]).

pub mod control;
pub mod oom;
pub mod psi;
pub mod qos;
