//! What gets measured: the floor and every function.
//!
//! Adding a function is one more entry in [`functions`]: its binary name, its environment, a
//! sample CloudEvent it answers with 200, and whether events/s is measured. Environment values
//! may contain [`BACKEND`] (replaced by the base URL of an `inference-sim` process) and
//! [`HOLD_MS`] (replaced by how long held events stay in flight).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http::Request;

/// Placeholder for the simulator's base URL (`http://127.0.0.1:PORT`).
pub const BACKEND: &str = "{backend}";
/// Placeholder for the hold time of the 100-in-flight measurement, in milliseconds.
pub const HOLD_MS: &str = "{hold_ms}";

/// A CloudEvent in binary mode; the runner adds a unique `ce-id` to every copy it sends.
#[derive(Debug, Clone)]
pub struct SampleEvent {
    /// Headers besides `ce-id`: `ce-specversion`, `ce-type`, `ce-source`, `content-type`, ...
    pub headers: Vec<(&'static str, &'static str)>,
    /// The body.
    pub body: &'static str,
}

impl SampleEvent {
    /// A JSON event of type `ty`.
    pub fn json(ty: &'static str, body: &'static str) -> Self {
        Self {
            headers: vec![
                ("ce-specversion", "1.0"),
                ("ce-type", ty),
                ("ce-source", "bench"),
                ("content-type", "application/json"),
            ],
            body,
        }
    }

    /// `POST /` carrying this event with `ce-id: id`.
    pub fn request(&self, addr: SocketAddr, id: &str, keep_alive: bool) -> Request {
        let mut headers = self.headers.clone();
        headers.push(("ce-id", id));
        Request::new(
            "POST",
            addr,
            "/",
            &headers,
            self.body.as_bytes(),
            keep_alive,
        )
    }
}

/// How the runner knows that the held events are all in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlightProbe {
    /// Poll `GET /metrics` until the gauge `handler_events_in_flight` reaches the count.
    Metrics,
    /// No metrics: wait this long after every request has been written.
    Settle(Duration),
}

/// One measured binary.
#[derive(Debug, Clone)]
pub struct Function {
    /// Name of the binary (and of the row in the report).
    pub name: &'static str,
    /// Path of the release binary.
    pub binary: PathBuf,
    /// Environment for every start (besides `PORT`, which the runner sets).
    pub env: Vec<(&'static str, &'static str)>,
    /// Extra environment for the 100-in-flight measurement: whatever makes the process hold
    /// events for [`HOLD_MS`] and lets 100 of them reach the backend at once.
    pub hold_env: Vec<(&'static str, &'static str)>,
    /// The event used for every measurement; answered with 200.
    pub event: SampleEvent,
    /// Whether events/s is measured.
    pub events_per_sec: bool,
    /// How to tell the held events are in flight.
    pub in_flight: InFlightProbe,
    /// The floor: a reference, not held to the targets.
    pub floor: bool,
}

impl Function {
    /// Whether the function needs an `inference-sim` backend.
    pub fn needs_backend(&self) -> bool {
        self.env
            .iter()
            .chain(&self.hold_env)
            .any(|(_, v)| v.contains(BACKEND))
    }

    /// The environment of one start on `port`, placeholders filled in.
    pub fn environment(
        &self,
        port: u16,
        backend: Option<&str>,
        hold: Option<Duration>,
    ) -> Vec<(String, String)> {
        let backend = backend.unwrap_or("http://127.0.0.1:9");
        let hold_ms = hold.map(|d| d.as_millis().to_string()).unwrap_or_default();
        let extra: &[(&str, &str)] = if hold.is_some() { &self.hold_env } else { &[] };
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .chain(extra)
            .map(|(k, v)| {
                let v = v.replace(BACKEND, backend).replace(HOLD_MS, &hold_ms);
                ((*k).to_string(), v)
            })
            .collect();
        env.push(("PORT".into(), port.to_string()));
        env
    }
}

/// The floor: `echo-floor` from this crate.
pub fn floor(bin_dir: &Path) -> Function {
    Function {
        name: "echo-floor",
        binary: bin_dir.join("echo-floor"),
        env: vec![],
        hold_env: vec![("ECHO_DELAY_MS", HOLD_MS)],
        event: SampleEvent::json("echo.request", r#"{"text":"Hi."}"#),
        events_per_sec: true,
        in_flight: InFlightProbe::Settle(Duration::from_secs(1)),
        floor: true,
    }
}

/// Every function, in report order.
pub fn functions(bin_dir: &Path) -> Vec<Function> {
    vec![Function {
        name: "tts-module",
        binary: bin_dir.join("tts-module"),
        env: vec![("TTS_URL", BACKEND)],
        // The default TTS_CONCURRENCY (8) would queue 92 of the 100 held events and time them
        // out after TTS_QUEUE_TIMEOUT_MS (5 s); 100 lets every one of them reach the backend.
        hold_env: vec![("TTS_CONCURRENCY", "100")],
        event: SampleEvent::json("ai.tts.request", r#"{"text":"Hi."}"#),
        events_per_sec: true,
        in_flight: InFlightProbe::Metrics,
        floor: false,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled() {
        let f = functions(Path::new("/x")).remove(0);
        assert!(f.needs_backend());
        let env = f.environment(
            1234,
            Some("http://127.0.0.1:5"),
            Some(Duration::from_secs(2)),
        );
        assert!(env.contains(&("TTS_URL".into(), "http://127.0.0.1:5".into())));
        assert!(env.contains(&("TTS_CONCURRENCY".into(), "100".into())));
        assert!(env.contains(&("PORT".into(), "1234".into())));
        let floor = floor(Path::new("/x"));
        assert!(!floor.needs_backend());
        let env = floor.environment(1, None, Some(Duration::from_millis(2000)));
        assert!(env.contains(&("ECHO_DELAY_MS".into(), "2000".into())));
        assert_eq!(floor.environment(1, None, None).len(), 1);
    }
}
