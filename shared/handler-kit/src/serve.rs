//! The standard router around a function's event routes, and serving with drain.
//!
//! Every function answers the same operational endpoints (`/healthz`, `/readyz`, `/metrics`),
//! caps its event bodies, turns a panic into a JSON 500 instead of a dropped connection, and
//! records one metric sample per event and logs it (successes at DEBUG). [`serve`] takes an already-bound
//! listener (bind first: the port must be open before any network I/O, cold start is the
//! product) and on shutdown stops accepting, reports not-ready, and lets in-flight events finish
//! within the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::KeyValue;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::delivery::{Class, error_response};
use crate::error::ErrorBody;
use crate::event::BodyLimit;
use crate::telemetry;

/// Liveness and readiness, shared by the router and the server.
#[derive(Debug)]
pub struct Health {
    draining: AtomicBool,
    ready: AtomicBool,
}

impl Health {
    /// A health state that is ready at once (a function is ready when it serves).
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            draining: AtomicBool::new(false),
            ready: AtomicBool::new(true),
        })
    }

    /// A health state that is not ready until [`Health::set_ready`] (e.g. a consumer is bound).
    pub fn starting() -> Arc<Self> {
        let health = Self::new();
        health.set_ready(false);
        health
    }

    /// Marks the process ready or not (it stays not ready once draining).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Ready to take work: false until started and once shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }

    /// Marks the process as draining.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// Wraps a function's event routes with the standard endpoints and layers.
pub fn function_router(events: Router, health: Arc<Health>, body_limit: usize) -> Router {
    let events = events
        .layer(middleware::from_fn(observe_event))
        .layer(axum::Extension(BodyLimit(body_limit)));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = health.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining")
                    }
                }
            }),
        )
        .route("/metrics", get(metrics))
        .merge(events)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(panic_response))
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render_prometheus(),
    )
}

async fn not_found() -> Response {
    let body = ErrorBody {
        error: "not_found",
        detail: "events are POSTed to /".into(),
    };
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: "method_not_allowed",
        detail: "events are POSTed to /".into(),
    };
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_default();
    tracing::error!(panic = %detail, "handler panicked");
    // Retryable on purpose: a panic is our bug, not the event's, and may be transient.
    error_response(
        Class::Internal,
        &ErrorBody {
            error: "internal",
            detail: "the handler failed unexpectedly".into(),
        },
    )
}

/// One span and one metric sample per event, and a log line (DEBUG for successes).
async fn observe_event(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let ty = match header("ce-type") {
        t if t.is_empty() => "structured".to_string(),
        t => t,
    };
    let id = header("ce-id");
    let span = tracing::info_span!("event", ce_type = %ty, ce_id = %id);
    // Most events carry no trace context; extracting nothing still costs a parse and a lock.
    if headers.contains_key("traceparent") || headers.contains_key("ce-traceparent") {
        let _ = span.set_parent(telemetry::parent_from_headers(headers));
    }
    let m = telemetry::metrics();
    m.in_flight.add(1, &[]);
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    m.in_flight.add(-1, &[]);
    let elapsed = started.elapsed();
    let status = response.status();
    let attrs = [
        KeyValue::new("type", ty),
        KeyValue::new("status", i64::from(status.as_u16())),
    ];
    m.events.add(1, &attrs);
    m.event_duration.record(elapsed.as_secs_f64(), &attrs);
    // Successes are counted and timed above (and traced); a log line for each one would cost
    // ~10% of a short event's CPU at thousands of events a second and flood the log pipeline,
    // so they are DEBUG. Refusals are INFO, failures WARN.
    let ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3;
    let code = status.as_u16();
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::warn!(status = code, ms, "event answered");
        } else if status.is_client_error() {
            tracing::info!(status = code, ms, "event answered");
        } else {
            tracing::debug!(status = code, ms, "event answered");
        }
    });
    response
}

/// A CloudEvents function as [`run`] starts it: how to read its configuration, build its
/// state, and route its requests. Implemented by each function's `State`.
pub trait Function: Sized + Send + 'static {
    /// The function's configuration.
    type Config: Send;
    /// Its name, for telemetry and logs.
    const NAME: &'static str;
    /// Reads every variable; problems are collected by `r`.
    fn read(r: &mut crate::config::ConfigReader) -> Self::Config;
    /// The shared settings inside the configuration (port, drain grace).
    fn base(config: &Self::Config) -> &crate::config::BaseConfig;
    /// Builds the state; network connections are made lazily, so this does no network I/O.
    fn start(
        config: Self::Config,
    ) -> impl Future<Output = Result<Self, crate::HandlerError>> + Send;
    /// Readiness, shared with the server so draining shows on `/readyz`.
    fn health(&self) -> Arc<Health>;
    /// The router: `POST /` plus the standard endpoints.
    fn app(self) -> Router;
}

/// Implements [`Function`] for a function crate laid out the usual way: `State::new(Config)`,
/// `State::health()`, `Config::read`, `config.base` and a free `app(State) -> Router`. The
/// argument is the function's name: `handler_kit::function!("tts-module");`.
#[macro_export]
macro_rules! function {
    ($name:literal) => {
        impl $crate::serve::Function for State {
            type Config = Config;
            const NAME: &'static str = $name;

            fn read(r: &mut $crate::config::ConfigReader) -> Config {
                Config::read(r)
            }

            fn base(config: &Config) -> &$crate::config::BaseConfig {
                &config.base
            }

            async fn start(config: Config) -> Result<Self, $crate::HandlerError> {
                Self::new(config).await
            }

            fn health(&self) -> ::std::sync::Arc<$crate::serve::Health> {
                State::health(self)
            }

            fn app(self) -> ::axum::Router {
                app(self)
            }
        }
    };
}

/// A function's whole `main`: configuration (exit 64 on any problem), telemetry, bind, build
/// the state, serve until SIGTERM, drain, flush telemetry. The port is bound before anything
/// else does I/O: it is what Knative waits for on a cold start.
pub async fn run<F: Function>() -> std::process::ExitCode {
    use std::process::ExitCode;
    let config = crate::config::load_or_exit(F::read);
    let telemetry = telemetry::init(F::NAME);
    let (port, grace) = (F::base(&config).port, F::base(&config).shutdown_grace);
    let listener = match bind(port).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(port, error = %e, "cannot bind");
            return ExitCode::FAILURE;
        }
    };
    let state = match F::start(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    let health = state.health();
    let app = state.app();
    tracing::info!(addr = ?listener.local_addr().ok(), "{} listening", F::NAME);
    let served = serve(listener, app, health, shutdown_signal(), grace).await;
    telemetry.shutdown();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Binds the HTTP port on all interfaces.
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Serves `app` until `shutdown` resolves, then drains for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_health = health.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        drain_health.start_draining();
        tracing::info!("shutdown requested, draining in-flight events");
        let _ = began_tx.send(());
    });
    let grace_elapsed = async move {
        if began_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server.into_future() => {
            tracing::info!("drained, exiting");
            result
        }
        () = grace_elapsed => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over, abandoning in-flight events");
            Ok(())
        }
    }
}
