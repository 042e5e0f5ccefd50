//! A real Milvus per test: the 2.3 standalone build from PyPI (`milvus-server`), its own data
//! directory and proxy port, killed with all its children on drop.
//!
//! The binary is `$MILVUS_SERVER_BIN`, else the project's `.venv/bin/milvus-server` (which
//! `just tools` installs). `milvus-server` is a Python wrapper that unpacks and spawns the
//! `milvus` binary; the server is started in its own process group so that drop can kill both.
//!
//! # One at a time per machine
//! Whatever the flags say, this build binds its embedded etcd to 127.0.0.1:2379/2380, so two
//! servers cannot run at once, not even from two test processes. [`MilvusServer::start`] first
//! takes a machine-wide lock and holds it until the server is dropped and its ports are free;
//! other callers wait for it. The lock is a Unix socket bound in Linux's abstract namespace: the
//! bind is atomic, and the kernel releases the name when the holder exits however it exits, so
//! a crashed or killed test run leaves no stale lock behind. What such a run can leave behind
//! is a running Milvus and its data directory; both are recognised by the data directory's
//! prefix and removed by the next lock holder (holding the lock proves nobody uses them).

use std::fs;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::nats_server::free_port;

/// The abstract socket name that serialises test servers on this machine.
const LOCK_NAME: &[u8] = b"handler-kit/milvus-test-server";
/// How long [`MilvusServer::start`] waits for another test's server to go away.
const LOCK_WAIT: Duration = Duration::from_secs(300);
/// Prefix of data directories in the system temp dir; marks leftovers of killed runs.
const DATA_PREFIX: &str = "handler-kit-milvus-";
/// The ports every instance binds regardless of its flags (embedded etcd).
const FIXED_PORTS: [u16; 2] = [2379, 2380];
/// From spawn to the REST API answering; typically about 7 s.
const READY_WAIT: Duration = Duration::from_secs(120);

/// A running Milvus standalone server.
#[derive(Debug)]
pub struct MilvusServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Released last, after the server is dead and its ports are free.
    _lock: UnixListener,
}

impl MilvusServer {
    /// Starts a server and waits until its REST API answers; waits first for any other test's
    /// server on this machine to be dropped (see the module docs).
    pub async fn start() -> anyhow::Result<Self> {
        let lock = acquire_lock().await?;
        remove_leftovers();
        wait_until_free(&FIXED_PORTS, Duration::from_secs(15)).with_context(|| {
            format!(
                "ports {FIXED_PORTS:?} are taken by another process (a Milvus not started \
                 by the tests?)"
            )
        })?;
        let dir = tempfile::Builder::new().prefix(DATA_PREFIX).tempdir()?;
        let port = free_port()?;
        let bin = binary();
        let log = fs::File::create(dir.path().join("milvus-server.log"))?;
        let mut command = Command::new(&bin);
        command.arg("--data").arg(dir.path());
        command.arg("--proxy-port").arg(port.to_string());
        for flag in [
            "--etcd-port",
            "--root-coord-port",
            "--proxy-internal-port",
            "--query-coord-port",
            "--query-node-port",
            "--index-coord-port",
            "--index-node-port",
            "--data-coord-port",
            "--data-node-port",
        ] {
            command.arg(flag).arg(free_port()?.to_string());
        }
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (run `just tools` to install it)",
                    bin.display()
                )
            })?;
        let mut server = Self {
            child: Some(child),
            port,
            dir,
            _lock: lock,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`: the proxy, which serves the REST API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The proxy port (gRPC and REST).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// POSTs `body` to `path` (e.g. `/v1/vector/insert`) and returns the JSON answer, whatever
    /// its `code`: for seeding collections in tests.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        post_json(self.port, path, body).await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            // An empty create is refused with 1802 "missing required parameters" only once
            // the proxy is fully up.
            let probe = post_json(
                self.port,
                "/v1/vector/collections/create",
                &serde_json::json!({}),
            )
            .await;
            if let Ok(answer) = probe
                && answer["code"] == 1802
            {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!("milvus-server exited with {status}: {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "milvus not ready within {READY_WAIT:?}: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_tail(&self) -> String {
        let tail = |path: PathBuf| {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().rev().take(10).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        format!(
            "{}\n{}",
            tail(self.dir.path().join("milvus-server.log")),
            tail(self.dir.path().join("logs/milvus-stderr.log"))
        )
    }
}

impl Drop for MilvusServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The wrapper leads the group; the `milvus` binary it spawned is in it too.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
            // `milvus` is not our child, so there is nothing to wait on: wait for its ports,
            // which is what the next server needs.
            let _ = wait_until_free(&FIXED_PORTS, Duration::from_secs(10));
        }
    }
}

/// The milvus-server binary to run.
pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("MILVUS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let mut dir: Option<&Path> = Some(Path::new(env!("CARGO_MANIFEST_DIR")));
    while let Some(d) = dir {
        let candidate = d.join(".venv/bin/milvus-server");
        if candidate.exists() {
            return candidate;
        }
        dir = d.parent();
    }
    PathBuf::from("milvus-server")
}

async fn acquire_lock() -> anyhow::Result<UnixListener> {
    let name = SocketAddr::from_abstract_name(LOCK_NAME)?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match UnixListener::bind_addr(&name) {
            Ok(lock) => return Ok(lock),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e).context("taking the Milvus test lock"),
        }
        if Instant::now() > deadline {
            bail!("another test has held the Milvus test server for over {LOCK_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills servers and removes data directories left by runs that were killed before their
/// drop ran. Only called with the lock held, so none of them is in use.
fn remove_leftovers() {
    let marker = std::env::temp_dir().join(DATA_PREFIX);
    let marker = marker.to_string_lossy();
    let own = std::process::id().to_string();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == own {
                continue;
            }
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(marker.as_ref()) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(DATA_PREFIX) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Waits until every port can be bound on 127.0.0.1.
fn wait_until_free(ports: &[u16], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let busy: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_err())
            .collect();
        if busy.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("ports {busy:?} still in use after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal HTTP/1.0 POST: the server answers without chunking and closes the connection, so
/// the body is everything after the head. Keeps an HTTP client out of testkit's dependencies.
async fn post_json(
    port: u16,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let exchange = async {
        let body = serde_json::to_vec(body)?;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let head = format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .with_context(|| format!("POST {path}: no answer within 30 s"))??;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("POST {path}: not an HTTP answer: {answer:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("POST {path}: {status}: {body}");
    }
    serde_json::from_str(body).with_context(|| format!("POST {path}: not JSON: {body}"))
}
