//! The shards' unix sockets, one home for both sides: socket naming (`{base}-{rank}`, TGI's layout),
//! the `unix://` URLs ServiceDiscovery answers, and a tonic channel dialled over a socket.

use crate::TextGenerationServiceClient;
use hyper_util::rt::TokioIo;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket of shard `rank`: `{base}-{rank}`, where TGI's launcher and router expect it.
pub fn shard_socket(base: impl AsRef<Path>, rank: usize) -> PathBuf {
    let mut path = OsString::from(base.as_ref().as_os_str());
    path.push(format!("-{rank}"));
    PathBuf::from(path)
}

/// The ServiceDiscovery URL of shard `rank`: `unix://{base}-{rank}`.
pub fn shard_url(base: impl AsRef<Path>, rank: usize) -> String {
    format!("unix://{}", shard_socket(base, rank).display())
}

/// The socket a ServiceDiscovery URL names (a bare path is taken as is).
pub fn url_socket(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("unix://").unwrap_or(url))
}

/// A socket that could not be dialled.
#[derive(Debug)]
pub struct ConnectError {
    pub path: PathBuf,
    source: tonic::transport::Error,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot connect to {}", self.path.display())?;
        // tonic's own message is only "transport error"; the cause (e.g. "No such file") is below it,
        // sometimes wrapped in a layer that repeats it.
        let mut cause: Option<&dyn std::error::Error> = Some(&self.source);
        let mut last = String::new();
        while let Some(e) = cause {
            let message = e.to_string();
            if message != last {
                write!(f, ": {message}")?;
            }
            last = message;
            cause = e.source();
        }
        Ok(())
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// An HTTP/2 channel to the gRPC server on the unix socket `path`.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, ConnectError> {
    let path = path.as_ref().to_path_buf();
    let socket = path.clone();
    // tonic requires a URI, but the connector ignores it and always dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ConnectError { path, source })
}

/// A `TextGenerationService` client on the socket `path`, without tonic's 4 MiB message limit (a
/// batch's generations with top-n tokens and prefill logprobs can exceed it).
pub async fn client(
    path: impl AsRef<Path>,
) -> Result<TextGenerationServiceClient<Channel>, ConnectError> {
    Ok(TextGenerationServiceClient::new(connect(path).await?)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    #[test]
    fn sockets_are_named_base_dash_rank() {
        assert_eq!(shard_socket("/tmp/s", 3), PathBuf::from("/tmp/s-3"));
        assert_eq!(shard_url("/tmp/s", 0), "unix:///tmp/s-0");
        assert_eq!(url_socket("unix:///tmp/s-0"), PathBuf::from("/tmp/s-0"));
        assert_eq!(url_socket("/tmp/s-1"), PathBuf::from("/tmp/s-1"));
    }

    #[test]
    fn a_non_utf8_base_is_kept_byte_for_byte() {
        use std::os::unix::ffi::OsStrExt;
        let base = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xffs"));
        let socket = shard_socket(base, 2);
        assert_eq!(socket.as_os_str().as_bytes(), b"/tmp/\xffs-2");
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent-0");
        let error = connect(&path).await.unwrap_err();
        let message = error.to_string();
        assert!(message.contains(&*path.to_string_lossy()), "{message}");
        assert_eq!(
            message.matches("No such file").count(),
            1,
            "the cause once: {message}"
        );
    }

    #[tokio::test]
    async fn the_channel_dials_the_socket_and_speaks_http2() {
        let dir = tempfile::tempdir().unwrap();
        let path = shard_socket(dir.path().join("shard"), 0);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut preface = [0u8; 24];
            stream.read_exact(&mut preface).await.unwrap();
            preface
        });
        let _channel = tokio::time::timeout(Duration::from_secs(10), connect(&path))
            .await
            .expect("connect timed out")
            .expect("connect");
        let preface = tokio::time::timeout(Duration::from_secs(10), accepted)
            .await
            .expect("no connection")
            .unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    }
}
