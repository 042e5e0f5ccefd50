//! Building the function under test against mock or simulated backends.

use std::time::Duration;

use axum::Router;

pub use testkit::cloudevent::{assert_error, event, eventually, send};

/// The function's router with `TTS_URL` pointing at `tts_url` and any extra variables.
pub async fn app(tts_url: &str, extra: &[(&str, &str)]) -> Router {
    let mut env = vec![("TTS_URL", tts_url)];
    env.extend_from_slice(extra);
    let config = handler_kit::config::load(&env, tts_module::Config::read).expect("valid config");
    let state = tts_module::State::new(config).await.expect("state");
    tts_module::app(state)
}

/// The simulator as the TTS backend (Coqui API).
pub async fn simulator() -> String {
    let (addr, _task) = testkit::sim::spawn(testkit::sim::SimConfig::default())
        .await
        .expect("simulator");
    format!("http://{addr}")
}

/// The real `tts-module` binary, started with only `env`, killed on drop.
pub struct Process {
    pub child: std::process::Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Process {
    /// Starts the binary on a free port and waits until `/readyz` answers 200.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let port = testkit::nats_server::free_port().expect("port");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tts-module"))
            .env_clear()
            .env("PORT", port.to_string())
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tts-module");
        let process = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: handler_kit::http::client(Duration::from_secs(5)).expect("client"),
        };
        let up = eventually(Duration::from_secs(10), || async {
            let r = process
                .http
                .get(format!("{}/readyz", process.base))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        assert!(up.is_some(), "tts-module never became ready");
        process
    }

    /// A binary-mode POST of `event` to the process.
    pub fn post(&self, event: testkit::cloudevent::EventBuilder) -> reqwest::RequestBuilder {
        let (headers, body) = event.binary_parts();
        let mut request = self.http.post(&self.base).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
