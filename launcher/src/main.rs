//! `tessera-launcher`: spawns and supervises shards and the router.
use clap::Parser;

/// Tessera launcher (process supervision arrives with the launcher issue).
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _ = Args::parse();
}
