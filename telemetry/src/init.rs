//! The process's tracing subscriber: an env filter (`LOG_LEVEL`, else `RUST_LOG`, else `info`), log
//! lines as text or JSON, and — with an OTLP endpoint — an OpenTelemetry layer exporting spans over
//! OTLP/gRPC, flushed when the returned [`Telemetry`] is shut down or dropped.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Stdout,
    Stderr,
}

/// Where spans are exported, and under which `service.name`.
#[derive(Debug, Clone, Copy)]
pub struct Otlp<'a> {
    /// OTLP/gRPC endpoint, e.g. `http://localhost:4317`.
    pub endpoint: &'a str,
    pub service_name: &'a str,
}

/// Everything [`init`] needs.
#[derive(Debug, Clone, Copy)]
pub struct LogConfig<'a> {
    /// JSON lines (with the current span) instead of text.
    pub json: bool,
    pub writer: Writer,
    /// Export spans over OTLP when given.
    pub otlp: Option<Otlp<'a>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--otlp-endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot start the span exporter's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install the tracing subscriber: {0}")]
    Install(String),
}

/// Holds the span exporter; shutting it down (or dropping it) exports what is still buffered.
/// Drop it outside async code: the flush blocks until the collector answers or the export times out.
#[must_use = "dropping it stops span export"]
pub struct Telemetry {
    export: Option<Export>,
}

struct Export {
    provider: SdkTracerProvider,
    /// The exporter's gRPC channel runs here, apart from the process's own runtime, so the exporter
    /// exists before that runtime and flushes after it is gone.
    runtime: tokio::runtime::Runtime,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(mut self) {
        self.flush_and_stop();
    }

    fn flush_and_stop(&mut self) {
        if let Some(export) = self.export.take() {
            if let Err(e) = export.provider.shutdown() {
                eprintln!("span export did not finish: {e}");
            }
            export.runtime.shutdown_background();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.flush_and_stop();
    }
}

type Base = Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Base> + Send + Sync>;

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(config: LogConfig<'_>) -> Result<Telemetry, Error> {
    let (filter, bad_filter) = env_filter();
    let mut layers: Vec<BoxedLayer> = vec![fmt_layer(config.json, config.writer)];
    let export = match config.otlp {
        Some(otlp) => {
            let export = start_export(otlp)?;
            let tracer = export.provider.tracer("tessera");
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(not_transport())
                    .boxed(),
            );
            Some(export)
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()
        .map_err(|e| Error::Install(e.to_string()))?;
    if let Some(warning) = bad_filter {
        tracing::warn!("{warning}");
    }
    if let Some(otlp) = config.otlp {
        tracing::info!(
            "exporting spans to {} as {:?}",
            otlp.endpoint,
            otlp.service_name
        );
    }
    Ok(Telemetry { export })
}

/// `LOG_LEVEL` (TGI's variable), else `RUST_LOG`, else `info`; a filter that does not parse falls
/// back to `info` with the returned warning.
fn env_filter() -> (EnvFilter, Option<String>) {
    let set = ["LOG_LEVEL", "RUST_LOG"].into_iter().find_map(|var| {
        let value = std::env::var(var).ok()?;
        (!value.trim().is_empty()).then_some((var, value))
    });
    let Some((var, value)) = set else {
        return (EnvFilter::new("info"), None);
    };
    match EnvFilter::try_new(&value) {
        Ok(filter) => (filter, None),
        Err(e) => (
            EnvFilter::new("info"),
            Some(format!(
                "{var}={value:?} is not a log filter ({e}); logging at info"
            )),
        ),
    }
}

fn fmt_layer(json: bool, writer: Writer) -> BoxedLayer {
    let (make_writer, terminal) = match writer {
        Writer::Stdout => (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
        ),
        Writer::Stderr => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    let layer = tracing_subscriber::fmt::layer().with_writer(make_writer);
    if json {
        layer.json().with_current_span(true).boxed()
    } else {
        layer.with_ansi(terminal).boxed()
    }
}

/// The gRPC/HTTP stack's own spans stay out of the export: the exporter runs on that stack, so
/// exporting them would feed every export back into the next one.
fn not_transport() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "TLS is not built in; export to a collector over http:// (e.g. a local agent)",
            ))
        }
        _ => {
            return Err(bad(
                "expected http://host:port (OTLP/gRPC, usually port 4317)",
            ))
        }
    }
    if uri.host().is_none() {
        return Err(bad("no host"));
    }
    Ok(())
}

fn start_export(otlp: Otlp<'_>) -> Result<Export, Error> {
    check_endpoint(otlp.endpoint)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    // The channel is built lazily and spawns its connection tasks on the runtime entered here.
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(otlp.endpoint)
            .build()
            .map_err(|e| Error::Endpoint {
                endpoint: otlp.endpoint.to_string(),
                reason: e.to_string(),
            })?
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(otlp.service_name.to_string())
                .build(),
        )
        .build();
    Ok(Export { provider, runtime })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_http_and_a_host() {
        assert!(check_endpoint("http://localhost:4317").is_ok());
        assert!(check_endpoint("http://10.0.0.1:4317/").is_ok());
        for bad in [
            "localhost:4317",
            "https://collector:4317",
            "http://",
            "not a uri",
        ] {
            let e = check_endpoint(bad).expect_err(bad).to_string();
            assert!(e.contains("--otlp-endpoint"), "{e}");
        }
    }
}
