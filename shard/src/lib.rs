//! Tessera shard library: weights, CPU engine, paged KV cache, and (later) the gRPC service.
