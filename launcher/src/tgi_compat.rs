//! TGI launcher flags on a Tessera command line: the one table of what the launcher does with each TGI flag
//! its own parser does not define (ignore with a warning, rename, accept one value, refuse), applied to
//! argv and to the flags' environment variables before clap parses, so a copied TGI command line starts.

use std::ffi::OsString;

/// What the launcher does with a TGI flag it does not define itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Accepted and dropped with a warning; the text says what Tessera does instead.
    Ignore(&'static str),
    /// TGI's older name of a Tessera flag: passed on under the new name.
    Rename(&'static str),
    /// Accepted when its value equals the one Tessera always uses (compared as numbers), refused otherwise.
    OnlyValue(&'static str, &'static str),
    /// Refused: it would change results and Tessera does not implement it; the text says what to do.
    Refuse(&'static str),
}

/// One TGI launcher flag Tessera's parser does not define.
#[derive(Debug, Clone, Copy)]
pub struct TgiFlag {
    /// The long name, without `--`.
    pub long: &'static str,
    pub short: Option<char>,
    /// Whether it takes a value (`--flag value` / `--flag=value`); otherwise it is a switch.
    pub takes_value: bool,
    /// The environment variable TGI also reads it from (none where the name is too generic to trust).
    pub env: Option<&'static str>,
    pub action: Action,
}

const fn flag(
    long: &'static str,
    takes_value: bool,
    env: Option<&'static str>,
    action: Action,
) -> TgiFlag {
    TgiFlag {
        long,
        short: None,
        takes_value,
        env,
        action,
    }
}

const NO_NGROK: &str = "no ngrok tunnel (TGI's own ngrok support is not functional either); \
                        put a tunnel or proxy in front of --port";
const OWN_ROPE: &str =
    "Tessera applies the `rope_scaling` of the model's config.json; edit it there";

/// TGI's launcher flags (reference/tgi.md §5.1) that Tessera's launcher does not define, and what happens
/// to each. Every other TGI flag is in `SUPPORTED` and means the same here.
pub const TGI_FLAGS: &[TgiFlag] = &[
    flag(
        "trust-remote-code",
        false,
        Some("TRUST_REMOTE_CODE"),
        Action::Ignore("Tessera runs only its own model code; nothing from the model repository is executed"),
    ),
    flag(
        "max-input-length",
        true,
        Some("MAX_INPUT_LENGTH"),
        Action::Rename("max-input-tokens"),
    ),
    flag(
        "cuda-memory-fraction",
        true,
        Some("CUDA_MEMORY_FRACTION"),
        Action::Ignore("the KV cache is sized by --kv-cache-fraction or --kv-cache-memory"),
    ),
    flag(
        "usage-stats",
        true,
        Some("USAGE_STATS"),
        Action::Ignore("Tessera sends no usage statistics"),
    ),
    flag(
        "disable-custom-kernels",
        false,
        Some("DISABLE_CUSTOM_KERNELS"),
        Action::Ignore("Tessera has no optional custom kernels to turn off"),
    ),
    flag(
        "cuda-graphs",
        true,
        Some("CUDA_GRAPHS"),
        Action::Ignore("Tessera does not capture CUDA graphs"),
    ),
    TgiFlag {
        short: Some('e'),
        // `ENV` is a shell variable (sh's startup file), not a request to print the environment.
        ..flag(
            "env",
            false,
            None,
            Action::Ignore("the launcher logs the model, the device and every child's command line at startup"),
        )
    },
    flag(
        "speculate",
        true,
        Some("SPECULATE"),
        Action::Ignore("Tessera decodes one token per step, without speculation; outputs do not depend on it"),
    ),
    flag(
        "weights-cache-override",
        true,
        Some("WEIGHTS_CACHE_OVERRIDE"),
        Action::Ignore("weights come from --model-id (a local folder, a .gguf file, or the Hub cache); pass that folder as --model-id"),
    ),
    flag(
        "enable-prefill-logprobs",
        false,
        Some("ENABLE_PREFILL_LOGPROBS"),
        Action::Ignore("prompt log-probabilities are always returned when a request asks (decoder_input_details)"),
    ),
    flag(
        "watermark-gamma",
        true,
        Some("WATERMARK_GAMMA"),
        Action::OnlyValue("0.5", "Tessera's watermark uses TGI's default gamma, 0.5"),
    ),
    flag(
        "watermark-delta",
        true,
        Some("WATERMARK_DELTA"),
        Action::OnlyValue("2.0", "Tessera's watermark uses TGI's default delta, 2.0"),
    ),
    flag(
        "rope-scaling",
        true,
        Some("ROPE_SCALING"),
        Action::Refuse(OWN_ROPE),
    ),
    flag("rope-factor", true, Some("ROPE_FACTOR"), Action::Refuse(OWN_ROPE)),
    flag(
        "lora-adapters",
        true,
        Some("LORA_ADAPTERS"),
        Action::Refuse("LoRA adapters are not supported; merge the adapter into the weights"),
    ),
    flag(
        "tokenizer-config-path",
        true,
        Some("TOKENIZER_CONFIG_PATH"),
        Action::Refuse("the chat template comes from the model (tokenizer_config.json, chat_template.jinja or GGUF metadata)"),
    ),
    flag("ngrok", false, Some("NGROK"), Action::Refuse(NO_NGROK)),
    flag(
        "ngrok-authtoken",
        true,
        Some("NGROK_AUTHTOKEN"),
        Action::Refuse(NO_NGROK),
    ),
    flag("ngrok-edge", true, Some("NGROK_EDGE"), Action::Refuse(NO_NGROK)),
];

/// TGI launcher flags Tessera's launcher defines with TGI's meaning: the rest of the audit, checked
/// against the parser by a test (clap handles them, so nothing else reads this list).
#[cfg(test)]
const SUPPORTED: &[&str] = &[
    "model-id",
    "revision",
    "validation-workers",
    "sharded",
    "num-shard",
    "quantize",
    "dtype",
    "max-concurrent-requests",
    "max-best-of",
    "max-stop-sequences",
    "max-top-n-tokens",
    "max-input-tokens",
    "max-total-tokens",
    "waiting-served-ratio",
    "max-batch-prefill-tokens",
    "max-batch-total-tokens",
    "max-waiting-tokens",
    "max-batch-size",
    "hostname",
    "port",
    "shard-uds-path",
    "master-addr",
    "master-port",
    "huggingface-hub-cache",
    "json-output",
    "cors-allow-origin",
    "api-key",
    "max-client-batch-size",
    "payload-limit",
    "graceful-termination-timeout",
    "prometheus-port",
    "otlp-endpoint",
    "otlp-service-name",
    "kv-cache-dtype",
];

/// The table as text for `--help`, so the generated configuration reference lists every TGI flag too.
pub fn help() -> String {
    let mut text = String::from(
        "TGI launcher flags this launcher does not define (also read from their environment variables):\n",
    );
    for tgi in TGI_FLAGS {
        let what = match tgi.action {
            Action::Ignore(instead) => format!("accepted and ignored with a warning: {instead}"),
            Action::Rename(to) => format!("read as --{to}"),
            Action::OnlyValue(value, why) => format!("accepted only as {value}: {why}"),
            Action::Refuse(why) => format!("refused: {why}"),
        };
        text.push_str(&format!("  --{}: {what}\n", tgi.long));
    }
    text
}

/// argv ready for the launcher's parser, and one warning per TGI flag accepted without effect.
#[derive(Debug, PartialEq)]
pub struct Translated {
    pub argv: Vec<OsString>,
    pub warnings: Vec<String>,
}

/// Applies `TGI_FLAGS` to `argv` (program name first) and to their variables in `env`; `Err` is the
/// message of a refused flag.
pub fn translate(
    argv: Vec<OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Translated, String> {
    let mut out = Translated {
        argv: Vec::with_capacity(argv.len()),
        warnings: Vec::new(),
    };
    let mut seen: Vec<&'static TgiFlag> = Vec::new();
    let mut args = argv.into_iter();
    out.argv.extend(args.next());
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else {
            out.argv.push(arg);
            continue;
        };
        if text == "--" {
            out.argv.push(arg);
            out.argv.extend(args.by_ref());
            break;
        }
        let Some((tgi, inline)) = lookup(text) else {
            out.argv.push(arg);
            continue;
        };
        let value = match (tgi.takes_value, inline) {
            (true, Some(v)) => Some(v.to_string()),
            (true, None) => match args.next().and_then(|v| v.into_string().ok()) {
                Some(v) => Some(v),
                None => return Err(format!("--{} needs a value", tgi.long)),
            },
            (false, Some(v)) if !truthy(v) => continue,
            (false, _) => None,
        };
        seen.push(tgi);
        apply(tgi, &format!("--{}", tgi.long), value, &mut out)?;
    }
    let mut from_env = Vec::new();
    for tgi in TGI_FLAGS
        .iter()
        .filter(|t| !seen.iter().any(|s| s.long == t.long))
    {
        let Some(name) = tgi.env else { continue };
        let Some(value) = env(name).filter(|v| !v.is_empty()) else {
            continue;
        };
        if tgi.takes_value {
            apply(tgi, name, Some(value), &mut out)?;
        } else if truthy(&value) {
            apply(tgi, name, None, &mut out)?;
        } else {
            continue;
        }
        from_env.push(tgi);
    }
    for tgi in seen.into_iter().chain(from_env) {
        check_rename(tgi, &out.argv, &env)?;
    }
    Ok(out)
}

/// The table entry `arg` names (`--long`, `--long=value`, `-s`), with its inline value.
fn lookup(arg: &str) -> Option<(&'static TgiFlag, Option<&str>)> {
    if let Some(long) = arg.strip_prefix("--") {
        let (name, inline) = match long.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (long, None),
        };
        return TGI_FLAGS
            .iter()
            .find(|t| t.long == name)
            .map(|t| (t, inline));
    }
    let mut chars = arg.strip_prefix('-')?.chars();
    let (short, rest) = (chars.next()?, chars.as_str());
    let tgi = TGI_FLAGS.iter().find(|t| t.short == Some(short))?;
    rest.is_empty().then_some((tgi, None))
}

fn truthy(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "" | "1" | "true" | "yes" | "on"
    )
}

/// One occurrence of `tgi` (written `given`: the flag or its variable) with its value.
fn apply(
    tgi: &TgiFlag,
    given: &str,
    value: Option<String>,
    out: &mut Translated,
) -> Result<(), String> {
    let shown = match &value {
        Some(v) => format!("{given} {v}"),
        None => given.to_string(),
    };
    match tgi.action {
        Action::Ignore(instead) => out
            .warnings
            .push(format!("ignoring TGI's {shown}: {instead}")),
        Action::Rename(to) => {
            out.argv.push(format!("--{to}").into());
            out.argv.extend(value.map(OsString::from));
            out.warnings.push(format!(
                "{given} is TGI's older name of --{to}; passing it on as --{to}"
            ));
        }
        Action::OnlyValue(only, why) => {
            let number = |v: &str| v.trim().parse::<f64>().ok();
            let given_value = value.as_deref().and_then(number);
            if given_value.is_none() || given_value != number(only) {
                return Err(format!("{shown} is not supported: {why}"));
            }
            out.warnings
                .push(format!("{shown} accepted: {why}, the same"));
        }
        Action::Refuse(why) => return Err(format!("TGI's {shown} is not supported: {why}")),
    }
    Ok(())
}

/// A renamed flag (given as a flag or variable) and its new name both given: TGI refuses this too, and
/// clap's message would name only the new flag.
fn check_rename(
    tgi: &TgiFlag,
    argv: &[OsString],
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    let Action::Rename(to) = tgi.action else {
        return Ok(());
    };
    let new = format!("--{to}");
    let inline = format!("{new}=");
    let given = argv
        .iter()
        .filter_map(|a| a.to_str())
        .filter(|a| *a == new || a.starts_with(&inline))
        .count();
    let new_env = to.to_ascii_uppercase().replace('-', "_");
    if given > 1 || env(&new_env).is_some_and(|v| !v.is_empty()) {
        return Err(format!(
            "--{} (TGI's older name) and --{to} are both given; keep --{to}",
            tgi.long
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::LauncherArgs;
    use clap::{CommandFactory, Parser};

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Translated, String> {
        let argv = std::iter::once("tessera-launcher")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        translate(argv, |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    fn strings(t: &Translated) -> Vec<String> {
        t.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The table is honest: supported flags are the launcher's own; table flags are not (the table
    /// would hide them from clap).
    #[test]
    fn table_and_launcher_flags_do_not_overlap() {
        let command = LauncherArgs::command();
        let own = |long: &str| command.get_arguments().any(|a| a.get_long() == Some(long));
        for long in SUPPORTED {
            assert!(own(long), "--{long} is listed as supported but not defined");
        }
        for tgi in TGI_FLAGS {
            assert!(
                !own(tgi.long),
                "--{} is defined; drop it from the table",
                tgi.long
            );
            if let Some(short) = tgi.short {
                assert!(command
                    .get_arguments()
                    .all(|a| a.get_short() != Some(short)));
            }
            if let Action::Rename(to) = tgi.action {
                assert!(own(to), "--{} renames to undefined --{to}", tgi.long);
            }
        }
    }

    /// A TGI deployment's command line (TGI's docs: sharded Llama with legacy limits) parses.
    #[test]
    fn tgi_command_line_parses_with_warnings() {
        let t = run(
            &[
                "--model-id",
                "meta-llama/Llama-3.1-8B-Instruct",
                "--sharded",
                "false",
                "--dtype",
                "bfloat16",
                "--trust-remote-code",
                "--max-input-length=1024",
                "--max-total-tokens",
                "2048",
                "--cuda-memory-fraction",
                "0.9",
                "--usage-stats",
                "off",
                "--disable-custom-kernels",
                "--cuda-graphs",
                "1,2,4",
                "-e",
                "--watermark-gamma",
                "0.50",
                "--payload-limit",
                "4000000",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(t.warnings.len(), 8, "{:#?}", t.warnings);
        assert!(t.warnings[0].starts_with("ignoring TGI's --trust-remote-code: "));
        let args = LauncherArgs::try_parse_from(&t.argv).unwrap();
        assert_eq!(args.limits.max_input_tokens, Some(1024));
        assert_eq!(args.limits.max_total_tokens, Some(2048));
        assert_eq!(args.model.dtype, crate::args::WeightDtype::Bf16);
        assert_eq!(args.sharding.sharded, Some(false));
        assert_eq!(args.server.payload_limit, 4_000_000);
    }

    #[test]
    fn result_changing_flags_are_refused() {
        let err = run(&["--lora-adapters", "org/adapter"], &[]).unwrap_err();
        assert!(
            err.contains("--lora-adapters org/adapter is not supported"),
            "{err}"
        );
        assert!(run(&["--rope-scaling=dynamic"], &[]).is_err());
        assert!(run(&["--watermark-delta", "3"], &[]).is_err());
        assert!(run(&["--ngrok"], &[]).is_err());
        assert!(run(&["--speculate"], &[])
            .unwrap_err()
            .contains("needs a value"));
    }

    /// `--kv-cache-dtype` is the launcher's own (bf16, f16, f32); TGI's fp8 values reach its
    /// parser, which refuses them by name.
    #[test]
    fn fp8_kv_cache_is_refused_by_name() {
        let t = run(&["--kv-cache-dtype", "fp8_e5m2"], &[]).unwrap();
        let err = LauncherArgs::try_parse_from(&t.argv)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--kv-cache-dtype fp8_e5m2 is not supported") && err.contains("bf16"),
            "{err}"
        );
        let t = run(&["--kv-cache-dtype=f16"], &[]).unwrap();
        let args = LauncherArgs::try_parse_from(&t.argv).unwrap();
        assert_eq!(
            args.model.kv_cache_dtype,
            Some(crate::args::KvCacheDtype::F16)
        );
    }

    #[test]
    fn environment_variables_count_like_flags() {
        let err = run(&[], &[("LORA_ADAPTERS", "a")]).unwrap_err();
        assert!(err.contains("LORA_ADAPTERS a is not supported"), "{err}");
        let t = run(&[], &[("TRUST_REMOTE_CODE", "true"), ("ENV", "/etc/shrc")]).unwrap();
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(run(&[], &[("NGROK", "false")]).is_ok());
        let t = run(&[], &[("MAX_INPUT_LENGTH", "100")]).unwrap();
        assert_eq!(
            strings(&t),
            ["tessera-launcher", "--max-input-tokens", "100"]
        );
        // The flag wins over the variable, as clap's own flags do.
        let t = run(&["--usage-stats", "off"], &[("USAGE_STATS", "on")]).unwrap();
        assert_eq!(t.warnings.len(), 1);
    }

    #[test]
    fn renamed_flag_with_its_new_name_is_refused() {
        let err = run(
            &["--max-input-length", "10", "--max-input-tokens", "10"],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("both given"), "{err}");
        assert!(run(&["--max-input-length", "10"], &[("MAX_INPUT_TOKENS", "9")]).is_err());
        assert!(run(&["--max-input-tokens", "10"], &[]).is_ok());
    }

    #[test]
    fn other_arguments_pass_through_untouched() {
        let args = [
            "--model-id",
            "m",
            "--trust-remote-code=false",
            "--",
            "--ngrok",
        ];
        let t = run(&args, &[]).unwrap();
        assert_eq!(
            strings(&t),
            ["tessera-launcher", "--model-id", "m", "--", "--ngrok"]
        );
        assert!(t.warnings.is_empty());
    }
}
