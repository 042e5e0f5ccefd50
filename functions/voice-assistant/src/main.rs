//! voice-assistant's entry point: configuration, telemetry, bind, serve. The logic is in `lib.rs`.

use std::process::ExitCode;

use handler_kit::{config, serve, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = config::load_or_exit(voice_assistant::Config::read);
    let telemetry = telemetry::init("voice-assistant");
    // Bind before any other I/O: the port is what Knative waits for on a cold start.
    let listener = match serve::bind(config.base.port).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port = config.base.port, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let grace = config.base.shutdown_grace;
    let state = match voice_assistant::State::new(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let health = state.health();
    let app = voice_assistant::app(state);
    tracing::info!(addr = ?listener.local_addr().ok(), "voice-assistant listening");
    let served = serve::serve(listener, app, health, serve::shutdown_signal(), grace).await;
    telemetry.shutdown();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}
