//! `nodelet`: a Kubernetes node in one binary.

use clap::Parser;

/// Command-line flags, named like the kubelet's where they exist.
#[derive(Debug, Parser)]
#[command(name = "nodelet", version, about = "A Kubernetes node in one binary")]
struct Flags {}

fn main() -> anyhow::Result<()> {
    let _flags = Flags::parse();
    anyhow::bail!("nodelet cannot run pods yet: the agent (pod workers, node status) is not built yet")
}
