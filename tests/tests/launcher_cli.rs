//! The launcher's command line end to end: one binary runs every process (`tessera-launcher shard|router`),
//! a copied TGI command line starts and serves (inapplicable flags warned about, result-changing ones
//! refused), the API key never appears on a child's command line or in the log, and the ready line names
//! the address and a first request.

mod launcher_support;

use launcher_support::{http, is_shard, model_arg, Launcher};
use std::process::Command;
use std::time::Duration;
use tessera_tests::binary;

/// Model load + router warmup on a busy 2-core machine.
const READY: Duration = Duration::from_secs(240);
const GGUF: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn generate_status(launcher: &Launcher, auth: Option<&str>) -> u16 {
    let body = r#"{"inputs":"What is Deep Learning?","parameters":{"max_new_tokens":4}}"#;
    let Some(key) = auth else {
        return http(launcher.port, "POST", "/generate", body).unwrap().0;
    };
    // The std-only client sends no extra headers: a raw request carries the bearer token.
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", launcher.port)).unwrap();
    let request = format!(
        "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Authorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_launcher_binary_runs_the_shard_and_the_router() {
    for (role, own) in [("shard", "serve"), ("router", "--tokenizer-name")] {
        let out = Command::new(binary("tessera-launcher"))
            .args([role, "--help"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{role} --help: {out:?}");
        assert!(text.contains(own), "{role} --help:\n{text}");
        assert!(
            text.contains(&format!("tessera-launcher {role}")),
            "{role} usage names the multi-call form:\n{text}"
        );
    }
}

#[test]
fn tgi_command_line_starts_with_warnings_and_serves() {
    let model = model_arg(GGUF);
    // TGI's usual deployment flags, the legacy `--max-input-length` among them.
    let args = [
        "--model-id",
        &model,
        "--sharded",
        "false",
        "--trust-remote-code",
        "--max-input-length",
        "200",
        "--max-total-tokens",
        "400",
        "--max-batch-prefill-tokens",
        "256",
        "--cuda-memory-fraction",
        "0.9",
        "--usage-stats=off",
        "--disable-custom-kernels",
        "--cuda-graphs",
        "1,2,4,8",
        "--device",
        "cpu",
    ];
    let mut launcher = Launcher::start(&args, &[("DISABLE_GRAMMAR_SUPPORT", "true")]);
    launcher.wait_ready(READY);
    let out = launcher.output();
    for warned in [
        "ignoring TGI's --trust-remote-code: ",
        "--max-input-length is TGI's older name of --max-input-tokens",
        "ignoring TGI's --cuda-memory-fraction 0.9: ",
        "ignoring TGI's --usage-stats off: ",
        "ignoring TGI's --disable-custom-kernels: ",
        "ignoring TGI's --cuda-graphs 1,2,4,8: Tessera does not capture CUDA graphs",
    ] {
        let line = out.lines().find(|l| l.contains(warned));
        assert!(
            line.is_some_and(|l| l.contains("WARN")),
            "no warning `{warned}`:\n{out}"
        );
    }
    let (_, info) = http(launcher.port, "GET", "/info", "").unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["max_input_tokens"], 200, "{info}");
    assert_eq!(generate_status(&launcher, None), 200);
    // TGI's DISABLE_GRAMMAR_SUPPORT reaches the router: grammars get TGI's 422.
    let grammar = r#"{"inputs":"a","parameters":{"max_new_tokens":2,"grammar":{"type":"regex","value":"a"}}}"#;
    let (status, body) = http(launcher.port, "POST", "/generate", grammar).unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("grammar is not supported"), "{body}");
    launcher.signal(15);
    assert!(launcher.wait_exit(Duration::from_secs(30)).success());
}

#[test]
fn result_changing_tgi_flags_are_refused_before_anything_starts() {
    for (args, env, message) in [
        (
            vec!["--lora-adapters", "org/adapter"],
            vec![],
            "TGI's --lora-adapters org/adapter is not supported: LoRA adapters are not supported",
        ),
        (
            vec!["--rope-scaling=dynamic"],
            vec![],
            "TGI's --rope-scaling dynamic is not supported: Tessera applies the `rope_scaling` of the model's config.json",
        ),
        (
            vec![],
            vec![("KV_CACHE_DTYPE", "fp8_e4m3fn")],
            "--kv-cache-dtype fp8_e4m3fn is not supported: an fp8 KV cache",
        ),
    ] {
        let mut launcher = Launcher::start(&args, &env);
        let status = launcher.wait_exit(Duration::from_secs(10));
        let out = launcher.output();
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}:\n{out}");
        assert!(out.contains(message), "{args:?} {env:?}:\n{out}");
        assert!(!out.contains("starting shard"), "{out}");
    }
}

#[test]
fn api_key_stays_off_command_lines_and_out_of_the_log() {
    let key = "tessera-test-key-7f3a9c";
    let model = model_arg(GGUF);
    let args = [
        "--model-id",
        &model,
        "--api-key",
        key,
        "--device",
        "cpu",
        "--max-batch-prefill-tokens",
        "256",
    ];
    let mut launcher = Launcher::start(&args, &[]);
    launcher.wait_ready(READY);
    let children = launcher.children();
    assert_eq!(children.len(), 2, "{children:?}");
    assert!(
        children.iter().any(|(_, cmd)| is_shard(cmd)),
        "{children:?}"
    );
    for (pid, cmdline) in &children {
        assert!(!cmdline.contains(key), "pid {pid}: {cmdline}");
    }
    // The key reached the router all the same, through its environment.
    assert_eq!(generate_status(&launcher, None), 401);
    assert_eq!(generate_status(&launcher, Some(key)), 200);
    let out = launcher.output();
    assert!(out.contains("starting router: "), "{out}");
    assert!(!out.contains(key), "the key is in the log:\n{out}");
    // The ready line: where it listens and a first request (with a placeholder for the key).
    let port = launcher.port;
    let ready = out.lines().find(|l| l.contains("; try: curl"));
    let ready = ready.unwrap_or_else(|| panic!("no ready line:\n{out}"));
    assert!(
        ready.contains(&format!(
            "listening on http://127.0.0.1:{port}; try: curl 127.0.0.1:{port}/generate"
        )),
        "{ready}"
    );
    assert!(ready.contains("Bearer $API_KEY"), "{ready}");
    launcher.signal(15);
    assert!(launcher.wait_exit(Duration::from_secs(30)).success());
}
