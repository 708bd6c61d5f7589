//! What a model path points at: a Hugging Face folder (with `config.json`) or a single GGUF file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The kind of model found at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// A Hugging Face layout: `config.json`, safetensors, tokenizer files.
    HfDir { dir: PathBuf },
    /// One GGUF file holding weights, tokenizer and chat template.
    Gguf { file: PathBuf },
}

impl ModelFiles {
    /// Classifies `path`: a directory must hold `config.json`; a file must start with the GGUF magic.
    pub fn resolve(path: &Path) -> Result<ModelFiles> {
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(ModelFiles::HfDir {
                    dir: path.to_path_buf(),
                });
            }
            return Err(Error::NotAModel {
                path: path.to_path_buf(),
            });
        }
        if path.is_file() && has_gguf_magic(path)? {
            return Ok(ModelFiles::Gguf {
                file: path.to_path_buf(),
            });
        }
        Err(Error::NotAModel {
            path: path.to_path_buf(),
        })
    }

    /// The path this model was resolved from.
    pub fn path(&self) -> &Path {
        match self {
            ModelFiles::HfDir { dir } => dir,
            ModelFiles::Gguf { file } => file,
        }
    }
}

/// Whether the file starts with "GGUF" (checked by content, not by extension).
fn has_gguf_magic(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_folders_and_gguf_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let msg = ModelFiles::resolve(d).unwrap_err().to_string();
        assert!(
            msg.contains(&*d.to_string_lossy()) && msg.contains("config.json"),
            "{msg}"
        );
        std::fs::write(d.join("config.json"), "{}").unwrap();
        assert_eq!(
            ModelFiles::resolve(d).unwrap(),
            ModelFiles::HfDir {
                dir: d.to_path_buf()
            }
        );
        let g = d.join("m.gguf");
        std::fs::write(&g, b"GGUF\x03\0\0\0").unwrap();
        assert_eq!(
            ModelFiles::resolve(&g).unwrap(),
            ModelFiles::Gguf { file: g.clone() }
        );
        let bad = d.join("x.bin");
        std::fs::write(&bad, b"GG").unwrap();
        assert!(matches!(
            ModelFiles::resolve(&bad),
            Err(Error::NotAModel { .. })
        ));
        let missing = d.join("absent");
        let msg = ModelFiles::resolve(&missing).unwrap_err().to_string();
        assert!(msg.contains("absent"), "{msg}");
    }
}
