//! stt-module through HTTP CloudEvents, with real speech fixtures, a real nats-server (KV), and
//! the simulator or wiremock as the Whisper-style backend.

mod memory;
mod recording;
mod request_values;
mod sessions;
mod support;
