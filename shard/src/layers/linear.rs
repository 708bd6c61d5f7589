//! Linear layers in Megatron's two tensor-parallel flavours: column-parallel (output rows split
//! across ranks; q/k/v and gate/up are fused into one matrix so one GEMM serves them) and
//! row-parallel (input columns split; the partial sums are all-reduced by the caller).

use std::sync::Arc;

use crate::backend::Backend;
use crate::comm::Shard;
use crate::weights::{expect_shape, stack_rows, DType, TensorData, WeightSource};
use crate::{Error, Result};

/// `y = x · Wᵀ (+ b)` with `W` packed for the device.
pub struct Linear<B: Backend> {
    weight: Arc<B::Matrix>,
    bias: Option<B::Tensor>,
}

/// One part of a fused column-parallel linear: rows `first..first + rows` of the checkpoint
/// tensor `{prefix}.weight` (all of its `total` rows unless it is itself fused, as Phi-3's
/// `qkv_proj`), and the rows that must stay on one rank (a head's, or a GQA group's, rows).
pub struct Part<'a> {
    pub prefix: &'a str,
    pub total: usize,
    pub first: usize,
    pub rows: usize,
    pub unit: usize,
}

impl<'a> Part<'a> {
    /// The whole tensor `{prefix}.weight` of `rows` rows.
    pub fn whole(prefix: &'a str, rows: usize, unit: usize) -> Self {
        Part {
            prefix,
            total: rows,
            first: 0,
            rows,
            unit,
        }
    }
}

/// A row-parallel linear's checkpoint prefix, full shape, and the input columns that stay on one
/// rank (matching the `unit` of the column-parallel layer that produces its input).
pub struct RowPart<'a> {
    pub prefix: &'a str,
    pub rows: usize,
    pub cols: usize,
    pub unit: usize,
}

impl<B: Backend> Linear<B> {
    pub fn new(weight: B::Matrix, bias: Option<B::Tensor>) -> Self {
        Linear {
            weight: Arc::new(weight),
            bias,
        }
    }

    /// A linear over an already packed, shared matrix (a tied lm_head).
    pub fn shared(weight: Arc<B::Matrix>) -> Self {
        Linear { weight, bias: None }
    }

    /// Fuses `parts` (e.g. q, k, v) by rows, each split across ranks by rows. `{prefix}.bias` is
    /// loaded too when `bias` is set.
    pub fn column(
        b: &B,
        src: &dyn WeightSource,
        parts: &[Part],
        cols: usize,
        bias: bool,
        dtype: DType,
        shard: Shard,
    ) -> Result<Self> {
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        let mut total = 0;
        for part in parts {
            let name = format!("{}.weight", part.prefix);
            let t = expect_shape(src, &name, &[part.total, cols])?;
            let local = shard.units(part.rows, part.unit);
            let rows = part.first + local.start..part.first + local.end;
            total += rows.len();
            weights.push(t.data.slice_rows(rows.clone(), cols));
            if bias {
                let b = load_vector(src, &format!("{}.bias", part.prefix), part.total)?;
                biases.extend_from_slice(&b[rows]);
            }
        }
        let data = stack_rows(weights, dtype);
        let data = data.quantized_at_load(cols, dtype).unwrap_or(data);
        let packed = b
            .pack(total, cols, &data)
            .map_err(|m| Error::tensor(src.file_of(parts[0].prefix), parts[0].prefix, m))?;
        let bias = bias.then(|| b.upload(biases, total));
        Ok(Linear::new(packed, bias))
    }

    /// Row-parallel: this rank keeps its slice of the input columns, split in whole `unit`s as
    /// the column-parallel layer before it split its rows (no bias in our families).
    pub fn row(
        b: &B,
        src: &dyn WeightSource,
        part: &RowPart,
        dtype: DType,
        shard: Shard,
    ) -> Result<Self> {
        let (rows, cols) = (part.rows, part.cols);
        let t = expect_shape(src, &format!("{}.weight", part.prefix), &[rows, cols])?;
        let local = shard.units(cols, part.unit);
        let width = local.len();
        let data = if shard.world == 1 {
            t.data
        } else {
            t.data.slice_cols(local, cols)
        };
        let data = data.convert(dtype);
        let data = data.quantized_at_load(width, dtype).unwrap_or(data);
        let packed = b
            .pack(rows, width, &data)
            .map_err(|m| Error::tensor(src.file_of(part.prefix), part.prefix, m))?;
        Ok(Linear::new(packed, None))
    }

    pub fn weight(&self) -> &Arc<B::Matrix> {
        &self.weight
    }

    /// `x` is `[n, in]`; returns `[n, out]`.
    pub fn forward(&self, b: &B, x: &B::Tensor) -> B::Tensor {
        let mut out = b.matmul(x, &self.weight);
        if let Some(bias) = &self.bias {
            b.add(&mut out, bias);
        }
        out
    }
}

/// A 1-D f32 tensor (norm weight, bias) of length `len`.
pub fn load_vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = src.tensor(name)?;
    if t.shape != [len] {
        return Err(Error::tensor(
            src.file_of(name),
            name,
            format!("expected shape [{len}], found {:?}", t.shape),
        ));
    }
    Ok(match t.data {
        TensorData::F32(v) => v,
        other => other.to_f32(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::weights::HostTensor;

    /// In-memory checkpoint for slicing tests.
    struct Mem(HashMap<String, HostTensor>);

    impl WeightSource for Mem {
        fn tensor(&self, name: &str) -> Result<HostTensor> {
            self.0
                .get(name)
                .cloned()
                .ok_or_else(|| Error::tensor("mem", name, "missing"))
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
        fn file_of(&self, _: &str) -> PathBuf {
            PathBuf::from("mem")
        }
        fn native_dtype(&self) -> DType {
            DType::F32
        }
    }

    fn matrix(rows: usize, cols: usize, seed: usize) -> HostTensor {
        let data = (0..rows * cols)
            .map(|i| ((i * 31 + seed) % 17) as f32 / 8.0 - 1.0)
            .collect();
        HostTensor {
            shape: vec![rows, cols],
            data: TensorData::F32(data),
        }
    }

    /// Tensor parallelism over two ranks with uneven shares (3 heads of 4 rows: rank 0 holds two,
    /// rank 1 one): column-parallel ranks produce disjoint output slices of each fused part;
    /// row-parallel ranks produce partial sums that add up to the full output.
    #[test]
    fn two_rank_slices_recombine_to_the_full_layer() {
        let (h, q, kv) = (8, 12, 6);
        let src = Mem(HashMap::from([
            ("q.weight".to_string(), matrix(q, h, 1)),
            ("k.weight".to_string(), matrix(kv, h, 2)),
            ("o.weight".to_string(), matrix(h, q, 3)),
        ]));
        let x: Vec<f32> = (0..2 * h).map(|i| i as f32 / 5.0 - 1.0).collect();
        let parts = [Part::whole("q", q, 4), Part::whole("k", kv, 2)];
        let run =
            |l: Linear<Cpu>, x: &[f32], width| l.forward(&Cpu, &Cpu.upload(x.to_vec(), width)).data;
        let (q_share, k_share) = ([0..8, 8..12], [0..4, 4..6]);
        let one = Shard { rank: 0, world: 1 };
        let full = run(
            Linear::column(&Cpu, &src, &parts, h, false, DType::F32, one).unwrap(),
            &x,
            h,
        );
        for rank in 0..2 {
            let shard = Shard { rank, world: 2 };
            let layer = Linear::column(&Cpu, &src, &parts, h, false, DType::F32, shard).unwrap();
            let local = run(layer, &x, h);
            let (qr, kr) = (q_share[rank].clone(), k_share[rank].clone());
            let width = qr.len() + kr.len();
            for t in 0..2 {
                let row = &full[t * (q + kv)..(t + 1) * (q + kv)];
                let want: Vec<f32> = [&row[qr.clone()], &row[q + kr.start..q + kr.end]].concat();
                assert_eq!(&local[t * width..(t + 1) * width], want.as_slice());
            }
        }
        let xo: Vec<f32> = (0..2 * q).map(|i| (i % 5) as f32 - 2.0).collect();
        let o = |shard| {
            let part = RowPart {
                prefix: "o",
                rows: h,
                cols: q,
                unit: 4,
            };
            Linear::row(&Cpu, &src, &part, DType::F32, shard).unwrap()
        };
        let full_o = run(o(one), &xo, q);
        let mut sum = vec![0.0; 2 * h];
        for rank in 0..2 {
            let xs: Vec<f32> = xo
                .chunks(q)
                .flat_map(|r| r[q_share[rank].clone()].to_vec())
                .collect();
            let width = q_share[rank].len();
            let part = run(o(Shard { rank, world: 2 }), &xs, width);
            sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
        for (a, b) in sum.iter().zip(&full_o) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
