//! pipeline-bridge through its public surface: CloudEvents and webhooks over HTTP, against a
//! fake Kubernetes API server and a fake KFP server that answer like the real ones, with a real
//! nats-server for the status messages. One test binary (modules below).

mod backend_answers;
mod binary;
mod credentials;
mod request_values;
mod status;
mod support;
mod trigger;
mod trust;
mod webhook_reads;
mod webhooks;
