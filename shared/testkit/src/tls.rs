//! A TLS server that requires a client certificate, for the clients that trust a private CA and
//! present certificates (handler-kit's `http::client_with`, pipeline-bridge through a
//! kubeconfig). Its certificates are test fixtures made by `scripts/make-tls-fixtures.sh`
//! (`fixtures/tls/`): a CA, a server certificate for 127.0.0.1 signed by it, a client
//! certificate signed by it, and an unrelated CA.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The folder holding the TLS fixtures.
pub const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/");

/// The bytes of the fixture `name` (`ca.pem`, `other-ca.pem`, `server.pem`, `server.key`,
/// `client.pem`, `client.key`).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{TLS_DIR}{name}");
    std::fs::read(&path).unwrap_or_else(|e| panic!("TLS fixture {path}: {e}"))
}

/// The certificates of the PEM fixture `name`, as DER.
pub fn certificates(name: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(&fixture(name))
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("TLS fixture {name}: {e}"))
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The request line, e.g. `POST /apis/batch/v1/namespaces/ops/jobs HTTP/1.1`.
    pub request_line: String,
    /// How many certificates the client presented (verified against the test CA).
    pub client_chain: usize,
}

/// The server; it stops when dropped.
#[derive(Debug)]
pub struct TlsServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsServer {
    /// Starts on a free loopback port; every request on a connection whose client presented a
    /// certificate signed by the test CA is answered `status` with the JSON `body`. A
    /// connection without one fails its handshake.
    pub async fn start(status: u16, body: &str) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in certificates("ca.pem") {
            roots.add(CertificateDer::from(ca))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let key = PrivateKeyDer::from_pem_slice(&fixture("server.key"))?;
        let chain = certificates("server.pem")
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answer = format!(
            "HTTP/1.1 {status} Answer\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log, answer) = (acceptor.clone(), log.clone(), answer.clone());
                tokio::spawn(async move {
                    // A refused handshake is for the client to report; nothing to answer.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_chain = tls.get_ref().1.peer_certificates().map_or(0, <[_]>::len);
                    let Some(head) = read_head(&mut tls).await else {
                        return;
                    };
                    let request_line = head.lines().next().unwrap_or_default().to_string();
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                        request_line,
                        client_chain,
                    });
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every request answered so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reads a request head (and drops any body: the answer closes the connection).
async fn read_head(tls: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut chunk).await.ok()?;
        if n == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}
