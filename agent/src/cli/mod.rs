//! Subcommands that talk to a running agent on this node.

pub mod exec;
