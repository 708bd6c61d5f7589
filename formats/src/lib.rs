//! Model files shared by router and shard: GGUF containers, tokenizers (HF folder or GGUF), chat templates.
//!
//! - [`gguf`]: validated, memory-mapped GGUF reader with dequantization to f32.
//! - [`tokenizer`]: `tokenizers::Tokenizer` from `tokenizer.json` or from GGUF vocabulary metadata.
//! - [`chat_template`]: Hugging Face chat templates rendered as transformers does.
//! - [`grammar`]: JSON-schema and regex grammars compiled to per-token masks (constrained decoding).
//! - [`model_files`]: what a model path is (HF folder or GGUF file).
//! - [`heap`]: the allocator settings of a process that loads model files.

pub mod chat_template;
pub mod error;
pub mod gguf;
pub mod grammar;
pub mod heap;
pub mod model_files;
pub mod tokenizer;

pub use error::{Error, Result};

/// A model file's bytes: a read-only map of the file, or a buffer handed in by the caller (tests and
/// fuzzing). The GGUF and safetensors readers parse either the same way.
pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Drops the mapped pages of `len` bytes at `offset` from this process's resident memory, once
    /// a reader has copied out what it needs: loading then never holds the whole file beside the
    /// weights it became (a lower peak RSS). The page cache keeps them, and a later read of the
    /// range maps them again. Best effort; owned bytes stay.
    pub fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        if let FileBytes::Mapped(mmap) = self {
            // SAFETY: the mapping is private, read-only and file-backed: dropped pages are re-read
            // from the file on the next access, so no reference ever observes different bytes.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
            };
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// Reads a UTF-8 text file, refusing one larger than `cap` bytes before reading it (model folders
/// are untrusted input; a huge JSON file would cost several times its size once parsed).
pub fn read_capped(path: &std::path::Path, cap: u64) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > cap {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            len,
            cap,
        });
    }
    let mut text = String::with_capacity(len as usize);
    // `take` keeps a file that grows while read inside the cap too.
    file.take(cap)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    Ok(text)
}
