//! Fuzz target (bolero) for the safetensors reader: `cargo test` runs it for a few seconds on
//! random edits of valid files and on headers built from random entries, under an allocation cap;
//! `cargo bolero test fuzz_safetensors_reader` runs it under libFuzzer.
//!
//! The property: any input opens or fails with an `Error` — no panic, no allocation past the cap —
//! and every tensor of a file that opened reads with as many elements as its shape says.

#[path = "../../formats/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use bolero::check;
use fuzz_support::{apply, within_allocation_cap, Edit, Executions, EXTREMES, TEST_TIME};
use serde_json::{json, Map, Value};
use tessera_shard::weights::safetensors::SafetensorsFile;

#[global_allocator]
static ALLOC: fuzz_support::CappedAlloc = fuzz_support::CappedAlloc;

const DTYPES: [&str; 8] = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4"];

/// A number: small most of the time, sometimes one of the extremes.
#[derive(Debug, bolero::generator::TypeGenerator)]
enum Num {
    Small(u8),
    Extreme(u8),
}

impl Num {
    fn value(&self) -> u64 {
        match *self {
            Num::Small(v) => v as u64,
            Num::Extreme(i) => EXTREMES[i as usize % EXTREMES.len()],
        }
    }
}

#[derive(Debug, bolero::generator::TypeGenerator)]
struct EntrySpec {
    dtype: u8,
    shape: Vec<Num>,
    start: Num,
    end: Num,
}

#[derive(Debug, bolero::generator::TypeGenerator)]
enum Seed {
    /// A valid file with F32, F16 and BF16 tensors and metadata.
    Valid,
    /// A header of random entries over `data_len` bytes of data.
    Entries {
        entries: Vec<EntrySpec>,
        data_len: u8,
    },
    /// The input's own bytes.
    Raw(Vec<u8>),
}

#[derive(Debug, bolero::generator::TypeGenerator)]
struct Case {
    seed: Seed,
    n_edits: u8,
    edits: Vec<Edit>,
}

fn file(header: &Value, data_len: usize) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend((0..data_len).map(|i| i as u8));
    out
}

fn valid() -> Vec<u8> {
    let header = json!({
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "BF16", "shape": [], "data_offsets": [32, 34]},
    });
    file(&header, 34)
}

fn bytes_of(case: &Case) -> Vec<u8> {
    let mut bytes = match &case.seed {
        Seed::Valid => valid(),
        Seed::Entries { entries, data_len } => {
            let mut header = Map::new();
            for (i, e) in entries.iter().enumerate() {
                let shape: Vec<u64> = e.shape.iter().map(Num::value).collect();
                header.insert(
                    format!("t{i}"),
                    json!({
                        "dtype": DTYPES[e.dtype as usize % DTYPES.len()],
                        "shape": shape,
                        "data_offsets": [e.start.value(), e.end.value()],
                    }),
                );
            }
            file(&Value::Object(header), *data_len as usize)
        }
        Seed::Raw(b) => b.clone(),
    };
    let n = case.n_edits as usize % 5;
    apply(&mut bytes, &case.edits[..n.min(case.edits.len())]);
    bytes
}

#[test]
fn fuzz_safetensors_reader() {
    let runs = Executions::new("safetensors_reader");
    check!()
        .with_type::<Case>()
        .with_test_time(TEST_TIME)
        .for_each(|case| {
            runs.tick();
            let bytes = bytes_of(case);
            within_allocation_cap(|| {
                let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors", bytes) else {
                    return;
                };
                let names: Vec<String> = f.names().map(str::to_string).collect();
                for name in names {
                    if let Ok(t) = f.tensor(&name) {
                        assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
                    }
                }
                runs.reached_end();
            })
        });
}

#[test]
fn seed_is_valid() {
    let f = SafetensorsFile::from_bytes("valid.safetensors", valid()).unwrap();
    assert_eq!(f.tensor("a").unwrap().data.len(), 6);
    assert_eq!(f.tensor("c").unwrap().shape, Vec::<usize>::new());
}
