//! The kubelet's streaming API: `exec`, `attach` and `portForward` over SPDY/3.1 and WebSocket, served on the
//! kubelet API (`server/`) and driving the runtime in-process (no CRI streaming server in between).
//!
//! Layers: the transports (`spdy` + `spdy_session`) turn a connection's streams into a transport-neutral
//! [`remotecommand::Session`] of channels; `exec` drives a process with one and returns its outcome, which the
//! transport reports as upstream does.

pub mod attach;
pub mod exec;
pub mod fdio;
#[cfg(test)]
mod fuzz;
pub mod portforward;
pub mod remotecommand;
pub mod spdy;
pub mod spdy_session;
pub mod websocket;
