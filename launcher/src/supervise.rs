//! The lifecycle: start every shard, wait until each answers Health, start the router, wait for /health 200,
//! then supervise. A shard dying restarts the whole shard group (its ranks share collectives) with a
//! backoff, while the router holds its requests and resumes them once the shards are back (restarted
//! ranks are awaited by `Info` alone: the router's Warmup, in its lockstep, is their first forward); past
//! `shard_restart_limit` restarts in `RESTART_WINDOW`, and for the router or any child during startup,
//! a child exiting stops the rest (non-zero exit naming it); SIGINT/SIGTERM drains the
//! router within the graceful timeout, then stops the shards (exit 0). Polling every 100 ms keeps every
//! failure visible within a fraction of a second and no wait unbounded.
//!
//! A child that stops answering without exiting (SIGSTOP, a hung device) is caught through the router:
//! its RPC deadline fails the shard calls and turns `/health` 503. A 503 that lasts `UNHEALTHY_EXIT` stops
//! everything, naming the shard that does not answer `Info` (or the router when every shard does).

use crate::children::redact;
use crate::health;
use crate::process::{describe, stop_all, Child, ChildSpec};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How often the steady state looks at its children.
const TICK: Duration = Duration::from_millis(100);
/// How often startup probes the shards and the router: readiness is seen within this.
const STARTUP_TICK: Duration = Duration::from_millis(20);
/// How long shards (and a router whose shards are gone) get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often a slow startup says what it is waiting for.
const WAIT_NOTICE: Duration = Duration::from_secs(10);
/// How long the first Health (one tiny forward on every rank) may take.
const FIRST_HEALTH: Duration = Duration::from_secs(60);
/// How often the steady state asks the router's `/health` (it answers from memory, in microseconds).
const HEALTH_PROBE: Duration = Duration::from_secs(1);
/// How long `/health` may answer 503 before the launcher gives up on the deployment. The router
/// re-checks a failed shard every second, so a passing failure clears well within this.
const UNHEALTHY_EXIT: Duration = Duration::from_secs(10);
/// The window in which shard-group restarts count toward the limit.
const RESTART_WINDOW: Duration = Duration::from_secs(600);

/// Everything the supervisor runs, already validated.
pub struct Plan {
    /// One per rank, in rank order, each with the socket it serves on.
    pub shards: Vec<(ChildSpec, PathBuf)>,
    pub router: ChildSpec,
    /// Where to probe the router's `/health`.
    pub router_addr: (String, u16),
    /// Whether requests need the API key (the first `curl` shown says so).
    pub api_key: bool,
    pub startup_timeout: Duration,
    pub graceful_timeout: Duration,
    /// Shard-group restarts allowed within `RESTART_WINDOW` (0: a dead shard stops everything).
    pub shard_restart_limit: u32,
}

/// The crash-loop guard: restarts within the window, and the backoff before the next one.
struct Restarts {
    limit: u32,
    recent: Vec<Instant>,
}

impl Restarts {
    /// The wait before one more restart, or `None` past the limit.
    fn next(&mut self) -> Option<Duration> {
        self.recent.retain(|t| t.elapsed() < RESTART_WINDOW);
        if self.recent.len() >= self.limit as usize {
            return None;
        }
        self.recent.push(Instant::now());
        Some(Duration::from_secs(1 << (self.recent.len() - 1).min(5)))
    }
}

/// Why the launcher stopped with an error; each names the process at fault.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        source: std::io::Error,
    },
    #[error("{name} {how} during startup; its last output:\n{tail}")]
    DiedStarting {
        name: String,
        how: String,
        tail: String,
    },
    #[error("{name} was not ready after {secs} s ({reason}); its last output:\n{tail}")]
    StartupTimeout {
        name: String,
        secs: u64,
        reason: String,
        tail: String,
    },
    #[error("{name} failed its first Health ({reason}); its last output:\n{tail}")]
    Unhealthy {
        name: String,
        reason: String,
        tail: String,
    },
    #[error("{name} {how}; stopped the others. Its last output:\n{tail}")]
    Died {
        name: String,
        how: String,
        tail: String,
    },
    #[error("{name} stopped answering ({reason}; the router's /health answered 503 for {secs} s); stopped the others. Its last output:\n{tail}")]
    Stuck {
        name: String,
        reason: String,
        secs: u64,
        tail: String,
    },
    #[error("cannot listen for signals: {0}")]
    Signals(std::io::Error),
}

impl SuperviseError {
    /// The first line of the message, without the captured output.
    fn summary(&self) -> String {
        let text = self.to_string();
        let first = text.lines().next().unwrap_or_default();
        first
            .trim_end_matches(" Its last output:")
            .trim_end_matches("; its last output:")
            .to_string()
    }
}

/// SIGINT and SIGTERM, merged.
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> Result<Self, SuperviseError> {
        let int = signal(SignalKind::interrupt()).map_err(SuperviseError::Signals)?;
        let term = signal(SignalKind::terminate()).map_err(SuperviseError::Signals)?;
        Ok(Self { int, term })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// What ended a wait.
enum Interrupt {
    Signal(&'static str),
    Failed(SuperviseError),
}

/// Runs the plan to the end: `Ok` after a signal-initiated shutdown, `Err` when a child failed.
pub async fn run(plan: Plan) -> Result<(), SuperviseError> {
    let mut signals = Signals::new()?;
    let started = Instant::now();
    let mut shards = Vec::new();
    for (spec, socket) in &plan.shards {
        // A stale socket from a killed run would make the router connect to nothing.
        let _ = std::fs::remove_file(socket);
        match spawn(spec) {
            Ok(child) => shards.push(child),
            Err(e) => return finish(shards, None, Interrupt::Failed(e), &mut signals).await,
        }
    }
    if let Some(stop) = wait_shards(&mut shards, &plan, &mut signals, true).await {
        return finish(shards, None, stop, &mut signals).await;
    }
    tracing::info!(
        "{} shard(s) ready in {:.1} s; starting the router",
        shards.len(),
        secs(started)
    );
    let mut router = match spawn(&plan.router) {
        Ok(router) => router,
        Err(e) => return finish(shards, None, Interrupt::Failed(e), &mut signals).await,
    };
    if let Some(stop) = wait_router(&mut router, &mut shards, &plan, &mut signals).await {
        return finish(
            shards,
            Some((router, plan.graceful_timeout)),
            stop,
            &mut signals,
        )
        .await;
    }
    announce_ready(&plan, secs(started));
    let stop = supervise(&mut router, &mut shards, &plan, &mut signals).await;
    finish(
        shards,
        Some((router, plan.graceful_timeout)),
        stop,
        &mut signals,
    )
    .await
}

/// Where the server listens and a first request to try: in the log, and as plain lines on a terminal.
fn announce_ready(plan: &Plan, secs: f64) {
    let (host, port) = &plan.router_addr;
    let (url, curl) = first_request(host, *port, plan.api_key);
    tracing::info!("ready in {secs:.1} s, listening on {url}; try: {curl}");
    if std::io::stdout().is_terminal() {
        println!("\nTessera is ready on {url}. Try:\n\n  {curl}\n");
    }
}

/// The URL to reach the router from this machine, and a `curl` for `/generate` (TGI's README request).
pub fn first_request(hostname: &str, port: u16, api_key: bool) -> (String, String) {
    let host = match hostname {
        "0.0.0.0" | "" | "::" | "[::]" => "localhost".to_string(),
        h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
        h => h.to_string(),
    };
    let auth = match api_key {
        true => " -H \"Authorization: Bearer $API_KEY\"",
        false => "",
    };
    let curl = format!(
        "curl {host}:{port}/generate -H 'Content-Type: application/json'{auth} \
         -d '{{\"inputs\":\"What is Deep Learning?\",\"parameters\":{{\"max_new_tokens\":20}}}}'"
    );
    (format!("http://{host}:{port}"), curl)
}

fn spawn(spec: &ChildSpec) -> Result<Child, SuperviseError> {
    tracing::info!(
        "starting {}: {}",
        spec.name,
        redact(&format!(
            "{} {}",
            spec.program.display(),
            spec.args.join(" ")
        ))
    );
    Child::spawn(spec).map_err(|source| SuperviseError::Spawn {
        name: spec.name.clone(),
        program: spec.program.display().to_string(),
        source,
    })
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// The first child that has exited, as the error naming it.
async fn first_exit<'a>(
    children: impl Iterator<Item = &'a mut Child>,
    starting: bool,
) -> Option<SuperviseError> {
    for child in children {
        if let Some(status) = child.exited() {
            let (name, how) = (child.name.clone(), describe(status));
            let tail = child.final_tail().await;
            return Some(match starting {
                true => SuperviseError::DiedStarting { name, how, tail },
                false => SuperviseError::Died { name, how, tail },
            });
        }
    }
    None
}

/// Polls every shard until all serve, then, with `health_forward`, sends Health to every rank at
/// once (it is a forward that joins their collectives); `Some` when startup must stop instead.
async fn wait_shards(
    shards: &mut [Child],
    plan: &Plan,
    signals: &mut Signals,
    health_forward: bool,
) -> Option<Interrupt> {
    let started = Instant::now();
    let mut ready = vec![false; shards.len()];
    let mut reasons = vec![String::from("not probed yet"); shards.len()];
    let mut notice = Instant::now();
    while ready.iter().any(|r| !r) {
        if let Some(e) = first_exit(shards.iter_mut(), true).await {
            return Some(Interrupt::Failed(e));
        }
        for (rank, (_, socket)) in plan.shards.iter().enumerate() {
            if ready[rank] {
                continue;
            }
            match health::shard_serving(socket).await {
                Ok(()) => ready[rank] = true,
                Err(reason) => reasons[rank] = reason,
            }
        }
        let waiting: Vec<usize> = (0..shards.len()).filter(|r| !ready[*r]).collect();
        if let Some(&rank) = waiting.first() {
            if started.elapsed() > plan.startup_timeout {
                return Some(Interrupt::Failed(timeout(
                    &shards[rank],
                    plan,
                    &reasons[rank],
                )));
            }
            if notice.elapsed() > WAIT_NOTICE {
                tracing::info!(
                    "waiting for shard(s) {waiting:?} to answer Health ({})",
                    reasons[rank]
                );
                notice = Instant::now();
            }
            if let Some(sig) = tick(signals, STARTUP_TICK).await {
                return Some(Interrupt::Signal(sig));
            }
        }
    }
    if !health_forward {
        return None;
    }
    first_health(shards, plan)
        .await
        .err()
        .map(Interrupt::Failed)
}

/// Health on every rank concurrently; the first failing rank (in rank order) is the error.
async fn first_health(shards: &[Child], plan: &Plan) -> Result<(), SuperviseError> {
    let calls: Vec<_> = plan
        .shards
        .iter()
        .map(|(_, socket)| tokio::spawn(health::shard_health(socket.clone(), FIRST_HEALTH)))
        .collect();
    for (child, call) in shards.iter().zip(calls) {
        let outcome = call.await.unwrap_or_else(|e| Err(e.to_string()));
        if let Err(reason) = outcome {
            return Err(SuperviseError::Unhealthy {
                name: child.name.clone(),
                reason,
                tail: child.tail(),
            });
        }
    }
    Ok(())
}

fn timeout(child: &Child, plan: &Plan, reason: &str) -> SuperviseError {
    SuperviseError::StartupTimeout {
        name: child.name.clone(),
        secs: plan.startup_timeout.as_secs(),
        reason: reason.to_string(),
        tail: child.tail(),
    }
}

/// Sleeps `period`; returns the signal if one arrived meanwhile.
async fn tick(signals: &mut Signals, period: Duration) -> Option<&'static str> {
    tokio::select! {
        sig = signals.recv() => Some(sig),
        _ = tokio::time::sleep(period) => None,
    }
}

/// Polls the router's /health until 200 (it warms the shards up first), watching every child.
async fn wait_router(
    router: &mut Child,
    shards: &mut [Child],
    plan: &Plan,
    signals: &mut Signals,
) -> Option<Interrupt> {
    let started = Instant::now();
    let (host, port) = &plan.router_addr;
    let mut notice = Instant::now();
    loop {
        if let Some(e) =
            first_exit(std::iter::once(&mut *router).chain(shards.iter_mut()), true).await
        {
            return Some(Interrupt::Failed(e));
        }
        let reason = match health::router_health(health::probe_host(host), *port).await {
            Ok(200) => return None,
            Ok(status) => format!("/health answered {status}"),
            Err(e) => e,
        };
        if started.elapsed() > plan.startup_timeout {
            return Some(Interrupt::Failed(timeout(router, plan, &reason)));
        }
        if notice.elapsed() > WAIT_NOTICE {
            tracing::info!("waiting for the router's /health ({reason})");
            notice = Instant::now();
        }
        if let Some(sig) = tick(signals, STARTUP_TICK).await {
            return Some(Interrupt::Signal(sig));
        }
    }
}

/// Steady state: returns when a child exits, the router reports the shards unhealthy for
/// `UNHEALTHY_EXIT`, or a signal arrives.
async fn supervise(
    router: &mut Child,
    shards: &mut [Child],
    plan: &Plan,
    signals: &mut Signals,
) -> Interrupt {
    let (host, port) = &plan.router_addr;
    let mut probed = Instant::now();
    let mut unhealthy_since: Option<Instant> = None;
    let mut restarts = Restarts {
        limit: plan.shard_restart_limit,
        recent: Vec::new(),
    };
    loop {
        if let Some(e) = first_exit(std::iter::once(&mut *router), false).await {
            return Interrupt::Failed(e);
        }
        if let Some(e) = first_exit(shards.iter_mut(), false).await {
            let Some(backoff) = restarts.next() else {
                return Interrupt::Failed(e);
            };
            tracing::warn!(
                "{}; restarting the shard group in {} s (restart {} of at most {} in {} min); the router holds its requests",
                e.summary(),
                backoff.as_secs(),
                restarts.recent.len(),
                restarts.limit,
                RESTART_WINDOW.as_secs() / 60
            );
            if let Some(stop) = restart_shards(shards, plan, signals, backoff).await {
                return stop;
            }
            // The router reconnects and warms the new group up (a big model's Warmup takes a
            // while): its /health gets the startup timeout to turn 200 again.
            if let Some(stop) = wait_router(router, shards, plan, signals).await {
                return stop;
            }
            unhealthy_since = None;
            continue;
        }
        if probed.elapsed() >= HEALTH_PROBE {
            probed = Instant::now();
            // Only a 503 counts: a probe that cannot connect (every connection slot busy) or times out
            // says nothing about the shards.
            match health::router_health(health::probe_host(host), *port).await {
                Ok(503) => {
                    let since = *unhealthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= UNHEALTHY_EXIT {
                        return Interrupt::Failed(stuck(router, shards, plan, since).await);
                    }
                }
                Ok(_) => unhealthy_since = None,
                Err(_) => {}
            }
        }
        if let Some(sig) = tick(signals, TICK).await {
            return Interrupt::Signal(sig);
        }
    }
}

/// Stops what is left of the shard group, waits `backoff`, starts every rank again and waits until
/// all answer Health; `Some` when the launcher must stop instead.
async fn restart_shards(
    shards: &mut [Child],
    plan: &Plan,
    signals: &mut Signals,
    backoff: Duration,
) -> Option<Interrupt> {
    let started = Instant::now();
    stop_all(shards, STOP_GRACE).await;
    tokio::select! {
        sig = signals.recv() => return Some(Interrupt::Signal(sig)),
        _ = tokio::time::sleep(backoff) => {}
    }
    for (child, (spec, socket)) in shards.iter_mut().zip(&plan.shards) {
        let _ = std::fs::remove_file(socket);
        match spawn(spec) {
            Ok(fresh) => *child = fresh,
            Err(e) => return Some(Interrupt::Failed(e)),
        }
    }
    // No Health forward here: the router is live, reconnects as soon as the ranks serve and runs
    // its Warmup and Prefill through its own lockstep, so a Health sent from here could meet one
    // rank before the router's forward and another after it, and their collectives would pair
    // different forwards (seen: rank 1 in a 1-token Health while rank 0 ran a 256-token Prefill).
    let stop = wait_shards(shards, plan, signals, false).await;
    if stop.is_none() {
        tracing::info!("shard group restarted in {:.1} s", secs(started));
    }
    stop
}

/// The error for a deployment whose `/health` stayed 503: the first shard that does not answer `Info`
/// (a stopped or hung process), else the router (every shard answers, yet it reports them unhealthy).
async fn stuck(router: &Child, shards: &[Child], plan: &Plan, since: Instant) -> SuperviseError {
    let secs = since.elapsed().as_secs();
    // A stopped rank also stalls its peers inside their collectives, so they fail `Info` too: name the
    // stopped process first.
    if let Some(child) = shards.iter().find(|c| c.is_stopped()) {
        return SuperviseError::Stuck {
            name: child.name.clone(),
            reason: "the process is stopped (SIGSTOP)".into(),
            secs,
            tail: child.tail(),
        };
    }
    for (child, (_, socket)) in shards.iter().zip(&plan.shards) {
        if let Err(reason) = health::shard_serving(socket).await {
            return SuperviseError::Stuck {
                name: child.name.clone(),
                reason,
                secs,
                tail: child.tail(),
            };
        }
    }
    SuperviseError::Stuck {
        name: router.name.clone(),
        reason: "every shard answers Info, yet the router reports them unhealthy".into(),
        secs,
        tail: router.tail(),
    }
}

/// Stops everything still running, router first (draining it on a signal), then the shards. A second
/// signal during the drain kills the router at once.
async fn finish(
    mut shards: Vec<Child>,
    router: Option<(Child, Duration)>,
    why: Interrupt,
    signals: &mut Signals,
) -> Result<(), SuperviseError> {
    match &why {
        Interrupt::Failed(e) => tracing::error!("{}: stopping everything", e.summary()),
        Interrupt::Signal(sig) => tracing::info!("{sig}: shutting down"),
    }
    if let Some((mut router, graceful)) = router {
        let grace = match &why {
            Interrupt::Signal(_) => graceful,
            Interrupt::Failed(_) => STOP_GRACE,
        };
        tracing::info!("stopping the router (up to {} s to drain)", grace.as_secs());
        tokio::select! {
            _ = stop_all(std::slice::from_mut(&mut router), grace) => {}
            sig = signals.recv() => tracing::warn!("{sig} again: killing the router"),
        }
        router.kill().await;
    }
    stop_all(&mut shards, STOP_GRACE).await;
    match why {
        Interrupt::Signal(_) => {
            tracing::info!("stopped");
            Ok(())
        }
        Interrupt::Failed(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::first_request;

    #[test]
    fn first_request_names_a_reachable_host() {
        let (url, curl) = first_request("0.0.0.0", 3000, false);
        assert_eq!(url, "http://localhost:3000");
        assert_eq!(
            curl,
            "curl localhost:3000/generate -H 'Content-Type: application/json' \
             -d '{\"inputs\":\"What is Deep Learning?\",\"parameters\":{\"max_new_tokens\":20}}'"
        );
        assert_eq!(first_request("::1", 80, false).0, "http://[::1]:80");
        let (_, curl) = first_request("10.0.0.2", 8080, true);
        assert!(curl.starts_with("curl 10.0.0.2:8080/generate"), "{curl}");
        assert!(curl.contains("Bearer $API_KEY"), "{curl}");
    }
}
