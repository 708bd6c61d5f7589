//! Child command lines, built from the children's own argument structs (`tessera_router::args::RouterArgs`,
//! the shard's serve args) so each flag is defined once; the launcher parses each argv back with the
//! child's parser before spawning, so a bad value fails here, naming the flag, not in a child.

use crate::args::LauncherArgs;
use crate::model::ResolvedModel;
use crate::process::ChildSpec;
use clap::{CommandFactory, Parser};
use std::path::{Path, PathBuf};
use tessera_router::args::{Cli as RouterCli, RouterArgs, ShardArgs as RouterShardArgs};
use tessera_shard::serve::ServeArgs;

/// Children write to a pipe the launcher re-emits: colour codes would only be noise.
fn no_color() -> (String, String) {
    ("NO_COLOR".into(), "1".into())
}

/// The socket of shard `rank`: `{shard_uds_path}-{rank}` (TGI's layout).
pub use tessera_proto::uds::shard_socket;

/// Where the shards' sockets live for one launch. Without `--shard-uds-path` that is a fresh
/// directory only this user can enter (0700, under `$XDG_RUNTIME_DIR` or the temp dir), so no
/// other local user can predict, pre-create, or connect to the sockets; it is removed with
/// everything in it when this value drops at the launcher's exit.
pub struct SocketDir {
    prefix: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl SocketDir {
    pub fn for_launch(given: Option<&Path>) -> Result<Self, String> {
        if let Some(prefix) = given {
            return Ok(SocketDir {
                prefix: prefix.to_path_buf(),
                _dir: None,
            });
        }
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = private_dir(&base)?;
        Ok(SocketDir {
            prefix: dir.path().join("tessera-server"),
            _dir: Some(dir),
        })
    }

    /// The `--uds-path` prefix: shard `r` listens on `{prefix}-{r}`.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }
}

fn private_dir(base: &Path) -> Result<tempfile::TempDir, String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("tessera-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(base)
        .map_err(|e| {
            format!(
                "cannot create a socket directory in {}: {e}",
                base.display()
            )
        })?;
    // Whatever the umask did, only the owner may enter.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.path().display()))?;
    Ok(dir)
}

/// The `--shard-uds-path` prefix `main` settled (given, or the launch's private directory).
fn uds_prefix(args: &LauncherArgs) -> Result<&Path, String> {
    args.sharding
        .shard_uds_path
        .as_deref()
        .ok_or_else(|| "no shard socket path: create the launch's SocketDir first".to_string())
}

/// A fresh random secret for this launch's tensor-parallel group (hex of 32 bytes from the
/// kernel), handed to every shard through its environment.
pub fn group_secret() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read /dev/urandom for the group secret: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The router's arguments: the launcher's router groups plus the shard socket and tokenizer.
pub fn router_args(args: &LauncherArgs, model: &ResolvedModel) -> Result<RouterArgs, String> {
    let mut server = args.server.clone();
    // Children always log JSON: the launcher parses each line and re-emits it in its own format.
    server.json_output = true;
    Ok(RouterArgs {
        shard: RouterShardArgs {
            master_shard_uds_path: shard_socket(uds_prefix(args)?, 0),
            tokenizer_name: model.path.clone(),
            model_id: Some(model.name.clone()),
        },
        server,
        limits: args.limits.clone(),
        batching: args.batching.clone(),
    })
}

/// The router's argv, checked by the router's own parser. The API key is never on it (any local user
/// can read /proc/PID/cmdline): it goes into the router's environment, see `router_env`.
pub fn router_argv(router: &RouterArgs) -> Result<Vec<String>, String> {
    let mut public = router.clone();
    public.server.api_key = None;
    let argv = public.to_argv();
    let mut parsed = RouterCli::try_parse_from(
        std::iter::once("tessera-router".to_string()).chain(argv.iter().cloned()),
    )
    .map_err(|e| format!("router arguments: {}", redact(&e.to_string())))?
    .router;
    // The parse above reads the launcher's own environment, which may hold the key.
    parsed.server.api_key = None;
    if parsed != public {
        return Err(format!("router arguments do not round-trip: {argv:?}"));
    }
    Ok(argv)
}

/// The router's environment: no colours, and the API key under the variable its `--api-key` reads.
pub fn router_env(router: &RouterArgs) -> Result<Vec<(String, String)>, String> {
    let mut env = vec![no_color()];
    if let Some(key) = &router.server.api_key {
        let command = RouterCli::command();
        let var = command
            .get_arguments()
            .find(|a| a.get_id() == "api_key")
            .and_then(|a| a.get_env())
            .and_then(|v| v.to_str())
            .ok_or("the router's --api-key reads no environment variable")?;
        env.push((var.to_string(), key.clone()));
    }
    Ok(env)
}

/// A command line for the log, with the value of any `--api-key` replaced.
pub fn redact(command_line: &str) -> String {
    let mut out = Vec::new();
    let mut hide_next = false;
    for word in command_line.split(' ') {
        if hide_next {
            out.push("[redacted]".to_string());
            hide_next = false;
        } else if word == "--api-key" {
            out.push(word.to_string());
            hide_next = true;
        } else if word.starts_with("--api-key=") {
            out.push("--api-key=[redacted]".to_string());
        } else {
            out.push(word.to_string());
        }
    }
    out.join(" ")
}

/// The shard's `serve` arguments under the shard's own parser (`ServeArgs` is a subcommand's group).
#[derive(Parser, Debug)]
struct ShardServeCli {
    #[command(flatten)]
    serve: ServeArgs,
}

/// The `serve` arguments of shard `rank`: the shard's own defaults, overridden by the launcher's flags.
pub fn serve_args(
    args: &LauncherArgs,
    model: &ResolvedModel,
    rank: usize,
    world_size: usize,
) -> Result<ServeArgs, String> {
    let model_id = model.path.display().to_string();
    let defaults = ShardServeCli::try_parse_from(["serve", "--model-id", &model_id])
        .map_err(|e| format!("shard arguments: {e}"))?;
    let uds_path = uds_prefix(args)?
        .to_str()
        .ok_or("--shard-uds-path is not UTF-8")?;
    let m = &args.model;
    let is_gguf = model
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    Ok(ServeArgs {
        uds_path: uds_path.to_string(),
        rank,
        world_size,
        master_addr: args.sharding.master_addr.clone(),
        master_port: args.sharding.master_port,
        device: m.device,
        dtype: m.dtype,
        quantize: m.check_quantize(is_gguf)?,
        kv_cache_memory: m.kv_cache_memory,
        kv_cache_dtype: m.kv_cache_dtype.unwrap_or(defaults.serve.kv_cache_dtype),
        kv_cache_fraction: m
            .kv_cache_fraction
            .unwrap_or(defaults.serve.kv_cache_fraction),
        max_batch_prefill_tokens: args.batching.max_batch_prefill_tokens as usize,
        // As TGI's launcher does: the shards export under the launcher's service name too.
        otlp_endpoint: args.server.otlp_endpoint.clone(),
        otlp_service_name: args.server.otlp_service_name.clone(),
        ..defaults.serve
    })
}

/// `--long` of the shard argument whose field is `id`, read from the shard's own definition.
fn shard_flag(id: &str) -> Result<String, String> {
    let command = ShardServeCli::command();
    let arg = command.get_arguments().find(|a| a.get_id() == id);
    let long = arg
        .and_then(|a| a.get_long())
        .ok_or(format!("the shard has no `{id}` argument"))?;
    Ok(format!("--{long}"))
}

/// The shard's argv (`serve ...`), checked by parsing it back with the shard's parser.
pub fn shard_argv(serve: &ServeArgs) -> Result<Vec<String>, String> {
    let mut pairs = vec![
        ("model_id", serve.model_id.display().to_string()),
        ("uds_path", serve.uds_path.clone()),
        ("rank", serve.rank.to_string()),
        ("world_size", serve.world_size.to_string()),
        ("master_addr", serve.master_addr.clone()),
        ("master_port", serve.master_port.to_string()),
        ("comm_timeout_secs", serve.comm_timeout_secs.to_string()),
        ("device", value_name(serve.device)),
        ("dtype", value_name(serve.dtype)),
        ("kv_cache_fraction", serve.kv_cache_fraction.to_string()),
        ("kv_cache_dtype", value_name(serve.kv_cache_dtype)),
        ("initial_kv_blocks", serve.initial_kv_blocks.to_string()),
        (
            "max_batch_prefill_tokens",
            serve.max_batch_prefill_tokens.to_string(),
        ),
    ];
    if let Some(scheme) = serve.quantize {
        pairs.push(("quantize", value_name(scheme)));
    }
    if let Some(bytes) = serve.kv_cache_memory {
        pairs.push(("kv_cache_memory", bytes.to_string()));
    }
    if let Some(endpoint) = &serve.otlp_endpoint {
        pairs.push(("otlp_endpoint", endpoint.clone()));
    }
    pairs.push(("otlp_service_name", serve.otlp_service_name.clone()));
    let mut argv = vec!["serve".to_string()];
    for (id, value) in pairs {
        argv.extend([shard_flag(id)?, value]);
    }
    let parsed =
        ShardServeCli::try_parse_from(&argv).map_err(|e| format!("shard arguments: {e}"))?;
    if parsed.serve != *serve {
        return Err(format!("shard arguments do not round-trip: {argv:?}"));
    }
    Ok(argv)
}

/// A clap value enum's command-line spelling.
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// The environment of shard `rank`: the communicator's rendezvous, as TGI sets it, and the
/// group's secret (in the environment, which only the shard's user can read; never on argv).
pub fn shard_env(
    args: &LauncherArgs,
    rank: usize,
    world_size: usize,
    secret: &str,
) -> Vec<(String, String)> {
    vec![
        no_color(),
        ("RANK".into(), rank.to_string()),
        ("WORLD_SIZE".into(), world_size.to_string()),
        ("MASTER_ADDR".into(), args.sharding.master_addr.clone()),
        ("MASTER_PORT".into(), args.sharding.master_port.to_string()),
        (tessera_shard::comm::SECRET_ENV.into(), secret.into()),
    ]
}

/// How to start the child `role` (`shard`, `router`): the program `$override_var` names, run as is
/// (custom installs, fault tests), else this very executable with `role` as its first argument — the
/// launcher is a multi-call binary, so building it builds everything it spawns.
pub fn child_program(override_var: &str, role: &str) -> Result<(PathBuf, Vec<String>), String> {
    if let Some(path) = std::env::var_os(override_var).filter(|p| !p.is_empty()) {
        return Ok((PathBuf::from(path), Vec::new()));
    }
    let exe = std::env::current_exe().map_err(|e| {
        format!(
            "cannot find the launcher's own executable to run the {role} ({e}); set {override_var}"
        )
    })?;
    Ok((exe, vec![role.to_string()]))
}

/// Every child of a launch: one spec per shard rank (with its socket), then the router.
pub fn plan_children(
    args: &LauncherArgs,
    model: &ResolvedModel,
    world_size: usize,
) -> Result<(Vec<(ChildSpec, PathBuf)>, ChildSpec), String> {
    let (shard_bin, shard_prefix) = child_program("TESSERA_SHARD_BIN", "shard")?;
    let secret = group_secret()?;
    let mut shards = Vec::with_capacity(world_size);
    for rank in 0..world_size {
        let spec = ChildSpec {
            name: format!("shard {rank}"),
            program: shard_bin.clone(),
            args: [
                shard_prefix.clone(),
                shard_argv(&serve_args(args, model, rank, world_size)?)?,
            ]
            .concat(),
            env: shard_env(args, rank, world_size, &secret),
        };
        shards.push((spec, shard_socket(uds_prefix(args)?, rank)));
    }
    let (router_bin, router_prefix) = child_program("TESSERA_ROUTER_BIN", "router")?;
    let router = router_args(args, model)?;
    let router = ChildSpec {
        name: "router".into(),
        program: router_bin,
        args: [router_prefix, router_argv(&router)?].concat(),
        env: router_env(&router)?,
    };
    Ok((shards, router))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_router::args::ServerArgs;

    fn launcher(extra: &[&str]) -> LauncherArgs {
        let argv = ["tessera-launcher", "--shard-uds-path", "/tmp/t"]
            .iter()
            .chain(extra);
        LauncherArgs::try_parse_from(argv).expect("launcher args parse")
    }

    fn model() -> ResolvedModel {
        ResolvedModel {
            path: "/models/smol.gguf".into(),
            name: "smol".into(),
        }
    }

    /// Launcher flags → RouterArgs → argv → the router's own parser → the same values.
    #[test]
    fn router_argv_round_trips_launcher_flags() {
        let args = launcher(&[
            "--hostname=127.0.0.1",
            "--port=8081",
            "--api-key=k",
            "--payload-limit=1000",
            "--cors-allow-origin=http://a,http://b",
            "--max-concurrent-requests=7",
            "--max-best-of=1",
            "--max-stop-sequences=3",
            "--max-top-n-tokens=2",
            "--max-input-tokens=100",
            "--max-total-tokens=200",
            "--validation-workers=1",
            "--max-client-batch-size=2",
            "--max-batch-prefill-tokens=512",
            "--max-batch-total-tokens=4096",
            "--waiting-served-ratio=0.5",
            "--max-waiting-tokens=9",
            "--max-batch-size=4",
            "--otlp-endpoint=http://collector:4317",
        ]);
        let router = router_args(&args, &model()).unwrap();
        let argv = router_argv(&router).unwrap();
        assert!(!argv.iter().any(|a| a.contains("api-key")), "{argv:?}");
        assert!(router_env(&router)
            .unwrap()
            .contains(&("API_KEY".into(), "k".into())));
        let all = std::iter::once("tessera-router".to_string()).chain(argv);
        let parsed = RouterCli::try_parse_from(all).unwrap().router;
        assert_eq!(parsed.limits, args.limits);
        assert_eq!(parsed.batching, args.batching);
        assert_eq!(parsed.server.cors_allow_origin, ["http://a", "http://b"]);
        assert!(
            parsed.server.json_output,
            "children always log JSON for the launcher to re-emit"
        );
        assert_eq!(
            ServerArgs {
                json_output: false,
                api_key: Some("k".into()),
                ..parsed.server
            },
            args.server
        );
        assert_eq!(
            parsed.shard.master_shard_uds_path,
            PathBuf::from("/tmp/t-0")
        );
        assert_eq!(
            parsed.shard.tokenizer_name,
            PathBuf::from("/models/smol.gguf")
        );
        assert_eq!(parsed.shard.model_id.as_deref(), Some("smol"));
    }

    /// Launcher flags → ServeArgs → argv → the shard's own parser → the same values.
    #[test]
    fn shard_argv_round_trips_launcher_flags() {
        let args = launcher(&[
            "--device=cpu",
            "--dtype=bfloat16",
            "--kv-cache-memory=1000000",
            "--kv-cache-fraction=0.25",
            "--kv-cache-dtype=f16",
            "--max-batch-prefill-tokens=256",
            "--otlp-endpoint=http://collector:4317",
            "--otlp-service-name=tessera",
        ]);
        let serve = serve_args(&args, &model(), 1, 2).unwrap();
        let argv = shard_argv(&serve).unwrap();
        let parsed = ShardServeCli::try_parse_from(&argv).unwrap().serve;
        assert_eq!(parsed, serve);
        assert_eq!((parsed.rank, parsed.world_size), (1, 2));
        assert_eq!(parsed.model_id, PathBuf::from("/models/smol.gguf"));
        assert_eq!(
            parsed.socket(),
            PathBuf::from("/tmp/t-1"),
            "the launcher probes this socket"
        );
        assert_eq!(
            (parsed.device, parsed.dtype),
            (args.model.device, args.model.dtype)
        );
        assert_eq!(parsed.kv_cache_memory, Some(1_000_000));
        assert_eq!(parsed.kv_cache_fraction, 0.25);
        assert_eq!(
            parsed.kv_cache_dtype,
            tessera_shard::kv_cache::KvCacheDtype::F16
        );
        assert_eq!(parsed.max_batch_prefill_tokens, 256);
        assert_eq!(
            parsed.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert_eq!(parsed.otlp_service_name, "tessera");
    }

    #[test]
    fn shard_defaults_come_from_the_shard() {
        let serve = serve_args(&launcher(&[]), &model(), 0, 1).unwrap();
        let own = ShardServeCli::try_parse_from(["serve", "--model-id", "/m"])
            .unwrap()
            .serve;
        assert_eq!(serve.kv_cache_fraction, own.kv_cache_fraction);
        assert_eq!(serve.initial_kv_blocks, own.initial_kv_blocks);
        assert_eq!(serve.kv_cache_dtype, own.kv_cache_dtype);
    }

    #[test]
    fn one_spec_per_rank_with_its_socket_and_env() {
        let args = launcher(&["--num-shard=2", "--master-port=1234"]);
        let (shards, router) = plan_children(&args, &model(), 2).unwrap();
        assert_eq!(shards.len(), 2);
        assert_eq!(shards[1].1, PathBuf::from("/tmp/t-1"));
        assert_eq!(shards[1].0.name, "shard 1");
        assert!(shards[1].0.env.contains(&("RANK".into(), "1".into())));
        assert!(shards[1]
            .0
            .env
            .contains(&("MASTER_PORT".into(), "1234".into())));
        // One secret for the whole group, in the environment and nowhere on argv.
        let secret = |rank: usize| {
            let env = &shards[rank].0.env;
            let var = env
                .iter()
                .find(|(k, _)| k == tessera_shard::comm::SECRET_ENV);
            var.map(|(_, v)| v.clone()).unwrap()
        };
        assert_eq!(secret(0), secret(1));
        assert_eq!(secret(0).len(), 64);
        assert!(!shards[0].0.args.iter().any(|a| a.contains(&secret(0))));
        let (again, _) = plan_children(&args, &model(), 2).unwrap();
        let other = again[0]
            .0
            .env
            .iter()
            .find(|(k, _)| k.starts_with("TESSERA_TP"));
        assert_ne!(other.unwrap().1, secret(0), "a fresh secret per launch");
        assert_eq!(router.name, "router");
        // The launcher runs itself as each child.
        let exe = std::env::current_exe().unwrap();
        assert_eq!(
            (&shards[0].0.program, &shards[0].0.args[..2]),
            (&exe, &["shard".to_string(), "serve".to_string()][..])
        );
        assert_eq!((&router.program, router.args[0].as_str()), (&exe, "router"));
    }

    #[test]
    fn the_default_socket_directory_is_private_fresh_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let (a, b) = (
            private_dir(base.path()).unwrap(),
            private_dir(base.path()).unwrap(),
        );
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        let sockets = SocketDir::for_launch(None).unwrap();
        let dir = sockets.prefix().parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        // A socket a shard left behind goes with the directory.
        let socket = shard_socket(sockets.prefix(), 0);
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        drop(sockets);
        drop(listener);
        assert!(!dir.exists(), "{} remains", dir.display());
        let given = SocketDir::for_launch(Some(Path::new("/srv/t"))).unwrap();
        assert_eq!(given.prefix(), Path::new("/srv/t"));
    }

    #[test]
    fn logged_command_lines_hide_the_api_key() {
        assert_eq!(
            redact("router --api-key s3cret --port 1 --api-key=s3cret"),
            "router --api-key [redacted] --port 1 --api-key=[redacted]"
        );
    }
}
