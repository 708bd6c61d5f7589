//! Tessera router library.
