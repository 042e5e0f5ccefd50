//! tts-module through its public surface: HTTP CloudEvents in, HTTP replies and NATS messages out.
//! One test binary (modules below) so the workspace links fewer executables.

mod backend_answers;
mod bad_input;
mod events;
mod hostile_data;
mod nats;
mod nats_auth;
mod request_values;
mod resilience;
mod shutdown;
mod support;
mod telemetry;
