//! A backend whose answer does not end: for checking that a client reads answers under a cap.
//!
//! [`EndlessServer`] answers every request with a status, a content type, the start of a body,
//! then one piece over and over (chunked), until the client hangs up or `offer` bytes of body
//! have gone out, and counts the body bytes it wrote. Writes succeed once the kernel has taken
//! the bytes, so the count is what the client read plus what sat in the two sockets' buffers
//! when it hung up; the server's send buffer is kept at 16 KiB to keep that part small.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How far over a client's cap [`EndlessServer::sent`] may be once the client hung up: what
/// its receive buffer and the server's send buffer held. Measured on loopback (Linux, 2026-12,
/// `cargo test -p handler-kit --lib http::`): 125,001 bytes written against a 64 KiB cap, so
/// about 60 KiB over it, run after run; 1 MiB, against the 64 MiB on offer.
pub const SOCKET_SLACK: u64 = 1024 * 1024;

/// What an [`EndlessServer`] answers.
#[derive(Debug, Clone)]
pub struct EndlessAnswer {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The `content-type`.
    pub content_type: String,
    /// The body's first bytes (e.g. `{"data": [`), counted as body.
    pub start: Vec<u8>,
    /// Repeated after `start` (must not be empty).
    pub piece: Vec<u8>,
    /// Body bytes after which the answer ends properly, if the client is still reading.
    pub offer: u64,
}

impl EndlessAnswer {
    /// A 200 of `content_type` sending `start`, then `piece` until 64 MiB have gone out.
    pub fn new(content_type: &str, start: impl Into<Vec<u8>>, piece: impl Into<Vec<u8>>) -> Self {
        Self {
            status: 200,
            content_type: content_type.into(),
            start: start.into(),
            piece: piece.into(),
            offer: 64 * 1024 * 1024,
        }
    }

    /// The same with another status.
    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

/// A running endless backend; it stops when dropped.
#[derive(Debug)]
pub struct EndlessServer {
    url: String,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    accepted: AtomicUsize,
    ended: AtomicUsize,
}

impl Drop for EndlessServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EndlessServer {
    /// Starts answering `answer` on a free loopback port.
    pub async fn start(answer: EndlessAnswer) -> anyhow::Result<Self> {
        anyhow::ensure!(!answer.piece.is_empty(), "an empty piece would never end");
        let socket = tokio::net::TcpSocket::new_v4()?;
        // Accepted connections inherit it (Linux): what the kernel holds for the client stays
        // small, so `sent` stays close to what the client read.
        socket.set_send_buffer_size(16 * 1024)?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let listener = socket.listen(64)?;
        let url = format!("http://{}", listener.local_addr()?);
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let answer = Arc::new(answer);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let (counts, answer) = (shared.clone(), answer.clone());
                tokio::spawn(async move {
                    serve(stream, &answer, &counts.sent).await;
                    counts.ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self { url, counts, task })
    }

    /// `http://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Body bytes written so far, over all connections.
    pub fn sent(&self) -> u64 {
        self.counts.sent.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Waits for [`Self::settled`] and asserts that the client hung up within `cap` bytes
    /// (plus [`SOCKET_SLACK`]); prints and returns what was sent, as the measurement.
    pub async fn assert_hung_up_within(&self, cap: u64, what: &str) -> u64 {
        let sent = self.settled().await;
        eprintln!("{what}: cap {cap} bytes, the backend wrote {sent} bytes before the hang-up");
        assert!(
            sent < cap + SOCKET_SLACK,
            "{what}: {sent} bytes sent for a cap of {cap}"
        );
        sent
    }

    /// Waits (10 s at most) until every connection accepted so far has ended, and returns
    /// [`Self::sent`] then; panics when one is still being written to.
    pub async fn settled(&self) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let accepted = self.counts.accepted.load(Ordering::SeqCst);
            if self.counts.ended.load(Ordering::SeqCst) == accepted {
                return self.sent();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client is still reading after 10 s ({} bytes sent)",
                self.sent()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Answers one connection (one request) until the client hangs up or the offer is spent.
async fn serve(mut stream: TcpStream, answer: &EndlessAnswer, sent: &AtomicU64) {
    if read_request(&mut stream).await.is_none() {
        return;
    }
    let head = format!(
        "HTTP/1.1 {} Endless\r\ncontent-type: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        answer.status, answer.content_type
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut offered = 0u64;
    let mut next = answer.start.as_slice();
    while offered < answer.offer {
        if !next.is_empty() {
            let frame = [
                format!("{:x}\r\n", next.len()).as_bytes(),
                next,
                b"\r\n".as_slice(),
            ]
            .concat();
            if stream.write_all(&frame).await.is_err() {
                return;
            }
            offered += next.len() as u64;
            sent.fetch_add(next.len() as u64, Ordering::SeqCst);
        }
        next = answer.piece.as_slice();
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
}

/// Reads the request's head and its `content-length` of body; `None` when the client left.
async fn read_request(stream: &mut TcpStream) -> Option<()> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = seen.len() - head_end;
    while body < length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body += n,
        }
    }
    Some(())
}
