//! Model files shared by router and shard: GGUF containers, tokenizers (HF folder or GGUF), chat templates.
