//! The router ⇄ shard contract: TGI's `generate.v3` gRPC service, plus id newtypes shared by both sides.

/// Generated messages, client and server of `generate.v3.TextGenerationService`.
#[allow(unused_qualifications)] // generated code spells out full paths
pub mod v3 {
    tonic::include_proto!("generate.v3");
}

pub mod uds;

pub use v3::text_generation_service_client::TextGenerationServiceClient;
pub use v3::text_generation_service_server::{TextGenerationService, TextGenerationServiceServer};

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_newtype!(
    /// A generation request, unique for the life of a router.
    RequestId
);
id_newtype!(
    /// A batch held by the shards, named by the router.
    BatchId
);

/// The batch id the router's health probe uses (TGI sends `u64::MAX`).
pub const HEALTH_BATCH_ID: u64 = u64::MAX;
