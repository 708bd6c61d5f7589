//! Launcher failures that must end in a clear error and a non-zero exit, fast, with no process left:
//! bad model paths, an unreachable Hub, a port in use, unsupported flags, a shard that dies or hangs while
//! starting, an unsupported architecture.

mod launcher_support;

use launcher_support::{assert_all_gone, fake_binary, free_port, model_arg, Launcher};
use std::time::{Duration, Instant};

const HF_MODEL: &str = "smollm2-hf-float32";

/// Runs the launcher to its exit; returns its log after checking the exit was a failure within `within`.
fn fails(args: &[&str], env: &[(&str, &str)], within: Duration) -> String {
    let start = Instant::now();
    let mut launcher = Launcher::start(args, env);
    let status = launcher.wait_exit(within);
    assert!(
        !status.success(),
        "expected a failure:\n{}",
        launcher.output()
    );
    assert!(start.elapsed() < within);
    launcher.output()
}

#[test]
fn missing_model_path_is_named() {
    let out = fails(
        &["--model-id", "/no/such/model"],
        &[],
        Duration::from_secs(10),
    );
    assert!(
        out.contains("model path /no/such/model does not exist"),
        "{out}"
    );
}

#[test]
fn folder_without_config_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = fails(
        &["--model-id", dir.path().to_str().unwrap()],
        &[],
        Duration::from_secs(10),
    );
    assert!(out.contains("no config.json"), "{out}");
}

#[test]
fn unreachable_hub_fails_fast() {
    // Online mode, but the endpoint is a closed local port: the probe must fail in seconds.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let env = [("HF_HUB_OFFLINE", "0"), ("HF_ENDPOINT", endpoint.as_str())];
    let out = fails(
        &["--model-id", "HuggingFaceTB/SmolLM2-135M-Instruct"],
        &env,
        Duration::from_secs(15),
    );
    assert!(
        out.contains("cannot fetch `HuggingFaceTB/SmolLM2-135M-Instruct` from the Hub"),
        "{out}"
    );
}

#[test]
fn offline_hub_id_not_in_cache() {
    let out = fails(&["--model-id", "org/model"], &[], Duration::from_secs(10));
    assert!(out.contains("HF_HUB_OFFLINE"), "{out}");
}

#[test]
fn port_in_use_fails_before_loading() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = fails(
        &["--model-id", &model_arg(HF_MODEL), "--port", &port],
        &[],
        Duration::from_secs(10),
    );
    assert!(
        out.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{out}"
    );
}

#[test]
fn unsupported_quantization_is_rejected() {
    let out = fails(
        &["--model-id", &model_arg(HF_MODEL), "--quantize", "awq"],
        &[],
        Duration::from_secs(10),
    );
    assert!(out.contains("--quantize awq is not supported"), "{out}");
}

#[test]
fn shard_dying_at_startup_is_named_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let shard = fake_binary(
        dir.path(),
        "shard",
        "echo \"cannot load: rank $RANK of $WORLD_SIZE\" >&2; exit 7",
    );
    let env = [("TESSERA_SHARD_BIN", shard.to_str().unwrap())];
    let out = fails(
        &["--model-id", &model_arg(HF_MODEL)],
        &env,
        Duration::from_secs(10),
    );
    assert!(
        out.contains("shard 0 exited with status 7 during startup"),
        "{out}"
    );
    assert!(out.contains("cannot load: rank 0 of 1"), "{out}");
}

#[test]
fn hung_shard_hits_the_startup_timeout_and_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    // Ignores SIGTERM so the launcher must escalate to SIGKILL; records its pid for the orphan check.
    let pid_file = dir.path().join("pid");
    let script = format!(
        "echo $$ > {}; trap '' TERM; echo loading forever; while true; do sleep 1; done",
        pid_file.display()
    );
    let shard = fake_binary(dir.path(), "shard", &script);
    let env = [("TESSERA_SHARD_BIN", shard.to_str().unwrap())];
    let args = [
        "--model-id",
        &model_arg(HF_MODEL),
        "--num-shard",
        "2",
        "--startup-timeout",
        "2",
    ];
    let out = fails(&args, &env, Duration::from_secs(15));
    assert!(out.contains("shard 0 was not ready after 2 s"), "{out}");
    assert!(out.contains("loading forever"), "{out}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_all_gone(&[pid], Duration::from_secs(2));
}

#[test]
fn unsupported_architecture_is_reported_by_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "n_embd": 8}"#;
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let tokenizer = tessera_tests::fetched_model(HF_MODEL).join("tokenizer.json");
    std::fs::copy(tokenizer, dir.path().join("tokenizer.json")).unwrap();
    let out = fails(
        &["--model-id", dir.path().to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    );
    assert!(out.contains("shard 0 exited"), "{out}");
    assert!(out.to_lowercase().contains("gpt2"), "{out}");
}

#[test]
fn router_dying_at_startup_stops_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let router = fake_binary(dir.path(), "router", "echo \"no tokenizer here\"; exit 3");
    let env = [("TESSERA_ROUTER_BIN", router.to_str().unwrap())];
    let model = model_arg(HF_MODEL);
    let args = ["--model-id", &model, "--device", "cpu"];
    let mut launcher = Launcher::start(&args, &env);
    // Record the real shard while it runs, to check it is stopped.
    let mut shards = Vec::new();
    while launcher.child.try_wait().unwrap().is_none() {
        shards.extend(launcher.shards());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = launcher.wait_exit(Duration::from_secs(1));
    let out = launcher.output();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("router exited with status 3 during startup"),
        "{out}"
    );
    assert!(out.contains("no tokenizer here"), "{out}");
    assert!(!shards.is_empty(), "the shard had started:\n{out}");
    let pids: Vec<i32> = shards.iter().map(|(pid, _)| *pid).collect();
    assert_all_gone(&pids, Duration::from_secs(2));
}
