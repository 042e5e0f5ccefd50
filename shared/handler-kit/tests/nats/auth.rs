//! Logging in to nats-server with each kind of credential the `NATS_*_FILE` variables give, TLS
//! with a private CA and a client certificate, a refused credential (a 503 that says why,
//! without the secret), and a secret rotated under a running client.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::ConnectOptions;
use futures::StreamExt as _;
use handler_kit::HandlerError;
use handler_kit::nats::{Nats, NatsConfig};
use testkit::nats_jwt::Decentralized;
use testkit::nats_server::{NatsOptions, NatsServer};
use tokio::time::Instant;

use crate::next_message;

/// Secret files in a temp dir, as a mounted Secret holds them.
struct Secrets(tempfile::TempDir);

impl Secrets {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("temp dir"))
    }

    /// Writes `text` to `name` (replacing it, as a rotated Secret does) and returns its path.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).expect("write the secret");
        path.display().to_string()
    }
}

/// The NATS configuration of `env`, as a function reads it at start-up.
fn config(env: &[(&str, &str)]) -> NatsConfig {
    handler_kit::config::load(&env.to_vec(), NatsConfig::read)
        .expect("a valid configuration")
        .expect("NATS_URL is set")
}

/// A server with `config` lines whose own client logs in with `client`.
async fn server(config: &str, client: ConnectOptions) -> NatsServer {
    NatsServer::start_configured(config, client)
        .await
        .expect("nats-server")
}

/// Publishes through a function's client configured by `env`, and checks that `server`'s own
/// client receives it.
async fn publishes(server: &NatsServer, env: &[(&str, &str)]) {
    let watcher = server.client().await.expect("watcher");
    let mut sub = watcher.subscribe("auth.check").await.expect("sub");
    watcher.flush().await.expect("flush");
    let nats = Nats::connect(Some(&config(env)), "auth-test")
        .await
        .expect("connect");
    nats.publish("auth.check".to_string(), &"hello", None)
        .await
        .expect("published with the credential");
    let msg = next_message(&mut sub).await;
    let body: String = rmp_serde::from_slice(&msg.payload).expect("msgpack");
    assert_eq!(body, "hello");
}

#[tokio::test]
async fn a_token_file_logs_in() {
    let server = server(
        "authorization { token: \"t0ken-s3cret\" }\n",
        ConnectOptions::with_token("t0ken-s3cret".into()),
    )
    .await;
    let secrets = Secrets::new();
    let token = secrets.write("token", "t0ken-s3cret\n");
    publishes(
        &server,
        &[("NATS_URL", &server.url()), ("NATS_TOKEN_FILE", &token)],
    )
    .await;
}

#[tokio::test]
async fn user_and_password_files_log_in() {
    let server = server(
        "authorization { users: [{user: alice, password: \"pa55-word\"}] }\n",
        ConnectOptions::with_user_and_password("alice".into(), "pa55-word".into()),
    )
    .await;
    let secrets = Secrets::new();
    let user = secrets.write("user", "alice");
    let password = secrets.write("password", "pa55-word\n");
    publishes(
        &server,
        &[
            ("NATS_URL", &server.url()),
            ("NATS_USER_FILE", &user),
            ("NATS_PASSWORD_FILE", &password),
        ],
    )
    .await;
}

#[tokio::test]
async fn credentials_in_nats_url_log_in() {
    let server = server(
        "authorization { users: [{user: alice, password: \"p@ss/word\"}] }\n",
        ConnectOptions::with_user_and_password("alice".into(), "p@ss/word".into()),
    )
    .await;
    let url = format!("nats://alice:p%40ss%2Fword@127.0.0.1:{}", server.port());
    publishes(&server, &[("NATS_URL", &url)]).await;
}

#[tokio::test]
async fn an_nkey_seed_file_logs_in() {
    let (function, watcher) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
    let server = server(
        &format!(
            "authorization {{ users: [{{nkey: {}}}, {{nkey: {}}}] }}\n",
            function.public_key(),
            watcher.public_key()
        ),
        ConnectOptions::with_nkey(watcher.seed().expect("seed")),
    )
    .await;
    let secrets = Secrets::new();
    let seed = secrets.write("seed", &format!("{}\n", function.seed().expect("seed")));
    publishes(
        &server,
        &[("NATS_URL", &server.url()), ("NATS_NKEY_FILE", &seed)],
    )
    .await;
}

#[tokio::test]
async fn a_creds_file_logs_in_to_an_operator_s_account() {
    let operator = Decentralized::new();
    let server = server(
        &operator.server_config(),
        ConnectOptions::with_credentials(&operator.user_creds("watcher")).expect("creds"),
    )
    .await;
    let secrets = Secrets::new();
    let creds = secrets.write("user.creds", &operator.user_creds("function"));
    publishes(
        &server,
        &[("NATS_URL", &server.url()), ("NATS_CREDS_FILE", &creds)],
    )
    .await;
}

#[tokio::test]
async fn tls_with_a_private_ca_and_a_client_certificate_connects() {
    let server = NatsServer::start_with(NatsOptions::tls("", ConnectOptions::new(), true))
        .await
        .expect("nats-server");
    let fixture = |name: &str| format!("{}{name}", testkit::tls::TLS_DIR);
    publishes(
        &server,
        &[
            ("NATS_URL", &server.url()),
            ("NATS_TLS_CA_FILE", &fixture("ca.pem")),
            ("NATS_TLS_CERT_FILE", &fixture("client.pem")),
            ("NATS_TLS_KEY_FILE", &fixture("client.key")),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let server = NatsServer::start_with(NatsOptions::tls("", ConnectOptions::new(), false))
        .await
        .expect("nats-server");
    let other_ca = format!("{}other-ca.pem", testkit::tls::TLS_DIR);
    let nats = Nats::connect(
        Some(&config(&[
            ("NATS_URL", &server.url()),
            ("NATS_TLS_CA_FILE", &other_ca),
        ])),
        "auth-test",
    )
    .await
    .expect("connect");
    // async-nats reports a failed handshake as an I/O error (the detail is at debug level).
    let e = refused(&nats, "could not connect: IO error").await;
    assert_eq!(e.class().status().as_u16(), 503, "{e}");
}

#[tokio::test]
async fn a_replaced_ca_file_is_read_again_at_the_next_connection_attempt() {
    let server = NatsServer::start_with(NatsOptions::tls("", ConnectOptions::new(), false))
        .await
        .expect("nats-server");
    let secrets = Secrets::new();
    let pem = |name: &str| {
        std::fs::read_to_string(format!("{}{name}", testkit::tls::TLS_DIR)).expect("fixture")
    };
    // The mounted CA is the wrong one at first: every attempt fails the handshake.
    let ca = secrets.write("ca.pem", &pem("other-ca.pem"));
    let nats = Nats::connect(
        Some(&config(&[
            ("NATS_URL", &server.url()),
            ("NATS_TLS_CA_FILE", &ca),
        ])),
        "auth-test",
    )
    .await
    .expect("connect");
    refused(&nats, "could not connect: IO error").await;
    // The Secret now holds the CA that signed the server: a later attempt uses it.
    secrets.write("ca.pem", &pem("ca.pem"));
    rotated(&server, &nats).await;
}

/// Asks, as a function does before its work, whether a message could be published, until the
/// 503 says `why` (the first attempts may still be under way), within ten seconds; returns
/// that error.
async fn refused(nats: &Nats, why: &str) -> HandlerError {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match nats.max_payload().await {
            Ok(_) => panic!("connected with a credential the server refuses"),
            Err(e) if e.to_string().contains(why) => return e,
            Err(e) => assert!(Instant::now() < deadline, "not refused for {why:?}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything logged at any level while the guard lives (on this thread: the tests below run
/// on a current-thread runtime, so the client's connection task logs here too).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        let captured = Self::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log")).into_owned()
    }
}

#[tokio::test]
async fn a_refused_credential_is_a_503_that_says_why_and_no_log_line_shows_the_secret() {
    let (captured, _guard) = Captured::start();
    let server = server(
        "authorization { users: [{user: alice, password: \"right-pa55\"}] }\n",
        ConnectOptions::with_user_and_password("alice".into(), "right-pa55".into()),
    )
    .await;
    let url = format!("nats://alice:wr0ng-pa55@127.0.0.1:{}", server.port());
    let nats = Nats::connect(Some(&config(&[("NATS_URL", &url)])), "auth-test")
        .await
        .expect("connect: credentials are checked by the server, in the background");
    let e = refused(&nats, "authorization violation").await;
    assert_eq!(e.class().status().as_u16(), 503, "retryable: {e}");

    let secrets = Secrets::new();
    let token = secrets.write("token", "wr0ng-t0ken");
    let by_file = Nats::connect(
        Some(&config(&[
            ("NATS_URL", &server.url()),
            ("NATS_TOKEN_FILE", &token),
        ])),
        "auth-test",
    )
    .await
    .expect("connect");
    let e2 = refused(&by_file, "authorization violation").await;

    let logs = captured.text();
    assert!(logs.contains("authorization violation"), "{logs}");
    for secret in ["wr0ng-pa55", "wr0ng-t0ken", "right-pa55"] {
        for shown in [&logs, &e.to_string(), &format!("{e:?}"), &e2.to_string()] {
            assert!(!shown.contains(secret), "{secret} shown in: {shown}");
        }
    }
}

#[tokio::test]
async fn a_rotated_token_file_is_used_at_the_next_reconnect() {
    let mut server = server(
        "authorization { token: \"first-t0ken\" }\n",
        ConnectOptions::with_token("first-t0ken".into()),
    )
    .await;
    let secrets = Secrets::new();
    let token = secrets.write("token", "first-t0ken");
    let nats = Nats::connect(
        Some(&config(&[
            ("NATS_URL", &server.url()),
            ("NATS_TOKEN_FILE", &token),
        ])),
        "auth-test",
    )
    .await
    .expect("connect");
    nats.publish("auth.check".to_string(), &"before", None)
        .await
        .expect("published with the first token");

    // The server moves to the new token first: the client, still holding the old file,
    // is refused on reconnect.
    server
        .restart_with(
            "authorization { token: \"second-t0ken\" }\n",
            ConnectOptions::with_token("second-t0ken".into()),
        )
        .await
        .expect("restarted with the second token");
    refused(&nats, "authorization violation").await;

    // The Secret is updated: the next attempt reads the new file and gets in.
    secrets.write("token", "second-t0ken\n");
    rotated(&server, &nats).await;
}

#[tokio::test]
async fn rotated_user_and_password_files_are_used_at_the_next_reconnect() {
    let old = "authorization { users: [{user: alice, password: \"old-pa55\"}] }\n";
    let mut server = server(
        old,
        ConnectOptions::with_user_and_password("alice".into(), "old-pa55".into()),
    )
    .await;
    let secrets = Secrets::new();
    let user = secrets.write("user", "alice");
    let password = secrets.write("password", "old-pa55");
    let nats = Nats::connect(
        Some(&config(&[
            ("NATS_URL", &server.url()),
            ("NATS_USER_FILE", &user),
            ("NATS_PASSWORD_FILE", &password),
        ])),
        "auth-test",
    )
    .await
    .expect("connect");
    nats.publish("auth.check".to_string(), &"before", None)
        .await
        .expect("published with the old password");

    // The Secret changes first, then the server restarts with it.
    secrets.write("user", "bob");
    secrets.write("password", "new-pa55");
    server
        .restart_with(
            "authorization { users: [{user: bob, password: \"new-pa55\"}] }\n",
            ConnectOptions::with_user_and_password("bob".into(), "new-pa55".into()),
        )
        .await
        .expect("restarted with the new user");
    rotated(&server, &nats).await;
}

/// `nats` publishes again (after it logged in with the new secret), and `server`'s client
/// receives it.
async fn rotated(server: &NatsServer, nats: &Nats) {
    let watcher = server.client().await.expect("watcher");
    let mut sub = watcher.subscribe("auth.check").await.expect("sub");
    watcher.flush().await.expect("flush");
    // Publish until one arrives: a publish written just before the client noticed the restart
    // goes into the old, dead connection and is lost, which is NATS' at-most-once; what must
    // hold is that the client logs in again with the new secret and gets through.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "never got through again: {last:?}"
        );
        if let Err(e) = nats.publish("auth.check".to_string(), &"after", None).await {
            last = Some(e.to_string());
            continue;
        }
        if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            let body: String = rmp_serde::from_slice(&msg.payload).expect("msgpack");
            assert_eq!(body, "after");
            return;
        }
    }
}
