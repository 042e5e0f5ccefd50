//! `fake-kube`: the fake Kubernetes API server of the tests ([`testkit::fake_kube::FakeKube`])
//! as a process, for the benchmark. A local stand-in, never a cluster.
//!
//! Usage: `fake-kube DIR [LATENCY_MS]`. Writes `DIR/kubeconfig` pointing at the server once it
//! listens (written aside and renamed, so a reader never sees half a file), then serves until
//! SIGTERM or Ctrl-C. `LATENCY_MS` (default 0) delays every answer.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use testkit::fake_kube::FakeKube;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().context("usage: fake-kube DIR [LATENCY_MS]")?);
    let latency: u64 = match args.next() {
        Some(ms) => ms.parse().with_context(|| format!("LATENCY_MS {ms:?}"))?,
        None => 0,
    };
    let kube = FakeKube::start().await?;
    kube.set_latency(Duration::from_millis(latency));
    // Nobody reads the request log of this process, and under load it would only grow.
    kube.set_recording(false);
    let staging = dir.join(".staging");
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let written = kube.write_kubeconfig(&staging)?;
    std::fs::rename(&written, dir.join("kubeconfig")).context("placing the kubeconfig")?;
    println!(
        "fake-kube (local stand-in for a Kubernetes API server) listening on {}",
        kube.url()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
