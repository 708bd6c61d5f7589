//! The rotary embedding's configuration: base, rotated dimensions and frequency rescaling, read
//! from either config layout transformers writes — the classic `rope_theta` + `rope_scaling`, or
//! `rope_parameters` (transformers 5; per layer type for Gemma 3) — with every default resolved
//! here as transformers resolves it (`modeling_rope_utils.py`), so the layer only computes.

use serde_json::Value;

use super::hf::{opt_f64, opt_usize};

/// One rotary embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub scaling: RopeScaling,
    /// Dimensions of each head that rotate (`head_dim · partial_rotary_factor`); the rest pass.
    pub rotary_dim: usize,
}

/// How rotary frequencies are rescaled for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        factor: f32,
    },
    /// NTK-aware: beyond `max_position_embeddings` the base grows with the sequence's length.
    Dynamic {
        factor: f32,
        max_position_embeddings: usize,
    },
    /// Llama 3.1's piecewise rescaling of low frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    Yarn(Yarn),
    /// Phi-3's per-frequency factors, long ones once a sequence outgrows the original context.
    LongRope(LongRope),
}

/// YaRN (Peng et al. 2023): interpolated low frequencies, extrapolated high ones, a linear ramp
/// between, and cos/sin scaled by `attention_factor`.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// Round the ramp's ends outwards (transformers' `truncate`, default true).
    pub truncate: bool,
    pub attention_factor: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LongRope {
    /// One factor per frequency (`rotary_dim / 2`) dividing it within the original context.
    pub short_factor: Vec<f32>,
    /// The same beyond it.
    pub long_factor: Vec<f32>,
    pub original_max_position_embeddings: usize,
    pub attention_factor: f32,
}

impl RopeConfig {
    pub fn plain(theta: f32, rotary_dim: usize) -> Self {
        RopeConfig {
            theta,
            scaling: RopeScaling::None,
            rotary_dim,
        }
    }

    pub(super) fn check(&self, head_dim: usize) -> Result<(), String> {
        if self.rotary_dim == 0 || !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > head_dim
        {
            return Err(format!(
                "rotary dimensions ({}) must be even, positive and at most head_dim ({head_dim})",
                self.rotary_dim
            ));
        }
        if let RopeScaling::LongRope(l) = &self.scaling {
            let half = self.rotary_dim / 2;
            if l.short_factor.len() != half || l.long_factor.len() != half {
                return Err(format!(
                    "longrope needs {half} short and long factors, got {} and {}",
                    l.short_factor.len(),
                    l.long_factor.len()
                ));
            }
        }
        Ok(())
    }
}

/// What the rope parsers need from the rest of `config.json`.
pub(super) struct RopeContext {
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// A top-level `original_max_position_embeddings` (Phi-3 keeps it there).
    pub original_max_position_embeddings: Option<usize>,
    pub default_theta: f64,
}

/// The global rotary embedding and, when `rope_parameters` is split by layer type, the one of
/// sliding-window layers.
pub(super) fn from_json(
    j: &Value,
    cx: &RopeContext,
) -> Result<(RopeConfig, Option<RopeConfig>), String> {
    match j.get("rope_parameters").filter(|v| v.is_object()) {
        Some(p) if p.get("full_attention").is_some() || p.get("sliding_attention").is_some() => {
            let part = |key: &str| p.get(key).map(|v| parse(j, v, cx)).transpose();
            let global =
                part("full_attention")?.ok_or("rope_parameters has no 'full_attention'")?;
            Ok((global, part("sliding_attention")?))
        }
        Some(p) => Ok((parse(j, p, cx)?, None)),
        None => {
            let scaling = j.get("rope_scaling").filter(|v| !v.is_null());
            let empty = Value::Object(Default::default());
            Ok((parse(j, scaling.unwrap_or(&empty), cx)?, None))
        }
    }
}

/// One rope parameter set `p` (a `rope_scaling` or `rope_parameters` object); `rope_theta` and
/// `partial_rotary_factor` are read from it first, then from the top level `j`.
fn parse(j: &Value, p: &Value, cx: &RopeContext) -> Result<RopeConfig, String> {
    let either = |k: &str| -> Result<Option<f64>, String> {
        Ok(match opt_f64(p, k)? {
            Some(v) => Some(v),
            None => opt_f64(j, k)?,
        })
    };
    let theta = either("rope_theta")?.unwrap_or(cx.default_theta) as f32;
    let partial = either("partial_rotary_factor")?.unwrap_or(1.0);
    let rotary_dim = (cx.head_dim as f64 * partial) as usize;
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| opt_f64(p, k).map(|v| v.map(|x| x as f32));
    let factor = || f("factor")?.ok_or(format!("rope scaling '{kind}' has no 'factor'"));
    let max = cx.max_position_embeddings;
    // The pretrained context of llama3, yarn and longrope: a top-level
    // `original_max_position_embeddings` (Phi-3 keeps it there) wins, as in transformers.
    let original = match cx.original_max_position_embeddings {
        Some(o) => o,
        None => opt_usize(p, "original_max_position_embeddings")?.unwrap_or(max),
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            max_position_embeddings: max,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: original,
        },
        "yarn" => RopeScaling::Yarn(yarn(p, max, original)?),
        "longrope" | "su" => RopeScaling::LongRope(long_rope(p, max, original)?),
        other => return Err(format!("unsupported rope scaling type '{other}'")),
    };
    Ok(RopeConfig {
        theta,
        scaling,
        rotary_dim,
    })
}

/// `0.1 · m · ln(scale) + 1` (1 for `scale` ≤ 1), YaRN's attention temperature.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// YaRN's default attention factor for `factor`: `mscale(factor, m) / mscale(factor, all)` when
/// both are set and nonzero (DeepSeek), else `mscale(factor, 1)`.
pub(super) fn yarn_attention_factor(factor: f64, m: Option<f64>, all: Option<f64>) -> f64 {
    match (m, all) {
        (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
            yarn_mscale(factor, m) / yarn_mscale(factor, all)
        }
        _ => yarn_mscale(factor, 1.0),
    }
}

/// LongRoPE's default attention factor: `√(1 + ln(factor) / ln(original))`, 1 for `factor` ≤ 1.
pub(super) fn long_rope_attention_factor(factor: f64, original: usize) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / (original as f64).ln()).sqrt()
    }
}

fn yarn(p: &Value, max: usize, original: usize) -> Result<Yarn, String> {
    let f = |k: &str| opt_f64(p, k);
    // Without a factor, the ratio of the context to the pretrained one (DeepSeek-V3 style).
    let factor = f("factor")?.unwrap_or(max as f64 / original as f64);
    let attention_factor = match f("attention_factor")? {
        Some(a) => a,
        None => yarn_attention_factor(factor, f("mscale")?, f("mscale_all_dim")?),
    };
    Ok(Yarn {
        factor: factor as f32,
        original_max_position_embeddings: original,
        beta_fast: f("beta_fast")?.filter(|&b| b != 0.0).unwrap_or(32.0) as f32,
        beta_slow: f("beta_slow")?.filter(|&b| b != 0.0).unwrap_or(1.0) as f32,
        truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
        attention_factor: attention_factor as f32,
    })
}

fn long_rope(p: &Value, max: usize, original: usize) -> Result<LongRope, String> {
    let factors = |k: &str| -> Result<Vec<f32>, String> {
        let list = p
            .get(k)
            .and_then(Value::as_array)
            .ok_or(format!("longrope has no '{k}' list"))?;
        list.iter()
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or(format!("'{k}' holds {v}"))
            })
            .collect()
    };
    let factor = opt_f64(p, "factor")?.unwrap_or(max as f64 / original as f64);
    let attention_factor = match opt_f64(p, "attention_factor")? {
        Some(a) => a,
        None => long_rope_attention_factor(factor, original),
    };
    Ok(LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor: attention_factor as f32,
    })
}
