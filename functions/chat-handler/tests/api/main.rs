//! chat-handler through its public surface: HTTP CloudEvents in; HTTP replies and NATS out.

mod backend_answers;
mod bad_input;
mod milvus;
mod paths;
mod request_values;
mod resilience;
mod streaming;
mod support;
