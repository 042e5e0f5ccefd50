//! pipeline-bridge's entry point: configuration, telemetry, bind, serve. The logic is in `lib.rs`.

use std::process::ExitCode;

use handler_kit::{config, serve, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    let config = config::load_or_exit(pipeline_bridge::Config::read);
    let telemetry = telemetry::init("pipeline-bridge");
    // Bind before any other I/O: the port is what Knative waits for on a cold start.
    let listener = match serve::bind(config.base.port).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port = config.base.port, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let grace = config.base.shutdown_grace;
    let state = match pipeline_bridge::State::new(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let health = state.health();
    let app = pipeline_bridge::app(state);
    tracing::info!(addr = ?listener.local_addr().ok(), "pipeline-bridge listening");
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
