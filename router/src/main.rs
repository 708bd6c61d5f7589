//! `tessera-router`: the HTTP front end process.
use clap::Parser;

/// Tessera router (the HTTP API arrives with the router issue).
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() {
    let _ = Args::parse();
}
