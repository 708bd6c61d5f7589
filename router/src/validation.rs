//! Request validation (TGI's `validation.rs`, checks in TGI's order with its messages): parameter ranges,
//! tokenization on blocking workers, truncation and the token limits. Produces a `ValidRequest`.
//!
//! This module is the single source of request validity. A request that passes it must pass every
//! per-request check of the shard (tessera-shard's `SamplingParams::from_proto`,
//! `StopParams::from_proto` and `Seq::new`), so a shard refusal only ever means a router bug or a
//! foreign router; a new shard rule belongs here first. `validation/proptests.rs` throws extreme
//! values at every parameter and holds whatever passes against the shard's own checks.
//!
//! Every user number is handled with checked or saturating arithmetic: a value past any limit is a
//! validation error, never a wrap.

use crate::api::{GenerateParameters, GrammarParam};
use crate::error::{Result, RouterError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tessera_formats::grammar::{Grammar, GrammarCompiler, GrammarKind};
use tessera_proto::v3;
use tokenizers::{Encoding, Tokenizer};
use tokio::sync::Semaphore;

/// Per-request limits (from the arguments and the shards' Warmup). Invariant kept by startup:
/// `max_total_tokens` is within the model's positions, so a request within it fits the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_top_n_tokens: u32,
    pub max_input_tokens: u32,
    pub max_total_tokens: u32,
    /// Requests may carry a grammar (not `--disable-grammar-support`).
    pub grammar_support: bool,
}

/// A request that passed validation: what the batcher schedules.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub inputs: String,
    /// Prompt ids after truncation.
    pub input_ids: Vec<u32>,
    pub truncate: u32,
    pub add_special_tokens: bool,
    pub decoder_input_details: bool,
    pub top_n_tokens: u32,
    pub parameters: v3::NextTokenChooserParameters,
    pub stopping: v3::StoppingCriteriaParameters,
    /// Admission priority under `--scheduling-policy priority` (lower first).
    pub priority: i32,
    /// When the HTTP request arrived (TTFT is measured from here).
    pub arrived: Instant,
}

#[derive(Clone)]
pub struct Validation {
    tokenizer: Arc<Tokenizer>,
    workers: Arc<Semaphore>,
    /// Judges grammars against this tokenizer; built on the first request with one.
    grammars: Arc<OnceLock<std::result::Result<GrammarCompiler, String>>>,
    pub limits: Limits,
}

impl Validation {
    pub fn new(tokenizer: Tokenizer, workers: usize, limits: Limits) -> Self {
        Validation {
            tokenizer: Arc::new(tokenizer),
            workers: Arc::new(Semaphore::new(workers.max(1))),
            grammars: Arc::default(),
            limits,
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Tokenize on a blocking worker (at most `validation_workers` at once), off the async threads.
    pub async fn tokenize(&self, text: String, add_special_tokens: bool) -> Result<Encoding> {
        let _permit = self
            .workers
            .acquire()
            .await
            .map_err(|e| RouterError::Tokenizer(e.to_string()))?;
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || tokenizer.encode(text, add_special_tokens))
            .await
            .map_err(|e| RouterError::Tokenizer(e.to_string()))?
            .map_err(|e| RouterError::Tokenizer(e.to_string()))
    }

    /// Compiles the request's grammar and computes its first mask on a blocking worker, so a bad
    /// grammar (or one past llguidance's size and fuel limits) is a 422 before any forward.
    async fn check_grammar(&self, parameters: &v3::NextTokenChooserParameters) -> Result<()> {
        let Some(grammar) = shard_grammar(parameters) else {
            return Ok(());
        };
        let _permit = self
            .workers
            .acquire()
            .await
            .map_err(|e| RouterError::InvalidGrammar(e.to_string()))?;
        let (tokenizer, grammars) = (self.tokenizer.clone(), self.grammars.clone());
        tokio::task::spawn_blocking(move || {
            let compiler = grammars
                .get_or_init(|| GrammarCompiler::validator(&tokenizer).map_err(|e| e.to_string()))
                .as_ref()
                .map_err(|e| RouterError::InvalidGrammar(e.clone()))?;
            compiler
                .check(&grammar)
                .map_err(|e| RouterError::InvalidGrammar(e.to_string()))
        })
        .await
        .map_err(|e| RouterError::InvalidGrammar(e.to_string()))?
    }

    /// `logit_bias` keys must be tokens of this tokenizer.
    fn check_logit_bias(&self, parameters: &v3::NextTokenChooserParameters) -> Result<()> {
        let vocab = self.tokenizer.get_vocab_size(true);
        match parameters.logit_bias.keys().find(|&&t| t as usize >= vocab) {
            Some(&t) => Err(RouterError::LogitBiasToken(t, vocab)),
            None => Ok(()),
        }
    }

    /// `best_of` for the non-streaming routes.
    pub fn validate_best_of(&self, best_of: usize) -> Result<usize> {
        self.limits.check_best_of(best_of)
    }

    /// Every check of TGI's `Validation::validate`, in its order.
    pub async fn validate(
        &self,
        inputs: String,
        p: &GenerateParameters,
        add_special_tokens: bool,
    ) -> Result<ValidRequest> {
        let arrived = Instant::now();
        let limits = &self.limits;
        let (parameters, top_n_tokens) = limits.check_parameters(p)?;
        if inputs.is_empty() {
            return Err(RouterError::EmptyInput);
        }
        limits.check_truncate(p)?;
        let encoding = self.tokenize(inputs.clone(), add_special_tokens).await?;
        let mut ids = encoding.get_ids().to_vec();
        let stopping = limits.check_tokens(p, &mut ids)?;
        self.check_logit_bias(&parameters)?;
        self.check_grammar(&parameters).await?;
        metrics::histogram!(crate::metrics::REQUEST_INPUT_LENGTH).record(ids.len() as f64);
        metrics::histogram!(crate::metrics::REQUEST_MAX_NEW_TOKENS)
            .record(stopping.max_new_tokens as f64);
        Ok(ValidRequest {
            inputs,
            input_ids: ids,
            truncate: p.truncate.unwrap_or(limits.max_input_tokens),
            add_special_tokens,
            decoder_input_details: p.decoder_input_details,
            top_n_tokens,
            parameters,
            stopping,
            priority: p.priority.unwrap_or(0),
            arrived,
        })
    }
}

impl Limits {
    /// `best_of` against `--max-best-of`.
    pub fn check_best_of(&self, best_of: usize) -> Result<usize> {
        if self.max_best_of == 1 && best_of != 1 {
            return Err(RouterError::BestOfDisabled);
        }
        if best_of == 0 || best_of > self.max_best_of {
            return Err(RouterError::BestOf(self.max_best_of, best_of));
        }
        Ok(best_of)
    }

    /// Checks 1–11 (no tokenizer needed); the shard's sampling parameters and `top_n_tokens`.
    /// Covers the shard's `SamplingParams::from_proto` and the stop sequences of
    /// `StopParams::from_proto` (the shard treats 0.0 as "unset", so nothing here sends 0.0 where
    /// 0.0 would mean something else).
    pub fn check_parameters(
        &self,
        p: &GenerateParameters,
    ) -> Result<(v3::NextTokenChooserParameters, u32)> {
        let sampling = p.do_sample
            || p.temperature.is_some()
            || p.top_k.is_some()
            || p.top_p.is_some()
            || p.typical_p.is_some();
        let best_of = p.best_of.unwrap_or(1);
        if best_of > 1 && !sampling {
            return Err(RouterError::BestOfSampling);
        }
        let temperature = p.temperature.unwrap_or(1.0);
        if temperature <= 0.0 || !temperature.is_finite() {
            return Err(RouterError::Temperature);
        }
        let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
        if repetition_penalty <= 0.0 || !repetition_penalty.is_finite() {
            return Err(RouterError::RepetitionPenalty);
        }
        // `contains` is false for NaN, and ±inf lie outside the range.
        let frequency_penalty = p.frequency_penalty.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&frequency_penalty) {
            return Err(RouterError::FrequencyPenalty);
        }
        let presence_penalty = p.presence_penalty.unwrap_or(0.0);
        if !(-2.0..=2.0).contains(&presence_penalty) {
            return Err(RouterError::PresencePenalty);
        }
        // 1.0 means "off" (OpenAI clients send it by default); TGI rejected it.
        let top_p = p.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(RouterError::TopP);
        }
        let typical_p = p.typical_p.unwrap_or(1.0);
        if p.typical_p.is_some() && !(typical_p > 0.0 && typical_p < 1.0) {
            return Err(RouterError::TypicalP);
        }
        // Any positive `top_k` is fine: the shard keeps every token when it exceeds the vocabulary.
        let top_k = match p.top_k {
            Some(k) => u32::try_from(k)
                .ok()
                .filter(|&k| k > 0)
                .ok_or(RouterError::TopK)?,
            None => 0,
        };
        if p.max_new_tokens == Some(0) {
            return Err(RouterError::NegativeMaxNewTokens);
        }
        if p.stop.len() > self.max_stop_sequences {
            return Err(RouterError::StopSequence(
                self.max_stop_sequences,
                p.stop.len(),
            ));
        }
        // An empty stop sequence matches before any text: the shard refuses it.
        if p.stop.iter().any(String::is_empty) {
            return Err(RouterError::EmptyStopSequence);
        }
        if best_of > 1 && p.seed.is_some() {
            return Err(RouterError::BestOfSeed);
        }
        let top_n_tokens = p.top_n_tokens.unwrap_or(0);
        if top_n_tokens > self.max_top_n_tokens {
            return Err(RouterError::TopNTokens(self.max_top_n_tokens, top_n_tokens));
        }
        let min_p = p.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(RouterError::MinP);
        }
        let logit_bias = p.logit_bias.clone().unwrap_or_default();
        if logit_bias.values().any(|b| !(-100.0..=100.0).contains(b)) {
            return Err(RouterError::LogitBias);
        }
        let (grammar_type, grammar) = match &p.grammar {
            Some(_) if !self.grammar_support => return Err(RouterError::GrammarDisabled),
            Some(g) => grammar_text(g)?,
            None => (v3::GrammarType::None, String::new()),
        };
        let warped =
            temperature != 1.0 || top_k != 0 || top_p < 1.0 || typical_p < 1.0 || min_p > 0.0;
        let parameters = v3::NextTokenChooserParameters {
            temperature,
            top_k,
            top_p,
            typical_p,
            // The shard samples exactly when told to: any warper implies sampling, as in TGI's shard.
            do_sample: p.do_sample || warped,
            seed: p.seed.unwrap_or_else(rand::random),
            repetition_penalty,
            watermark: p.watermark,
            frequency_penalty,
            presence_penalty,
            grammar,
            grammar_type: grammar_type as i32,
            min_p,
            logit_bias,
        };
        Ok((parameters, top_n_tokens))
    }

    /// Check 13: `truncate` before tokenizing.
    pub fn check_truncate(&self, p: &GenerateParameters) -> Result<()> {
        match p.truncate {
            Some(t) if t == 0 || t > self.max_input_tokens => {
                Err(RouterError::Truncate(self.max_input_tokens, t))
            }
            _ => Ok(()),
        }
    }

    /// Checks 14–16 on the prompt's ids: truncates them (keeping the last `truncate`, as TGI and
    /// the shard do) and checks the token limits; returns the stopping parameters. Covers the
    /// shard's `Seq::new` (a prompt of at least one token, prompt + `max_new_tokens` within the
    /// model's positions) and `StopParams::from_proto` (`max_new_tokens` of at least 1).
    pub fn check_tokens(
        &self,
        p: &GenerateParameters,
        ids: &mut Vec<u32>,
    ) -> Result<v3::StoppingCriteriaParameters> {
        if let Some(t) = p.truncate {
            let keep = usize::try_from(t).unwrap_or(usize::MAX);
            ids.drain(..ids.len().saturating_sub(keep));
        }
        // Text made only of what the tokenizer drops (e.g. characters its normalizer removes).
        if ids.is_empty() {
            return Err(RouterError::NoInputTokens);
        }
        // Saturating: a length past u32 is past every limit anyway.
        let input_length = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        let max_total = self.max_total_tokens;
        // Defaults to what the context leaves. That is 0 only for a prompt of `max_total_tokens`
        // or more, which the input-length check refuses (startup keeps `max_input_tokens` below
        // `max_total_tokens`), so the shard never gets 0.
        let max_new_tokens = p
            .max_new_tokens
            .unwrap_or_else(|| max_total.saturating_sub(input_length));
        // Checked: `max_new_tokens` is the user's number and may be near u32::MAX.
        if input_length
            .checked_add(max_new_tokens)
            .is_none_or(|total| total > max_total)
        {
            return Err(RouterError::MaxTotalTokens(
                max_total,
                input_length,
                max_new_tokens,
            ));
        }
        if input_length > self.max_input_tokens {
            return Err(RouterError::InputLength(
                self.max_input_tokens,
                input_length,
            ));
        }
        Ok(v3::StoppingCriteriaParameters {
            max_new_tokens,
            stop_sequences: p.stop.clone(),
            ignore_eos_token: false,
        })
    }
}

/// A grammar parameter as the v3 fields carry it: a JSON schema's text, or a regex.
fn grammar_text(g: &GrammarParam) -> Result<(v3::GrammarType, String)> {
    let schema = match g {
        GrammarParam::Regex(r) => return Ok((v3::GrammarType::Regex, r.clone())),
        // TGI accepts the schema as an object or as a string holding one.
        GrammarParam::Json(serde_json::Value::String(text)) => {
            serde_json::from_str(text).map_err(|e| {
                RouterError::InvalidGrammar(format!("the JSON schema is not JSON: {e}"))
            })?
        }
        GrammarParam::Json(schema) => schema.clone(),
        GrammarParam::JsonSchema(config) => config.schema.clone(),
    };
    // Its shape (an object or a boolean) is judged by the compile, as the shard's is.
    Ok((v3::GrammarType::Json, schema.to_string()))
}

/// The grammar the shard will compile from these parameters (its `SamplingParams::from_proto` rule).
fn shard_grammar(p: &v3::NextTokenChooserParameters) -> Option<Grammar> {
    let kind = match v3::GrammarType::try_from(p.grammar_type).ok()? {
        _ if p.grammar.is_empty() => return None,
        v3::GrammarType::None => return None,
        v3::GrammarType::Json => GrammarKind::Json,
        v3::GrammarType::Regex => GrammarKind::Regex,
    };
    Some(Grammar {
        kind,
        source: p.grammar.clone(),
    })
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn validation() -> Validation {
        // SmolLM2 as converted by the setup step (`bash tests/fetch-models.sh`).
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/smollm2-hf-float32");
        let tokenizer = tessera_formats::tokenizer::load_tokenizer(&dir).unwrap_or_else(|e| {
            panic!("{e}: run `bash tests/fetch-models.sh` for the SmolLM2 tokenizer")
        });
        let limits = Limits {
            max_best_of: 2,
            max_stop_sequences: 4,
            max_top_n_tokens: 5,
            max_input_tokens: 10,
            max_total_tokens: 20,
            grammar_support: true,
        };
        Validation::new(tokenizer, 1, limits)
    }

    async fn check(p: GenerateParameters, inputs: &str) -> Result<ValidRequest> {
        validation().validate(inputs.to_string(), &p, true).await
    }

    #[tokio::test]
    async fn each_check_reports_tgis_message() {
        let cases: Vec<(GenerateParameters, RouterError)> = vec![
            (
                GenerateParameters {
                    best_of: Some(2),
                    ..Default::default()
                },
                RouterError::BestOfSampling,
            ),
            (
                GenerateParameters {
                    temperature: Some(0.0),
                    ..Default::default()
                },
                RouterError::Temperature,
            ),
            (
                GenerateParameters {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                RouterError::RepetitionPenalty,
            ),
            (
                GenerateParameters {
                    frequency_penalty: Some(3.0),
                    ..Default::default()
                },
                RouterError::FrequencyPenalty,
            ),
            (
                GenerateParameters {
                    presence_penalty: Some(-3.0),
                    ..Default::default()
                },
                RouterError::PresencePenalty,
            ),
            (
                GenerateParameters {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                RouterError::TopP,
            ),
            (
                GenerateParameters {
                    typical_p: Some(1.0),
                    ..Default::default()
                },
                RouterError::TypicalP,
            ),
            (
                GenerateParameters {
                    top_k: Some(0),
                    ..Default::default()
                },
                RouterError::TopK,
            ),
            (
                GenerateParameters {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                RouterError::NegativeMaxNewTokens,
            ),
            (
                GenerateParameters {
                    stop: vec!["a".into(); 5],
                    ..Default::default()
                },
                RouterError::StopSequence(4, 5),
            ),
            (
                GenerateParameters {
                    best_of: Some(2),
                    do_sample: true,
                    seed: Some(1),
                    ..Default::default()
                },
                RouterError::BestOfSeed,
            ),
            (
                GenerateParameters {
                    top_n_tokens: Some(6),
                    ..Default::default()
                },
                RouterError::TopNTokens(5, 6),
            ),
            (
                GenerateParameters {
                    truncate: Some(11),
                    ..Default::default()
                },
                RouterError::Truncate(10, 11),
            ),
            (
                GenerateParameters {
                    max_new_tokens: Some(18),
                    ..Default::default()
                },
                RouterError::MaxTotalTokens(20, 4, 18),
            ),
            (
                GenerateParameters {
                    max_new_tokens: Some(u32::MAX),
                    ..Default::default()
                },
                RouterError::MaxTotalTokens(20, 4, u32::MAX),
            ),
            (
                GenerateParameters {
                    min_p: Some(1.5),
                    ..Default::default()
                },
                RouterError::MinP,
            ),
            (
                GenerateParameters {
                    logit_bias: Some([(3, 101.0)].into()),
                    ..Default::default()
                },
                RouterError::LogitBias,
            ),
            (
                GenerateParameters {
                    logit_bias: Some([(49152, 1.0)].into()),
                    ..Default::default()
                },
                RouterError::LogitBiasToken(49152, 49152),
            ),
            (
                GenerateParameters {
                    grammar: Some(GrammarParam::Json(serde_json::json!("{not json"))),
                    ..Default::default()
                },
                RouterError::InvalidGrammar(
                    "the JSON schema is not JSON: key must be a string at line 1 column 2".into(),
                ),
            ),
        ];
        for (params, expected) in cases {
            assert_eq!(
                check(params, "Once upon a time").await.unwrap_err(),
                expected
            );
        }
        assert_eq!(
            check(GenerateParameters::default(), "").await.unwrap_err(),
            RouterError::EmptyInput
        );
        let long = "word ".repeat(15);
        let p = GenerateParameters {
            max_new_tokens: Some(1),
            ..Default::default()
        };
        assert!(matches!(
            check(p, &long).await.unwrap_err(),
            RouterError::InputLength(10, _)
        ));
        assert_eq!(
            RouterError::TopP.to_string(),
            "Input validation error: `top_p` must be > 0.0 and <= 1.0"
        );
    }

    #[tokio::test]
    async fn grammars_reach_the_shard_fields_or_fail_with_the_engines_reason() {
        let with = |g: serde_json::Value| GenerateParameters {
            grammar: Some(serde_json::from_value(g).unwrap()),
            ..Default::default()
        };
        let schema =
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        for g in [
            serde_json::json!({"type": "json", "value": schema}),
            serde_json::json!({"type": "json", "value": schema.to_string()}),
            serde_json::json!({"type": "json_object", "value": schema}),
            serde_json::json!({"type": "json_schema", "value": {"name": "a", "schema": schema}}),
        ] {
            let valid = check(with(g), "Once upon a time").await.unwrap();
            assert_eq!(valid.parameters.grammar_type, v3::GrammarType::Json as i32);
            assert_eq!(valid.parameters.grammar, schema.to_string());
        }
        let valid = check(
            with(serde_json::json!({"type": "regex", "value": "[ab]+"})),
            "x",
        )
        .await
        .unwrap();
        assert_eq!(valid.parameters.grammar_type, v3::GrammarType::Regex as i32);
        for bad in [
            serde_json::json!({"type": "regex", "value": "(a"}),
            serde_json::json!({"type": "json", "value": {"type": "strange"}}),
            serde_json::json!({"type": "json", "value": {"$ref": "#/$defs/nowhere"}}),
        ] {
            let e = check(with(bad.clone()), "x").await.unwrap_err();
            assert!(
                matches!(&e, RouterError::InvalidGrammar(m) if !m.is_empty()),
                "{bad}: {e:?}"
            );
        }
    }

    #[tokio::test]
    async fn defaults_truncation_and_sampling_flags() {
        let valid = check(GenerateParameters::default(), "Once upon a time")
            .await
            .unwrap();
        assert_eq!(valid.input_ids, vec![6403, 1980, 253, 655]);
        assert_eq!(
            valid.stopping.max_new_tokens, 16,
            "defaults to what the context leaves"
        );
        assert!(!valid.parameters.do_sample);
        let p = GenerateParameters {
            truncate: Some(2),
            top_p: Some(1.0),
            temperature: Some(0.5),
            ..Default::default()
        };
        let valid = check(p, "Once upon a time").await.unwrap();
        assert_eq!(valid.input_ids, vec![253, 655]);
        assert!(valid.parameters.do_sample);
        assert_eq!(
            validation().validate_best_of(3).unwrap_err(),
            RouterError::BestOf(2, 3)
        );
    }
}
