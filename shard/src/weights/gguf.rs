//! GGUF weights under Hugging Face names, as llama.cpp's `convert_hf_to_gguf.py` stores them:
//! quantized tensors are handed out quantized (`Affine`) when the model keeps them so, else
//! dequantized exactly to f32 as ggml does. What the converter changed is undone here: the q/k
//! row permutation of the `llama` architecture (so HF's rotate-half RoPE applies), Gemma's norm
//! weights stored as `1 + w`, and experts stacked into one `[experts, rows, cols]` tensor per
//! projection (each expert is handed out as its own 2-D matrix, decoded from its own bytes only).

use std::path::PathBuf;

use tessera_formats::gguf::affine::{affine_layout, to_affine};
use tessera_formats::gguf::{dequantize, GgmlType, Gguf};

use super::{DType, HostTensor, TensorData, WeightSource};
use crate::{Error, Result};

/// How llama.cpp names a family's per-layer norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormNames {
    /// `post_attention_layernorm` (the norm before the MLP) is `ffn_norm`.
    Standard,
    /// Gemma 2/3 (norms around both attention and MLP): `post_attention_layernorm` is
    /// `post_attention_norm`, `pre_feedforward_layernorm` is `ffn_norm` and
    /// `post_feedforward_layernorm` is `post_ffw_norm`.
    Gemma,
}

impl NormNames {
    /// The naming a GGUF `general.architecture` uses.
    pub fn of_architecture(arch: &str) -> Self {
        if matches!(arch, "gemma2" | "gemma3") {
            NormNames::Gemma
        } else {
            NormNames::Standard
        }
    }
}

/// Where an HF tensor is stored in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The GGUF tensor, e.g. `blk.3.attn_q.weight`.
    pub name: String,
    /// For one expert's matrix: its index in the stacked `[experts, rows, cols]` tensor `name`,
    /// and the per-expert tensor older Mixtral files store instead (`blk.{i}.ffn_gate.{e}.weight`).
    pub expert: Option<(usize, String)>,
}

/// A GGUF file seen as a weight source.
pub struct GgufSource<'a> {
    gguf: &'a Gguf,
    names: NormNames,
    /// llama.cpp permutes q/k rows only for the `llama` architecture (others use NEOX rotary).
    unpermute: bool,
    /// Gemma 1-3: the converter stores every `*norm.weight` (q/k norms and the final norm too)
    /// as `1 + w`; the decoder wants HF's `w`.
    norms_shifted: bool,
    num_heads: usize,
    num_kv_heads: usize,
    /// Hand quantized tensors out as they are stored instead of dequantized.
    keep_quantized: bool,
}

impl<'a> GgufSource<'a> {
    pub fn new(gguf: &'a Gguf, num_heads: usize, num_kv_heads: usize) -> Self {
        let arch = gguf.get_str("general.architecture").unwrap_or("");
        let names = NormNames::of_architecture(arch);
        GgufSource {
            gguf,
            names,
            unpermute: arch == "llama",
            norms_shifted: matches!(arch, "gemma" | "gemma2" | "gemma3"),
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

    fn has(&self, gguf_name: &str) -> bool {
        self.gguf.tensor_info(gguf_name).is_ok()
    }

    /// `n` elements of `g` stored as `ty` in `bytes`, quantized or f32 as asked (`dense` forces
    /// f32).
    fn decode(
        &self,
        g: &str,
        ty: GgmlType,
        bytes: &[u8],
        n: usize,
        dense: bool,
    ) -> Result<TensorData> {
        let path = self.gguf.path();
        if self.keep_quantized && !dense && affine_layout(ty).is_some() {
            let a = to_affine(ty, bytes, n).map_err(|m| Error::tensor(path, g, m))?;
            return Ok(TensorData::Quant(vec![a]));
        }
        let v = dequantize(ty, bytes, n).map_err(|m| Error::tensor(path, g, m))?;
        Ok(TensorData::F32(v))
    }

    /// A stored tensor with its PyTorch-order shape.
    fn read(&self, g: &str, dense: bool) -> Result<(Vec<usize>, TensorData)> {
        let info = self.gguf.tensor_info(g)?;
        let bytes = self.gguf.tensor_data(g)?;
        let data = self.decode(g, info.ggml_type, bytes, info.n_elements(), dense)?;
        self.gguf.release_tensor(g);
        Ok((info.shape(), data))
    }

    /// Expert `e`'s `[rows, cols]` matrix, from the stacked tensor (decoding only its rows) or an
    /// old per-expert one.
    fn expert(&self, hf: &str, stacked: &str, e: usize, single: &str) -> Result<HostTensor> {
        let path = self.gguf.path();
        if !self.has(stacked) && self.has(single) {
            let (shape, data) = self.read(single, false)?;
            return Ok(HostTensor { shape, data });
        }
        let info = self.gguf.tensor_info(stacked)?;
        let shape = info.shape();
        let [experts, rows, cols] = shape[..] else {
            let msg = format!("stacked experts must have 3 dimensions, found {shape:?}");
            return Err(Error::tensor(path, stacked, msg));
        };
        if e >= experts {
            let msg = format!("{hf} asks for expert {e}; the file stacks {experts}");
            return Err(Error::tensor(path, stacked, msg));
        }
        let layout = info.ggml_type.layout();
        if !cols.is_multiple_of(layout.block_elems) {
            let msg = format!("rows of {cols} are not whole {:?} blocks", info.ggml_type);
            return Err(Error::tensor(path, stacked, msg));
        }
        let matrix_bytes = rows * cols / layout.block_elems * layout.block_bytes;
        let bytes = &self.gguf.tensor_data(stacked)?[e * matrix_bytes..(e + 1) * matrix_bytes];
        let data = self.decode(stacked, info.ggml_type, bytes, rows * cols, false)?;
        Ok(HostTensor {
            shape: vec![rows, cols],
            data,
        })
    }
}

/// Maps an HF tensor name to its GGUF name in the standard (non-Gemma) naming; `None` if it has
/// no whole-tensor counterpart (experts live inside stacked tensors: see [`locate`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    locate(hf, NormNames::Standard)
        .filter(|l| l.expert.is_none())
        .map(|l| l.name)
}

/// Where the HF tensor `hf` is stored under `names`; `None` if it has no GGUF counterpart.
pub fn locate(hf: &str, names: NormNames) -> Option<Location> {
    let whole = |name: String| Location { name, expert: None };
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(whole(f.to_string()));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if let Some(found) = locate_expert(layer, module, suffix) {
        return Some(found);
    }
    let gemma = names == NormNames::Gemma;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" if gemma => "ffn_norm",
        "post_feedforward_layernorm" if gemma => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        // Phi-3's fused `[gate; up]`: llama.cpp keeps it whole as `ffn_up`, gate half first.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        _ => return None,
    };
    Some(whole(format!("blk.{layer}.{g}.{suffix}")))
}

/// Qwen3-MoE's `mlp.experts.{e}.{gate,up,down}_proj` and Mixtral's
/// `block_sparse_moe.experts.{e}.{w1,w3,w2}`: expert `e` of `ffn_{gate,up,down}_exps`.
fn locate_expert(layer: &str, module: &str, suffix: &str) -> Option<Location> {
    let rest = module
        .strip_prefix("mlp.experts.")
        .or_else(|| module.strip_prefix("block_sparse_moe.experts."))?;
    let (expert, proj) = rest.split_once('.')?;
    let expert: usize = expert.parse().ok()?;
    let g = match proj {
        "gate_proj" | "w1" => "ffn_gate",
        "up_proj" | "w3" => "ffn_up",
        "down_proj" | "w2" => "ffn_down",
        _ => return None,
    };
    Some(Location {
        name: format!("blk.{layer}.{g}_exps.{suffix}"),
        expert: Some((expert, format!("blk.{layer}.{g}.{expert}.{suffix}"))),
    })
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
        let loc = locate(name, self.names)
            .ok_or_else(|| Error::tensor(path, name, "has no GGUF counterpart"))?;
        if let Some((e, single)) = &loc.expert {
            return self.expert(name, &loc.name, *e, single);
        }
        let g = loc.name;
        let shifted = self.norms_shifted && name.ends_with("norm.weight");
        let (shape, mut data) = self.read(&g, shifted)?;
        if shifted {
            if let TensorData::F32(v) = &mut data {
                v.iter_mut().for_each(|w| *w -= 1.0);
            }
        }
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
        locate(name, self.names).is_some_and(|l| {
            self.has(&l.name) || l.expert.is_some_and(|(_, single)| self.has(&single))
        })
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
        assert!(gguf_name("model.layers.x.mlp.down_proj.weight").is_none());
    }

    fn whole(hf: &str, names: NormNames) -> String {
        let loc = locate(hf, names).unwrap();
        assert_eq!(loc.expert, None, "{hf}");
        loc.name
    }

    #[test]
    fn norm_names_follow_the_family() {
        use NormNames::{Gemma, Standard};
        let p = "model.layers.2.";
        let cases = [
            ("input_layernorm", Standard, "attn_norm"),
            ("post_attention_layernorm", Standard, "ffn_norm"),
            ("input_layernorm", Gemma, "attn_norm"),
            ("post_attention_layernorm", Gemma, "post_attention_norm"),
            ("pre_feedforward_layernorm", Gemma, "ffn_norm"),
            ("post_feedforward_layernorm", Gemma, "post_ffw_norm"),
            ("self_attn.q_norm", Gemma, "attn_q_norm"),
            ("self_attn.k_norm", Standard, "attn_k_norm"),
        ];
        for (module, names, g) in cases {
            assert_eq!(
                whole(&format!("{p}{module}.weight"), names),
                format!("blk.2.{g}.weight")
            );
        }
        assert!(locate("model.layers.2.pre_feedforward_layernorm.weight", Standard).is_none());
        assert_eq!(NormNames::of_architecture("gemma3"), Gemma);
        assert_eq!(NormNames::of_architecture("qwen3moe"), Standard);
    }

    #[test]
    fn fused_and_router_names() {
        let s = NormNames::Standard;
        assert_eq!(
            whole("model.layers.1.self_attn.qkv_proj.weight", s),
            "blk.1.attn_qkv.weight"
        );
        assert_eq!(
            whole("model.layers.1.mlp.gate_up_proj.weight", s),
            "blk.1.ffn_up.weight"
        );
        assert_eq!(
            whole("model.layers.1.mlp.gate.weight", s),
            "blk.1.ffn_gate_inp.weight"
        );
        assert_eq!(
            whole("model.layers.1.block_sparse_moe.gate.weight", s),
            "blk.1.ffn_gate_inp.weight"
        );
    }

    #[test]
    fn experts_map_into_stacked_tensors() {
        let s = NormNames::Standard;
        let cases = [
            ("mlp.experts.5.gate_proj", "ffn_gate", 5),
            ("mlp.experts.0.up_proj", "ffn_up", 0),
            ("mlp.experts.7.down_proj", "ffn_down", 7),
            ("block_sparse_moe.experts.3.w1", "ffn_gate", 3),
            ("block_sparse_moe.experts.3.w3", "ffn_up", 3),
            ("block_sparse_moe.experts.3.w2", "ffn_down", 3),
        ];
        for (module, g, e) in cases {
            let loc = locate(&format!("model.layers.4.{module}.weight"), s).unwrap();
            assert_eq!(loc.name, format!("blk.4.{g}_exps.weight"));
            assert_eq!(loc.expert, Some((e, format!("blk.4.{g}.{e}.weight"))));
        }
        assert!(locate("model.layers.4.mlp.experts.x.up_proj.weight", s).is_none());
        assert!(gguf_name("model.layers.4.mlp.experts.1.up_proj.weight").is_none());
    }

    /// A GGUF v3 file in memory: `general.architecture` and tensors given as (name, ggml dims,
    /// ggml type id, raw bytes).
    fn gguf_file(arch: &str, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Gguf {
        fn put_str(b: &mut Vec<u8>, s: &str) {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        }
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(1u64.to_le_bytes());
        put_str(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        put_str(&mut b, arch);
        let (mut data, align) = (Vec::new(), 32);
        for (name, dims, ty, raw) in tensors {
            put_str(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend((data.len() as u64).to_le_bytes());
            data.extend(raw);
            data.resize(data.len().next_multiple_of(align), 0);
        }
        b.resize(b.len().next_multiple_of(align), 0);
        b.extend(data);
        Gguf::from_bytes("test.gguf", b).unwrap()
    }

    const F32: u32 = 0;
    const Q8_0: u32 = 8;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Q8_0 rows of 32: per row an f16 scale of 1/64 and quants `row * 3 + i - 16`.
    fn q8_rows(rows: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for r in 0..rows {
            b.extend(half::f16::from_f32(1.0 / 64.0).to_le_bytes());
            b.extend((0..32).map(|i| (r as i32 * 3 + i - 16) as i8 as u8));
        }
        b
    }

    #[test]
    fn experts_are_sliced_from_stacked_tensors() {
        // 3 experts of [2 rows, 32 cols]: f32 gate values `100 e + 32 r + c`, Q8_0 up.
        let gate: Vec<f32> = (0..3 * 2 * 32).map(|i| i as f32).collect();
        let g = gguf_file(
            "qwen3moe",
            &[
                (
                    "blk.0.ffn_gate_exps.weight",
                    vec![32, 2, 3],
                    F32,
                    f32_bytes(&gate),
                ),
                ("blk.0.ffn_up_exps.weight", vec![32, 2, 3], Q8_0, q8_rows(6)),
            ],
        );
        let src = GgufSource::new(&g, 1, 1);
        let t = src
            .tensor("model.layers.0.mlp.experts.1.gate_proj.weight")
            .unwrap();
        assert_eq!(t.shape, vec![2, 32]);
        assert_eq!(t.data.to_f32(), gate[64..128].to_vec());
        assert!(src.contains("model.layers.0.mlp.experts.2.gate_proj.weight"));
        assert!(!src.contains("model.layers.0.mlp.experts.0.down_proj.weight"));
        let err = src.tensor("model.layers.0.mlp.experts.3.gate_proj.weight");
        assert!(err.unwrap_err().to_string().contains("expert 3"));

        let (_, all_up) = g.tensor_f32("blk.0.ffn_up_exps.weight").unwrap();
        let quant = src.keep_quantized(true);
        let up = quant
            .tensor("model.layers.0.mlp.experts.2.up_proj.weight")
            .unwrap();
        assert!(matches!(up.data, TensorData::Quant(_)));
        assert_eq!(up.shape, vec![2, 32]);
        assert_eq!(up.data.to_f32(), all_up[128..192].to_vec());
    }

    #[test]
    fn old_mixtral_files_store_one_tensor_per_expert() {
        let w: Vec<f32> = (0..4).map(|i| i as f32).collect();
        let g = gguf_file(
            "llama",
            &[("blk.1.ffn_up.2.weight", vec![2, 2], F32, f32_bytes(&w))],
        );
        let src = GgufSource::new(&g, 1, 1);
        let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
        assert!(src.contains(name));
        let t = src.tensor(name).unwrap();
        assert_eq!((t.shape, t.data.to_f32()), (vec![2, 2], w));
    }

    #[test]
    fn gemma_norms_come_back_without_the_added_one() {
        let g = gguf_file(
            "gemma2",
            &[
                (
                    "blk.0.post_attention_norm.weight",
                    vec![2],
                    F32,
                    f32_bytes(&[1.5, 0.25]),
                ),
                (
                    "blk.0.ffn_norm.weight",
                    vec![2],
                    F32,
                    f32_bytes(&[3.0, 1.0]),
                ),
                ("blk.0.ffn_up.weight", vec![2], F32, f32_bytes(&[1.5, 0.25])),
            ],
        );
        let src = GgufSource::new(&g, 1, 1);
        let get = |n: &str| src.tensor(&format!("model.layers.0.{n}.weight")).unwrap();
        assert_eq!(get("post_attention_layernorm").data.to_f32(), [0.5, -0.75]);
        assert_eq!(get("pre_feedforward_layernorm").data.to_f32(), [2.0, 0.0]);
        // Only norms are shifted.
        assert_eq!(get("mlp.up_proj").data.to_f32(), [1.5, 0.25]);
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
