//! Batch invariance: the same prompts run one by one, batched together, with the prefill split
//! into chunks (mixed with other sequences' decode steps), and with KV blocks scattered in shuffled
//! order must give the same logits and the same greedy ids.

mod engine_common;

use engine_common::*;
use tessera_shard::forward::{ForwardBatch, LogitsWanted, SeqInput};
use tessera_shard::kv_cache::{KvCache, KvCacheDtype};
use tessera_shard::loader::{load, LoadOptions, WeightDtype};
use tessera_shard::models::Model;
use tessera_shard::tools::generate::argmax;

const BLOCK: usize = 4;

/// How a schedule feeds the sequences.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    /// Largest prefill chunk per forward.
    chunk: usize,
    /// All sequences in each forward, or one sequence after the other.
    together: bool,
    /// Hand out blocks in a shuffled order from a cache larger than needed.
    scatter: bool,
}

#[derive(Debug, Default)]
struct SeqRun {
    prompt: Vec<u32>,
    blocks: Vec<u32>,
    fed: usize,
    /// Logits of every prompt position, then of every decode step.
    rows: Vec<Vec<f32>>,
    generated: Vec<u32>,
}

fn shuffled(n: usize, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.swap(i, (s >> 33) as usize % (i + 1));
    }
    v
}

/// The next input of `r`, or `None` when it has generated `steps` tokens.
fn next_input(r: &SeqRun, chunk: usize, steps: usize) -> Option<SeqInput> {
    let (tokens, logits) = if r.fed < r.prompt.len() {
        (
            r.prompt[r.fed..(r.fed + chunk).min(r.prompt.len())].to_vec(),
            LogitsWanted::All,
        )
    } else if r.generated.len() < steps {
        (vec![*r.generated.last().unwrap()], LogitsWanted::Last)
    } else {
        return None;
    };
    let slots = (r.fed..r.fed + tokens.len())
        .map(|p| r.blocks[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
        .collect();
    Some(SeqInput {
        tokens,
        start_pos: r.fed,
        slots,
        block_table: r.blocks.clone(),
        logits,
        decoded_from: None,
    })
}

fn run(model: &Model, prompts: &[Vec<u32>], steps: usize, s: Schedule) -> Vec<SeqRun> {
    let needed: Vec<usize> = prompts
        .iter()
        .map(|p| (p.len() + steps).div_ceil(BLOCK))
        .collect();
    let total: usize = needed.iter().sum::<usize>() + if s.scatter { 7 } else { 0 };
    let pool = if s.scatter {
        shuffled(total, 42)
    } else {
        (0..total as u32).collect()
    };
    let mut cache = KvCache::new(model.cache_shape(), total, BLOCK);
    let mut at = 0;
    let mut runs: Vec<SeqRun> = prompts
        .iter()
        .zip(&needed)
        .map(|(p, &n)| {
            at += n;
            SeqRun {
                prompt: p.clone(),
                blocks: pool[at - n..at].to_vec(),
                ..SeqRun::default()
            }
        })
        .collect();
    loop {
        let mut who = Vec::new();
        let mut batch = ForwardBatch::default();
        for (i, r) in runs.iter().enumerate() {
            if let Some(input) = next_input(r, s.chunk, steps) {
                who.push(i);
                batch.seqs.push(input);
                if !s.together {
                    break;
                }
            }
        }
        if who.is_empty() {
            return runs;
        }
        let out = model.forward(&batch, &mut cache).unwrap();
        let vocab = model.config().vocab_size;
        for ((&i, input), logits) in who.iter().zip(&batch.seqs).zip(out) {
            let r = &mut runs[i];
            r.fed += input.tokens.len();
            r.rows
                .extend(logits.chunks_exact(vocab).map(<[f32]>::to_vec));
            if r.fed >= r.prompt.len() {
                r.generated.push(argmax(r.rows.last().unwrap()));
            }
        }
    }
}

fn assert_same(a: &[SeqRun], b: &[SeqRun], what: &str, tol: f32) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.generated, y.generated, "{what}: sequence {i} greedy ids");
        assert_eq!(x.rows.len(), y.rows.len(), "{what}: sequence {i} row count");
        for (j, (rx, ry)) in x.rows.iter().zip(&y.rows).enumerate() {
            let d = max_abs_diff(rx, ry);
            assert!(d < tol, "{what}: sequence {i} row {j} differs by {d}");
        }
    }
}

/// Logits must agree within `tol`: 1e-4 with an f32 KV cache; a 16-bit cache rounds K and V, so
/// kernel-order differences of 1e-7 can move a value by one bf16 step, and only the greedy ids
/// are exact.
fn check_invariance(model: &Model, prompts: &[Vec<u32>], steps: usize, tol: f32) {
    let base = run(
        model,
        prompts,
        steps,
        Schedule {
            chunk: usize::MAX,
            together: false,
            scatter: false,
        },
    );
    assert!(base.iter().all(|r| r.generated.len() == steps));
    let schedules = [
        (
            "batched",
            Schedule {
                chunk: usize::MAX,
                together: true,
                scatter: false,
            },
        ),
        (
            "chunked",
            Schedule {
                chunk: 5,
                together: false,
                scatter: false,
            },
        ),
        (
            "chunked+batched",
            Schedule {
                chunk: 3,
                together: true,
                scatter: false,
            },
        ),
        (
            "scattered blocks",
            Schedule {
                chunk: 7,
                together: true,
                scatter: true,
            },
        ),
    ];
    for (what, s) in schedules {
        assert_same(&base, &run(model, prompts, steps, s), what, tol);
    }
}

fn encode(loaded: &tessera_shard::loader::Loaded, texts: &[&str]) -> Vec<Vec<u32>> {
    texts
        .iter()
        .map(|t| {
            loaded
                .tokenizer
                .encode(*t, true)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect()
}

#[test]
fn stories260k_is_batch_invariant() {
    let loaded = load(&or_skip!(stories()), &f32_cache()).unwrap();
    let prompts = encode(
        &loaded,
        &[
            "Once upon a time",
            "Lily and Tom went to the park to play with a big red ball and a small dog",
            "The",
        ],
    );
    check_invariance(&loaded.model, &prompts, 12, 1e-4);
}

/// f32 weights (a GGUF dequantized exactly) and an f32 KV cache: schedules may only reorder sums.
fn f32_cache() -> LoadOptions {
    LoadOptions {
        dtype: WeightDtype::F32,
        kv_cache_dtype: KvCacheDtype::F32,
        ..LoadOptions::default()
    }
}

fn smollm2_prompts(loaded: &tessera_shard::loader::Loaded) -> Vec<Vec<u32>> {
    encode(
        loaded,
        &[
            "def fibonacci(n):",
            "The capital of France is a city where",
            "Hi",
        ],
    )
}

#[test]
fn smollm2_is_batch_invariant() {
    let loaded = load(&smollm2_gguf(), &f32_cache()).unwrap();
    check_invariance(&loaded.model, &smollm2_prompts(&loaded), 5, 1e-4);
}

#[test]
fn smollm2_served_as_by_default_keeps_ids_across_schedules() {
    // Quantized weights and a bf16 KV cache: int8 activation rounding turns the 1e-5 differences
    // of another summation order into whole quantization steps now and then, so only the
    // greedy ids are exact. Observed: logits within 0.65.
    let loaded = load(&smollm2_gguf(), &LoadOptions::default()).unwrap();
    check_invariance(&loaded.model, &smollm2_prompts(&loaded), 5, 1.5);
}
