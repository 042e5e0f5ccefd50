//! nats-source against a real nats-server and a test sink: delivery, failures, ordering, replies.

mod backpressure;
mod cluster_faults;
mod dead_letters;
mod delivery;
mod end_to_end;
mod faults;
mod hostile;
mod lag;
mod nats_auth;
mod observability;
mod redrive;
mod support;
