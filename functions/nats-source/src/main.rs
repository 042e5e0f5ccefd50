//! nats-source's entry point. Without arguments, the event source: configuration, telemetry,
//! health server, the consume loop. `nats-source redrive ...` moves dead letters back.

use std::process::ExitCode;

use handler_kit::serve::{self, Health, function_router};
use handler_kit::{config, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.split_first() {
        None => source().await,
        Some((command, rest)) if command == "redrive" => {
            nats_source::redrive::command(rest, &config::ProcessEnv).await
        }
        Some((other, _)) => {
            eprintln!(
                "nats-source: unknown command {other:?} (commands: redrive; none runs the source)"
            );
            ExitCode::from(64)
        }
    }
}

async fn source() -> ExitCode {
    let config = config::load_or_exit(nats_source::Config::read);
    let telemetry = telemetry::init("nats-source");
    let listener = match serve::bind(config.port).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port = config.port, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let health = Health::starting();
    let shutdown = CancellationToken::new();
    let app = function_router(axum::Router::new(), health.clone(), 0);
    let stop = shutdown.clone();
    let server = tokio::spawn(serve::serve(
        listener,
        app,
        health.clone(),
        async move { stop.cancelled().await },
        config.shutdown_grace,
    ));
    let signal = shutdown.clone();
    tokio::spawn(async move {
        serve::shutdown_signal().await;
        signal.cancel();
    });
    let result = nats_source::run(config, health, shutdown.clone()).await;
    shutdown.cancel();
    let _ = server.await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "nats-source failed");
            ExitCode::FAILURE
        }
    }
}
