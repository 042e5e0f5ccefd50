//! The function and the source as child processes: started from their binaries with an
//! environment, killed with SIGKILL or stopped with SIGTERM, and started again the same way.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::support::eventually;

/// How long a started process may take to answer `/readyz` (a debug build on a busy machine).
const READY: Duration = Duration::from_secs(30);

/// One binary run as a child process with a fixed environment and port; its stdout and stderr
/// are appended to `{log_dir}/{name}.log`, across restarts.
pub struct Service {
    name: &'static str,
    program: PathBuf,
    env: Vec<(String, String)>,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Service {
    /// Starts `program` with exactly `env` (plus `PORT`), nothing inherited, and waits until
    /// it is ready.
    pub async fn start(
        name: &'static str,
        program: &Path,
        env: Vec<(String, String)>,
        log_dir: &Path,
    ) -> Self {
        let mut service = Self {
            name,
            program: program.to_path_buf(),
            env,
            port: testkit::nats_server::free_port().expect("port"),
            log: log_dir.join(format!("{name}.log")),
            child: None,
            http: handler_kit::http::client(Duration::from_secs(2)).expect("http client"),
        };
        service.spawn();
        service.ready().await;
        service
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.program)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("PORT", self.port.to_string())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until `/readyz` answers 200, at most [`READY`].
    async fn ready(&mut self) {
        let url = format!("{}/readyz", self.url());
        let http = self.http.clone();
        let ready = eventually(READY, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http.get(&url).send().await.ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
        if ready.is_none() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            panic!(
                "{} not ready within {READY:?} (exited: {exited:?}); log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// `kill -9`: no shutdown, open connections cut.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit on its own (within `grace`).
    pub async fn terminate(&mut self, grace: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success(), "kill -TERM {}", self.name);
        let exited = eventually(grace, || {
            let status = child.try_wait().expect("wait");
            async move { status }
        })
        .await;
        match exited {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} still running {grace:?} after SIGTERM", self.name);
            }
        }
    }

    /// Starts the binary again with the same environment and port, and waits until ready.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.ready().await;
    }

    /// `kill -9`, a moment down (callers meet a refused port), then [`Service::restart`].
    pub async fn crash(&mut self) {
        self.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.restart().await;
    }

    /// Lines of the log (every run so far) containing `needle`.
    pub fn log_lines_with(&self, needle: &str) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// tts-module's binary, built the way its image is.
pub fn tts_module_binary() -> PathBuf {
    function_binary("tts-module")
}

/// A function's binary, built the way its image is (`cargo build -p NAME`, in this test's
/// profile). A package's integration tests only get their own package's binaries
/// (`CARGO_BIN_EXE_*`), so this asks cargo, which builds it when it is missing or stale and
/// otherwise only names it (about a second), and takes the path from cargo's own report.
pub fn function_binary(name: &str) -> PathBuf {
    let mut build = Command::new(env!("CARGO"));
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--package", name, "--bin", name])
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let output = build
        .output()
        .unwrap_or_else(|e| panic!("running cargo build -p {name}: {e}"));
    assert!(output.status.success(), "cargo build -p {name} failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo named no {name} executable"))
}

/// The `data:` entries of a ConfigMap manifest (flat `KEY: "value"` lines, as ours are), so
/// the processes run with the settings a deployment gets.
pub fn config_map(path: &str) -> Vec<(String, String)> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let data = text.split_once("\ndata:\n").expect("a data: section").1;
    data.lines()
        .take_while(|l| l.starts_with(' ') || l.is_empty())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}
