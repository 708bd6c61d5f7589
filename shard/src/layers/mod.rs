//! Layers shared by every model family: linear (column/row parallel), embedding, RMSNorm,
//! rotary embedding and paged attention. Each lives here once.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod norm;
pub mod rope;

/// Token rows per parallel task in the element-wise layers: enough work to pay for a task, so
/// decode steps stay on one thread while prefills spread over the pool.
pub const ROWS_PER_TASK: usize = 16;
