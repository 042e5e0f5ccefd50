//! Dev-only test support for the workspace's functions, including the inference
//! simulator: a labelled local stand-in for inference backends.

pub mod cloudevent;
pub mod endless;
pub mod fake_kube;
pub mod fixtures;
pub mod milvus_server;
pub mod mocks;
pub mod nats_jwt;
pub mod nats_server;
pub mod sim;
pub mod tls;
pub mod wav;
