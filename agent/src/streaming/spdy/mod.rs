//! SPDY/3.1, the protocol the API server speaks to a kubelet for exec, attach and port-forward (no maintained
//! Rust crate implements it): frames (`frame.rs`), compressed header blocks (`headers.rs`) and the server side of
//! a connection (`conn.rs`). Only what Kubernetes' `spdystream` peer uses is served: client-opened streams, data,
//! half-close, reset, ping and goaway; server push and priorities are not.

pub mod conn;
pub mod dictionary;
pub mod frame;
pub mod headers;

pub use conn::{Config, Connection, Stream, StreamReader, StreamWriter};
pub use headers::Headers;
