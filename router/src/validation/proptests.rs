//! Property tests of request validity: extreme values (0, 1, u32::MAX, u64::MAX, i64 extremes, NaN,
//! ±inf, subnormals, huge strings) at every numeric parameter of the TGI and OpenAI APIs, through
//! JSON parsing, the OpenAI parameter mapping and validation. Never a panic; either a 422 or a
//! request that the shard's own checks accept.

use super::Limits;
use crate::api::GenerateParameters;
use crate::error::{Result, RouterError};
use crate::openai::{chat_parameters, choices_count, parameters};
use crate::openai_types::{ChatRequest, CompletionRequest};
use crate::scheduler::NewRequest;
use axum::extract::FromRequest;
use axum::http::StatusCode;
use proptest::prelude::*;
use serde_json::{json, Value};
use tessera_proto::v3;
use tessera_shard::sampling::SamplingParams;
use tessera_shard::stopping::StopParams;

const LIMITS: Limits = Limits {
    max_best_of: 2,
    max_stop_sequences: 4,
    max_top_n_tokens: 5,
    max_input_tokens: 4095,
    max_total_tokens: 4096,
    grammar_support: true,
};
const MAX_CLIENT_BATCH_SIZE: usize = 4;

fn f32s() -> impl Strategy<Value = f32> {
    prop_oneof![
        prop::sample::select(vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.0,
            -2.0,
            0.5,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            f32::from_bits(1), // smallest subnormal
            -f32::from_bits(1),
            f32::MAX,
            f32::MIN,
            f32::EPSILON,
            1.0 + f32::EPSILON,
            1.0 - f32::EPSILON / 2.0,
            2.0 + f32::EPSILON * 2.0,
        ]),
        any::<f32>(),
        -3.0f32..3.0,
    ]
}

fn u32s() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 2, 4, 5, 6, 4095, 4096, u32::MAX - 1, u32::MAX]),
        any::<u32>(),
        0u32..8,
    ]
}

fn i32s() -> impl Strategy<Value = i32> {
    prop_oneof![
        prop::sample::select(vec![i32::MIN, -1, 0, 1, 50, i32::MAX]),
        any::<i32>(),
    ]
}

fn u64s() -> impl Strategy<Value = u64> {
    prop_oneof![prop::sample::select(vec![0, 1, u64::MAX]), any::<u64>()]
}

fn usizes() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 2, 3, usize::MAX]),
        any::<usize>()
    ]
}

/// Stop lists: empty strings, ordinary ones and one as long as a payload allows.
fn stops() -> impl Strategy<Value = Vec<String>> {
    let one = prop_oneof![
        Just(String::new()),
        "[a-z.!\n]{1,4}",
        Just("x".repeat(1 << 18)),
    ];
    prop::collection::vec(one, 0..6)
}

/// Prompt lengths in tokens around every limit, up to what a 2 MB payload could tokenize to.
fn prompt_lengths() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0, 1, 2, 4094, 4095, 4096, 4097, 2_000_000]),
        0usize..64,
    ]
}

fn generate_parameters() -> impl Strategy<Value = GenerateParameters> {
    let floats = (
        prop::option::of(f32s()),
        prop::option::of(f32s()),
        prop::option::of(f32s()),
        prop::option::of(f32s()),
        prop::option::of(f32s()),
        prop::option::of(f32s()),
    );
    let integers = (
        prop::option::of(usizes()),
        prop::option::of(i32s()),
        prop::option::of(u32s()),
        prop::option::of(u32s()),
        prop::option::of(u64s()),
        prop::option::of(u32s()),
    );
    (floats, integers, any::<bool>(), stops()).prop_map(
        |(
            (
                temperature,
                repetition_penalty,
                frequency_penalty,
                presence_penalty,
                top_p,
                typical_p,
            ),
            (best_of, top_k, max_new_tokens, truncate, seed, top_n_tokens),
            do_sample,
            stop,
        )| GenerateParameters {
            best_of,
            temperature,
            repetition_penalty,
            frequency_penalty,
            presence_penalty,
            top_k,
            top_p,
            typical_p,
            do_sample,
            max_new_tokens,
            stop,
            truncate,
            seed,
            top_n_tokens,
            ..Default::default()
        },
    )
}

/// Every refusal is the 422 validation class.
fn assert_validation_error(e: &RouterError) {
    let (status, kind) = e.status_and_type();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(kind, "validation", "{e}");
    assert!(e.to_string().starts_with("Input validation error: "), "{e}");
}

/// Validation of `p` on a prompt of `prompt_len` tokens, as `Validation::validate` orders it
/// (the non-empty text check precedes tokenization and is not a number).
fn validate(p: &GenerateParameters, prompt_len: usize) -> Result<(v3::Request, Vec<u32>)> {
    LIMITS.check_best_of(p.best_of.unwrap_or(1))?;
    let (parameters, top_n_tokens) = LIMITS.check_parameters(p)?;
    LIMITS.check_truncate(p)?;
    let mut ids: Vec<u32> = (0..prompt_len as u32).collect();
    let stopping = LIMITS.check_tokens(p, &mut ids)?;
    let request = v3::Request {
        truncate: p.truncate.unwrap_or(LIMITS.max_input_tokens),
        parameters: Some(parameters),
        stopping_parameters: Some(stopping),
        top_n_tokens,
        ..Default::default()
    };
    Ok((request, ids))
}

/// What the shard checks of an accepted request. Sampling and stopping through the shard's own
/// `from_proto`; `Seq::new` (shard/src/engine/request.rs) needs a model, so its rules are restated:
/// at least one prompt token after truncating to the last `truncate`, and prompt +
/// `max_new_tokens` - 1 positions within the model's (startup keeps `max_total_tokens` within
/// them). Also the scheduler's block math on it.
fn assert_shard_accepts(request: &v3::Request, p: &GenerateParameters, ids: &[u32]) {
    let sent = request.parameters.as_ref().unwrap();
    let sampling = SamplingParams::from_proto(Some(sent))
        .unwrap_or_else(|e| panic!("the shard refuses sampling parameters {sent:?}: {e}"));
    // The shard reads 0.0 as "unset": nothing validation accepts may mean something else there.
    assert_eq!(sampling.temperature, sent.temperature);
    assert_eq!(sampling.top_p, sent.top_p);
    assert_eq!(sampling.typical_p, sent.typical_p);
    assert_eq!(sampling.repetition_penalty, sent.repetition_penalty);
    assert_eq!(sampling.top_k, sent.top_k as usize);
    assert_eq!(sampling.is_sampling(), sent.do_sample);
    if let Some(seed) = p.seed {
        assert_eq!(sampling.seed, seed);
    }
    let stopping = request.stopping_parameters.as_ref().unwrap();
    let stop = StopParams::from_proto(Some(stopping))
        .unwrap_or_else(|e| panic!("the shard refuses stopping parameters {stopping:?}: {e}"));
    assert!(stop.max_new_tokens >= 1);
    assert!(request.top_n_tokens <= LIMITS.max_top_n_tokens);

    assert!(!ids.is_empty() && ids.len() <= request.truncate as usize);
    let positions = ids.len() + stop.max_new_tokens as usize - 1;
    assert!(positions < LIMITS.max_total_tokens as usize, "{positions}");

    let scheduled = NewRequest {
        id: tessera_proto::RequestId(0),
        input_ids: ids.to_vec(),
        max_new_tokens: stop.max_new_tokens,
        prefill_logprobs: false,
        priority: 0,
        generated: Vec::new(),
        preemptions: 0,
        request: request.clone(),
    };
    assert_eq!(scheduled.total_tokens(0) as usize, positions);
}

fn check_tgi(p: &GenerateParameters, prompt_len: usize) {
    match validate(p, prompt_len) {
        Ok((request, ids)) => assert_shard_accepts(&request, p, &ids),
        Err(e) => assert_validation_error(&e),
    }
}

/// A JSON body through axum's extractor, as the routes receive it: a body serde cannot take
/// (a number past its field's type, a negative seed) is the 422 of the JSON-rejection mapping.
fn parse<T: serde::de::DeserializeOwned>(body: &Value) -> Option<T> {
    let request = axum::http::Request::builder()
        .method("POST")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    match futures::executor::block_on(axum::Json::<T>::from_request(request, &())) {
        Ok(axum::Json(parsed)) => Some(parsed),
        Err(rejection) => {
            let e = RouterError::from(rejection);
            assert_validation_error(&e);
            None
        }
    }
}

/// JSON numbers at and past the edges of u32, u64, i64, f32 and f64 (and a wrong type).
fn json_numbers() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(2),
            json!(0.0),
            json!(0.5),
            json!(1.0),
            json!(-2.0),
            json!(2.0),
            json!(u32::MAX),
            json!(u32::MAX as u64 + 1),
            json!(u64::MAX),
            json!(i64::MAX),
            json!(i64::MIN),
            json!(1e39), // past f32: serde reads it as inf
            json!(-1e39),
            json!(1e-50),  // below f32's subnormals: reads as 0.0
            json!(1e-45),  // f32's smallest subnormal
            json!(5e-324), // f64's smallest subnormal
            json!(f64::MAX),
            json!(1e300),
            json!(null),
            json!("1"),
        ]),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |v| v.is_finite().then(|| Value::from(v))),
    ]
}

/// Each field present with an extreme value or absent.
fn json_fields(
    names: &'static [&'static str],
) -> impl Strategy<Value = serde_json::Map<String, Value>> {
    prop::collection::vec(prop::option::of(json_numbers()), names.len()).prop_map(move |values| {
        names
            .iter()
            .zip(values)
            .filter_map(|(name, v)| v.map(|v| (name.to_string(), v)))
            .collect()
    })
}

const SAMPLING_FIELDS: [&str; 6] = [
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "n",
];

/// The OpenAI routes' checks before validation, then validation and the shard's checks.
fn check_openai(n: Option<usize>, mapped: Result<GenerateParameters>, prompt_len: usize) {
    let checked = choices_count(MAX_CLIENT_BATCH_SIZE, n).and(mapped);
    match checked {
        Ok(p) => check_tgi(&p, prompt_len),
        Err(e) => assert_validation_error(&e),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tgi_parameters_are_refused_or_accepted_by_the_shard(
        p in generate_parameters(),
        prompt_len in prompt_lengths(),
    ) {
        check_tgi(&p, prompt_len);
    }

    #[test]
    fn chat_requests_are_refused_or_accepted_by_the_shard(
        mut fields in json_fields(&["max_tokens", "max_completion_tokens", "top_logprobs"]),
        sampling in json_fields(&SAMPLING_FIELDS),
        logprobs in prop::option::of(any::<bool>()),
        stop in prop::option::of(stops()),
        prompt_len in prompt_lengths(),
    ) {
        fields.extend(sampling);
        fields.insert("messages".into(), json!([{"role": "user", "content": "Hi"}]));
        if let Some(logprobs) = logprobs {
            fields.insert("logprobs".into(), json!(logprobs));
        }
        if let Some(stop) = stop {
            // A list, or a single string as OpenAI also allows.
            let stop = match stop.as_slice() {
                [one] => json!(one),
                many => json!(many),
            };
            fields.insert("stop".into(), stop);
        }
        if let Some(request) = parse::<ChatRequest>(&Value::Object(fields)) {
            check_openai(request.sampling.n, chat_parameters(&request, None), prompt_len);
        }
    }

    #[test]
    fn completion_requests_are_refused_or_accepted_by_the_shard(
        mut fields in json_fields(&["max_tokens", "logprobs"]),
        sampling in json_fields(&SAMPLING_FIELDS),
        stop in prop::option::of(stops()),
        prompt_len in prompt_lengths(),
    ) {
        fields.extend(sampling);
        fields.insert("prompt".into(), json!("Once upon a time"));
        if let Some(stop) = stop {
            fields.insert("stop".into(), json!(stop));
        }
        if let Some(request) = parse::<CompletionRequest>(&Value::Object(fields)) {
            let mapped = parameters(&request.sampling, request.max_tokens, request.logprobs);
            check_openai(request.sampling.n, mapped, prompt_len);
        }
    }

    /// The scheduler's reservation saturates instead of wrapping to a small request.
    #[test]
    fn total_tokens_never_wraps(prompt_len in 0usize..5000, max_new in u32s(), speculate in u32s()) {
        let request = NewRequest {
            id: tessera_proto::RequestId(0),
            input_ids: vec![0; prompt_len],
            max_new_tokens: max_new,
            prefill_logprobs: false,
            priority: 0,
            generated: Vec::new(),
            preemptions: 0,
            request: v3::Request::default(),
        };
        let exact = prompt_len as u64 + max_new as u64 + speculate as u64;
        // Exact below u32::MAX; past it, within one of the maximum (never a small number).
        let expected = exact.min(u32::MAX as u64).saturating_sub(1);
        prop_assert_eq!(request.total_tokens(speculate) as u64, expected);
    }
}

/// The shapes that reached the shard before validation refused them, each with its message.
#[test]
fn what_the_shard_refuses_the_router_refuses_first() {
    let cases = [
        (
            GenerateParameters {
                stop: vec!["a".into(), String::new()],
                ..Default::default()
            },
            RouterError::EmptyStopSequence,
        ),
        (
            GenerateParameters {
                temperature: Some(f32::NAN),
                ..Default::default()
            },
            RouterError::Temperature,
        ),
        (
            GenerateParameters {
                top_p: Some(f32::NAN),
                ..Default::default()
            },
            RouterError::TopP,
        ),
        (
            GenerateParameters {
                typical_p: Some(f32::NAN),
                ..Default::default()
            },
            RouterError::TypicalP,
        ),
        (
            GenerateParameters {
                frequency_penalty: Some(f32::INFINITY),
                ..Default::default()
            },
            RouterError::FrequencyPenalty,
        ),
        (
            GenerateParameters {
                presence_penalty: Some(f32::NAN),
                ..Default::default()
            },
            RouterError::PresencePenalty,
        ),
        (
            GenerateParameters {
                repetition_penalty: Some(f32::INFINITY),
                ..Default::default()
            },
            RouterError::RepetitionPenalty,
        ),
        (
            GenerateParameters {
                top_k: Some(i32::MIN),
                ..Default::default()
            },
            RouterError::TopK,
        ),
        (
            GenerateParameters {
                max_new_tokens: Some(u32::MAX),
                ..Default::default()
            },
            RouterError::MaxTotalTokens(4096, 4, u32::MAX),
        ),
    ];
    for (p, expected) in cases {
        assert_eq!(validate(&p, 4).unwrap_err(), expected);
    }
    assert_eq!(
        validate(&GenerateParameters::default(), 0).unwrap_err(),
        RouterError::NoInputTokens
    );
    assert_eq!(
        RouterError::EmptyStopSequence.to_string(),
        "Input validation error: `stop` sequences cannot be empty strings"
    );
    // OpenAI: `"stop": ""` on either route.
    let chat: ChatRequest =
        parse(&json!({"messages": [{"role": "user", "content": "Hi"}], "stop": ""})).unwrap();
    let p = chat_parameters(&chat, None).unwrap();
    assert_eq!(validate(&p, 4).unwrap_err(), RouterError::EmptyStopSequence);
    // A JSON number past f32 reads as infinity.
    let chat: ChatRequest =
        parse(&json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e39}))
            .unwrap();
    assert_eq!(chat.sampling.temperature, Some(f32::INFINITY));
    let p = chat_parameters(&chat, None).unwrap();
    assert_eq!(validate(&p, 4).unwrap_err(), RouterError::Temperature);
    // Past u32: serde refuses it, a 422 through the JSON-rejection mapping.
    assert!(
        parse::<ChatRequest>(&json!({"messages": [], "max_tokens": u32::MAX as u64 + 1})).is_none()
    );
}
