//! Supervision faults with the real shard and router: with restarts off, a shard killed with SIGKILL
//! brings the launcher down within seconds, naming it, with no process left (restarts:
//! launcher_restart.rs); a SIGKILLed launcher takes its children with it
//! (PR_SET_PDEATHSIG).

mod launcher_support;

use launcher_support::{assert_all_gone, ready_smollm2, send_signal, Launcher};
use std::time::{Duration, Instant};

fn ready_launcher(num_shard: &str) -> Launcher {
    ready_smollm2(num_shard, &["--shard-restart-limit", "0"])
}

/// (pid of the shard of `rank`, every child pid) of a ready launcher.
fn shard_and_children(launcher: &Launcher, rank: usize) -> (i32, Vec<i32>) {
    let shard = launcher
        .shards()
        .into_iter()
        .find(|(_, cmd)| cmd.contains(&format!(" --rank {rank} ")))
        .expect("a shard child");
    let children = launcher.children();
    (shard.0, children.iter().map(|(pid, _)| *pid).collect())
}

#[test]
fn killed_shard_of_two_stops_everything_and_is_named() {
    let mut launcher = ready_launcher("2");
    let (shard, children) = shard_and_children(&launcher, 1);
    assert_eq!(children.len(), 3, "{:?}", launcher.children());
    let start = Instant::now();
    send_signal(shard, 9);
    let status = launcher.wait_exit(Duration::from_secs(10));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        !status.success(),
        "a dead shard is a failure:\n{}",
        launcher.output()
    );
    let out = launcher.output();
    assert!(
        out.contains("shard 1 was killed by signal 9 (SIGKILL)"),
        "{out}"
    );
    assert_all_gone(&children, Duration::from_secs(2));
}

#[test]
fn sigkilled_launcher_takes_its_children_along() {
    let mut launcher = ready_launcher("1");
    let (_, children) = shard_and_children(&launcher, 0);
    launcher.signal(9);
    launcher.wait_exit(Duration::from_secs(5));
    assert_all_gone(&children, Duration::from_secs(5));
}
