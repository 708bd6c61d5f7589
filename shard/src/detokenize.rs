//! UTF-8-safe incremental detokenization with prefix/read offsets, as TGI's `decode_token`: each
//! new token's text is `decode(ids[prefix..]) - decode(ids[prefix..read])`, withheld while it ends
//! in an incomplete character (U+FFFD), so streamed pieces never split a character and add up to
//! the full decode. A few prompt tokens are kept as context so decoders that strip a leading space
//! or merge byte-fallback tokens see what came before.

use std::collections::HashSet;

use tokenizers::Tokenizer;

use crate::Error;

/// Prompt tokens kept as decoding context (TGI uses 5).
const CONTEXT_TOKENS: usize = 5;

/// Streaming decoder state of one request.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    /// Prompt context followed by every generated id.
    ids: Vec<u32>,
    /// Number of context ids at the front of `ids`.
    context: usize,
    /// Start of the ids decoded for comparison.
    prefix_offset: usize,
    /// End of the ids whose text has already been streamed.
    read_offset: usize,
}

fn decode(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Result<String, Error> {
    tok.decode(ids, skip_special)
        .map_err(|e| Error::Tokenizer(format!("decode failed: {e}")))
}

impl Detokenizer {
    /// Starts after `prompt` (only its last few ids are kept).
    pub fn new(prompt: &[u32]) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        Detokenizer {
            ids: tail.to_vec(),
            context: tail.len(),
            prefix_offset: 0,
            read_offset: tail.len(),
        }
    }

    /// Generated ids so far.
    pub fn generated(&self) -> &[u32] {
        &self.ids[self.context..]
    }

    /// Adds one generated token; returns the text it completes (empty while a character is still
    /// incomplete). Special tokens are rendered, as TGI streams them.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, Error> {
        self.ids.push(id);
        let prefix = decode(tok, &self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = decode(tok, &self.ids[self.prefix_offset..], false)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new) = suffix_after(&full, &prefix) else {
            return Ok(String::new());
        };
        let new = new.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(new)
    }

    /// The whole generated text, decoded once with the prompt context (so a leading space
    /// survives), special tokens skipped: the `generated_text` of a finished request.
    pub fn full_text(&self, tok: &Tokenizer) -> Result<String, Error> {
        let prefix = decode(tok, &self.ids[..self.context], true)?;
        let full = decode(tok, &self.ids, true)?;
        Ok(suffix_after(&full, &prefix).unwrap_or(&full).to_string())
    }
}

/// `full` without its leading `prefix`; if the decoder rewrote the prefix (cleanup rules), the
/// text past `prefix.len()` bytes when that is a character boundary, else `None` (wait for more).
fn suffix_after<'a>(full: &'a str, prefix: &str) -> Option<&'a str> {
    full.strip_prefix(prefix)
        .or_else(|| full.get(prefix.len()..))
}

/// Ids of the tokenizer's special added tokens (`Tokens.is_special`).
pub fn special_ids(tok: &Tokenizer) -> HashSet<u32> {
    tok.get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(path: &std::path::Path) -> Tokenizer {
        Tokenizer::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// stories260K's tokenizer from the third-party data folder (`$TESSERA_SHARED`, else
    /// `../shared` beside the repository), or `None` after printing that the test is skipped.
    fn stories260k() -> Option<Tokenizer> {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let base = std::env::var_os("TESSERA_SHARED")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| repo.join("../shared"));
        let path = base.join("models/stories260K/tokenizer.json");
        if !path.exists() {
            eprintln!("skipped: {} not found", path.display());
            return None;
        }
        Some(load(&path))
    }

    /// SmolLM2's tokenizer, as converted by the setup step (`bash tests/fetch-models.sh`).
    fn smollm2() -> Tokenizer {
        load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../.cache/models/smollm2-hf-float32/tokenizer.json"),
        )
    }

    /// Streams `continuation`'s ids after `prompt`'s and checks every piece is whole characters
    /// and the pieces add up to what a full decode adds after the prompt.
    fn check_stream(tok: &Tokenizer, prompt: &str, continuation: &str) {
        let p = tok.encode(prompt, true).unwrap().get_ids().to_vec();
        let all = tok
            .encode(format!("{prompt}{continuation}"), true)
            .unwrap()
            .get_ids()
            .to_vec();
        let common = p.iter().zip(&all).take_while(|(a, b)| a == b).count();
        let (prompt_ids, gen) = all.split_at(common);
        let mut d = Detokenizer::new(prompt_ids);
        let mut streamed = String::new();
        for &id in gen {
            let piece = d.push(tok, id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "half a character in {piece:?}");
            streamed.push_str(&piece);
        }
        let full = tok.decode(&all, false).unwrap();
        let before = tok.decode(prompt_ids, false).unwrap();
        assert_eq!(
            streamed,
            full[before.len()..],
            "prompt {prompt:?} + {continuation:?}"
        );
        assert_eq!(d.generated(), gen);
        assert_eq!(d.full_text(tok).unwrap(), streamed);
    }

    const CASES: &[(&str, &str)] = &[
        ("Once upon a time", " there was a little girl."),
        ("Hello", " world  with  double spaces\nand lines"),
        ("Café", " crème brûlée à la française, naïve Zoë"),
        ("Emoji", " 🦀 crabs 🎉🎉 and 👩‍👩‍👧 families"),
        ("CJK", " 日本語のテキスト と 中文"),
        ("Mixed", " ünïcödé → ∑ x² ≠ ∞"),
    ];

    #[test]
    fn stories260k_byte_fallback_streams_whole_characters() {
        let Some(tok) = stories260k() else { return };
        for (p, c) in CASES {
            check_stream(&tok, p, c);
        }
    }

    #[test]
    fn smollm2_byte_level_streams_whole_characters() {
        let tok = smollm2();
        for (p, c) in CASES {
            check_stream(&tok, p, c);
        }
    }

    #[test]
    fn stories260k_reference_continuation_keeps_its_leading_space() {
        // reference.txt: "Once upon a time" → these 20 greedy ids.
        let Some(tok) = stories260k() else { return };
        let gen = [
            432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410,
            408, 419, 292,
        ];
        let mut d = Detokenizer::new(&[1, 403, 407, 261, 378]);
        let text: String = gen.iter().map(|&i| d.push(&tok, i).unwrap()).collect();
        assert_eq!(
            text,
            ", there was a little girl named Lily. She loved to play outsid"
        );
        assert_eq!(d.full_text(&tok).unwrap(), text);
    }

    #[test]
    fn special_tokens_stream_but_are_skipped_in_full_text() {
        let tok = smollm2();
        let end = tok.token_to_id("<|im_end|>").unwrap();
        assert!(special_ids(&tok).contains(&end));
        let mut d = Detokenizer::new(&[504]);
        let mut streamed = String::new();
        for id in tok
            .encode(" Paris.", false)
            .unwrap()
            .get_ids()
            .iter()
            .chain([&end])
        {
            streamed.push_str(&d.push(&tok, *id).unwrap());
        }
        assert_eq!(streamed, " Paris.<|im_end|>");
        assert_eq!(d.full_text(&tok).unwrap(), " Paris.");
    }

    #[test]
    fn an_unfinished_character_is_withheld_not_lost() {
        let Some(tok) = stories260k() else { return };
        // "🦀" is not in this 512-token vocabulary: four byte-fallback tokens.
        let ids = tok.encode("🦀", false).unwrap().get_ids().to_vec();
        let bytes: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| tok.id_to_token(i).unwrap().starts_with("<0x"))
            .collect();
        assert_eq!(bytes.len(), 4, "{ids:?}");
        let mut d = Detokenizer::new(&[1, 403]);
        for &b in &bytes[..3] {
            assert_eq!(d.push(&tok, b).unwrap(), "");
        }
        assert_eq!(d.push(&tok, bytes[3]).unwrap(), "🦀");
    }
}
