//! The standard router and the server around every function, over real TCP: a panic becomes a
//! retryable JSON 500 and the process keeps serving; on shutdown an in-flight event finishes
//! while new connections are refused; when the grace period ends with an event still running,
//! the server returns without waiting for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use handler_kit::serve::{Health, function_router, serve};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Routes: `/panic` panics, `/slow/{ms}` answers after that many milliseconds (and tells
/// `started` when it begins).
fn app(health: Arc<Health>, started: Arc<tokio::sync::Notify>) -> Router {
    let events = Router::new()
        .route(
            "/panic",
            post(|| async {
                if std::hint::black_box(true) {
                    panic!("a bug in the handler");
                }
                "unreachable"
            }),
        )
        .route(
            "/slow/{ms}",
            post(move |axum::extract::Path(ms): axum::extract::Path<u64>| {
                let started = started.clone();
                async move {
                    started.notify_one();
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    "done"
                }
            }),
        );
    function_router(events, health, 1024)
}

/// One HTTP/1.1 POST on a new connection; the status and body, or the I/O error.
async fn post_to(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    health: Arc<Health>,
    /// Notified when a `/slow` event begins.
    started: Arc<tokio::sync::Notify>,
}

async fn start(grace: Duration) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let health = Health::new();
    let started = Arc::new(tokio::sync::Notify::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(
        listener,
        app(health.clone(), started.clone()),
        health.clone(),
        async move {
            let _ = stopped.await;
        },
        grace,
    ));
    Running {
        addr,
        stop: Some(stop),
        served,
        health,
        started,
    }
}

#[tokio::test]
async fn a_panic_is_a_retryable_json_500_and_the_server_keeps_serving() {
    let running = start(Duration::from_secs(5)).await;
    let (status, body) = post_to(running.addr, "/panic").await.expect("answered");
    assert_eq!(status, 500, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(error["error"], "internal", "{body}");
    assert!(
        !body.contains("a bug in the handler"),
        "the panic message is logged, not sent: {body}"
    );
    // The process is still there and answers the next event.
    assert_eq!(
        post_to(running.addr, "/slow/0").await.expect("answered"),
        (200, "done".to_string())
    );
}

#[tokio::test]
async fn on_shutdown_an_event_in_flight_finishes_and_new_connections_are_refused() {
    let mut running = start(Duration::from_secs(10)).await;
    let addr = running.addr;
    let in_flight = tokio::spawn(async move { post_to(addr, "/slow/800").await });
    // The event is being handled before shutdown begins.
    running.started.notified().await;
    running
        .stop
        .take()
        .expect("stop")
        .send(())
        .expect("server running");
    let draining = Instant::now();
    while running.health.is_ready() {
        assert!(
            draining.elapsed() < Duration::from_secs(5),
            "never started draining"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The listener is closed: new work does not reach the handler.
    let refused = post_to(addr, "/slow/0").await;
    assert!(
        refused.is_err(),
        "new work was taken while draining: {refused:?}"
    );
    assert_eq!(
        in_flight.await.expect("task").expect("answered"),
        (200, "done".to_string())
    );
    running
        .served
        .await
        .expect("task")
        .expect("served and drained");
}

#[tokio::test]
async fn an_event_still_running_at_the_end_of_the_grace_period_is_abandoned() {
    let mut running = start(Duration::from_millis(300)).await;
    let addr = running.addr;
    let in_flight = tokio::spawn(async move { post_to(addr, "/slow/30000").await });
    running.started.notified().await;
    let stopping = Instant::now();
    running
        .stop
        .take()
        .expect("stop")
        .send(())
        .expect("server running");
    tokio::time::timeout(Duration::from_secs(5), running.served)
        .await
        .expect("serve returned after the grace period, not after the event")
        .expect("task")
        .expect("served");
    assert!(
        stopping.elapsed() >= Duration::from_millis(300),
        "returned before the grace period: {:?}",
        stopping.elapsed()
    );
    // The event never answered: `serve` gave up on it. The function's main returns next and
    // the process exit cuts the connection; the caller sees no answer and retries.
    assert!(
        !in_flight.is_finished(),
        "the 30 s event cannot have been answered"
    );
    in_flight.abort();
}
