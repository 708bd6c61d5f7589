//! GGUF weights under Hugging Face names: quantized tensors are handed out quantized (`Affine`)
//! when the model keeps them so, else dequantized exactly to f32 as ggml does; llama.cpp's q/k row
//! permutation is undone so HF's rotate-half RoPE applies.

use std::path::PathBuf;

use tessera_formats::gguf::affine::affine_layout;
use tessera_formats::gguf::Gguf;

use super::{DType, HostTensor, TensorData, WeightSource};
use crate::{Error, Result};

/// A GGUF file seen as a weight source.
pub struct GgufSource<'a> {
    gguf: &'a Gguf,
    /// llama.cpp permutes q/k rows only for the `llama` architecture (qwen2 uses NEOX rotary).
    unpermute: bool,
    num_heads: usize,
    num_kv_heads: usize,
    /// Hand quantized tensors out as they are stored instead of dequantized.
    keep_quantized: bool,
}

impl<'a> GgufSource<'a> {
    pub fn new(gguf: &'a Gguf, num_heads: usize, num_kv_heads: usize) -> Self {
        let unpermute = gguf.get_str("general.architecture") == Some("llama");
        GgufSource {
            gguf,
            unpermute,
            num_heads,
            num_kv_heads,
            keep_quantized: false,
        }
    }

    /// Whether quantized tensors come out quantized (the model serves them so) or as f32.
    pub fn keep_quantized(self, keep: bool) -> Self {
        GgufSource {
            keep_quantized: keep,
            ..self
        }
    }
}

/// Maps an HF tensor name to its GGUF name; `None` if it has no counterpart.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The row order that undoes llama.cpp's `permute`: within each head, HF row `t * hd/2 + j` is
/// GGUF row `2j + t`, so `order[hf_row]` is the GGUF row to take.
fn unpermute_order(rows: usize, heads: usize) -> Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows cannot be split into {heads} heads of even size"
        ));
    }
    let hd = rows / heads;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for j in 0..hd / 2 {
            for t in 0..2 {
                order[h * hd + t * hd / 2 + j] = h * hd + 2 * j + t;
            }
        }
    }
    Ok(order)
}

impl WeightSource for GgufSource<'_> {
    fn tensor(&self, name: &str) -> Result<HostTensor> {
        let path = self.gguf.path();
        let g =
            gguf_name(name).ok_or_else(|| Error::tensor(path, name, "has no GGUF counterpart"))?;
        let ty = self.gguf.tensor_info(&g)?.ggml_type;
        let (shape, mut data) = if self.keep_quantized && affine_layout(ty).is_some() {
            let (shape, a) = self.gguf.tensor_affine(&g)?;
            (shape, TensorData::Quant(a))
        } else {
            let (shape, v) = self.gguf.tensor_f32(&g)?;
            (shape, TensorData::F32(v))
        };
        let heads = if g.ends_with("attn_q.weight") || g.ends_with("attn_q.bias") {
            Some(self.num_heads)
        } else if g.ends_with("attn_k.weight") || g.ends_with("attn_k.bias") {
            Some(self.num_kv_heads)
        } else {
            None
        };
        if let (true, Some(heads)) = (self.unpermute, heads) {
            let (rows, cols) = match shape[..] {
                [rows] => (rows, 1),
                [rows, cols] => (rows, cols),
                _ => {
                    return Err(Error::tensor(
                        path,
                        &g,
                        format!("expected 1 or 2 dimensions, found {shape:?}"),
                    ))
                }
            };
            let order = unpermute_order(rows, heads).map_err(|m| Error::tensor(path, &g, m))?;
            data = data.gather_rows(&order, cols);
        }
        Ok(HostTensor { shape, data })
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.gguf.tensors().iter().any(|t| t.name == g))
    }

    fn file_of(&self, _name: &str) -> PathBuf {
        self.gguf.path().to_path_buf()
    }

    /// Quantized when any tensor is stored in a quantized type (they are then served as stored);
    /// f32 for float files (exact for F16 and BF16 ones too).
    fn native_dtype(&self) -> DType {
        let quantized = self
            .gguf
            .tensors()
            .iter()
            .any(|t| affine_layout(t.ggml_type).is_some());
        if quantized {
            DType::Quantized { at_load: None }
        } else {
            DType::F32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").unwrap(),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.rotary.inv_freq").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // One head of 4 rows: HF rows [a, b, c, d] are stored by llama.cpp as [a, c, b, d].
        let gguf = TensorData::F32(vec![0.0, 2.0, 1.0, 3.0]);
        let order = unpermute_order(4, 1).unwrap();
        assert_eq!(
            gguf.gather_rows(&order, 1).to_f32(),
            vec![0.0, 1.0, 2.0, 3.0]
        );
        assert!(unpermute_order(4, 3).is_err());
    }
}
