//! Shared harness of the router end-to-end tests: a REAL `tessera-shard serve` on SmolLM2 and the
//! `tessera-router` binary on a free port, started once per test binary and killed when it exits.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tessera_tests::{binary, fetched_model, free_port, spawn_logged as spawn};

pub const MODEL: &str = "smollm2-hf-float32";

pub struct Server {
    pub base: String,
    pub logs: PathBuf,
}

/// Start a shard and a router with `router_args` added; blocks until `/health` answers 200.
/// The processes are spawned by a thread that lives as long as the test binary, with
/// PR_SET_PDEATHSIG, so they die with it even though a static `Server` is never dropped.
pub fn start(name: &str, router_args: &[&str]) -> Server {
    start_with(name, &["--kv-cache-memory", "300000000"], router_args)
}

/// [`start`] with the shard's flags given too.
pub fn start_with(name: &str, shard_args: &[&str], router_args: &[&str]) -> Server {
    let router_args: Vec<String> = router_args.iter().map(|s| s.to_string()).collect();
    let shard_args: Vec<String> = shard_args.iter().map(|s| s.to_string()).collect();
    let logs = std::env::temp_dir().join(format!("tessera-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let port = free_port();
    let uds = logs.join("shard");
    let (tx, rx) = mpsc::channel();
    let thread_logs = logs.clone();
    std::thread::spawn(move || {
        let model = fetched_model(MODEL);
        let mut shard = spawn(
            Command::new(binary("tessera-shard"))
                .args(["serve", "--model-id"])
                .arg(&model)
                .arg("--uds-path")
                .arg(&uds)
                .args(&shard_args),
            &thread_logs.join("shard.log"),
        );
        let mut router = spawn(
            Command::new(binary("tessera-router"))
                .arg("--master-shard-uds-path")
                .arg(tessera_proto::uds::shard_socket(&uds, 0))
                .arg("--tokenizer-name")
                .arg(&model)
                .args(["--hostname", "127.0.0.1", "--port", &port.to_string()])
                .args(["--max-batch-prefill-tokens", "512", "--model-id", "smollm2"])
                .args(&router_args),
            &thread_logs.join("router.log"),
        );
        let ready = wait_healthy(port, &mut router, &mut shard);
        tx.send(ready).unwrap();
        // Keep the spawning thread (the children's "parent" for PDEATHSIG) alive.
        loop {
            std::thread::park();
        }
    });
    let ready = rx.recv().unwrap();
    if let Err(e) = ready {
        let shard = std::fs::read_to_string(logs.join("shard.log")).unwrap_or_default();
        let router = std::fs::read_to_string(logs.join("router.log")).unwrap_or_default();
        panic!("server did not start: {e}\n--- shard ---\n{shard}\n--- router ---\n{router}");
    }
    Server {
        base: format!("http://127.0.0.1:{port}"),
        logs,
    }
}

/// Raw HTTP status of `GET path` (no client library needed before tokio starts).
pub fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn wait_healthy(port: u16, router: &mut Child, shard: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = router.try_wait() {
            return Err(format!("router exited: {status}"));
        }
        if let Ok(Some(status)) = shard.try_wait() {
            return Err(format!("shard exited: {status}"));
        }
        if get_status(port, "/health") == Some(200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err("timed out waiting for /health".into())
}

/// The reference outputs of SmolLM2 (transformers, float32, greedy; tests/fixtures/smollm2/SOURCE.md).
pub fn reference() -> serde_json::Value {
    let path = tessera_tests::workspace_root().join("tests/fixtures/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn reference_case(name: &str) -> serde_json::Value {
    reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

/// A metric's value in the Prometheus text (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
