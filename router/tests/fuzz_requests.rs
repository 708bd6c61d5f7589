//! Fuzz target (bolero) for the router's request parsing: JSON bodies of `/`, `/generate`,
//! `/generate_stream`, `/v1/chat/completions` and `/v1/completions`, built from the APIs' field
//! names with random and extreme values and then mutated byte by byte, go through axum's JSON
//! extractor (as the routes receive them), the OpenAI parameter mapping and validation's pure
//! checks. `cargo test` runs it for a few seconds under an allocation cap; `cargo bolero test
//! fuzz_request_bodies` runs it under libFuzzer.
//!
//! The property: every body is refused with a 4xx of the validation class (or 413), or it yields a
//! request the shard's own checks accept — no panic, no allocation past the cap.

#[path = "../../formats/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use axum::extract::FromRequest;
use axum::http::StatusCode;
use bolero::check;
use fuzz_support::{apply, within_allocation_cap, Edit, Executions, EXTREMES, TEST_TIME};
use serde_json::{json, Map, Value};
use tessera_router::api::{CompatGenerateRequest, GenerateParameters, GenerateRequest};
use tessera_router::error::{Result, RouterError};
use tessera_router::openai::{chat_parameters, choices_count, parameters};
use tessera_router::openai_types::{ChatRequest, CompletionRequest};
use tessera_router::tools::ToolUse;
use tessera_router::validation::Limits;
use tessera_shard::sampling::SamplingParams;
use tessera_shard::stopping::StopParams;

#[global_allocator]
static ALLOC: fuzz_support::CappedAlloc = fuzz_support::CappedAlloc;

/// The limits `validation/proptests.rs` checks against (a 4096-position model).
const LIMITS: Limits = Limits {
    max_best_of: 2,
    max_stop_sequences: 4,
    max_top_n_tokens: 5,
    max_input_tokens: 4095,
    max_total_tokens: 4096,
    grammar_support: true,
};
const MAX_CLIENT_BATCH_SIZE: usize = 4;

/// TGI's `parameters` object.
const TGI_FIELDS: [&str; 21] = [
    "best_of",
    "temperature",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "top_k",
    "top_p",
    "typical_p",
    "do_sample",
    "max_new_tokens",
    "return_full_text",
    "stop",
    "truncate",
    "watermark",
    "details",
    "decoder_input_details",
    "seed",
    "top_n_tokens",
    "grammar",
    "adapter_id",
    "unknown_field",
];

/// Both OpenAI routes' sampling fields plus each route's own.
const SAMPLING_FIELDS: [&str; 10] = [
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "n",
    "stream",
    "stream_options",
    "stop",
    "response_format",
];
const CHAT_FIELDS: [&str; 8] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
];
const COMPLETION_FIELDS: [&str; 6] = [
    "model",
    "prompt",
    "max_tokens",
    "logprobs",
    "echo",
    "suffix",
];

#[derive(Debug, Clone, Copy, bolero::generator::TypeGenerator)]
enum Route {
    Compat,
    Generate,
    GenerateStream,
    Chat,
    Completion,
}

/// A JSON value for one field: mostly the shapes the APIs take, at their edges.
#[derive(Debug, bolero::generator::TypeGenerator)]
enum Val {
    Extreme(u8),
    Negative(u8),
    Int(i64),
    Float(f64),
    /// Numbers at f32's and f64's edges, written as JSON text.
    FloatEdge(u8),
    Bool(bool),
    Null,
    Str(String),
    /// A string of `n * 4096` copies of one character (long stops, long prompts).
    Long {
        c: char,
        n: u8,
    },
    Strings(Vec<String>),
    Object(Vec<(u8, Box<Val>)>),
    List(Vec<Val>),
}

const FLOAT_EDGES: [f64; 10] = [
    1e39,
    -1e39,
    1e-50,
    1e-45,
    5e-324,
    f64::MAX,
    -0.0,
    0.0,
    1.0 + f32::EPSILON as f64,
    2.000001,
];

impl Val {
    /// `depth` bounds nesting so a generated value stays small.
    fn json(&self, names: &[&str], depth: u8) -> Value {
        match self {
            Val::Extreme(i) => json!(EXTREMES[*i as usize % EXTREMES.len()]),
            Val::Negative(i) => json!(
                -(EXTREMES[*i as usize % EXTREMES.len()] as i128).max(i64::MIN as i128) as i64
            ),
            Val::Int(v) => json!(v),
            Val::Float(v) if v.is_finite() => json!(v),
            Val::Float(_) => Value::Null,
            Val::FloatEdge(i) => json!(FLOAT_EDGES[*i as usize % FLOAT_EDGES.len()]),
            Val::Bool(b) => json!(b),
            Val::Null => Value::Null,
            Val::Str(s) => json!(s),
            Val::Long { c, n } => json!(c.to_string().repeat((*n as usize % 64) * 4096)),
            Val::Strings(v) => json!(v),
            Val::Object(fields) if depth > 0 => {
                let mut map = Map::new();
                for (name, v) in fields {
                    let name = names
                        .get(*name as usize % names.len().max(1))
                        .copied()
                        .unwrap_or("x");
                    map.insert(name.into(), v.json(names, depth - 1));
                }
                Value::Object(map)
            }
            Val::List(items) if depth > 0 => {
                Value::Array(items.iter().map(|v| v.json(names, depth - 1)).collect())
            }
            Val::Object(_) | Val::List(_) => json!({}),
        }
    }
}

#[derive(Debug, bolero::generator::TypeGenerator)]
struct Case {
    route: Route,
    /// (field index, value): fields of the route set to random values.
    fields: Vec<(u8, Val)>,
    /// The prompt's length in tokens, as the tokenizer would have made it.
    prompt_len: u16,
    /// How many of `edits` apply to the serialized body (modulo 4; 0 keeps it valid JSON).
    n_edits: u8,
    edits: Vec<Edit>,
}

/// Names nested objects draw from: message and option fields the routes read.
const INNER_NAMES: [&str; 6] = ["role", "content", "type", "include_usage", "name", "text"];

/// A well-formed body of `route`, then the case's fields written over it.
fn body(case: &Case) -> Vec<u8> {
    let set = |base: &mut Map<String, Value>, names: &[&str]| {
        for (i, v) in &case.fields {
            let name = names[*i as usize % names.len()];
            base.insert(name.into(), v.json(&INNER_NAMES, 3));
        }
    };
    let value = match case.route {
        Route::Compat | Route::Generate | Route::GenerateStream => {
            let mut p = Map::new();
            set(&mut p, &TGI_FIELDS);
            let mut b = json!({"inputs": "Once upon a time", "parameters": p});
            if matches!(case.route, Route::Compat) {
                b["stream"] = json!(case.prompt_len.is_multiple_of(2));
            }
            b
        }
        Route::Chat => {
            let mut b = Map::new();
            b.insert(
                "messages".into(),
                json!([{"role": "user", "content": "Hi"}]),
            );
            let names: Vec<&str> = CHAT_FIELDS
                .iter()
                .chain(&SAMPLING_FIELDS)
                .copied()
                .collect();
            set(&mut b, &names);
            Value::Object(b)
        }
        Route::Completion => {
            let mut b = Map::new();
            b.insert("prompt".into(), json!("Once upon a time"));
            let names: Vec<&str> = COMPLETION_FIELDS
                .iter()
                .chain(&SAMPLING_FIELDS)
                .copied()
                .collect();
            set(&mut b, &names);
            Value::Object(b)
        }
    };
    let mut bytes = serde_json::to_vec(&value).expect("a serde_json::Value serializes");
    let n = case.n_edits as usize % 4;
    apply(&mut bytes, &case.edits[..n.min(case.edits.len())]);
    bytes
}

/// Refusals a body can get before it reaches the shard: 422 of the validation class (or the
/// template/batch classes of the OpenAI routes), 413 for a body past the limit.
fn assert_refusal(e: &RouterError) {
    let (status, _) = e.status_and_type();
    assert!(
        status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::PAYLOAD_TOO_LARGE,
        "a request body answered {status}: {e}"
    );
}

/// The body through axum's JSON extractor, as a route receives it.
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let request = axum::http::Request::builder()
        .method("POST")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(bytes.to_vec()))
        .expect("a request with a byte body builds");
    match futures::executor::block_on(axum::Json::<T>::from_request(request, &())) {
        Ok(axum::Json(parsed)) => Some(parsed),
        Err(rejection) => {
            assert_refusal(&RouterError::from(rejection));
            None
        }
    }
}

/// Validation's pure checks in `Validation::validate`'s order, on a prompt of `prompt_len` tokens;
/// what passes must pass the shard's own checks. Returns whether the request was accepted.
fn validate(p: &GenerateParameters, best_of: bool, prompt_len: usize) -> bool {
    let checked = (|| -> Result<_> {
        if best_of {
            LIMITS.check_best_of(p.best_of.unwrap_or(1))?;
        }
        let (parameters, top_n) = LIMITS.check_parameters(p)?;
        LIMITS.check_truncate(p)?;
        let mut ids: Vec<u32> = (0..prompt_len as u32).collect();
        let stopping = LIMITS.check_tokens(p, &mut ids)?;
        Ok((parameters, top_n, stopping, ids))
    })();
    let (parameters, top_n, stopping, ids) = match checked {
        Ok(accepted) => accepted,
        Err(e) => {
            assert_refusal(&e);
            return false;
        }
    };
    SamplingParams::from_proto(Some(&parameters))
        .unwrap_or_else(|e| panic!("the shard refuses {parameters:?}: {e}"));
    let stop = StopParams::from_proto(Some(&stopping))
        .unwrap_or_else(|e| panic!("the shard refuses {stopping:?}: {e}"));
    assert!(stop.max_new_tokens >= 1);
    assert!(top_n <= LIMITS.max_top_n_tokens);
    let truncate = p.truncate.unwrap_or(LIMITS.max_input_tokens) as usize;
    assert!(!ids.is_empty() && ids.len() <= truncate);
    assert!(ids.len() + stop.max_new_tokens as usize <= LIMITS.max_total_tokens as usize);
    true
}

/// One case through its route's parsing and checks; whether it was accepted.
fn run(case: &Case) -> bool {
    let bytes = body(case);
    // Prompt lengths around every limit as well as small ones.
    let prompt_len = match case.prompt_len % 8 {
        0 => [0, 4094, 4095, 4096, 4097, 60_000][case.prompt_len as usize / 8 % 6],
        _ => case.prompt_len as usize % 64,
    };
    match case.route {
        Route::Compat => parse::<CompatGenerateRequest>(&bytes)
            .is_some_and(|r| validate(&r.parameters, !r.stream, prompt_len)),
        Route::Generate => parse::<GenerateRequest>(&bytes)
            .is_some_and(|r| validate(&r.parameters, true, prompt_len)),
        // The streaming route refuses `best_of > 1` on its own (`check_best_of` is not its rule).
        Route::GenerateStream => parse::<GenerateRequest>(&bytes)
            .is_some_and(|r| validate(&r.parameters, false, prompt_len)),
        Route::Chat => parse::<ChatRequest>(&bytes).is_some_and(|r| {
            let tools = ToolUse::from_request(
                r.tools.as_ref(),
                r.tool_choice.as_ref(),
                r.parallel_tool_calls,
            );
            let mapped = choices_count(MAX_CLIENT_BATCH_SIZE, r.sampling.n)
                .and(tools)
                .and_then(|t| chat_parameters(&r, t.as_ref()));
            match mapped {
                Ok(p) => validate(&p, false, prompt_len),
                Err(e) => {
                    assert_refusal(&e);
                    false
                }
            }
        }),
        Route::Completion => parse::<CompletionRequest>(&bytes).is_some_and(|r| {
            let mapped = choices_count(MAX_CLIENT_BATCH_SIZE, r.sampling.n).and(parameters(
                &r.sampling,
                r.max_tokens,
                r.logprobs,
            ));
            match mapped {
                Ok(p) => validate(&p, false, prompt_len),
                Err(e) => {
                    assert_refusal(&e);
                    false
                }
            }
        }),
    }
}

#[test]
fn fuzz_request_bodies() {
    let runs = Executions::new("request_bodies");
    check!()
        .with_type::<Case>()
        .with_test_time(TEST_TIME)
        .for_each(|case| {
            runs.tick();
            if within_allocation_cap(|| run(case)) {
                runs.reached_end();
            }
        });
}

/// The unmutated seed bodies of every route are accepted, so the fuzz target starts from requests
/// that get through validation.
#[test]
fn seed_bodies_are_accepted() {
    for route in [
        Route::Compat,
        Route::Generate,
        Route::GenerateStream,
        Route::Chat,
        Route::Completion,
    ] {
        let case = Case {
            route,
            fields: vec![],
            prompt_len: 5,
            n_edits: 0,
            edits: vec![],
        };
        assert!(run(&case), "{route:?}");
    }
}

/// Values that must be refused, not accepted or panicked on.
#[test]
fn known_bad_bodies_are_refused() {
    let bodies: [(Route, Value); 5] = [
        (
            Route::Generate,
            json!({"inputs": "x", "parameters": {"max_new_tokens": u32::MAX}}),
        ),
        (
            Route::Generate,
            json!({"inputs": "x", "parameters": {"top_k": i32::MIN}}),
        ),
        (
            Route::Chat,
            json!({"messages": [], "max_tokens": u32::MAX as u64 + 1}),
        ),
        (Route::Chat, json!({"messages": [], "temperature": 1e39})),
        (Route::Completion, json!({"prompt": "x", "n": 0})),
    ];
    for (route, value) in bodies {
        let bytes = serde_json::to_vec(&value).unwrap();
        let accepted = match route {
            Route::Generate => {
                parse::<GenerateRequest>(&bytes).is_some_and(|r| validate(&r.parameters, true, 5))
            }
            Route::Chat => parse::<ChatRequest>(&bytes).is_some_and(|r| {
                ToolUse::from_request(r.tools.as_ref(), r.tool_choice.as_ref(), None)
                    .and_then(|t| chat_parameters(&r, t.as_ref()))
                    .is_ok_and(|p| validate(&p, false, 5))
            }),
            _ => parse::<CompletionRequest>(&bytes)
                .is_some_and(|r| choices_count(MAX_CLIENT_BATCH_SIZE, r.sampling.n).is_ok()),
        };
        assert!(!accepted, "{value}");
    }
}
