//! Every model family against transformers: the tiny random-weight checkpoints in
//! `tests/fixtures/families/` (made by transformers itself, `make.py` there says how), each as a
//! Hugging Face folder and as the GGUF file llama.cpp's converter made of it. Per fixture and
//! format: the first token's logits within 1e-3 of transformers' float32 ones, greedy ids equal,
//! the prompts batched together giving the same ids as alone (batch invariance), and two
//! tensor-parallel ranks giving the one-rank logits. Every fixture folder is checked, whatever
//! its shape: the test reads what is there rather than a list.
//!
//! Where a GGUF cannot carry a setting its `config.json` has (llama.cpp's converter keeps no key
//! for it, so the file's own configuration differs), comparing that GGUF with transformers would
//! be comparing two models: the row says so and what the file lacks, and checks the file's weights
//! one-rank with config.json's values for just those settings instead.

mod engine_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use engine_common::*;
use serde_json::Value;
use tessera_formats::gguf::Gguf;
use tessera_shard::comm::{Comm, CpuComm, Local, Rendezvous};
use tessera_shard::config::{ModelConfig, RopeScaling};
use tessera_shard::forward::{ForwardBatch, LogitsWanted, SeqInput};
use tessera_shard::kv_cache::{KvCache, KvCacheDtype};
use tessera_shard::loader::{load_model, Device, LoadOptions, WeightDtype};
use tessera_shard::models::Model;
use tessera_shard::tools::generate::argmax;
use tessera_shard::weights::gguf::GgufSource;
use tessera_shard::weights::DType;

const BLOCK: usize = 16;
/// transformers' first-token logits against ours: both f32, summed in other orders.
const LOGIT_TOLERANCE: f32 = 1e-3;
/// Two ranks' row-parallel sums against one rank's.
const RANK_TOLERANCE: f32 = 1e-4;

struct Case {
    name: String,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    first_logits: Vec<f32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn cases(dir: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let r: Value = serde_json::from_str(&text).expect("reference JSON");
    r["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap_or("?").to_string(),
            prompt: ids(&c["prompt_ids"]),
            greedy: ids(&c["greedy_ids"]),
            first_logits: c["first_logits"]
                .as_array()
                .expect("first_logits")
                .iter()
                .map(|x| x.as_f64().expect("a logit") as f32)
                .collect(),
        })
        .collect()
}

/// Every fixture folder (those with a reference), sorted.
fn fixtures() -> Vec<PathBuf> {
    let root = repo_root().join("tests/fixtures/families");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/families")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("reference.json").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures in {}", root.display());
    dirs
}

fn load(path: &Path, comm: Arc<dyn Comm>) -> Model {
    let opts = LoadOptions {
        dtype: WeightDtype::Auto,
        device: Device::Cpu,
        kv_cache_dtype: KvCacheDtype::F32,
        comm,
        ..LoadOptions::default()
    };
    load_model(path, &opts)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .0
}

/// Greedy decoding of `prompts` together (one batch: the prefills, then `steps` decode steps);
/// per forward, each sequence's logits row, and the ids.
fn decode(model: &Model, prompts: &[&[u32]], steps: usize) -> (Vec<Vec<Vec<f32>>>, Vec<Vec<u32>>) {
    let per_seq = (prompts.iter().map(|p| p.len()).max().unwrap_or(0) + steps).div_ceil(BLOCK);
    let mut cache = KvCache::new(model.cache_shape(), per_seq * prompts.len(), BLOCK);
    let input = |s: usize, tokens: Vec<u32>, start: usize| SeqInput {
        slots: (start..start + tokens.len())
            .map(|p| (s * per_seq * BLOCK + p) as u32)
            .collect(),
        tokens,
        start_pos: start,
        block_table: ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect(),
        logits: LogitsWanted::Last,
        decoded_from: None,
    };
    let mut batch = ForwardBatch {
        seqs: (0..prompts.len())
            .map(|s| input(s, prompts[s].to_vec(), 0))
            .collect(),
    };
    let mut pos: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let (mut forwards, mut out) = (Vec::new(), vec![Vec::new(); prompts.len()]);
    for _ in 0..steps {
        let logits = model.forward(&batch, &mut cache).expect("forward");
        batch.seqs = (0..prompts.len())
            .map(|s| {
                let next = argmax(&logits[s]);
                out[s].push(next);
                pos[s] += 1;
                input(s, vec![next], pos[s] - 1)
            })
            .collect();
        forwards.push(logits);
    }
    (forwards, out)
}

/// How many of `case`'s greedy ids the engine must reproduce. All of them, except where a
/// LongRoPE sequence (Phi-3) starts within the pretrained context and decodes past it: there
/// transformers' `prepare_inputs_for_generation` drops the KV cache and recomputes the whole
/// sequence with the long factors, while Tessera (as TGI and vLLM) keeps the cached keys it
/// rotated with the short ones and uses the long factors from that step on. Ids before the
/// crossing step must still be equal.
fn comparable(config: &ModelConfig, case: &Case) -> usize {
    match &config.rope.scaling {
        RopeScaling::LongRope(l) if case.prompt.len() <= l.original_max_position_embeddings => {
            let before = (l.original_max_position_embeddings - case.prompt.len()).saturating_add(1);
            before.min(case.greedy.len())
        }
        _ => case.greedy.len(),
    }
}

/// One-rank checks of one model file against the reference; returns the worst logit error and
/// notes on ids not compared.
fn check_alone_and_batched(label: &str, model: &Model, cases: &[Case]) -> (f32, Vec<String>) {
    let (mut worst, mut notes) = (0f32, Vec::new());
    let steps = cases.iter().map(|c| c.greedy.len()).min().unwrap_or(0);
    let mut alone = Vec::new();
    for case in cases {
        let (forwards, ids) = decode(model, &[&case.prompt], case.greedy.len());
        let err = max_abs_diff(&forwards[0][0], &case.first_logits);
        worst = worst.max(err);
        assert!(
            err <= LOGIT_TOLERANCE,
            "{label} {}: first logits differ by {err}",
            case.name
        );
        let n = comparable(model.config(), case);
        assert_eq!(
            ids[0][..n],
            case.greedy[..n],
            "{label} {}: greedy ids",
            case.name
        );
        if n < case.greedy.len() {
            notes.push(format!(
                "{}: first {n} of {} ids (LongRoPE crosses the pretrained context)",
                case.name,
                case.greedy.len()
            ));
        }
        alone.push(ids[0][..steps].to_vec());
    }
    let prompts: Vec<&[u32]> = cases.iter().map(|c| &c.prompt[..]).collect();
    let (_, batched) = decode(model, &prompts, steps);
    for ((case, got), want) in cases.iter().zip(&batched).zip(&alone) {
        assert_eq!(
            got, want,
            "{label} {}: batched with the other prompts",
            case.name
        );
    }
    (worst, notes)
}

/// Two ranks over TCP decode like one: same ids, logits within `RANK_TOLERANCE`.
fn check_two_ranks(label: &str, path: &Path, cases: &[Case]) {
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt.clone()).collect();
    let steps = 8;
    let one = {
        let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
        decode(&load(path, Arc::new(Local)), &refs, steps)
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (path, prompts) = (path.to_path_buf(), prompts.clone());
            std::thread::spawn(move || {
                let rendezvous = Rendezvous {
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    join_timeout: Duration::from_secs(60),
                    op_timeout: Duration::from_secs(60),
                    secret: b"families test".to_vec(),
                };
                let comm = CpuComm::join(rank, 2, &rendezvous).expect("join");
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
                    decode(&load(&path, Arc::new(comm)), &refs, steps)
                })
            })
        })
        .collect();
    for (rank, r) in ranks.into_iter().enumerate() {
        let (forwards, ids) = r.join().expect("rank thread");
        assert_eq!(ids, one.1, "{label}: rank {rank}'s greedy ids");
        for (step, (a, b)) in forwards.iter().zip(&one.0).enumerate() {
            for (s, (x, y)) in a.iter().zip(b).enumerate() {
                let err = max_abs_diff(x, y);
                assert!(
                    err <= RANK_TOLERANCE,
                    "{label}: rank {rank} step {step} sequence {s} differs by {err}"
                );
            }
        }
    }
}

/// The settings of `config.json` that the GGUF `gguf` made of `dir` cannot carry, as the two
/// resolved configurations show (empty when the file says all of it), and the GGUF's
/// configuration with those settings taken from config.json.
fn gguf_cannot_carry(dir: &Path, gguf: &Path) -> (Vec<String>, ModelConfig) {
    let hf = ModelConfig::from_hf_dir(dir).expect("config.json");
    let file = Gguf::open(gguf).expect("GGUF");
    let mut g = ModelConfig::from_gguf(&file).unwrap_or_else(|e| panic!("{}: {e}", gguf.display()));
    let mut lost = Vec::new();
    if matches!(hf.rope.scaling, RopeScaling::Dynamic { .. }) && g.rope != hf.rope {
        lost.push(format!(
            "dynamic rope scaling (the file: {:?})",
            g.rope.scaling
        ));
        g.rope = hf.rope.clone();
    }
    let windows = |c: &ModelConfig| (0..c.num_layers).map(|i| c.window(i)).collect::<Vec<_>>();
    if windows(&hf) != windows(&g) {
        lost.push(format!(
            "sliding windows {:?} (the file: {:?})",
            windows(&hf),
            windows(&g)
        ));
        (g.sliding_window, g.sliding_layers) = (hf.sliding_window, hf.sliding_layers.clone());
    }
    if hf.attn_scale != g.attn_scale {
        lost.push(format!(
            "attention scale {} (the file: {}, from its shape)",
            hf.attn_scale, g.attn_scale
        ));
        g.attn_scale = hf.attn_scale;
    }
    (lost, g)
}

/// Each fixture, as a folder and as GGUF: what was checked, and the worst logit error.
#[test]
fn every_family_matches_transformers() {
    let mut table = Vec::new();
    for dir in fixtures() {
        let cases = cases(&dir);
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let gguf = dir.join("model.gguf");
        for (format, path) in [("hf", dir.clone()), ("gguf", gguf)] {
            if !path.exists() {
                table.push(format!("{name:16} {format:5} (no file)"));
                continue;
            }
            let label = format!("{name} ({format})");
            if format == "gguf" {
                let (lost, patched) = gguf_cannot_carry(&dir, &path);
                if !lost.is_empty() {
                    let file = Gguf::open(&path).expect("GGUF");
                    let src = GgufSource::new(&file, patched.num_heads, patched.num_kv_heads);
                    let model = Model::load(&src, &patched, DType::F32, Arc::new(Local))
                        .unwrap_or_else(|e| panic!("{label}: {e}"))
                        .with_kv_cache_dtype(KvCacheDtype::F32);
                    let (worst, notes) = check_alone_and_batched(&label, &model, &cases);
                    table.push(format!(
                        "{name:16} {format:5} skipped: the file cannot carry {}; its weights \
                         with config.json's values: ids equal, batch-invariant; max logit error \
                         {worst:.2e} {}",
                        lost.join(", "),
                        notes.join("; ")
                    ));
                    continue;
                }
            }
            let model = load(&path, Arc::new(Local));
            let (worst, notes) = check_alone_and_batched(&label, &model, &cases);
            check_two_ranks(&label, &path, &cases);
            table.push(format!(
                "{name:16} {format:5} ids equal, batch-invariant, 2-rank parity; max logit error \
                 {worst:.2e} {}",
                notes.join("; ")
            ));
        }
    }
    println!("{}", table.join("\n"));
}
