//! `tessera-shard bench`: engine throughput on this machine, no server involved — prefill tokens/s
//! for one long prompt, decode tokens/s at several batch sizes (median and spread over runs), and
//! the process's peak RSS.

use std::path::PathBuf;
use std::time::Instant;

use crate::forward::{ForwardBatch, LogitsWanted, SeqInput};
use crate::kv_cache::{KvCache, KvCacheDtype, KvCacheDtypeParser, DEFAULT_BLOCK_SIZE};
use crate::loader::{self, Device, LoadOptions, WeightDtype};
use crate::models::Model;
use crate::tools::generate::argmax;
use crate::weights::quant::Scheme;
use crate::Result;

/// Arguments of `tessera-shard bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model folder (Hugging Face layout) or `.gguf` file.
    #[arg(long)]
    pub model_id: PathBuf,
    #[arg(long, value_enum, default_value_t = WeightDtype::Auto)]
    pub dtype: WeightDtype,
    /// Quantize dense matrices at load (`q8_0`, `q4_k`).
    #[arg(long, value_enum)]
    pub quantize: Option<Scheme>,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// What the KV cache stores: bf16 (half the memory of f32), f16, or f32; attention math is
    /// f32 either way. TGI's fp8 values are refused.
    #[arg(long, value_parser = KvCacheDtypeParser, default_value_t = KvCacheDtype::default())]
    pub kv_cache_dtype: KvCacheDtype,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Decode batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    /// Context each decoding sequence starts from.
    #[arg(long, default_value_t = 64)]
    pub context: usize,
    /// Decode steps timed per run.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Runs per measurement (median and spread are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

/// Median, minimum and maximum of a set of throughputs.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        v.sort_by(f64::total_cmp);
        Stats {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// A synthetic prompt: deterministic ids spread over the vocabulary (content does not change cost).
fn prompt(len: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % vocab) as u32)
        .collect()
}

fn seq_input(tokens: Vec<u32>, start: usize, blocks: &[u32], bs: usize) -> SeqInput {
    let slots = (start..start + tokens.len())
        .map(|p| blocks[p / bs] * bs as u32 + (p % bs) as u32)
        .collect();
    SeqInput {
        tokens,
        start_pos: start,
        slots,
        block_table: blocks.to_vec(),
        logits: LogitsWanted::Last,
        decoded_from: None,
    }
}

/// Tokens/s of one prefill of `len` tokens, per run.
pub fn prefill(model: &Model, len: usize, runs: usize) -> Result<Stats> {
    let bs = DEFAULT_BLOCK_SIZE;
    let blocks: Vec<u32> = (0..len.div_ceil(bs) as u32).collect();
    let mut cache = KvCache::new(model.cache_shape(), blocks.len(), bs);
    let ids = prompt(len, model.config().vocab_size, 0);
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        let batch = ForwardBatch {
            seqs: vec![seq_input(ids.clone(), 0, &blocks, bs)],
        };
        let t = Instant::now();
        model.forward(&batch, &mut cache)?;
        rates.push(len as f64 / t.elapsed().as_secs_f64());
    }
    Ok(Stats::of(rates))
}

/// Generated tokens/s of `batch` sequences decoding `steps` tokens each after a `context` prefill.
pub fn decode(
    model: &Model,
    batch: usize,
    context: usize,
    steps: usize,
    runs: usize,
) -> Result<Stats> {
    let bs = DEFAULT_BLOCK_SIZE;
    let per_seq = (context + steps).div_ceil(bs);
    let mut cache = KvCache::new(model.cache_shape(), per_seq * batch, bs);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let mut rates = Vec::new();
    for _ in 0..runs.max(1) {
        let seqs = (0..batch).map(|s| {
            seq_input(
                prompt(context, model.config().vocab_size, s),
                0,
                &tables[s],
                bs,
            )
        });
        let mut next: Vec<u32> = model
            .forward(
                &ForwardBatch {
                    seqs: seqs.collect(),
                },
                &mut cache,
            )?
            .iter()
            .map(|l| argmax(l))
            .collect();
        let t = Instant::now();
        for step in 0..steps {
            let seqs = (0..batch)
                .map(|s| seq_input(vec![next[s]], context + step, &tables[s], bs))
                .collect();
            next = model
                .forward(&ForwardBatch { seqs }, &mut cache)?
                .iter()
                .map(|l| argmax(l))
                .collect();
        }
        rates.push((batch * steps) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(Stats::of(rates))
}

/// Peak resident set size of this process in MiB (`VmHWM`), where /proc is available.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs the `bench` subcommand and prints a report.
pub fn run(args: &BenchArgs) -> Result<()> {
    let opts = LoadOptions {
        dtype: args.dtype,
        quantize: args.quantize,
        device: args.device,
        kv_cache_dtype: args.kv_cache_dtype,
        ..LoadOptions::default()
    };
    let t = Instant::now();
    let (model, config, dtype) = loader::load_model(&args.model_id, &opts)?;
    println!(
        "model {} ({}, {} layers, hidden {}), weights {} ({:.0} MiB streamed per decode step), KV cache {}, {} threads, integer kernels {:?}, loaded in {:.1}s",
        args.model_id.display(),
        config.architecture,
        config.num_layers,
        config.hidden_size,
        loader::dtype_name(dtype),
        model.weight_bytes() as f64 / (1 << 20) as f64,
        args.kv_cache_dtype,
        rayon::current_num_threads(),
        crate::backend::cpu::quant::Kernels::chosen(),
        t.elapsed().as_secs_f64()
    );
    // One untimed pass warms caches and the thread pool.
    prefill(&model, args.prefill_tokens.min(64), 1)?;
    let p = prefill(&model, args.prefill_tokens, args.runs)?;
    println!(
        "prefill {:>4} tokens        : {:8.1} tok/s (median; min {:.1}, max {:.1})",
        args.prefill_tokens, p.median, p.min, p.max
    );
    for &b in &args.batch_sizes {
        let d = decode(&model, b, args.context, args.steps, args.runs)?;
        println!(
            "decode batch {b:>3} (ctx {:>4}): {:8.1} tok/s (median; min {:.1}, max {:.1})",
            args.context, d.median, d.min, d.max
        );
    }
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    Ok(())
}
