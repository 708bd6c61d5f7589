//! Per-request next-token choice: logits processors (logit bias, grammar mask, repetition, frequency
//! and presence penalties, watermark), warpers (temperature, top-k, top-p, min-p, typical-p) and
//! greedy or seeded multinomial choice, as TGI's `NextTokenChooser` (itself following transformers'
//! processors) does it.
//!
//! Reported logprobs (of the chosen token and of the `top_n_tokens` alternatives) are those of the raw
//! model distribution, before penalties and warpers, so they mean the same thing whatever the sampling
//! parameters (TGI reports post-warper values, a known source of confusion).

use crate::backend::cpu::exp_in_place;
use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_proto::v3::{GrammarType, NextTokenChooserParameters};

use crate::Error;
use tessera_formats::grammar::{Constraint, Grammar, GrammarKind};

/// Kirchenbauer et al. watermark constants, as TGI's defaults.
const WATERMARK_GAMMA: f32 = 0.5;
const WATERMARK_DELTA: f32 = 2.0;
const WATERMARK_HASH_KEY: u64 = 15_485_863;

/// Validated sampling parameters. Proto3 sends 0 for an unset float, so 0 means "off" for
/// temperature, top_p, typical_p and repetition_penalty; negative or non-finite values are errors.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub typical_p: f32,
    pub do_sample: bool,
    pub seed: u64,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub watermark: bool,
    /// Min-p cut-off in [0, 1]; 0 is off.
    pub min_p: f32,
    /// (token id, bias) added to the logits first, ids ascending.
    pub logit_bias: Vec<(u32, f32)>,
    /// The grammar the output must follow, compiled when the request is built.
    pub grammar: Option<Grammar>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            watermark: false,
            min_p: 0.0,
            logit_bias: Vec::new(),
            grammar: None,
        }
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        field: format!("parameters.{field}"),
        reason: reason.into(),
    }
}

/// `0` → `default`; otherwise `value` must be finite and satisfy `ok`.
fn unset_or(
    field: &str,
    value: f32,
    default: f32,
    ok: impl Fn(f32) -> bool,
    rule: &str,
) -> Result<f32, Error> {
    if value == 0.0 {
        Ok(default)
    } else if value.is_finite() && ok(value) {
        Ok(value)
    } else {
        Err(invalid(field, format!("must be {rule}, got {value}")))
    }
}

impl SamplingParams {
    /// Validates the wire parameters; an absent message means greedy decoding. The router's
    /// `router/src/validation.rs` is the single source of request validity and refuses all of
    /// this first; these checks guard against router bugs and foreign routers.
    pub fn from_proto(p: Option<&NextTokenChooserParameters>) -> Result<Self, Error> {
        let Some(p) = p else {
            return Ok(SamplingParams::default());
        };
        // As TGI's shard: a grammar applies when its text is not empty.
        let grammar = match (GrammarType::try_from(p.grammar_type), p.grammar.is_empty()) {
            (_, true) | (Ok(GrammarType::None), _) => None,
            (Ok(GrammarType::Json), false) => Some(GrammarKind::Json),
            (Ok(GrammarType::Regex), false) => Some(GrammarKind::Regex),
            (Err(_), false) => {
                return Err(invalid(
                    "grammar_type",
                    format!("unknown grammar type {}", p.grammar_type),
                ))
            }
        }
        .map(|kind| Grammar {
            kind,
            source: p.grammar.clone(),
        });
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err(invalid(
                "min_p",
                format!("must be in [0, 1], got {}", p.min_p),
            ));
        }
        let mut logit_bias: Vec<(u32, f32)> = p.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
        if let Some((t, b)) = logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(invalid(
                "logit_bias",
                format!("the bias of token {t} must be in [-100, 100], got {b}"),
            ));
        }
        logit_bias.sort_by_key(|&(t, _)| t);
        for (field, v) in [
            ("frequency_penalty", p.frequency_penalty),
            ("presence_penalty", p.presence_penalty),
        ] {
            if !v.is_finite() || !(-2.0..=2.0).contains(&v) {
                return Err(invalid(field, format!("must be in [-2, 2], got {v}")));
            }
        }
        Ok(SamplingParams {
            temperature: unset_or("temperature", p.temperature, 1.0, |v| v > 0.0, "> 0")?,
            top_k: p.top_k as usize,
            top_p: unset_or("top_p", p.top_p, 1.0, |v| v > 0.0 && v <= 1.0, "in (0, 1]")?,
            typical_p: unset_or(
                "typical_p",
                p.typical_p,
                1.0,
                |v| v > 0.0 && v <= 1.0,
                "in (0, 1]",
            )?,
            do_sample: p.do_sample,
            seed: p.seed,
            repetition_penalty: unset_or(
                "repetition_penalty",
                p.repetition_penalty,
                1.0,
                |v| v > 0.0,
                "> 0",
            )?,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            watermark: p.watermark,
            min_p: p.min_p,
            logit_bias,
            grammar,
        })
    }

    /// Any warper turns sampling on, as in TGI (a temperature without `do_sample` still samples).
    pub fn is_sampling(&self) -> bool {
        self.do_sample
            || self.temperature != 1.0
            || self.top_k != 0
            || self.top_p < 1.0
            || self.typical_p < 1.0
            || self.min_p > 0.0
    }
}

/// One chosen token with the raw logprob, and the `top_n` most likely alternatives (id, logprob).
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Per-request chooser. It owns its RNG, so a seeded request gives the same tokens whatever batch
/// it runs in, and it remembers prompt and output tokens for the penalties.
pub struct Sampler {
    /// The grammar's state, when the request has one.
    constraint: Option<Constraint>,
    params: SamplingParams,
    sampling: bool,
    rng: StdRng,
    top_n: usize,
    /// Tokens of prompt and output (repetition penalty).
    seen: HashSet<u32>,
    /// Generated-token counts (frequency penalty).
    counts: HashMap<u32, u32>,
    /// Last token of prompt or output (watermark green list seed).
    last: Option<u32>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("constrained", &self.constraint.is_some())
            .finish_non_exhaustive()
    }
}

impl Sampler {
    pub fn new(
        params: SamplingParams,
        prompt: &[u32],
        top_n: usize,
        constraint: Option<Constraint>,
    ) -> Self {
        Sampler {
            constraint,
            sampling: params.is_sampling(),
            rng: StdRng::seed_from_u64(params.seed),
            params,
            top_n,
            seen: prompt.iter().copied().collect(),
            counts: HashMap::new(),
            last: prompt.last().copied(),
        }
    }

    /// The seed to report: only a sampling request has one.
    pub fn seed(&self) -> Option<u64> {
        self.sampling.then_some(self.params.seed)
    }

    /// Computes the grammar's mask for the next token, if any (run it alongside the forward).
    pub fn prepare(&mut self) {
        if let Some(c) = &mut self.constraint {
            c.prepare();
        }
    }

    /// Why the grammar stopped constraining this request, if llguidance failed mid-generation.
    pub fn grammar_failure(&self) -> Option<&str> {
        self.constraint.as_ref().and_then(Constraint::failure)
    }

    /// Chooses the next token from one row of logits and records it as generated.
    pub fn choose(&mut self, logits: &[f32]) -> Result<Choice, Error> {
        if logits.is_empty() {
            return Err(Error::Sampling("empty logits row".into()));
        }
        let norm = LogSoftmax::of(logits);
        let id = if self.is_plain_greedy() {
            // Nothing changes the scores: no vocabulary-sized copy per token.
            argmax(logits)
        } else {
            let mut scores = logits.to_vec();
            for &(t, bias) in &self.params.logit_bias {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s += bias;
                }
            }
            if let Some(c) = &mut self.constraint {
                c.mask().apply(&mut scores);
            }
            self.apply_processors(&mut scores);
            if self.sampling {
                apply_warpers(&self.params, &mut scores);
                sample(&scores, &mut self.rng)
            } else {
                argmax(&scores)
            }
        };
        let top = match self.top_n {
            0 => Vec::new(),
            n => top_n(&norm.row(logits), n),
        };
        let choice = Choice {
            id,
            logprob: norm.logprob(logits[id as usize]),
            top,
        };
        self.record(id);
        Ok(choice)
    }

    /// Records `id` as generated without choosing it (a resumed request's earlier tokens): the
    /// RNG draws what `choose` would have, so a seeded request continues as if never paused.
    pub fn replay(&mut self, id: u32) {
        if self.sampling {
            let _: f64 = self.rng.gen();
        }
        self.record(id);
    }

    fn record(&mut self, id: u32) {
        if let Some(c) = &mut self.constraint {
            c.commit(id);
        }
        self.seen.insert(id);
        *self.counts.entry(id).or_insert(0) += 1;
        self.last = Some(id);
    }

    /// Greedy with no bias, grammar or penalty: the choice is the raw logits' argmax.
    fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        !self.sampling
            && self.constraint.is_none()
            && p.logit_bias.is_empty()
            && p.repetition_penalty == 1.0
            && p.frequency_penalty == 0.0
            && p.presence_penalty == 0.0
            && !p.watermark
    }

    fn apply_processors(&self, scores: &mut [f32]) {
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            for &t in &self.seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s > 0.0 { *s / penalty } else { *s * penalty };
                }
            }
        }
        // OpenAI penalties count generated tokens only: frequency per occurrence, presence once.
        let (freq, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq != 0.0 || presence != 0.0 {
            for (&t, &n) in &self.counts {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s -= freq * n as f32 + presence;
                }
            }
        }
        if let (true, Some(last)) = (self.params.watermark, self.last) {
            watermark(scores, last);
        }
    }
}

/// Adds `WATERMARK_DELTA` to a green list of `gamma × vocab` tokens drawn from an RNG seeded by the
/// previous token (Kirchenbauer et al., 2023).
fn watermark(scores: &mut [f32], last: u32) {
    let vocab = scores.len();
    let green = (vocab as f32 * WATERMARK_GAMMA) as usize;
    let mut rng = StdRng::seed_from_u64(WATERMARK_HASH_KEY.wrapping_mul(last as u64));
    let mut perm: Vec<u32> = (0..vocab as u32).collect();
    for i in 0..green {
        let j = rng.gen_range(i..vocab);
        perm.swap(i, j);
        scores[perm[i] as usize] += WATERMARK_DELTA;
    }
}

/// Temperature, then top-k, top-p, min-p and typical-p; filtered tokens become `-inf`.
fn apply_warpers(p: &SamplingParams, scores: &mut [f32]) {
    if p.temperature != 1.0 {
        scores.iter_mut().for_each(|s| *s /= p.temperature);
    }
    if p.top_k > 0 && p.top_k < scores.len() {
        let mut sorted = scores.to_vec();
        sorted.select_nth_unstable_by(p.top_k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[p.top_k - 1];
        scores
            .iter_mut()
            .filter(|s| **s < kth)
            .for_each(|s| *s = f32::NEG_INFINITY);
    }
    if p.top_p < 1.0 {
        top_p(scores, p.top_p);
    }
    if p.min_p > 0.0 {
        min_p(scores, p.min_p);
    }
    if p.typical_p < 1.0 {
        typical_p(scores, p.typical_p);
    }
}

/// Keeps the tokens whose probability is at least `min_p` times the most likely one's (Nguyen et
/// al., 2024), as transformers' `MinPLogitsWarper`: in logits, `s >= max + ln(min_p)`.
fn min_p(scores: &mut [f32], min_p: f32) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = max + min_p.ln();
    scores
        .iter_mut()
        .filter(|s| **s < floor)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// Keeps the smallest most-likely set whose probability reaches `p` (always at least one token).
fn top_p(scores: &mut [f32], p: f32) {
    let probs = softmax(scores);
    let order = sorted_desc(&probs);
    let mut cum = 0.0f64;
    let mut keep = order.len();
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i] as f64;
        if cum >= p as f64 {
            keep = rank + 1;
            break;
        }
    }
    for &i in &order[keep..] {
        scores[i] = f32::NEG_INFINITY;
    }
}

/// Locally typical sampling (Meister et al., 2022): keeps the tokens whose surprisal is closest to
/// the entropy until their mass reaches `mass`, as transformers' `TypicalLogitsWarper`.
fn typical_p(scores: &mut [f32], mass: f32) {
    let logp = log_softmax(scores);
    let entropy: f64 = logp
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| -(l as f64) * (l as f64).exp())
        .sum();
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| logp[i].is_finite()).collect();
    let shift = |i: usize| ((-logp[i] as f64) - entropy).abs();
    order.sort_by(|&a, &b| shift(a).total_cmp(&shift(b)));
    let mut cum = 0.0f64;
    let mut keep = order.len();
    for (rank, &i) in order.iter().enumerate() {
        cum += (logp[i] as f64).exp();
        if cum >= mass as f64 {
            keep = rank + 1;
            break;
        }
    }
    for &i in &order[keep..] {
        scores[i] = f32::NEG_INFINITY;
    }
}

/// Multinomial draw from `softmax(scores)` with the request's RNG.
fn sample(scores: &[f32], rng: &mut StdRng) -> u32 {
    let probs = softmax(scores);
    let r: f64 = rng.gen::<f64>();
    let mut cum = 0.0f64;
    let mut last_positive = argmax(scores);
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p as f64;
            last_positive = i as u32;
            if r < cum {
                return i as u32;
            }
        }
    }
    // Rounding can leave the total a hair under r: the last token with mass takes it.
    last_positive
}

/// Index of the largest score; NaN never wins, ties go to the lowest id (as torch.argmax).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] || scores[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Numerically stable log-softmax; `-inf` stays `-inf`, NaN logits count as `-inf`.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    LogSoftmax::of(logits).row(logits)
}

/// A row's log-softmax without the row: `logprob(v) = (v − max) − ln Σ exp(v − max)`, NaN logits
/// counting as `-inf` (and every logprob `-inf` when no logit is finite). One element costs a
/// subtraction, so a token's logprob needs no vocabulary-sized buffer.
#[derive(Debug, Clone, Copy)]
pub struct LogSoftmax {
    max: f32,
    ln_sum: f32,
}

impl LogSoftmax {
    pub fn of(logits: &[f32]) -> Self {
        let max = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let mut norm = LogSoftmax { max, ln_sum: 0.0 };
        if !max.is_finite() {
            return norm;
        }
        // The vocabulary-wide sum is the sampling hot spot: vectorised f32 exp over a small
        // scratch block of shifted logits, summed in f64.
        let mut scratch = [0f32; 1024];
        let mut sum = 0f64;
        for chunk in logits.chunks(scratch.len()) {
            let e = &mut scratch[..chunk.len()];
            for (x, &v) in e.iter_mut().zip(chunk) {
                *x = norm.shifted(v);
            }
            exp_in_place(e);
            sum += e.iter().map(|&x| x as f64).sum::<f64>();
        }
        norm.ln_sum = sum.ln() as f32;
        norm
    }

    /// `v − max`, NaN as `-inf`.
    fn shifted(&self, v: f32) -> f32 {
        if v.is_nan() {
            f32::NEG_INFINITY
        } else {
            v - self.max
        }
    }

    /// The log-probability of a logit `v` of this row.
    pub fn logprob(&self, v: f32) -> f32 {
        if self.max.is_finite() {
            self.shifted(v) - self.ln_sum
        } else {
            f32::NEG_INFINITY
        }
    }

    /// The whole row's log-probabilities.
    pub fn row(&self, logits: &[f32]) -> Vec<f32> {
        logits.iter().map(|&v| self.logprob(v)).collect()
    }
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    log_softmax(scores).into_iter().map(f32::exp).collect()
}

fn sorted_desc(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order
}

/// The `n` highest logprobs, best first.
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..logprobs.len()).collect();
    let n = n.min(order.len());
    let cmp = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b));
    if n < order.len() {
        order.select_nth_unstable_by(n - 1, cmp);
        order.truncate(n);
    }
    order.sort_by(cmp);
    order.into_iter().map(|i| (i as u32, logprobs[i])).collect()
}

#[cfg(test)]
mod tests;
