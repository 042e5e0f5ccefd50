//! chat-handler's entry point: [`handler_kit::serve::run`] does configuration, telemetry, bind and
//! serve for every function; the logic is in `lib.rs`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    handler_kit::serve::run::<chat_handler::State>().await
}
