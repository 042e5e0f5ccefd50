//! A Coqui-style TTS backend that is overloaded in bursts: it answers `GET /api/tts` with a
//! short WAV, except for the first [`BURST`] of every [`PERIOD`], when it
//! answers 503 to every call. Consecutive failures are what open tts-module's breaker, so it
//! opens in every burst and closes after it. Between bursts it also refuses every
//! [`BETWEEN`]th call, so at least a fifth of all calls are refused however the source paces
//! itself (a source held off by the bursts makes fewer calls during them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// How often a burst starts.
pub const PERIOD: Duration = Duration::from_millis(1500);
/// How long a burst lasts.
pub const BURST: Duration = Duration::from_millis(450);
/// Between bursts, one call in this many is refused.
pub const BETWEEN: u64 = 5;

#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    refused: AtomicU64,
}

#[derive(Clone)]
struct Backend {
    counts: Arc<Counts>,
    started: Instant,
    wav: Arc<Vec<u8>>,
}

impl Backend {
    /// Whether the call arriving now is refused; counts it.
    fn refuses(&self) -> bool {
        let call = self.counts.calls.fetch_add(1, Ordering::SeqCst);
        let into = self.started.elapsed().as_millis() % PERIOD.as_millis();
        let refuse = into < BURST.as_millis() || call.is_multiple_of(BETWEEN);
        if refuse {
            self.counts.refused.fetch_add(1, Ordering::SeqCst);
        }
        refuse
    }
}

/// The backend, served on the test's runtime.
pub struct FlakyTts {
    pub url: String,
    counts: Arc<Counts>,
    started: Instant,
}

impl FlakyTts {
    pub async fn start() -> Self {
        let backend = Backend {
            counts: Arc::default(),
            started: Instant::now(),
            // 50 ms of silence at 16 kHz: a real WAV, and small replies.
            wav: Arc::new(testkit::wav::silence_wav(50, 16_000)),
        };
        let (counts, started) = (backend.counts.clone(), backend.started);
        let app = axum::Router::new()
            .route("/api/tts", axum::routing::get(speak))
            .with_state(backend);
        let url = testkit::cloudevent::serve(app).await.expect("backend");
        Self {
            url,
            counts,
            started,
        }
    }

    /// When the next burst starts.
    pub fn next_burst(&self) -> Instant {
        let period = PERIOD.as_millis();
        let next = (self.started.elapsed().as_millis() / period + 1) * period;
        self.started + Duration::from_millis(u64::try_from(next).unwrap_or(u64::MAX))
    }

    /// (calls, refused with 503) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.calls.load(Ordering::SeqCst),
            self.counts.refused.load(Ordering::SeqCst),
        )
    }
}

async fn speak(State(backend): State<Backend>) -> Response {
    if backend.refuses() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "overloaded",
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, "audio/wav")],
        backend.wav.as_ref().clone(),
    )
        .into_response()
}
