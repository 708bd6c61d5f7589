//! Grammar costs on a real vocabulary (default: SmolLM2's, from `bash tests/fetch-models.sh`): compile
//! time of a 50-property JSON schema, cold and cached, and the per-token mask cost while writing a
//! valid answer at batch 1 and at batch 32 (masks computed in parallel, as the shard does beside the
//! forward). Prints a Markdown table.
//!
//! `cargo bench -p tessera-formats --bench grammar [-- TOKENIZER_MODEL_PATH]`

use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};
use tessera_formats::grammar::{Constraint, Grammar, GrammarCompiler, GrammarKind};

/// 50 required properties of mixed kinds, and a valid instance of it.
fn schema_and_answer() -> (Value, Value) {
    let (mut props, mut answer) = (Map::new(), Map::new());
    for i in 0..50 {
        let (schema, value) = match i % 5 {
            0 => (
                json!({"type": "string", "maxLength": 24}),
                json!(format!("value number {i}")),
            ),
            1 => (json!({"type": "integer", "minimum": 0}), json!(i * 37)),
            2 => (json!({"type": "boolean"}), json!(i % 2 == 0)),
            3 => (json!({"enum": ["red", "green", "blue"]}), json!("green")),
            _ => (
                json!({"type": "array", "items": {"type": "number"}, "maxItems": 4}),
                json!([1.5, i]),
            ),
        };
        props.insert(format!("field_{i}"), schema);
        answer.insert(format!("field_{i}"), value);
    }
    let required: Vec<&String> = props.keys().collect();
    let schema = json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
    (schema, Value::Object(answer))
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            )
            .into()
        });
    let tokenizer = tessera_formats::tokenizer::load_tokenizer(path.as_ref()).expect("tokenizer");
    let vocab = tokenizer.get_vocab_size(true);
    let t = Instant::now();
    let compiler = GrammarCompiler::new(&tokenizer, vocab, &[0]).expect("compiler");
    let setup = t.elapsed();
    let (schema, answer) = schema_and_answer();
    let grammar = Grammar {
        kind: GrammarKind::Json,
        source: schema.to_string(),
    };
    let compile = || {
        let t = Instant::now();
        let mut c = compiler.compile(&grammar).expect("compiles");
        c.prepare();
        (t.elapsed(), c)
    };
    let (cold, _) = compile();
    let (cached, _) = compile();
    let tokens: Vec<u32> = tokenizer
        .encode(serde_json::to_string_pretty(&answer).unwrap(), false)
        .unwrap()
        .get_ids()
        .to_vec();

    // Batch 1: one answer, token by token.
    let (_, mut one) = compile();
    let mut per_token = Vec::with_capacity(tokens.len());
    for &id in &tokens {
        let t = Instant::now();
        one.prepare();
        per_token.push(t.elapsed());
        assert!(one.mask().allows(id), "the answer's token {id} is refused");
        one.commit(id);
    }
    per_token.sort();
    let mean1 = per_token.iter().sum::<Duration>() / per_token.len() as u32;

    // Batch 32: every step computes 32 masks in parallel.
    let mut batch: Vec<Constraint> = (0..32).map(|_| compile().1).collect();
    let mut steps = Vec::with_capacity(tokens.len());
    for &id in &tokens {
        let t = Instant::now();
        batch.par_iter_mut().for_each(Constraint::prepare);
        steps.push(t.elapsed());
        batch.iter_mut().for_each(|c| c.commit(id));
    }
    steps.sort();
    let mean32 = steps.iter().sum::<Duration>() / steps.len() as u32;

    println!(
        "vocabulary {vocab} tokens, {} rayon threads, answer {} tokens",
        rayon::current_num_threads(),
        tokens.len()
    );
    println!();
    println!("| measure | ms |");
    println!("|---|---|");
    println!(
        "| compiler setup (token trie, once per process) | {} |",
        ms(setup)
    );
    println!(
        "| 50-property schema, cold (compile + first mask) | {} |",
        ms(cold)
    );
    println!("| same schema, cached | {} |", ms(cached));
    println!(
        "| mask per token, batch 1: mean / p50 / p99 | {} / {} / {} |",
        ms(mean1),
        ms(percentile(&per_token, 0.5)),
        ms(percentile(&per_token, 0.99))
    );
    println!(
        "| 32 masks per step, batch 32: mean / p50 / p99 | {} / {} / {} |",
        ms(mean32),
        ms(percentile(&steps, 0.5)),
        ms(percentile(&steps, 0.99))
    );
}
