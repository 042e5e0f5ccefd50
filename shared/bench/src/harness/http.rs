//! A minimal blocking HTTP/1.1 client over [`std::net::TcpStream`].
//!
//! Hand-written on purpose: a cold-start attempt is one `connect`, one `write` and a few
//! `read`s, with nothing (pool, resolver, runtime) between the clock and the socket. The same
//! code drives keep-alive connections for the events/s measurement. It understands what the
//! functions send back: `Content-Length`, `Transfer-Encoding: chunked`, or a body up to EOF;
//! [`Conn::read_with`] also hands each piece of the body over as it arrives (server-sent
//! events, timed to the first token).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::harness::error::{Context as _, Result, ensure};
use serde_json::Value;

/// Largest response body read; anything bigger is an error, not a buffer that keeps growing.
/// tts-module's answer to a text of 5000 characters (max-body section) is ~18 MB of base64.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Longest status or header line.
const MAX_LINE: u64 = 16 * 1024;

/// An encoded request, written to the socket as is.
#[derive(Debug, Clone)]
pub struct Request {
    bytes: Vec<u8>,
}

impl Request {
    /// Encodes `method path` for `addr` with `headers` and `body`. Without `keep_alive` the
    /// request asks the server to close the connection after answering.
    pub fn new(
        method: &str,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        keep_alive: bool,
    ) -> Self {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
        for (name, value) in headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if !keep_alive {
            head.push_str("connection: close\r\n");
        }
        if !body.is_empty() || method == "POST" {
            let _ = write!(head, "content-length: {}\r\n", body.len());
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        Self { bytes }
    }

    /// The head of a `method path` request announcing a body of `content_length` bytes with
    /// `expect: 100-continue`, and no body: a server that refuses a body by its declared length
    /// answers at once, before a byte of it is sent (a big body written anyway would meet a
    /// closed connection).
    pub fn announce(
        method: &str,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        content_length: usize,
    ) -> Self {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
        for (name, value) in headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let _ = write!(
            head,
            "connection: close\r\nexpect: 100-continue\r\ncontent-length: {content_length}\r\n\r\n"
        );
        Self {
            bytes: head.into_bytes(),
        }
    }

    /// A `GET path` asking for the connection to be closed afterwards.
    pub fn get(addr: SocketAddr, path: &str) -> Self {
        Self::new("GET", addr, path, &[], &[], false)
    }

    /// The bytes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers with lower-cased names, in order.
    pub headers: Vec<(String, String)>,
    /// The whole body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` on a fresh connection to `addr` and reads the answer, all within `timeout`
/// per socket operation.
pub fn exchange(addr: SocketAddr, request: &Request, timeout: Duration) -> io::Result<Response> {
    let mut conn = Conn::connect(addr, timeout)?;
    conn.send(request)
}

/// One connection, reusable for several requests (keep-alive).
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connects to `addr`; every later read or write fails after `timeout` without progress.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let timeout = timeout.max(Duration::from_millis(1));
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            reader: BufReader::with_capacity(16 * 1024, stream),
        })
    }

    /// Writes `request` without waiting for the answer.
    pub fn write(&mut self, request: &Request) -> io::Result<()> {
        let stream = self.reader.get_mut();
        stream.write_all(request.as_bytes())?;
        stream.flush()
    }

    /// Reads the next response.
    pub fn read(&mut self) -> io::Result<Response> {
        read_response(&mut self.reader)
    }

    /// Reads the next response, calling `on_body` with every piece of the body as soon as it
    /// has been read (each chunk of a chunked body; a sized body at once). The whole body is
    /// in the returned response too.
    pub fn read_with(&mut self, on_body: &mut dyn FnMut(&[u8])) -> io::Result<Response> {
        read_response_with(&mut self.reader, on_body)
    }

    /// Writes `request` and reads its response.
    pub fn send(&mut self, request: &Request) -> io::Result<Response> {
        self.write(request)?;
        self.read()
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// One line without its CRLF; EOF before any byte is `UnexpectedEof`.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = reader.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(invalid("response line too long or truncated"));
    }
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| invalid("response line is not UTF-8"))
}

/// Reads one response: status line, headers, body.
pub fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
    read_response_with(reader, &mut |_| {})
}

/// [`read_response`], calling `on_body` with every piece of the body as soon as it is read.
pub fn read_response_with(
    reader: &mut impl BufRead,
    on_body: &mut dyn FnMut(&[u8]),
) -> io::Result<Response> {
    let status_line = read_line(reader)?;
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(invalid(format!(
            "not an HTTP/1 status line: {status_line:?}"
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line: {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line: {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        response.body = read_chunked(reader, on_body)?;
        return Ok(response);
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| invalid(format!("bad content-length {length:?}")))?;
        if length > MAX_BODY {
            return Err(invalid(format!("body of {length} bytes is too large")));
        }
        response.body = vec![0; length];
        reader.read_exact(&mut response.body)?;
    } else {
        reader
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut response.body)?;
        if response.body.len() > MAX_BODY {
            return Err(invalid("body too large"));
        }
    }
    if !response.body.is_empty() {
        on_body(&response.body);
    }
    Ok(response)
}

fn read_chunked(reader: &mut impl BufRead, on_body: &mut dyn FnMut(&[u8])) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(reader)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(invalid("body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        on_body(&body[start..]);
        if !read_line(reader)?.is_empty() {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

/// Longest a [`Peer`]'s connect, write or read may wait.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// One keep-alive connection to a backend, opened (untimed) on first use.
pub struct Peer {
    /// Where it connects.
    pub addr: SocketAddr,
    conn: Option<Conn>,
}

impl Peer {
    /// A peer for `addr`; nothing is connected yet.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// The connection, opened now if there is none.
    pub fn conn(&mut self) -> io::Result<&mut Conn> {
        if self.conn.is_none() {
            self.conn = Some(Conn::connect(self.addr, PEER_TIMEOUT)?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| io::Error::other("no connection"))
    }

    /// Writes `request`, reads the answer with `on_body`; returns it with the moment before
    /// the write and the time from then to the end of the body. Any failure drops the
    /// connection.
    pub fn send(
        &mut self,
        request: &Request,
        on_body: &mut dyn FnMut(&[u8]),
    ) -> Result<(Response, Instant, Duration)> {
        let conn = self.conn()?;
        let started = Instant::now();
        let result = conn.write(request).and_then(|()| conn.read_with(on_body));
        let took = started.elapsed();
        match result {
            Ok(r) => Ok((r, started, took)),
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// `POST path` with a JSON body, which must be answered 200.
    pub fn post_json(
        &mut self,
        path: &str,
        body: &Value,
        on_body: &mut dyn FnMut(&[u8]),
    ) -> Result<(Response, Instant, Duration)> {
        let request = Request::new(
            "POST",
            self.addr,
            path,
            &[("content-type", "application/json"), ("accept", "*/*")],
            body.to_string().as_bytes(),
            true,
        );
        let (r, started, took) = self
            .send(&request, on_body)
            .with_context(|| format!("POST {path} on {}", self.addr))?;
        ensure!(
            r.status == 200,
            "POST {path} on {} answered HTTP {}: {}",
            self.addr,
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        Ok((r, started, took))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> io::Result<Response> {
        read_response(&mut io::Cursor::new(raw.as_bytes().to_vec()))
    }

    #[test]
    fn content_length_body_and_headers() {
        let r = parse("HTTP/1.1 200 OK\r\nCE-Id: a.reply\r\ncontent-length: 3\r\n\r\nabcEXTRA")
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ce-id"), Some("a.reply"));
        assert_eq!(r.body, b"abc");
    }

    #[test]
    fn chunked_body() {
        let r = parse("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            .unwrap();
        assert_eq!(r.body, b"abcde");
    }

    #[test]
    fn body_pieces_are_handed_over_as_read() {
        let raw =
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let mut pieces = Vec::new();
        let r = read_response_with(&mut io::Cursor::new(raw.as_bytes().to_vec()), &mut |b| {
            pieces.push(b.to_vec())
        })
        .unwrap();
        assert_eq!(pieces, [b"abc".to_vec(), b"de".to_vec()]);
        assert_eq!(r.body, b"abcde");
    }

    #[test]
    fn body_to_eof_and_early_eof() {
        assert_eq!(parse("HTTP/1.1 200 OK\r\n\r\nrest").unwrap().body, b"rest");
        assert_eq!(parse("").unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(parse("SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn request_encoding() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
        let r = Request::new("POST", addr, "/", &[("ce-id", "1")], b"{}", false);
        assert_eq!(
            std::str::from_utf8(r.as_bytes()).unwrap(),
            "POST / HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nce-id: 1\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
        );
    }
}
