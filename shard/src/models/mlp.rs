//! The MLP of a decoder layer: dense gated (SwiGLU, GeGLU) or a sparse mixture of experts.
//!
//! Experts are tensor-parallel the way dense MLPs are: every rank holds each expert's slice of
//! the FFN columns (gate/up by rows, down by columns) and the ranks' partial sums meet in the
//! layer's one all-reduce. Assigning whole experts to ranks instead would leave a rank idle
//! whenever the router prefers another's experts; this split keeps every rank's work equal to
//! the dense case whatever the routing, with the same uneven-split rules.
//!
//! A step groups tokens by expert, so each chosen expert's weights are read once for all of its
//! tokens (batched decode reads an expert once per step, not once per token).

use crate::backend::{Activation, Backend};
use crate::comm::Shard;
use crate::config::{Architecture, ModelConfig};
use crate::layers::linear::{Linear, Part, RowPart};
use crate::weights::{DType, WeightSource};
use crate::Result;

pub enum Mlp<B: Backend> {
    Dense(Dense<B>),
    Experts(Experts<B>),
}

/// `down(act(gate(x)) · up(x))`, gate and up fused into one column-parallel matrix.
pub struct Dense<B: Backend> {
    gate_up: Linear<B>,
    down: Linear<B>,
}

/// A router picking `top_k` of `experts` per token, outputs weighted by its probabilities.
pub struct Experts<B: Backend> {
    router: Linear<B>,
    experts: Vec<Dense<B>>,
    top_k: usize,
    renormalize: bool,
}

/// Where a layer's tensors are, for the loader.
pub struct Loading<'a, B: Backend> {
    pub b: &'a B,
    pub src: &'a dyn WeightSource,
    pub config: &'a ModelConfig,
    pub dtype: DType,
    pub shard: Shard,
}

impl<B: Backend> Dense<B> {
    /// `gate`, `up` and `down` name whole tensors, or `up` is `None` and `gate` is a fused
    /// `[gate; up]` tensor (Phi-3's `gate_up_proj`).
    fn load(
        at: &Loading<B>,
        (gate, up, down): (&str, Option<&str>, &str),
        ff: usize,
    ) -> Result<Self> {
        let h = at.config.hidden_size;
        let parts = match up {
            Some(up) => vec![Part::whole(gate, ff, 1), Part::whole(up, ff, 1)],
            None => (0..2)
                .map(|half| Part {
                    prefix: gate,
                    total: 2 * ff,
                    first: half * ff,
                    rows: ff,
                    unit: 1,
                })
                .collect(),
        };
        let down = RowPart {
            prefix: down,
            rows: h,
            cols: ff,
            unit: 1,
        };
        Ok(Dense {
            gate_up: Linear::column(at.b, at.src, &parts, h, false, at.dtype, at.shard)?,
            down: Linear::row(at.b, at.src, &down, at.dtype, at.shard)?,
        })
    }

    /// This rank's partial sum of the output.
    fn forward(&self, b: &B, x: &B::Tensor, act: Activation) -> B::Tensor {
        let gu = self.gate_up.forward(b, x);
        self.down.forward(b, &b.gated(&gu, act))
    }

    fn nbytes(&self, b: &B) -> usize {
        b.nbytes(self.gate_up.weight()) + b.nbytes(self.down.weight())
    }
}

impl<B: Backend> Mlp<B> {
    /// Layer `i`'s MLP (`p` is its name prefix, `model.layers.{i}`).
    pub fn load(at: &Loading<B>, p: &str, i: usize) -> Result<Self> {
        let c = at.config;
        let name = |s: &str| format!("{p}.{s}");
        let Some(moe) = c.moe.as_ref().filter(|m| m.sparse_layers[i]) else {
            let (gate, up, down) = match c.architecture {
                Architecture::Phi3 => (name("mlp.gate_up_proj"), None, name("mlp.down_proj")),
                _ => (
                    name("mlp.gate_proj"),
                    Some(name("mlp.up_proj")),
                    name("mlp.down_proj"),
                ),
            };
            let names = (gate.as_str(), up.as_deref(), down.as_str());
            return Ok(Mlp::Dense(Dense::load(at, names, c.intermediate_size)?));
        };
        let (block, [gate, up, down]) = match c.architecture {
            Architecture::Mixtral => ("block_sparse_moe", ["w1", "w3", "w2"]),
            _ => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        };
        // Every rank routes every token itself: the router is replicated, in f32.
        let router_name = name(&format!("{block}.gate"));
        let router = [Part::whole(&router_name, moe.num_experts, 1)];
        let whole = Shard { rank: 0, world: 1 };
        let router = Linear::column(
            at.b,
            at.src,
            &router,
            c.hidden_size,
            false,
            DType::F32,
            whole,
        )?;
        let experts = (0..moe.num_experts)
            .map(|e| {
                let expert = |s: &str| name(&format!("{block}.experts.{e}.{s}"));
                let names = (expert(gate), expert(up), expert(down));
                let names = (names.0.as_str(), Some(names.1.as_str()), names.2.as_str());
                Dense::load(at, names, moe.intermediate_size)
            })
            .collect::<Result<_>>()?;
        Ok(Mlp::Experts(Experts {
            router,
            experts,
            top_k: moe.top_k,
            renormalize: moe.norm_topk_prob,
        }))
    }

    /// This rank's partial sum of the MLP's output for `x` (`[n, hidden]`, normalized).
    pub fn forward(&self, b: &B, x: &B::Tensor, act: Activation) -> B::Tensor {
        match self {
            Mlp::Dense(d) => d.forward(b, x, act),
            Mlp::Experts(e) => e.forward(b, x, act),
        }
    }

    /// Bytes a decode step reads on average: the dense weights, or the router and `top_k` of
    /// the experts.
    pub fn nbytes(&self, b: &B) -> usize {
        match self {
            Mlp::Dense(d) => d.nbytes(b),
            Mlp::Experts(e) => {
                let all: usize = e.experts.iter().map(|d| d.nbytes(b)).sum();
                b.nbytes(e.router.weight()) + all * e.top_k / e.experts.len()
            }
        }
    }
}

impl<B: Backend> Experts<B> {
    fn forward(&self, b: &B, x: &B::Tensor, act: Activation) -> B::Tensor {
        let (n, h) = (b.rows(x), b.width(x));
        let routes = b.top_k_softmax(&self.router.forward(b, x), self.top_k, self.renormalize);
        // Per expert: its tokens and their weights, tokens in order.
        let mut chosen = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (t, picks) in routes.iter().enumerate() {
            for &(e, p) in picks {
                chosen[e].0.push(t);
                chosen[e].1.push(p);
            }
        }
        let mut out = b.zeros(n, h);
        for (expert, (tokens, weights)) in self.experts.iter().zip(&chosen) {
            if tokens.is_empty() {
                continue;
            }
            let y = expert.forward(b, &b.gather_rows(x, tokens), act);
            b.scatter_add_rows(&mut out, &y, tokens, weights);
        }
        out
    }
}
