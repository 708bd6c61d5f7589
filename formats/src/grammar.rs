//! Constrained decoding: TGI's `json` and `regex` grammars compiled by llguidance against a tokenizer's
//! byte vocabulary (cached by source), and the per-request [`Constraint`] that masks each step's logits.
//!
//! The router compiles a request's grammar (and computes its first mask) while validating, so a bad
//! grammar is a 422 before any forward; the shard compiles it again for the tokens. llguidance's
//! fuel limits bound both the compile and every step's mask, so no grammar can hang a process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::Value;
use tokenizers::Tokenizer;

/// Compiled grammars kept per process (a cache hit skips schema translation and lexer setup).
const CACHE_ENTRIES: usize = 256;

/// What a grammar's source is (the v3 `GrammarType` values 1 and 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrammarKind {
    /// A JSON schema, as JSON text.
    Json,
    /// A regular expression the whole output must match.
    Regex,
}

/// A request's grammar: its kind and source text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grammar {
    pub kind: GrammarKind,
    pub source: String,
}

/// Why a grammar cannot constrain this model, in llguidance's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// llguidance's reason on one line (its messages may span several; ours go into logs and HTTP bodies).
fn err(e: impl std::fmt::Display) -> GrammarError {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    GrammarError(lines.join("; "))
}

/// Compiles grammars for one tokenizer; shared by all requests of a process.
pub struct GrammarCompiler {
    factory: ParserFactory,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    parsers: HashMap<Grammar, TokenParser>,
    order: VecDeque<Grammar>,
}

impl GrammarCompiler {
    /// `vocab_size` is the model's logits width (at least the tokenizer's); `eos` are the ids that
    /// end a generation (the first is the one llguidance allows once the grammar accepts).
    pub fn new(
        tokenizer: &Tokenizer,
        vocab_size: usize,
        eos: &[u32],
    ) -> Result<Self, GrammarError> {
        let words = token_bytes(tokenizer, vocab_size)?;
        let first_eos = *eos
            .first()
            .ok_or_else(|| err("the model has no end-of-sequence token"))?;
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ByteVocab {
            trie,
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(err)?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // The whole schema's error, not the tokens so far, is what a client needs.
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(GrammarCompiler {
            factory,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// A compiler that only judges grammars ([`GrammarCompiler::check`]), for a process that does not
    /// know the model's end-of-sequence ids: any id stands in, since it only changes which mask
    /// allows it, not whether a grammar compiles.
    pub fn validator(tokenizer: &Tokenizer) -> Result<Self, GrammarError> {
        Self::new(tokenizer, tokenizer.get_vocab_size(true), &[0])
    }

    /// A fresh constraint for `grammar`, from the cache when this source was compiled before.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let cached = self
            .lock()
            .parsers
            .get(grammar)
            .map(TokenParser::deep_clone);
        let parser = match cached {
            Some(p) => p,
            None => {
                let parser = self
                    .factory
                    .create_parser(top_level(grammar)?)
                    .map_err(err)?;
                let mut cache = self.lock();
                if cache.order.len() >= CACHE_ENTRIES {
                    if let Some(old) = cache.order.pop_front() {
                        cache.parsers.remove(&old);
                    }
                }
                if cache
                    .parsers
                    .insert(grammar.clone(), parser.deep_clone())
                    .is_none()
                {
                    cache.order.push_back(grammar.clone());
                }
                parser
            }
        };
        Ok(Constraint {
            matcher: Matcher::new(Ok(parser)),
            mask: None,
            eos: self.factory.tok_env().tok_trie().eos_token_set(),
            failure: None,
        })
    }

    /// Compiles `grammar` and computes its first mask: everything that can fail before the first
    /// token (schema, regex, size and fuel limits, a language with no valid first token).
    pub fn check(&self, grammar: &Grammar) -> Result<(), GrammarError> {
        let mask = self.compile(grammar)?.try_mask()?;
        if mask.num_set() == 0 {
            return Err(err("the grammar allows no output"));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A panic elsewhere cannot leave the cache inconsistent: recover it.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn top_level(grammar: &Grammar) -> Result<TopLevelGrammar, GrammarError> {
    match grammar.kind {
        GrammarKind::Json => {
            let schema: Value = serde_json::from_str(&grammar.source)
                .map_err(|e| err(format!("the JSON schema is not JSON: {e}")))?;
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(err("a JSON schema must be an object or a boolean"));
            }
            Ok(TopLevelGrammar::from_json_schema(schema))
        }
        GrammarKind::Regex => Ok(TopLevelGrammar::from_regex(&grammar.source)),
    }
}

/// The allowed next tokens of one request as a bitset over the vocabulary.
pub struct TokenMask(SimpleVob);

impl TokenMask {
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// Sets every disallowed logit (and every id past the mask) to `-inf`.
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX {
                continue;
            }
            for (b, logit) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// One request's grammar state: the mask for its next token, advanced by each chosen token. It never
/// fails outward: should llguidance fail mid-generation (a step past its fuel), the reason is kept
/// and only end-of-sequence is allowed from then on, so the request ends instead of its batch.
pub struct Constraint {
    matcher: Matcher,
    /// The mask for the next token, once computed (dropped by [`Constraint::commit`]).
    mask: Option<TokenMask>,
    eos: SimpleVob,
    failure: Option<String>,
}

impl Constraint {
    fn try_mask(&mut self) -> Result<SimpleVob, GrammarError> {
        self.matcher.compute_mask_or_eos().map_err(err)
    }

    /// Computes the next token's mask (once per step; call ahead of the forward to overlap it).
    /// A complete grammar allows only end-of-sequence.
    pub fn prepare(&mut self) {
        if self.mask.is_some() {
            return;
        }
        let mask = match self.failure {
            Some(_) => self.eos.clone(),
            None => self.try_mask().unwrap_or_else(|e| {
                self.failure = Some(e.0);
                self.eos.clone()
            }),
        };
        self.mask = Some(TokenMask(mask));
    }

    /// The next token's mask.
    pub fn mask(&mut self) -> &TokenMask {
        self.prepare();
        self.mask.as_ref().expect("prepared above")
    }

    /// Advances past the chosen token.
    pub fn commit(&mut self, token: u32) {
        self.mask = None;
        if self.failure.is_none() {
            if let Err(e) = self.matcher.consume_token(token) {
                self.failure = Some(err(e).0);
            }
        }
    }

    /// The grammar is complete: nothing but end-of-sequence may follow.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Why the grammar stopped constraining, if llguidance failed mid-generation.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
}

/// The byte string of every token id below `vocab_size` (empty for ids the tokenizer does not
/// have, which are then never allowed); special tokens carry llguidance's marker byte.
pub fn token_bytes(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Vec<Vec<u8>>, GrammarError> {
    let form = ByteForm::of(tokenizer)?;
    let mut words = vec![Vec::new(); vocab_size.max(tokenizer.get_vocab_size(true))];
    for (piece, id) in tokenizer.get_vocab(false) {
        if let Some(w) = words.get_mut(id as usize) {
            *w = form.bytes(&piece);
        }
    }
    for (id, added) in tokenizer.get_added_tokens_decoder() {
        let Some(w) = words.get_mut(id as usize) else {
            continue;
        };
        *w = added.content.into_bytes();
        if added.special {
            w.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
        }
    }
    Ok(words)
}

/// How a vocabulary piece spells its bytes, read off the tokenizer's decoder.
enum ByteForm {
    /// GPT-2's printable stand-ins for the 256 bytes.
    ByteLevel(HashMap<char, u8>),
    /// SentencePiece: `<0xNN>` pieces are bytes, `space` stands for ' '.
    ByteFallback { space: char },
}

impl ByteForm {
    fn of(tokenizer: &Tokenizer) -> Result<ByteForm, GrammarError> {
        let decoder = serde_json::to_value(tokenizer.get_decoder()).map_err(err)?;
        let parts: Vec<&Value> = match decoder["type"].as_str() {
            Some("Sequence") => decoder["decoders"]
                .as_array()
                .map(|d| d.iter().collect())
                .unwrap_or_default(),
            _ => vec![&decoder],
        };
        let kind = |t: &str| parts.iter().any(|p| p["type"] == t);
        if kind("ByteLevel") {
            return Ok(ByteForm::ByteLevel(byte_level_chars()));
        }
        let space = parts
            .iter()
            .find_map(|p| match p["type"].as_str() {
                Some("Replace") if p["content"] == " " => p["pattern"]["String"].as_str(),
                Some("Metaspace") => p["replacement"].as_str(),
                _ => None,
            })
            .and_then(|s| s.chars().next());
        match (kind("ByteFallback") || kind("Metaspace"), space) {
            (true, Some(space)) => Ok(ByteForm::ByteFallback { space }),
            _ => Err(err(format!(
                "grammars need a byte-level or SentencePiece vocabulary; this tokenizer's decoder is {}",
                decoder["type"]
            ))),
        }
    }

    fn bytes(&self, piece: &str) -> Vec<u8> {
        match self {
            ByteForm::ByteLevel(map) => piece
                .chars()
                .map(|c| map.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                // A piece outside the byte alphabet (an added word) spells itself.
                .unwrap_or_else(|| piece.as_bytes().to_vec()),
            ByteForm::ByteFallback { space } => {
                let hex = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => vec![b],
                    None => piece.replace(*space, " ").into_bytes(),
                }
            }
        }
    }
}

/// GPT-2's byte-to-character table, inverted: printable Latin-1 bytes stand for themselves, the
/// others for the characters from U+0100 on, in byte order.
fn byte_level_chars() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below U+0200")
            };
            (c, b)
        })
        .collect()
}

/// The tokenizer environment llguidance asks for: our trie, and the real tokenizer for text.
struct ByteVocab {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for ByteVocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}
