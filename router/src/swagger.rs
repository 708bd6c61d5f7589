//! The Swagger UI page at `/docs` over `/api-doc/openapi.json`, with Swagger UI's files served from the
//! binary under `/docs/` (vendored by `utoipa-swagger-ui`, so neither the build nor the browser needs the
//! network).

use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::{Arc, LazyLock};
use utoipa_swagger_ui::Config;

/// `/docs` (and `/docs/`) answer the page; `/docs/{file}` answers Swagger UI's files.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/docs", get(page))
        .route("/docs/", get(page))
        .route("/docs/{*file}", get(asset))
}

async fn page() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}

/// The stock `index.html` and `swagger-initializer.js` are served too; the config points them at ours.
static CONFIG: LazyLock<Arc<Config<'static>>> =
    LazyLock::new(|| Arc::new(Config::from("/api-doc/openapi.json")));

async fn asset(Path(file): Path<String>) -> Response {
    match utoipa_swagger_ui::serve(&file, CONFIG.clone()) {
        Ok(Some(found)) => (
            [(header::CONTENT_TYPE, found.content_type)],
            found.bytes.into_owned(),
        )
            .into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no Swagger UI file {file}")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str) -> (StatusCode, String, Vec<u8>) {
        let response = routes::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let kind = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, kind, body.to_vec())
    }

    /// Every `src="…"` and `href="…"` of an HTML page.
    fn references(html: &str) -> Vec<String> {
        ["src=\"", "href=\""]
            .iter()
            .flat_map(|attr| html.split(attr).skip(1))
            .filter_map(|rest| rest.split('"').next())
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn the_page_and_every_file_it_loads_come_from_the_router() {
        for path in ["/docs", "/docs/"] {
            let (status, kind, body) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(kind.starts_with("text/html"), "{kind}");
            let html = String::from_utf8(body).unwrap();
            assert!(html.contains("/api-doc/openapi.json"));
            let refs = references(&html);
            assert!(refs.len() >= 3, "{refs:?}");
            for r in refs.iter().filter(|r| r.starts_with("/docs/")) {
                let (status, _, body) = get(r).await;
                assert_eq!(status, StatusCode::OK, "{r}");
                assert!(!body.is_empty(), "{r}");
            }
            assert!(
                refs.iter()
                    .all(|r| r.starts_with("/docs/") || r == "/api-doc/openapi.json"),
                "a reference leaves the router: {refs:?}"
            );
            assert!(!html.contains("http://") && !html.contains("https://"));
        }
        let (_, kind, body) = get("/docs/swagger-ui-bundle.js").await;
        assert!(kind.contains("javascript"), "{kind}");
        assert!(body.len() > 100_000, "the bundle is {} bytes", body.len());
        let (_, kind, _) = get("/docs/swagger-ui.css").await;
        assert!(kind.starts_with("text/css"), "{kind}");
    }

    #[tokio::test]
    async fn the_stock_initializer_points_at_our_document_and_unknown_files_are_404() {
        let (status, _, body) = get("/docs/swagger-initializer.js").await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8(body)
            .unwrap()
            .contains("/api-doc/openapi.json"));
        assert_eq!(get("/docs/nope.js").await.0, StatusCode::NOT_FOUND);
    }
}
