//! voice-assistant's entry point: [`handler_kit::serve::run`] does configuration, telemetry, bind and
//! serve for every function; the logic is in `lib.rs`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handler_kit::serve::run::<voice_assistant::State>().await
}
