//! W3C trace context (`traceparent`, `tracestate`) across process boundaries: read from an HTTP
//! request's headers into the router's request span, written into each gRPC request's metadata by
//! the router, read back by the shard into its service span.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::time::Duration;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes its own well-formed ASCII keys and values.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The remote trace context in `headers` (HTTP headers, or gRPC metadata seen as HTTP/2 headers);
/// `None` when there is no valid `traceparent`.
pub fn parent_from_headers(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    let context = TraceContextPropagator::new()
        .extract_with_context(&opentelemetry::Context::new(), &HeaderExtractor(headers));
    context.span().span_context().is_valid().then_some(context)
}

/// Makes `span` continue the trace in `headers`, if they carry one; otherwise the span keeps its
/// own parent (or starts a trace).
fn continue_trace(span: &Span, headers: &http::HeaderMap) {
    if let Some(parent) = parent_from_headers(headers) {
        span.set_parent(parent);
    }
}

/// The router's span for one HTTP request (`tower_http::trace::TraceLayer::make_span_with`): named
/// `METHOD /path`, a child of the caller's span when the request carries a `traceparent`.
pub fn http_server_span<B>(request: &http::Request<B>) -> Span {
    let method = request.method().as_str();
    let path = request.uri().path();
    let span = tracing::info_span!(
        "http_request",
        otel.name = format!("{method} {path}"),
        otel.kind = "server",
        otel.status_code = Empty,
        http.response.status_code = Empty,
    );
    continue_trace(&span, request.headers());
    span
}

/// Records the status on the span of [`http_server_span`] (`TraceLayer::on_response`); a server
/// error marks the span failed.
pub fn record_http_response<B>(response: &http::Response<B>, _latency: Duration, span: &Span) {
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// The shard's span for one gRPC call (tonic's `Server::trace_fn`): named after the method
/// (`generate.v3.TextGenerationService/Prefill`), a child of the router's span that sent it.
pub fn grpc_server_span(request: &http::Request<()>) -> Span {
    let name = request.uri().path().trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or(("", name));
    let span = tracing::info_span!(
        "grpc_request",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    continue_trace(&span, request.headers());
    span
}

/// A tonic client interceptor writing the current span's trace context into each request's
/// metadata, so the shard's spans join the router's trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceInjector;

impl tonic::service::Interceptor for TraceInjector {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject(&Span::current().context(), request.metadata_mut());
        Ok(request)
    }
}

fn inject(context: &opentelemetry::Context, metadata: &mut MetadataMap) {
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(context, &mut MetadataInjector(metadata));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn traceparent_header_parses_into_a_remote_parent() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", TRACEPARENT.parse().unwrap());
        let parent = parent_from_headers(&headers).expect("a valid traceparent");
        let span = parent.span();
        let context = span.span_context();
        assert_eq!(
            context.trace_id(),
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()
        );
        assert_eq!(
            context.span_id(),
            SpanId::from_hex("b7ad6b7169203331").unwrap()
        );
        assert!(context.is_remote() && context.is_sampled());
    }

    #[test]
    fn absent_or_malformed_traceparent_is_no_parent() {
        assert!(parent_from_headers(&http::HeaderMap::new()).is_none());
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", "00-zz-yy-01".parse().unwrap());
        assert!(parent_from_headers(&headers).is_none());
    }

    #[test]
    fn injected_metadata_extracts_to_the_same_context() {
        let sent = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let mut metadata = MetadataMap::new();
        inject(
            &opentelemetry::Context::new().with_remote_span_context(sent.clone()),
            &mut metadata,
        );
        assert_eq!(
            metadata.get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let received = parent_from_headers(&metadata.into_headers()).unwrap();
        let span = received.span();
        assert_eq!(span.span_context().trace_id(), sent.trace_id());
        assert_eq!(span.span_context().span_id(), sent.span_id());
    }

    #[test]
    fn nothing_is_injected_outside_a_trace() {
        let mut metadata = MetadataMap::new();
        inject(&opentelemetry::Context::new(), &mut metadata);
        assert!(metadata.is_empty());
    }
}
