//! Layers shared by every model family: linear (column/row parallel), embedding, RMSNorm,
//! rotary embedding and paged attention. Each lives here once.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod norm;
pub mod rope;
