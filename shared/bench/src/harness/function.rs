//! A measured binary: its environment (with placeholders for the backends it calls), the
//! sample CloudEvent it answers with 200, and how its held events are seen in flight.
//!
//! Environment values may contain placeholders, filled in per start from [`Endpoints`]:
//!
//! - [`BACKEND`]: an `inference-sim` answering at once, or after [`HOLD_MS`] in the
//!   100-in-flight measurement;
//! - [`INSTANT`]: an `inference-sim` answering at once in every measurement;
//! - [`STREAMING`]: an `inference-sim` streaming chat tokens slowly
//!   ([`STREAM_TOKEN_DELAY`] before each), so a streamed answer stays open for about [`HOLD`];
//! - [`MILVUS`]: the Milvus mock in the bench process (see
//!   [`MilvusMock`](super::backends::MilvusMock));
//! - [`KUBE`]: the kubeconfig of a `fake-kube` (testkit's fake Kubernetes API server)
//!   answering at once, or after [`HOLD_MS`] in the 100-in-flight measurement;
//! - [`HOLD_MS`]: how long held events stay in flight, in milliseconds.
//!
//! A sample event's body may contain [`EVENT_ID`], replaced by the `ce-id` of every copy, so
//! copies differ (chat-handler shares one run among identical concurrent requests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::http::Request;

/// How long the backend (or the floor) holds each event in the 100-in-flight measurement.
pub const HOLD: Duration = Duration::from_millis(2000);
/// Events held in flight at once.
pub const HELD_EVENTS: usize = 100;
/// Gap before each chat token of the streaming simulator ([`STREAMING`]): chat-handler's
/// sample answer is 8 tokens, so each stream stays open about [`HOLD`].
pub const STREAM_TOKEN_DELAY: Duration = Duration::from_millis(250);

/// Placeholder for the step's simulator: instant, or answering after [`HOLD_MS`] when events
/// are held in flight.
pub const BACKEND: &str = "{backend}";
/// Placeholder for a simulator that answers at once in every step.
pub const INSTANT: &str = "{instant}";
/// Placeholder for a simulator streaming chat tokens [`STREAM_TOKEN_DELAY`] apart.
pub const STREAMING: &str = "{streaming}";
/// Placeholder for the Milvus mock (REST API v2) in the bench process.
pub const MILVUS: &str = "{milvus}";
/// Placeholder for the kubeconfig of a fake Kubernetes API server: instant, or answering after
/// [`HOLD_MS`] when events are held in flight.
pub const KUBE: &str = "{kubeconfig}";
/// Placeholder for the hold time of the 100-in-flight measurement, in milliseconds.
pub const HOLD_MS: &str = "{hold_ms}";
/// Placeholder in a sample event's body for the copy's `ce-id`.
pub const EVENT_ID: &str = "{id}";
/// Every placeholder that names a simulator.
const SIMULATORS: [&str; 3] = [BACKEND, INSTANT, STREAMING];
/// Where an unset placeholder points: a closed port.
const NOWHERE: &str = "http://127.0.0.1:9";

/// Base URLs the placeholders stand for in one start; unset ones point at a closed port.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// [`BACKEND`].
    pub backend: Option<String>,
    /// [`INSTANT`].
    pub instant: Option<String>,
    /// [`STREAMING`].
    pub streaming: Option<String>,
    /// [`MILVUS`].
    pub milvus: Option<String>,
    /// [`KUBE`]: a kubeconfig path.
    pub kube: Option<String>,
}

impl Endpoints {
    /// `value` with every URL placeholder filled in.
    fn fill(&self, value: &str) -> String {
        let url = |u: &Option<String>| u.clone().unwrap_or_else(|| NOWHERE.to_string());
        value
            .replace(BACKEND, &url(&self.backend))
            .replace(INSTANT, &url(&self.instant))
            .replace(STREAMING, &url(&self.streaming))
            .replace(MILVUS, &url(&self.milvus))
            .replace(
                KUBE,
                self.kube.as_deref().unwrap_or("/nonexistent/kubeconfig"),
            )
    }
}

/// A CloudEvent in binary mode; the runner adds a unique `ce-id` to every copy it sends.
#[derive(Debug, Clone)]
pub struct SampleEvent {
    /// Headers besides `ce-id`: `ce-specversion`, `ce-type`, `ce-source`, `content-type`, ...
    pub headers: Vec<(&'static str, &'static str)>,
    /// The body; [`EVENT_ID`] in it becomes the copy's `ce-id`.
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
        let body = self.body.replace(EVENT_ID, id);
        Request::new("POST", addr, "/", &headers, body.as_bytes(), keep_alive)
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
    /// Extra environment for the 100-in-flight measurement (a variable also in `env` is
    /// replaced): whatever makes the process hold events for [`HOLD_MS`] and lets 100 of them
    /// reach the backend at once.
    pub hold_env: Vec<(&'static str, &'static str)>,
    /// The backend work in each answer, for the notes (e.g. `one round trip to inference-sim`).
    pub backend_work: &'static str,
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
    /// Whether any of the function's environment values contains `placeholder`.
    pub fn uses(&self, placeholder: &str) -> bool {
        self.env
            .iter()
            .chain(&self.hold_env)
            .any(|(_, v)| v.contains(placeholder))
    }

    /// Whether the function needs an `inference-sim` backend.
    pub fn needs_backend(&self) -> bool {
        SIMULATORS.iter().any(|p| self.uses(p))
    }

    /// The environment of one start on `port`, placeholders filled in from `endpoints`; with
    /// `hold`, the hold environment is applied over it.
    pub fn environment(
        &self,
        port: u16,
        endpoints: &Endpoints,
        hold: Option<Duration>,
    ) -> Vec<(String, String)> {
        let hold_ms = hold.map(|d| d.as_millis().to_string()).unwrap_or_default();
        let extra: &[(&str, &str)] = if hold.is_some() { &self.hold_env } else { &[] };
        let mut env: Vec<(String, String)> = Vec::new();
        for (k, v) in self.env.iter().chain(extra) {
            let v = endpoints.fill(v).replace(HOLD_MS, &hold_ms);
            set_var(&mut env, k, v);
        }
        set_var(&mut env, "PORT", port.to_string());
        env
    }
}

/// Sets `name` to `value` in `env`, replacing an earlier value.
pub fn set_var(env: &mut Vec<(String, String)>, name: &str, value: impl Into<String>) {
    let value = value.into();
    match env.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => env.push((name.to_string(), value)),
    }
}
