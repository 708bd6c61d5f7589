//! The Hugging Face Hub side of model resolution: finding a complete snapshot in the local hub cache and
//! downloading one with `hf-hub` (blocking client, progress bars, resumable, `HF_TOKEN`), after a fast
//! reachability probe so an offline machine gets a clear error in seconds rather than a long hang.

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::io::IsTerminal;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the reachability probe may take before the Hub counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Files fetched besides the weights when present in the repository (tokenizer, chat template, configs).
const SIDE_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// Where and how to reach the Hub, read from the environment once.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub cache folder (`.../hub`, holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    /// `HF_TOKEN` (or the older names), else the cache's token file.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: never touch the network.
    pub offline: bool,
}

impl HubConfig {
    /// Reads the usual Hugging Face variables; `cache_override` is `--huggingface-hub-cache`.
    pub fn from_env(cache_override: Option<PathBuf>) -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cache_dir = cache_override
            .or_else(|| var("HF_HUB_CACHE").map(PathBuf::from))
            .unwrap_or_else(|| Cache::from_env().path().clone());
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| var("HF_API_TOKEN"))
            .or_else(|| Cache::new(cache_dir.clone()).token());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".to_string());
        Self {
            cache_dir,
            endpoint,
            token,
            offline,
        }
    }

    fn repo(&self, repo_id: &str, revision: Option<&str>) -> Repo {
        let revision = revision.unwrap_or("main").to_string();
        Repo::with_revision(repo_id.to_string(), RepoType::Model, revision)
    }
}

/// A snapshot folder of `repo_id` already in the cache with config, tokenizer and every weight file.
pub fn cached_snapshot(hub: &HubConfig, repo_id: &str, revision: Option<&str>) -> Option<PathBuf> {
    let cache = Cache::new(hub.cache_dir.clone()).repo(hub.repo(repo_id, revision));
    let config = cache.get("config.json")?;
    let dir = config.parent()?.to_path_buf();
    let weights = weight_files_on_disk(&dir)?;
    let complete =
        dir.join("tokenizer.json").exists() && weights.iter().all(|w| dir.join(w).exists());
    complete.then_some(dir)
}

/// The weight files a snapshot folder needs: the index's shards, or the single safetensors file.
fn weight_files_on_disk(dir: &Path) -> Option<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        return shards_of_index(&text).ok();
    }
    dir.join("model.safetensors")
        .exists()
        .then(|| vec!["model.safetensors".to_string()])
}

/// The distinct file names in a safetensors index's `weight_map`.
fn shards_of_index(text: &str) -> Result<Vec<String>, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("bad index json: {e}"))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("index has no weight_map")?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Fails fast, with the reason, when the Hub cannot be used right now.
pub fn check_reachable(hub: &HubConfig) -> Result<(), String> {
    if hub.offline {
        return Err("HF_HUB_OFFLINE is set".to_string());
    }
    let (host, port) = host_and_port(&hub.endpoint)?;
    let addrs = resolve(&host, port)?;
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("cannot connect to {host} ({addr}): {e}"),
        }
    }
    Err(last)
}

/// DNS lookup bounded by the probe timeout: a resolver that never answers must not stall the launcher.
fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let target = (host.to_string(), port);
    // The lookup thread is detached: on timeout it finishes (or not) on its own.
    std::thread::spawn(move || {
        let _ = tx.send(target.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    });
    match rx.recv_timeout(PROBE_TIMEOUT) {
        Ok(Ok(addrs)) => Ok(addrs),
        Ok(Err(e)) => Err(format!("cannot resolve {host}: {e}")),
        Err(_) => Err(format!(
            "cannot resolve {host}: no answer in {PROBE_TIMEOUT:?}"
        )),
    }
}

/// `https://host[:port][/...]` → (host, port).
fn host_and_port(endpoint: &str) -> Result<(String, u16), String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or(format!("HF_ENDPOINT `{endpoint}` has no scheme"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let default_port = if scheme == "http" { 80 } else { 443 };
    match authority.rsplit_once(':') {
        Some((host, port)) => {
            let port = port
                .parse()
                .map_err(|_| format!("HF_ENDPOINT `{endpoint}` has a bad port"))?;
            Ok((host.to_string(), port))
        }
        None => Ok((authority.to_string(), default_port)),
    }
}

/// Downloads (or completes) a snapshot of `repo_id` into the hub cache and returns its folder.
pub fn download(hub: &HubConfig, repo_id: &str, revision: Option<&str>) -> Result<PathBuf, String> {
    // Progress bars on a terminal; elsewhere (logs, containers) one line per downloaded file.
    download_with(hub, repo_id, revision, std::io::stderr().is_terminal())
}

fn download_with(
    hub: &HubConfig,
    repo_id: &str,
    revision: Option<&str>,
    terminal: bool,
) -> Result<PathBuf, String> {
    check_reachable(hub)?;
    let cache = Cache::new(hub.cache_dir.clone()).repo(hub.repo(repo_id, revision));
    let api = ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_progress(terminal)
        .with_retries(3)
        .build()
        .map_err(|e| format!("hub client: {e}"))?;
    let repo = api.repo(hub.repo(repo_id, revision));
    let info = repo
        .info()
        .map_err(|e| format!("cannot read {repo_id} on the Hub: {e}"))?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let fetch = |name: &str| -> Result<PathBuf, String> {
        let cached = cache.get(name).is_some();
        let started = Instant::now();
        let path = repo
            .get(name)
            .map_err(|e| format!("downloading {repo_id}/{name}: {e}"))?;
        if !terminal && !cached {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            tracing::info!(
                "downloaded {repo_id}/{name} ({}) in {:.1} s",
                human_bytes(size),
                started.elapsed().as_secs_f64()
            );
        }
        Ok(path)
    };
    let mut config = None;
    for name in SIDE_FILES.iter().filter(|n| names.iter().any(|m| m == *n)) {
        let path = fetch(name)?;
        if *name == "config.json" {
            config = Some(path);
        }
    }
    let config = config.ok_or(format!("{repo_id} has no config.json"))?;
    for name in weight_files(repo_id, &names, &fetch)? {
        fetch(&name)?;
    }
    Ok(config
        .parent()
        .ok_or("snapshot has no folder")?
        .to_path_buf())
}

/// `1.5 GB`, `870.2 kB`, `12 B` (decimal units, as the Hub shows sizes).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The weight files to fetch: every shard named by the index, else the top-level `.safetensors` files.
fn weight_files(
    repo_id: &str,
    names: &[String],
    fetch: &dyn Fn(&str) -> Result<PathBuf, String>,
) -> Result<Vec<String>, String> {
    const INDEX: &str = "model.safetensors.index.json";
    if names.iter().any(|n| n == INDEX) {
        let text = std::fs::read_to_string(fetch(INDEX)?).map_err(|e| e.to_string())?;
        return shards_of_index(&text);
    }
    let files: Vec<String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors") && !n.contains('/'))
        .cloned()
        .collect();
    if files.is_empty() {
        return Err(format!(
            "{repo_id} has no safetensors weights (tessera loads safetensors, or a local .gguf file given by path)"
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_hub() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(870_200), "870.2 kB");
        assert_eq!(human_bytes(269_060_384), "269.1 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.5 GB");
    }

    #[test]
    fn endpoint_host_and_port() {
        assert_eq!(
            host_and_port("https://huggingface.co").unwrap(),
            ("huggingface.co".into(), 443)
        );
        assert_eq!(
            host_and_port("http://127.0.0.1:8080/x").unwrap(),
            ("127.0.0.1".into(), 8080)
        );
        assert!(host_and_port("huggingface.co").is_err());
    }

    #[test]
    fn index_shards_are_distinct_and_sorted() {
        let text = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
        assert_eq!(
            shards_of_index(text).unwrap(),
            vec!["m-1.safetensors", "m-2.safetensors"]
        );
        assert!(shards_of_index("{}").is_err());
    }

    #[test]
    fn offline_fails_without_network() {
        let hub = HubConfig {
            cache_dir: PathBuf::from("/nonexistent"),
            endpoint: "https://huggingface.co".into(),
            token: None,
            offline: true,
        };
        assert!(check_reachable(&hub)
            .unwrap_err()
            .contains("HF_HUB_OFFLINE"));
    }

    #[test]
    fn unreachable_endpoint_fails_fast() {
        // A closed local port: refused at once, no DNS and no external traffic.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let hub = HubConfig {
            cache_dir: PathBuf::from("/nonexistent"),
            endpoint: format!("http://127.0.0.1:{port}"),
            token: None,
            offline: false,
        };
        let start = Instant::now();
        assert!(download(&hub, "org/model", None)
            .unwrap_err()
            .contains("cannot connect"));
        assert!(start.elapsed() < Duration::from_secs(6));
    }

    /// A Hub serving `org/m` (commit `c0ffee`) the way hf-hub reads it: repo info, then per file a
    /// one-byte range for its metadata and a range from the resume offset for its content.
    fn fake_hub(files: &'static [(&'static str, usize)]) -> String {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = Vec::new();
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    head.push(std::mem::take(&mut line).to_ascii_lowercase());
                }
                // The reachability probe connects and sends nothing.
                let Some(request) = head.first() else {
                    continue;
                };
                let path = request.split(' ').nth(1).unwrap_or_default().to_string();
                let range = head.iter().find_map(|h| h.strip_prefix("range: bytes="));
                let start: usize = range
                    .and_then(|r| r.split('-').next()?.parse().ok())
                    .unwrap_or(0);
                let one_byte = range.is_some_and(|r| r.trim() == "0-0");
                let file = files
                    .iter()
                    .find(|(name, _)| path == format!("/org/m/resolve/main/{name}"));
                let (status, headers, body) = match file {
                    _ if path == "/api/models/org/m/revision/main" => {
                        let siblings: Vec<_> = files
                            .iter()
                            .map(|(name, _)| serde_json::json!({"rfilename": name}))
                            .collect();
                        let info = serde_json::json!({"sha": "c0ffee", "siblings": siblings});
                        ("200 OK", String::new(), info.to_string().into_bytes())
                    }
                    Some((name, len)) => {
                        let end = if one_byte { 1 } else { *len };
                        let headers = format!(
                            "etag: \"e-{name}\"\r\nx-repo-commit: c0ffee\r\n\
                             content-range: bytes {start}-{}/{len}\r\n",
                            end - 1
                        );
                        ("206 Partial Content", headers, vec![b'x'; end - start])
                    }
                    None => ("404 Not Found", String::new(), Vec::new()),
                };
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            }
        });
        endpoint
    }

    #[test]
    fn downloads_log_one_line_per_file_off_a_terminal() {
        const FILES: &[(&str, usize)] = &[
            ("config.json", 20),
            ("tokenizer.json", 900),
            ("model.safetensors", 3000),
        ];
        let tmp = tempfile::tempdir().unwrap();
        let hub = HubConfig {
            cache_dir: tmp.path().into(),
            endpoint: fake_hub(FILES),
            token: None,
            offline: false,
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        let download = || download_with(&hub, "org/m", None, false);
        let dir = tracing::subscriber::with_default(subscriber, || {
            download().unwrap();
            // Everything is cached now: no file is fetched, so no line.
            download().unwrap()
        });
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap().len(),
            3000
        );
        assert_eq!(cached_snapshot(&hub, "org/m", None), Some(dir));
        let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        for line in [
            "downloaded org/m/config.json (20 B) in ",
            "downloaded org/m/tokenizer.json (900 B) in ",
            "downloaded org/m/model.safetensors (3.0 kB) in ",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

    /// A `Write` into the shared log buffer of a test subscriber.
    struct LogSink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn cached_snapshot_needs_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = HubConfig {
            cache_dir: tmp.path().into(),
            endpoint: String::new(),
            token: None,
            offline: true,
        };
        let repo = tmp.path().join("models--org--m");
        let snap = repo.join("snapshots/abc");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("tokenizer.json"), "{}").unwrap();
        assert_eq!(cached_snapshot(&hub, "org/m", None), None, "no weights yet");
        std::fs::write(snap.join("model.safetensors"), "").unwrap();
        assert_eq!(cached_snapshot(&hub, "org/m", None), Some(snap));
    }
}
