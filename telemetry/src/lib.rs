//! Logging and OpenTelemetry tracing shared by the router and the shards: one subscriber setup
//! ([`init`]: env filter, text or JSON lines, OTLP/gRPC span export) and the W3C trace-context
//! propagation that carries a trace from an HTTP request through the router into the shards.

mod init;
mod propagation;

pub use init::{init, Error, LogConfig, Otlp, Telemetry, Writer};
pub use propagation::{
    grpc_server_span, http_server_span, parent_from_headers, record_http_response, TraceInjector,
};
