//! Backends the functions call: `inference-sim` processes, a `fake-kube` process, and a
//! Milvus mock in the bench process; and [`Backends`], the set one run shares.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Result, bail, ensure};
use tokio::runtime::Runtime;

use super::fixtures;
use super::function::{BACKEND, Endpoints, Function, INSTANT, KUBE, MILVUS, STREAMING};
use super::measure::{START_DEADLINE, log_path, loopback, wait_for};
use super::proc::{Proc, command, free_port};

/// An `inference-sim` process on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct Backend {
    _proc: Proc,
    /// Its base URL.
    pub url: String,
}

impl Backend {
    /// Where it listens.
    pub fn addr(&self) -> Result<SocketAddr> {
        addr_of(&self.url)
    }
}

/// The socket address of an `http://127.0.0.1:PORT` base URL.
pub fn addr_of(url: &str) -> Result<SocketAddr> {
    url.strip_prefix("http://")
        .and_then(|a| a.trim_end_matches('/').parse().ok())
        .with_context(|| format!("{url:?} is not http://IP:PORT"))
}

/// Starts `inference-sim` from `bin_dir` answering after `latency` (`SIM_LATENCY_MS`) and
/// streaming chat tokens `token_delay` apart (`SIM_TOKEN_DELAY_MS`), and waits for `/healthz`.
pub fn start_backend(
    bin_dir: &Path,
    latency: Duration,
    token_delay: Duration,
    logs: &Path,
    label: &str,
) -> Result<Backend> {
    let binary = bin_dir.join("inference-sim");
    ensure!(binary.exists(), "{} not found", binary.display());
    let port = free_port()?;
    let log = log_path(logs, &format!("inference-sim-{label}"));
    let env = [
        (
            "SIM_LATENCY_MS".to_string(),
            latency.as_millis().to_string(),
        ),
        (
            "SIM_TOKEN_DELAY_MS".to_string(),
            token_delay.as_millis().to_string(),
        ),
    ];
    let mut cmd = command(&binary, &["--port".into(), port.to_string()], &env, &log)?;
    let mut proc = Proc::spawn(&mut cmd, "inference-sim", &log)?;
    wait_for(&mut proc, loopback(port), "/healthz")?;
    Ok(Backend {
        _proc: proc,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// The Milvus REST v2 search path the mock answers.
pub const MILVUS_SEARCH_PATH: &str = "/v2/vectordb/entities/search";
/// What the mock answers to every search: two documents.
pub const MILVUS_ANSWER: &str = r#"{"code":0,"data":[{"id":1,"distance":0.9,"text":"NATS is a messaging system.","source":"a.md"},{"id":2,"distance":0.8,"text":"JetStream persists messages.","source":"b.md"}]}"#;

/// `POST` [`MILVUS_SEARCH_PATH`] answers [`MILVUS_ANSWER`] at once. Stopped when dropped.
#[derive(Debug)]
pub struct MilvusMock {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    searches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl Drop for MilvusMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn milvus_search(
    axum::extract::State(searches): axum::extract::State<Arc<AtomicUsize>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // A cheap sanity check, not a parse: the request is a search of a collection.
    if !body.windows(16).any(|w| w == b"\"collectionName\"") {
        return (axum::http::StatusCode::BAD_REQUEST, "no collectionName").into_response();
    }
    searches.fetch_add(1, Ordering::Relaxed);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        MILVUS_ANSWER,
    )
        .into_response()
}

impl MilvusMock {
    /// Binds 127.0.0.1 on a free port and serves on `rt`.
    pub fn start(rt: &Runtime) -> Result<Self> {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
            .context("binding the Milvus mock")?;
        let addr = listener.local_addr()?;
        let searches = Arc::new(AtomicUsize::new(0));
        let app = axum::Router::new()
            .route(MILVUS_SEARCH_PATH, axum::routing::post(milvus_search))
            .with_state(searches.clone());
        let task = rt.spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            url: format!("http://{addr}"),
            searches,
            task,
        })
    }

    /// Searches answered so far.
    pub fn searches(&self) -> usize {
        self.searches.load(Ordering::Relaxed)
    }
}

/// A `fake-kube` process and the kubeconfig pointing at it; killed when dropped.
#[derive(Debug)]
pub struct FakeKube {
    proc: Proc,
    _dir: tempfile::TempDir,
    /// The kubeconfig path.
    pub kubeconfig: String,
}

impl FakeKube {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Starts `fake-kube` from `bin_dir` answering after `latency`; returns once its
    /// kubeconfig is written (after it listens).
    pub fn start(bin_dir: &Path, latency: Duration, logs: &Path, label: &str) -> Result<Self> {
        let dir = tempfile::tempdir().context("creating a directory for the kubeconfig")?;
        let log = logs.join(format!("fake-kube-{label}.log"));
        let args = [
            dir.path().display().to_string(),
            latency.as_millis().to_string(),
        ];
        let mut cmd = command(&bin_dir.join("fake-kube"), &args, &[], &log)?;
        let mut proc = Proc::spawn(&mut cmd, "fake-kube", &log)?;
        let kubeconfig = dir.path().join("kubeconfig");
        let started = Instant::now();
        while !kubeconfig.is_file() {
            proc.check_alive()?;
            if started.elapsed() > START_DEADLINE {
                bail!("fake-kube wrote no kubeconfig within {:?}", START_DEADLINE);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Self {
            proc,
            kubeconfig: kubeconfig.display().to_string(),
            _dir: dir,
        })
    }
}

/// The backends every section shares, started for the placeholders the run's functions use:
/// the instant simulator ([`BACKEND`] and [`INSTANT`] outside the 100-in-flight measurement),
/// the Milvus mock, a `fake-kube` answering at once (and the catalog pipeline-bridge reads),
/// and the tokio runtime the mock runs on, which sections use for their own in-process mocks
/// and NATS clients. Everything stops when dropped.
#[derive(Debug)]
pub struct Backends {
    fast: Option<Backend>,
    milvus: Option<MilvusMock>,
    kube: Option<FakeKube>,
    // Dropped last: the mock's task runs on it.
    rt: Runtime,
}

impl Backends {
    /// Starts what `functions` use, with binaries from `bin_dir` and output to `logs`.
    pub fn start(functions: &[&Function], bin_dir: &Path, logs: &Path) -> Result<Self> {
        let uses = |placeholder: &str| functions.iter().any(|f| f.uses(placeholder));
        let fast = (uses(BACKEND) || uses(INSTANT))
            .then(|| start_backend(bin_dir, Duration::ZERO, Duration::ZERO, logs, "fast"))
            .transpose()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting a tokio runtime")?;
        let milvus = uses(MILVUS).then(|| MilvusMock::start(&rt)).transpose()?;
        if uses(KUBE) {
            fixtures::write_catalog(bin_dir, fixtures::PIPELINE_MAX_BODY_BYTES)?;
        }
        let kube = uses(KUBE)
            .then(|| FakeKube::start(bin_dir, Duration::ZERO, logs, "fast"))
            .transpose()?;
        Ok(Self {
            fast,
            milvus,
            kube,
            rt,
        })
    }

    /// Where the placeholders point outside the 100-in-flight measurement.
    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            backend: self.fast.as_ref().map(|b| b.url.clone()),
            instant: self.fast.as_ref().map(|b| b.url.clone()),
            streaming: None,
            milvus: self.milvus.as_ref().map(|m| m.url.clone()),
            kube: self.kube.as_ref().map(|k| k.kubeconfig.clone()),
        }
    }

    /// The runtime in-process mocks and NATS clients run on.
    pub fn rt(&self) -> &Runtime {
        &self.rt
    }

    /// Searches the Milvus mock answered so far (0 without one).
    pub fn milvus_searches(&self) -> usize {
        self.milvus.as_ref().map_or(0, MilvusMock::searches)
    }
}

/// The backends of the 100-in-flight measurement, holding every event about `hold`: a
/// simulator answering after it ([`BACKEND`]), one streaming tokens `token_delay` apart
/// ([`STREAMING`]) and a `fake-kube` answering after it ([`KUBE`]). Stopped when dropped.
#[derive(Debug)]
pub struct HeldBackends {
    slow: Option<Backend>,
    streaming: Option<Backend>,
    kube: Option<FakeKube>,
}

impl HeldBackends {
    /// Starts what `functions` use.
    pub fn start(
        functions: &[&Function],
        hold: Duration,
        token_delay: Duration,
        bin_dir: &Path,
        logs: &Path,
    ) -> Result<Self> {
        let uses = |placeholder: &str| functions.iter().any(|f| f.uses(placeholder));
        let slow = uses(BACKEND)
            .then(|| start_backend(bin_dir, hold, Duration::ZERO, logs, "slow"))
            .transpose()?;
        let streaming = uses(STREAMING)
            .then(|| start_backend(bin_dir, Duration::ZERO, token_delay, logs, "streaming"))
            .transpose()?;
        let kube = uses(KUBE)
            .then(|| FakeKube::start(bin_dir, hold, logs, "slow"))
            .transpose()?;
        Ok(Self {
            slow,
            streaming,
            kube,
        })
    }

    /// `normal` with the held backends in place of the instant ones.
    pub fn endpoints(&self, normal: &Endpoints) -> Endpoints {
        Endpoints {
            backend: self.slow.as_ref().map(|b| b.url.clone()),
            streaming: self.streaming.as_ref().map(|b| b.url.clone()),
            kube: self.kube.as_ref().map(|k| k.kubeconfig.clone()),
            ..normal.clone()
        }
    }
}
