//! `inference-sim`: serves the deterministic inference simulator, a local stand-in
//! for inference backends used by `just dev`. Never a production backend.
//!
//! Usage: `inference-sim [--host HOST] [--port PORT]`, defaulting to `SIM_HOST` /
//! `SIM_PORT`, then 127.0.0.1:8090. Simulation tunables come from `SIM_*` variables
//! (see `testkit::sim::SimConfig::from_env`).

use anyhow::{Context, bail};
use testkit::sim::{SimConfig, router};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (host, port) = listen_address(std::env::args().skip(1))?;
    let config = SimConfig::from_env()?;
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .with_context(|| format!("binding {host}:{port}"))?;
    let addr = listener.local_addr()?;
    println!("inference-sim (local stand-in for inference backends) listening on http://{addr}");
    axum::serve(listener, router(config))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

fn listen_address(mut args: impl Iterator<Item = String>) -> anyhow::Result<(String, u16)> {
    let mut host = std::env::var("SIM_HOST").unwrap_or_else(|_| "127.0.0.1".to_owned());
    let mut port = std::env::var("SIM_PORT").unwrap_or_else(|_| "8090".to_owned());
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let target = match flag.as_str() {
            "--host" => &mut host,
            "--port" => &mut port,
            _ => {
                bail!("unknown argument {flag:?}; usage: inference-sim [--host HOST] [--port PORT]")
            }
        };
        *target = match inline {
            Some(value) => value,
            None => args
                .next()
                .with_context(|| format!("{flag} needs a value"))?,
        };
    }
    let port = port
        .trim()
        .parse()
        .with_context(|| format!("invalid port {port:?}"))?;
    Ok((host, port))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    eprintln!(
                        "inference-sim: cannot listen for SIGTERM ({err}); Ctrl-C still stops it"
                    );
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
