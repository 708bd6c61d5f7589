//! Prints a GGUF file's metadata (arrays summarized) and tensor count: `cargo run --example gguf_meta FILE`.

use tessera_formats::gguf::{Gguf, GgufValue};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for arg in std::env::args().skip(1) {
        let g = Gguf::open(std::path::Path::new(&arg))?;
        println!("== {arg} (v{}, {} tensors)", g.version(), g.tensors().len());
        for (k, v) in g.metadata() {
            match v {
                GgufValue::Array(a) => {
                    let head: Vec<_> = a.iter().take(4).collect();
                    println!("{k}: array[{}] {head:?}", a.len());
                }
                GgufValue::String(s) if s.len() > 80 => println!("{k}: {:?}...", &s[..80]),
                _ => println!("{k}: {v:?}"),
            }
        }
    }
    Ok(())
}
