//! nodelet's agent: the kubelet half of the node. The binary (`main.rs`) is a thin CLI over these modules.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod certificate;
pub mod cli;
pub mod config;
pub mod events;
pub mod eviction;
pub mod images;
pub mod logs;
pub mod metrics;
pub mod network;
pub mod node;
pub mod oom;
pub mod pods;
pub mod prober;
pub mod root_lock;
pub mod server;
pub mod sources;
pub mod stats;
pub mod status;
pub mod streaming;
pub mod units;
pub mod volumes;
