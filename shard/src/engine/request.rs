//! One request held by the engine: its tokens, KV placement (router-assigned blocks and slots),
//! prefill progress, sampler, stop criteria and detokenizer, and what each forward adds to it.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use tessera_formats::grammar::{Constraint, GrammarCompiler};

use tokenizers::Tokenizer;

use super::types::{Finished, GenerationOut, NewRequest, TokenOut};
use crate::detokenize::Detokenizer;
use crate::forward::{LogitsWanted, SeqInput};
use crate::sampling::{LogSoftmax, Sampler};
use crate::stopping::StoppingCriteria;
use crate::Error;

/// What a request needs from the engine to be built and advanced.
pub(super) struct Ctx {
    pub tokenizer: Tokenizer,
    pub special: HashSet<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Blocks of the current KV cache (the engine updates it when warmup resizes the cache).
    pub num_blocks: usize,
    pub block_size: usize,
    pub max_positions: usize,
    pub vocab_size: usize,
    /// Grammar compiler for this tokenizer, built in the background at start (see [`Ctx::prepare_grammars`]).
    pub grammars: Arc<OnceLock<Result<Arc<GrammarCompiler>, String>>>,
}

/// The grammar compiler of a tokenizer, or why its vocabulary cannot carry grammars.
fn grammar_compiler(
    tokenizer: &Tokenizer,
    vocab_size: usize,
    eos: &[u32],
) -> Result<Arc<GrammarCompiler>, String> {
    GrammarCompiler::new(tokenizer, vocab_size, eos)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

impl Ctx {
    /// Builds the grammar compiler on a background thread (its token trie takes ≈ 0.2 s on a
    /// 49k vocabulary), so the first constrained request does not stall its batch for it.
    pub fn prepare_grammars(&self) {
        let (cell, tokenizer) = (self.grammars.clone(), self.tokenizer.clone());
        let (vocab_size, eos) = (self.vocab_size, self.eos_token_ids.clone());
        let spawned = std::thread::Builder::new()
            .name("grammar-setup".into())
            .spawn(move || {
                cell.get_or_init(|| grammar_compiler(&tokenizer, vocab_size, &eos));
            });
        if let Err(e) = spawned {
            tracing::warn!("grammar setup thread: {e}; the first grammar request builds it");
        }
    }

    /// The constraint of a request's grammar (`None` without one); a grammar that does not compile
    /// refuses the request with llguidance's reason.
    fn constraint(&self, req: &NewRequest) -> Result<Option<Constraint>, Error> {
        let Some(grammar) = &req.sampling.grammar else {
            return Ok(None);
        };
        let compiler = self.grammars.get_or_init(|| {
            grammar_compiler(&self.tokenizer, self.vocab_size, &self.eos_token_ids)
        });
        let refuse = |reason: String| invalid("parameters.grammar", reason);
        let compiler = compiler.as_ref().map_err(|e| refuse(e.clone()))?;
        compiler
            .compile(grammar)
            .map(Some)
            .map_err(|e| refuse(e.to_string()))
    }
}

fn invalid(field: &str, reason: String) -> Error {
    Error::InvalidArgument {
        field: field.to_string(),
        reason,
    }
}

/// A request in a batch. Invariant: `computed <= tokens.len()`, and every slot lies inside the
/// block of its position (the router grants more blocks as the request grows; a forward checks
/// that its tokens have slots).
#[derive(Debug)]
pub(super) struct Seq {
    pub id: u64,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    /// Tokens the prefill computes: the prompt, and the generated tokens of a resumed request.
    prompt_len: usize,
    /// Position of the first generated token (the prompt's length).
    generated_from: usize,
    /// Tokens whose KV is in the cache.
    computed: usize,
    blocks: Vec<u32>,
    slots: Vec<u32>,
    /// Size of the first forward (chunk_len or the whole uncached prompt); `None` afterwards.
    first_chunk: Option<usize>,
    sampler: Sampler,
    stopper: StoppingCriteria,
    detok: Detokenizer,
    prefill_logprobs: bool,
    prefill_out: Vec<TokenOut>,
    /// Logprob of `tokens[computed]` from the previous chunk's last row (NaN when unknown).
    carried_logprob: f32,
}

impl Seq {
    /// Tokenizes and validates a new request against the cache and the model's limits. The
    /// prompt and length rules mirror `router/src/validation.rs` (the single source of request
    /// validity); block, slot and chunk rules check the router's own placement.
    pub fn new(req: NewRequest, ctx: &Ctx) -> Result<Seq, Error> {
        let prompt = tokenize(&req, &ctx.tokenizer)?;
        let max_new = req.stop.max_new_tokens as usize;
        // The last generated token is never fed back, so it needs no position and no slot.
        // Saturating: `max_new_tokens` comes off the wire.
        let positions = prompt.len().saturating_add(max_new).saturating_sub(1);
        if positions > ctx.max_positions {
            return Err(invalid(
                "stopping_parameters.max_new_tokens",
                format!(
                    "{} prompt tokens + {max_new} new tokens exceed the model's {} positions",
                    prompt.len(),
                    ctx.max_positions
                ),
            ));
        }
        // A resumed request computes its generated tokens with the prompt.
        let tokens: Vec<u32> = prompt.iter().chain(&req.generated).copied().collect();
        // The router may reserve KV up front (TGI) or grant it as the request grows: the
        // slots must cover at least what the prefill computes.
        let slots = placement(&req.blocks, &req.slots, tokens.len(), ctx)?;
        let cache_len = req.cache_len as usize;
        if cache_len >= tokens.len() {
            return Err(invalid(
                "cache_len",
                format!(
                    "{cache_len} cached tokens leave nothing to compute of a {}-token prompt",
                    tokens.len()
                ),
            ));
        }
        if req.chunk_len == Some(0) {
            return Err(invalid("chunk_len", "must be at least 1".into()));
        }
        let constraint = ctx.constraint(&req)?;
        let uncached = tokens.len() - cache_len;
        let first = req
            .chunk_len
            .map_or(uncached, |c| (c as usize).min(uncached));
        let mut seq = Seq {
            id: req.id,
            sampler: Sampler::new(req.sampling, &prompt, req.top_n_tokens as usize, constraint),
            stopper: StoppingCriteria::new(req.stop, &ctx.eos_token_ids),
            detok: Detokenizer::new(&prompt),
            prompt_len: tokens.len(),
            generated_from: prompt.len(),
            tokens,
            computed: cache_len,
            blocks: req.blocks,
            slots,
            first_chunk: Some(first),
            prefill_logprobs: req.prefill_logprobs,
            prefill_out: Vec::new(),
            carried_logprob: f32::NAN,
        };
        // Positions past the router's slots but inside its blocks are held too (KV on demand
        // grows into them before granting another block).
        seq.grant(&[], ctx.block_size);
        seq.replay(&req.generated, ctx)?;
        Ok(seq)
    }

    /// Brings sampler, stop criteria and detokenizer to where they stood after generating
    /// `generated`, as if this shard had chosen each token.
    fn replay(&mut self, generated: &[u32], ctx: &Ctx) -> Result<(), Error> {
        for (i, &id) in generated.iter().enumerate() {
            if id as usize >= ctx.vocab_size {
                return Err(invalid(
                    "generated_ids",
                    format!("token {id} is past the vocabulary ({})", ctx.vocab_size),
                ));
            }
            self.sampler.replay(id);
            let text = self.detok.push(&ctx.tokenizer, id)?;
            if let Some(reason) = self.stopper.check(id, &text) {
                return Err(invalid(
                    "generated_ids",
                    format!("the request already finished at token {i} ({reason:?})"),
                ));
            }
        }
        Ok(())
    }

    /// Appends granted blocks to the block table; their slots follow it.
    pub fn grant(&mut self, blocks: &[u32], block_size: usize) {
        self.blocks.extend_from_slice(blocks);
        let end = self.blocks.len() * block_size;
        let start = self.slots.len();
        self.slots
            .extend((start..end).map(|p| {
                self.blocks[p / block_size] * block_size as u32 + (p % block_size) as u32
            }));
    }

    /// Whether the next `n` tokens have KV slots.
    pub fn has_slots(&self, n: usize) -> bool {
        self.computed + n <= self.slots.len()
    }

    /// KV capacity reserved for this request.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }

    /// Tokens this request computes in the next forward. A prefill continuation draws on the
    /// shared `budget`; the first chunk was budgeted by the router and a decode step is one token.
    pub fn next_len(&self, budget: &mut usize) -> usize {
        let pending = self.tokens.len() - self.computed;
        if let Some(first) = self.first_chunk {
            return first;
        }
        if self.computed >= self.prompt_len {
            return pending;
        }
        let n = pending.min(*budget);
        *budget -= n;
        n
    }

    /// The forward input for the next `n` tokens.
    pub fn input(&self, n: usize) -> SeqInput {
        let end = self.computed + n;
        let reaches_end = end == self.tokens.len();
        let wants_prompt = self.prefill_logprobs && self.computed < self.prompt_len;
        let logits = match (wants_prompt, reaches_end) {
            (true, _) => LogitsWanted::All,
            (false, true) => LogitsWanted::Last,
            (false, false) => LogitsWanted::None,
        };
        SeqInput {
            tokens: self.tokens[self.computed..end].to_vec(),
            start_pos: self.computed,
            slots: self.slots[self.computed..end].to_vec(),
            block_table: self.blocks.clone(),
            logits,
            decoded_from: Some(self.generated_from),
        }
    }

    /// Gets the next token's grammar mask ready when a forward of `n` tokens ends in a choice; the
    /// engine runs this beside the forward.
    pub fn prepare_choice(&mut self, n: usize) {
        if n > 0 && self.computed + n == self.tokens.len() {
            self.sampler.prepare();
        }
    }

    /// Records a forward of `n` tokens that returned `rows` (flattened, `vocab` wide) and, once
    /// the prompt is done, chooses the next token.
    pub fn advance(
        &mut self,
        n: usize,
        rows: &[f32],
        ctx: &Ctx,
    ) -> Result<Option<GenerationOut>, Error> {
        let vocab = ctx.vocab_size;
        let start = self.computed;
        self.computed += n;
        self.first_chunk = None;
        if self.prefill_logprobs && start < self.prompt_len {
            self.record_prompt_logprobs(start, n, rows, ctx)?;
        }
        if self.computed < self.tokens.len() {
            return Ok(None);
        }
        let last = rows
            .len()
            .checked_sub(vocab)
            .map(|at| &rows[at..])
            .ok_or_else(|| Error::Sampling(format!("request {}: no logits returned", self.id)))?;
        let constrained = self.sampler.grammar_failure().is_none();
        let choice = self.sampler.choose(last)?;
        if let (true, Some(reason)) = (constrained, self.sampler.grammar_failure()) {
            tracing::warn!(
                request_id = self.id,
                "grammar failed, ending the request: {reason}"
            );
        }
        self.tokens.push(choice.id);
        let text = self.detok.push(&ctx.tokenizer, choice.id)?;
        let reason = self.stopper.check(choice.id, &text);
        let token = TokenOut {
            id: choice.id,
            logprob: choice.logprob,
            text,
            special: ctx.special.contains(&choice.id),
        };
        let top = choice
            .top
            .iter()
            .map(|&(id, logprob)| token_out(id, logprob, ctx))
            .collect::<Result<_, _>>()?;
        let finished = match reason {
            Some(reason) => Some(Finished {
                text: self.detok.full_text(&ctx.tokenizer)?,
                generated_tokens: self.stopper.generated(),
                reason,
                seed: self.sampler.seed(),
            }),
            None => None,
        };
        let prefill = (self.prefill_logprobs && self.stopper.generated() == 1)
            .then(|| std::mem::take(&mut self.prefill_out));
        Ok(Some(GenerationOut {
            request_id: self.id,
            prefill,
            token,
            top,
            finished,
        }))
    }

    /// Logprobs of the prompt tokens this chunk covers: row `i` predicts position `start + i + 1`.
    fn record_prompt_logprobs(
        &mut self,
        start: usize,
        n: usize,
        rows: &[f32],
        ctx: &Ctx,
    ) -> Result<(), Error> {
        let vocab = ctx.vocab_size;
        if rows.len() != n * vocab {
            return Err(Error::Sampling(format!(
                "request {}: expected {n} logits rows, got {} values",
                self.id,
                rows.len()
            )));
        }
        let row_logprob = |i: usize, token: u32| {
            let row = &rows[i * vocab..(i + 1) * vocab];
            LogSoftmax::of(row).logprob(row[token as usize])
        };
        let end = (start + n).min(self.prompt_len);
        for p in start..end {
            let logprob = match p {
                0 => f32::NAN,
                p if p == start => self.carried_logprob,
                p => row_logprob(p - 1 - start, self.tokens[p]),
            };
            self.prefill_out
                .push(token_out(self.tokens[p], logprob, ctx)?);
        }
        if end < self.prompt_len {
            self.carried_logprob = row_logprob(n - 1, self.tokens[end]);
        }
        Ok(())
    }
}

fn token_out(id: u32, logprob: f32, ctx: &Ctx) -> Result<TokenOut, Error> {
    let text = ctx
        .tokenizer
        .decode(&[id], false)
        .map_err(|e| Error::Tokenizer(format!("decode of token {id} failed: {e}")))?;
    Ok(TokenOut {
        id,
        logprob,
        text,
        special: ctx.special.contains(&id),
    })
}

/// Prompt tokens of `req` after truncation (what [`Seq::new`] will hold).
pub(super) fn prompt_len(req: &NewRequest, ctx: &Ctx) -> Result<usize, Error> {
    tokenize(req, &ctx.tokenizer).map(|t| t.len())
}

/// Prompt ids, truncated to the last `truncate` tokens when asked.
fn tokenize(req: &NewRequest, tokenizer: &Tokenizer) -> Result<Vec<u32>, Error> {
    if req.inputs.is_empty() {
        return Err(invalid("inputs", "cannot be empty".into()));
    }
    let encoding = tokenizer
        .encode(req.inputs.as_str(), req.add_special_tokens)
        .map_err(|e| invalid("inputs", format!("tokenization failed: {e}")))?;
    let ids = encoding.get_ids();
    let keep = match req.truncate as usize {
        0 => ids.len(),
        t => t.min(ids.len()),
    };
    if keep == 0 {
        return Err(invalid("inputs", "tokenizes to no tokens".into()));
    }
    Ok(ids[ids.len() - keep..].to_vec())
}

/// The slot of every position below `positions`, checked against the block table and the cache.
fn placement(
    blocks: &[u32],
    slots: &[u32],
    positions: usize,
    ctx: &Ctx,
) -> Result<Vec<u32>, Error> {
    let bs = ctx.block_size;
    if let Some(&b) = blocks.iter().find(|&&b| b as usize >= ctx.num_blocks) {
        return Err(invalid(
            "blocks",
            format!("block {b} is past the KV cache ({} blocks)", ctx.num_blocks),
        ));
    }
    let slots: Vec<u32> = if slots.is_empty() {
        (0..blocks.len() * bs)
            .map(|p| blocks[p / bs] * bs as u32 + (p % bs) as u32)
            .collect()
    } else {
        slots.to_vec()
    };
    if slots.len() < positions {
        return Err(invalid(
            "slots",
            format!(
                "{} slots for the {positions} positions of the prompt",
                slots.len()
            ),
        ));
    }
    for (p, &s) in slots.iter().take(positions).enumerate() {
        let block = blocks.get(p / bs).copied();
        if block != Some(s / bs as u32) {
            return Err(invalid(
                "slots",
                format!("slot {s} of position {p} is not in block {block:?} of the block table"),
            ));
        }
    }
    Ok(slots)
}
