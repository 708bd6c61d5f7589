#!/usr/bin/env python3
"""A random-weight llama GGUF (F16) at a real model's shape, for speed and memory figures only.

SmolLM2-135M's rows (576) are no multiple of 256, so every K-quant file of it falls back to legacy
types on most tensors; a 1B- or 7B-shaped file exercises the Q4_K/Q5_K/Q6_K paths a real model
takes. Tokenizer metadata is copied from a base GGUF, so both servers tokenize as they do for it.
The text it generates is noise; its figures are not about quality.

    python bench/synthetic_gguf.py --base SmolLM2-135M-Instruct.Q4_1.gguf --shape 1b --out llama-1b.F16.gguf

Needs numpy and the gguf package vendored in llama.cpp's source (gguf-py, put on PYTHONPATH).
"""

import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

# (layers, hidden, ffn, heads, kv heads): Llama-3.2-1B's and Llama-2-7B's blocks.
SHAPES = {
    "1b": (16, 2048, 8192, 32, 8),
    "7b": (32, 4096, 11008, 32, 32),
}


def copy_tokenizer(reader: GGUFReader, writer: GGUFWriter) -> int:
    """Copies every tokenizer.* field; returns the vocabulary size."""
    vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == GGUFValueType.ARRAY:
            writer.add_array(name, value)
            if name == "tokenizer.ggml.tokens":
                vocab = len(value)
        else:
            writer.add_key_value(name, value, kind)
    return vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="GGUF whose tokenizer the new file takes")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    layers, hidden, ffn, heads, kv_heads = SHAPES[args.shape]
    head_dim = hidden // heads
    writer = GGUFWriter(args.out, "llama")
    vocab = copy_tokenizer(GGUFReader(args.base), writer)
    writer.add_name(f"synthetic-llama-{args.shape}")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(1)  # mostly F16

    tensors = [("token_embd.weight", (vocab, hidden)), ("output_norm.weight", (hidden,))]
    tensors.append(("output.weight", (vocab, hidden)))
    for i in range(layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden)),
            (f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_norm.weight", (hidden,)),
            (f"blk.{i}.ffn_gate.weight", (ffn, hidden)),
            (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
            (f"blk.{i}.ffn_down.weight", (hidden, ffn)),
        ]
    for name, shape in tensors:
        # Norm weights are f32 in every llama GGUF; matrices f16.
        dtype = np.float32 if len(shape) == 1 else np.float16
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = GGMLQuantizationType.F32 if dtype == np.float32 else GGMLQuantizationType.F16
        writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in tensors:
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
        writer.write_tensor_data(data)
    writer.close()


if __name__ == "__main__":
    main()
