//! Shared helpers of the launcher tests (included with `mod launcher_support;`): a launcher process with
//! isolated caches, sockets and port; a std-only HTTP client; /proc inspection of the process tree.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_tests::binary;
pub use tessera_tests::free_port;

/// A running `tessera-launcher` with everything it writes kept in a temporary folder.
pub struct Launcher {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    output: Arc<Mutex<String>>,
}

impl Launcher {
    /// Starts the launcher on a free port with `args`, offline, with private caches and sockets.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Launcher {
        let dir = tempfile::tempdir().unwrap();
        // A test that names its own port (a taken one) keeps it; clap refuses a repeated flag.
        let port = match args.iter().position(|a| *a == "--port") {
            Some(i) => args[i + 1].parse().unwrap(),
            None => free_port(),
        };
        let mut command = Command::new(binary("tessera-launcher"));
        command.args(["--hostname", "127.0.0.1"]);
        if !args.contains(&"--port") {
            command.args(["--port", &port.to_string()]);
        }
        // Tests run concurrently: each group of shards rendezvous on its own port.
        command.args(["--master-port", &free_port().to_string()]);
        command
            .arg("--shard-uds-path")
            .arg(dir.path().join("shard"))
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("HUGGINGFACE_HUB_CACHE", dir.path().join("hub"))
            .env("TESSERA_CACHE_DIR", dir.path().join("tessera"))
            .env_remove("LOG_LEVEL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("tessera-launcher starts");
        let output = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("launcher> {line}");
                let mut out = sink.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        });
        Launcher {
            child,
            port,
            dir,
            output,
        }
    }

    /// Everything the launcher logged so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for `/health` 200 through the launcher's router; panics with the log when the launcher exits.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "launcher exited ({status}) before ready:\n{}",
                    self.output()
                );
            }
            if matches!(http(self.port, "GET", "/health", ""), Ok((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("not ready after {timeout:?}:\n{}", self.output());
    }

    /// Waits for the launcher to exit, or panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "launcher still running after {timeout:?}:\n{}",
            self.output()
        );
    }

    pub fn signal(&self, signal: i32) {
        send_signal(self.child.id() as i32, signal);
    }

    /// The launcher's child processes (shards and router), as (pid, command line).
    pub fn children(&self) -> Vec<(i32, String)> {
        children_of(self.child.id() as i32)
    }

    /// The launcher's shard processes, as (pid, command line).
    pub fn shards(&self) -> Vec<(i32, String)> {
        let children = self.children().into_iter();
        children.filter(|(_, cmd)| is_shard(cmd)).collect()
    }
}

/// Whether a command line is a shard's: the launcher runs itself as `tessera-launcher shard serve …`.
pub fn is_shard(cmdline: &str) -> bool {
    let mut words = cmdline.split(' ');
    let program = words.next().unwrap_or_default();
    program.ends_with("tessera-launcher") && words.next() == Some("shard")
}

impl Drop for Launcher {
    /// A failed test must not leave a model server behind: kill the launcher's whole tree.
    fn drop(&mut self) {
        for (pid, _) in self.children() {
            send_signal(pid, 9);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn send_signal(pid: i32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Live (non-zombie) processes whose parent is `parent`, with their command lines.
pub fn children_of(parent: i32) -> Vec<(i32, String)> {
    let entries = std::fs::read_dir("/proc").unwrap().filter_map(Result::ok);
    entries
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_state(*pid).is_some_and(|(state, ppid)| state != "Z" && ppid == parent))
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (pid, String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

/// Whether `pid` is a live process (zombies awaiting their reaper are dead).
pub fn alive(pid: i32) -> bool {
    proc_state(pid).is_some_and(|(state, _)| state != "Z")
}

/// (state, ppid) from /proc/PID/stat.
fn proc_state(pid: i32) -> Option<(String, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    Some((fields.first()?.to_string(), fields.get(1)?.parse().ok()?))
}

/// Waits until none of `pids` is alive, or panics naming the survivors.
pub fn assert_all_gone(pids: &[i32], timeout: Duration) {
    let start = Instant::now();
    while pids.iter().any(|p| alive(*p)) && start.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// A minimal HTTP/1.1 request on 127.0.0.1 → (status, body). Bodies are JSON, answered with a length.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// A model fetched by tests/fetch-models.sh, as a string argument.
pub fn model_arg(relative: &str) -> String {
    tessera_tests::fetched_model(relative).display().to_string()
}

/// A launcher serving SmolLM2 Q4_1 on `num_shard` CPU ranks (prefill budget 256) with `extra` flags,
/// ready to answer.
pub fn ready_smollm2(num_shard: &str, extra: &[&str]) -> Launcher {
    let model = model_arg("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut args = vec![
        "--model-id",
        &model,
        "--num-shard",
        num_shard,
        "--device",
        "cpu",
        "--max-batch-prefill-tokens",
        "256",
    ];
    args.extend_from_slice(extra);
    let mut launcher = Launcher::start(&args, &[]);
    launcher.wait_ready(Duration::from_secs(240));
    launcher
}

/// The reference outputs of SmolLM2-135M-Instruct (tests/fixtures/smollm2/SOURCE.md).
pub fn reference() -> serde_json::Value {
    let path: PathBuf =
        tessera_tests::workspace_root().join("tests/fixtures/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Writes an executable shell script standing in for a child binary.
pub fn fake_binary(dir: &Path, name: &str, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
