//! The harness: everything the sections share, and nothing about any one of them.
//!
//! - [`section`]: the [`Section`](section::Section) interface, the shared settings and the
//!   run's [`Context`](section::Context).
//! - [`function`], [`catalog`]: a measured binary and the list of them; [`fixtures`]: the
//!   files they run with.
//! - [`proc`]: child processes killed on drop, free ports, memory and CPU from `/proc`.
//! - [`measure`]: starting one process, readiness, cold start, idle RSS, RSS with events held.
//! - [`load`]: events/s over many connections (a thread each, or one epoll loop).
//! - [`backends`]: `inference-sim`, `fake-kube` and the Milvus mock.
//! - [`http`]: a minimal blocking HTTP/1.1 client; [`llm`]: direct calls to the LLM.
//! - [`nats`]: nats-server, a raw subscriber, MessagePack stream chunks.
//! - [`metrics`]: Prometheus text from `/metrics`.
//! - [`stats`]: percentiles and units; [`results`]: failures and target checks.
//! - [`error`]: the crate's one error type.
//!
//! Harness modules import each other, never a section.

pub mod backends;
pub mod catalog;
pub mod error;
pub mod fixtures;
pub mod function;
pub mod http;
pub mod llm;
pub mod load;
pub mod measure;
pub mod metrics;
pub mod nats;
pub mod proc;
pub mod results;
pub mod section;
pub mod stats;
