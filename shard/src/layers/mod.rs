//! Layers shared by every model family: linear (column/row parallel), embedding, RMSNorm and
//! rotary embedding, each holding its weights on a [`Backend`](crate::backend::Backend) and
//! running through its operations. Each lives here once.

pub mod embedding;
pub mod linear;
pub mod norm;
pub mod rope;
