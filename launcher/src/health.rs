//! Readiness probes: a shard is ready when it answers the gRPC `Health` RPC on its unix socket (not when the
//! socket file appears, TGI's wart); the router is ready when `GET /health` answers 200. Health is a real
//! forward that joins the ranks' collectives, so it goes to every rank at once, after each answers `Info`.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tessera_proto::v3::{HealthRequest, InfoRequest};
use tessera_proto::TextGenerationServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe may take: a loaded shard answers Info in microseconds.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the shard serves gRPC yet (its model is loaded): one `Info` call; `Err` says why not.
pub async fn shard_serving(socket: &Path) -> Result<(), String> {
    let call = async {
        let mut client = shard_client(socket.to_path_buf()).await?;
        client
            .info(InfoRequest {})
            .await
            .map_err(|e| format!("Info: {}", e.message()))
    };
    tokio::time::timeout(PROBE_TIMEOUT, call)
        .await
        .map_err(|_| "Info timed out".to_string())?
        .map(drop)
}

/// One `Health` call (a tiny forward on the shard) within `timeout`.
pub async fn shard_health(socket: PathBuf, timeout: Duration) -> Result<(), String> {
    let call = async {
        let mut client = shard_client(socket).await?;
        client
            .health(HealthRequest {})
            .await
            .map_err(|e| format!("Health: {}", e.message()))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("Health timed out after {} s", timeout.as_secs()))?
        .map(drop)
}

async fn shard_client(
    socket: PathBuf,
) -> Result<TextGenerationServiceClient<tonic::transport::Channel>, String> {
    tessera_proto::uds::client(socket)
        .await
        .map_err(|e| e.to_string())
}

/// The HTTP status of `GET /health` on the router, or why there was none.
pub async fn router_health(host: &str, port: u16) -> Result<u16, String> {
    tokio::time::timeout(PROBE_TIMEOUT, http_get_status(host, port, "/health"))
        .await
        .map_err(|_| "GET /health timed out".to_string())?
}

/// A minimal HTTP/1.1 GET that only reads the status line (keeps the launcher free of an HTTP client).
async fn http_get_status(host: &str, port: u16, path: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        let n = stream
            .read(&mut head[len..])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        len += n;
    }
    parse_status(&head[..len])
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status(head: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(head);
    let code = text.strip_prefix("HTTP/1.").and_then(|r| r.get(2..5));
    code.and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))
}

/// The address to probe for a listen address: wildcards are reached through loopback.
pub fn probe_host(hostname: &str) -> &str {
    match hostname {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line() {
        assert_eq!(parse_status(b"HTTP/1.1 503 Service Unavailable"), Ok(503));
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n"), Ok(200));
        assert!(parse_status(b"SSH-2.0").is_err());
    }

    #[tokio::test]
    async fn router_probe_reads_the_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        assert_eq!(router_health("127.0.0.1", port).await, Ok(200));
    }

    #[tokio::test]
    async fn shard_probe_fails_without_a_server() {
        let tmp = tempfile::tempdir().unwrap();
        let err = shard_serving(&tmp.path().join("sock")).await.unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
        let socket = tmp.path().join("sock");
        let err = shard_health(socket, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.starts_with("cannot connect"), "{err}");
    }
}
