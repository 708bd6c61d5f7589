//! One supervised child process: spawned in its own process group with PR_SET_PDEATHSIG (so it dies with a
//! SIGKILLed launcher), its output re-emitted line by line with its name, the last lines kept for errors.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

/// Lines of a child's output kept to explain its death.
const TAIL_LINES: usize = 30;

/// What to run: the launcher builds one per shard rank and one for the router.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// `shard 0`, `router`: the prefix of every log line and the name in every error.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// A running child and the tail of its output.
pub struct Child {
    pub name: String,
    child: tokio::process::Child,
    /// The child's pid, which is also its process group id.
    pgid: i32,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// The stdout/stderr relays; they end at EOF, once the child (and anything holding its pipes) is gone.
    relays: Vec<tokio::task::JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

impl Child {
    /// Spawns `spec`; must run on the thread that stays alive for the launcher's life (PDEATHSIG is per thread).
    pub fn spawn(spec: &ChildSpec) -> std::io::Result<Child> {
        let mut command = Command::new(&spec.program);
        command.args(&spec.args).envs(spec.env.iter().cloned());
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Own process group: a terminal's Ctrl-C reaches only the launcher, which then stops children in order;
        // and killpg reaches anything a child spawned.
        command.process_group(0);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only calls async-signal-safe functions.
        unsafe {
            command.pre_exec(move || {
                #[cfg(target_os = "linux")]
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher died before prctl took effect: nobody would ever stop this child.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        let pgid = child.id().map(|p| p as i32).unwrap_or_default();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let mut relays = Vec::new();
        if let Some(out) = child.stdout.take() {
            relays.push(tokio::spawn(relay(out, spec.name.clone(), tail.clone())));
        }
        if let Some(err) = child.stderr.take() {
            relays.push(tokio::spawn(relay(err, spec.name.clone(), tail.clone())));
        }
        Ok(Child {
            name: spec.name.clone(),
            child,
            pgid,
            tail,
            relays,
            exit: None,
        })
    }

    /// The exit status once the child has exited (non-blocking; reaps it).
    /// Whether the process is stopped (SIGSTOP, a debugger): `T` or `t` in `/proc/PID/stat`.
    pub fn is_stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pgid)).unwrap_or_default();
        // The state follows the parenthesised command name, which may itself hold spaces or parens.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        matches!(state, Some("T" | "t"))
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Sends `signal` to the child's whole process group (no-op once nothing is left in it).
    pub fn signal(&self, signal: libc::c_int) {
        if self.pgid > 0 {
            // SAFETY: plain syscall; ESRCH (group gone) is the expected outcome late in shutdown.
            unsafe { libc::killpg(self.pgid, signal) };
        }
    }

    /// SIGKILL to the group and reap the child.
    pub async fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        if self.exit.is_none() {
            self.exit = self.child.wait().await.ok();
        }
    }

    /// The kept output lines once the relays have read what the (exited) child wrote last; bounded, since
    /// a grandchild may still hold the pipes open.
    pub async fn final_tail(&mut self) -> String {
        for relay in &mut self.relays {
            let _ = tokio::time::timeout(Duration::from_secs(1), relay).await;
        }
        self.tail()
    }

    /// The kept output lines, indented, for an error message.
    pub fn tail(&self) -> String {
        let lines = self
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        if lines.is_empty() {
            return format!("  ({} printed nothing)", self.name);
        }
        lines
            .iter()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// SIGTERM to every child, SIGKILL to those still running after `grace`; returns once all are reaped.
/// Stragglers in their groups get SIGKILL too, so nothing outlives the launcher.
pub async fn stop_all(children: &mut [Child], grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    for child in children.iter_mut() {
        if child.exited().is_none() {
            child.signal(libc::SIGTERM);
        }
    }
    while children.iter_mut().any(|c| c.exited().is_none())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for child in children {
        child.kill().await;
    }
}

/// `exited with status 1`, `was killed by signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal} ({})", signal_name(signal)),
        _ => "exited".to_string(),
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    }
}

/// Re-emits each line through the launcher's logger, prefixed with the child's name, and keeps the tail.
async fn relay(stream: impl AsyncRead + Unpin, name: String, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let (level, text) = parse_line(&line);
        match level {
            tracing::Level::ERROR => tracing::error!("[{name}] {text}"),
            tracing::Level::WARN => tracing::warn!("[{name}] {text}"),
            tracing::Level::DEBUG => tracing::debug!("[{name}] {text}"),
            tracing::Level::TRACE => tracing::trace!("[{name}] {text}"),
            _ => tracing::info!("[{name}] {text}"),
        }
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    }
}

/// A child's log line → its level and text without the child's own timestamp (the launcher adds its
/// own). Understands tracing-subscriber's JSON and plain formats; anything else is INFO, as written.
fn parse_line(line: &str) -> (tracing::Level, String) {
    let Ok(serde_json::Value::Object(json)) = serde_json::from_str::<serde_json::Value>(line)
    else {
        return parse_plain(&strip_ansi(line));
    };
    let level = json
        .get("level")
        .and_then(|l| l.as_str())
        .and_then(|l| l.parse().ok());
    let mut fields = json
        .get("fields")
        .and_then(|f| f.as_object())
        .cloned()
        .unwrap_or_default();
    let message = fields
        .remove("message")
        .map(|m| m.as_str().map(str::to_string).unwrap_or(m.to_string()));
    let mut text = message.unwrap_or_else(|| line.to_string());
    if let Some(target) = json.get("target").and_then(|t| t.as_str()) {
        text = format!("{target}: {text}");
    }
    for (key, value) in fields {
        text.push_str(&format!(" {key}={value}"));
    }
    (level.unwrap_or(tracing::Level::INFO), text)
}

/// `2026-01-01T00:00:00.000Z  WARN target: message` → (WARN, `target: message`).
fn parse_plain(line: &str) -> (tracing::Level, String) {
    let mut words = line.split_whitespace();
    let stamped = words
        .next()
        .is_some_and(|w| w.ends_with('Z') && w.contains('T'));
    let level = words.next().and_then(|l| l.parse::<tracing::Level>().ok());
    match (stamped, level) {
        (true, Some(level)) => {
            let rest = line
                .trim_start()
                .split_once(char::is_whitespace)
                .map(|(_, r)| r);
            let rest = rest.unwrap_or_default().trim_start();
            let text = rest
                .split_once(char::is_whitespace)
                .map(|(_, r)| r.trim_start());
            (level, text.unwrap_or_default().to_string())
        }
        _ => (tracing::Level::INFO, line.to_string()),
    }
}

/// Removes terminal colour sequences (`ESC [ ... letter`) a child wrote for a terminal it does not have.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip `[`, parameters, and the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_their_level_and_fields() {
        let line = r#"{"timestamp":"t","level":"WARN","fields":{"message":"slow","ms":12},"target":"shard::x"}"#;
        let (level, text) = parse_line(line);
        assert_eq!(level, tracing::Level::WARN);
        assert_eq!(text, "shard::x: slow ms=12");
        let plain = "\u{1b}[2m2026-11-22T06:17:58.319307Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m t: engine ready";
        assert_eq!(
            parse_line(plain),
            (tracing::Level::WARN, "t: engine ready".to_string())
        );
        assert_eq!(
            parse_line("plain text"),
            (tracing::Level::INFO, "plain text".to_string())
        );
    }

    fn spec(script: &str) -> ChildSpec {
        ChildSpec {
            name: "test child".into(),
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hello".into())],
        }
    }

    #[tokio::test]
    async fn exit_status_and_tail_are_reported() {
        let mut child = Child::spawn(&spec("echo $GREETING; echo oops >&2; exit 3")).unwrap();
        let status = child.child.wait().await.unwrap();
        assert_eq!(describe(status), "exited with status 3");
        let tail = child.final_tail().await;
        assert!(tail.contains("hello") && tail.contains("oops"), "{tail}");
    }

    #[tokio::test]
    async fn stop_kills_a_child_that_ignores_sigterm() {
        let mut child = Child::spawn(&spec("trap '' TERM; sleep 30 & wait")).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = std::time::Instant::now();
        stop_all(std::slice::from_mut(&mut child), Duration::from_millis(300)).await;
        assert!(start.elapsed() < Duration::from_secs(5));
        let status = child.exited().expect("reaped");
        assert!(describe(status).contains("SIGKILL"), "{}", describe(status));
        // The grandchild (`sleep`) was in the same group and is gone as well (a zombie awaiting init is dead).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(live_in_group(child.pgid), Vec::<i32>::new());
    }

    /// Pids of non-zombie processes in process group `pgid` (from /proc/PID/stat: state is field 3, pgrp 5).
    fn live_in_group(pgid: i32) -> Vec<i32> {
        let stats = std::fs::read_dir("/proc").unwrap().filter_map(Result::ok);
        stats
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter_map(|stat| {
                let (pid, rest) = stat.split_once(" (")?;
                let fields: Vec<&str> = rest.rsplit_once(") ")?.1.split(' ').collect();
                let live = fields[0] != "Z" && fields[2] == pgid.to_string();
                live.then(|| pid.parse().ok()).flatten()
            })
            .collect()
    }
}
