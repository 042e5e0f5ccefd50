//! `handler_kit::nats` against real `nats-server` processes: the server list of `NATS_URL`, and
//! publishing that keeps a message (stored with its PubAck, or flushed) across failures.

mod servers;
