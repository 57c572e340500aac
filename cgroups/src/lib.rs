//! nodelet's cgroup layer: the kubelet's QoS hierarchy, resource limits, OOM events, PSI and stats, on pure
//! cgroup v2 hosts and on hybrid (v1 memory + unified) hosts.
//!
//! QoS classes, cgroup names and the kubelet's resource conversions ([`qos`]); the kubepods tree with limits on
//! disk ([`hierarchy`]); PSI parsing and triggers ([`psi`]); OOM kill events and records ([`oom`]); usage for the
//! summary API ([`stats`]); killing, freezing and removing cgroups ([`control`]).
#![deny(missing_docs)]

pub mod control;
pub mod hierarchy;
pub mod oom;
pub mod psi;
pub mod qos;
pub mod stats;
