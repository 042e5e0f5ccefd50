//! Publishing the reply to a nats-server that requires a credential or TLS: each kind the
//! `NATS_*_FILE` variables give logs in; a refused one is a retryable 503 that says why and
//! shows no secret.

use std::time::Duration;

use async_nats::ConnectOptions;
use futures::StreamExt as _;
use serde_json::json;
use testkit::nats_jwt::Decentralized;
use testkit::nats_server::{NatsOptions, NatsServer};

use crate::support::{app, assert_error, event, send, simulator};

/// A server with `config` lines whose own client logs in with `client`.
async fn server(config: &str, client: ConnectOptions) -> NatsServer {
    NatsServer::start_configured(config, client)
        .await
        .expect("nats-server")
}

fn secret(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    testkit::nats_server::secret_file(dir.path(), name, text)
}

/// Sends a TTS request to tts-module configured with `env` and checks its reply arrives on
/// `ai.tts.response.{id}` through `nats`' own client.
async fn the_reply_is_published(nats: &NatsServer, id: &str, env: &[(&str, &str)]) {
    let client = nats.client().await.expect("client");
    let mut replies = client
        .subscribe(format!("ai.tts.response.{id}"))
        .await
        .expect("sub");
    client.flush().await.expect("flush");
    let app = app(&simulator().await, env).await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .msgpack(&json!({"request_id": id, "text": "Hello there."}))
            .binary(),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let msg = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("the reply in time")
        .expect("subscription open");
    /// The part of the reply that says whose it is.
    #[derive(serde::Deserialize)]
    struct Reply {
        request_id: String,
    }
    let reply: Reply = rmp_serde::from_slice(&msg.payload).expect("msgpack reply");
    assert_eq!(reply.request_id, id);
}

#[tokio::test]
async fn a_token_file_publishes_the_reply() {
    let nats = server(
        "authorization { token: \"tts-t0ken\" }\n",
        ConnectOptions::with_token("tts-t0ken".into()),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let token = secret(&dir, "token", "tts-t0ken\n");
    the_reply_is_published(
        &nats,
        "tok-1",
        &[("NATS_URL", &nats.url()), ("NATS_TOKEN_FILE", &token)],
    )
    .await;
}

#[tokio::test]
async fn user_and_password_files_publish_the_reply() {
    let nats = server(
        "authorization { users: [{user: tts, password: \"tts-pa55\"}] }\n",
        ConnectOptions::with_user_and_password("tts".into(), "tts-pa55".into()),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let user = secret(&dir, "user", "tts");
    let password = secret(&dir, "password", "tts-pa55");
    the_reply_is_published(
        &nats,
        "up-1",
        &[
            ("NATS_URL", &nats.url()),
            ("NATS_USER_FILE", &user),
            ("NATS_PASSWORD_FILE", &password),
        ],
    )
    .await;
}

#[tokio::test]
async fn an_nkey_seed_file_publishes_the_reply() {
    let (function, watcher) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
    let nats = server(
        &format!(
            "authorization {{ users: [{{nkey: {}}}, {{nkey: {}}}] }}\n",
            function.public_key(),
            watcher.public_key()
        ),
        ConnectOptions::with_nkey(watcher.seed().expect("seed")),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let seed = secret(&dir, "seed", &function.seed().expect("seed"));
    the_reply_is_published(
        &nats,
        "nkey-1",
        &[("NATS_URL", &nats.url()), ("NATS_NKEY_FILE", &seed)],
    )
    .await;
}

#[tokio::test]
async fn a_creds_file_publishes_the_reply() {
    let operator = Decentralized::new();
    let nats = server(
        &operator.server_config(),
        ConnectOptions::with_credentials(&operator.user_creds("watcher")).expect("creds"),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let creds = secret(&dir, "tts.creds", &operator.user_creds("tts-module"));
    the_reply_is_published(
        &nats,
        "creds-1",
        &[("NATS_URL", &nats.url()), ("NATS_CREDS_FILE", &creds)],
    )
    .await;
}

#[tokio::test]
async fn tls_with_a_client_certificate_publishes_the_reply() {
    let nats = NatsServer::start_with(NatsOptions::tls("", ConnectOptions::new(), true))
        .await
        .expect("nats-server");
    let fixture = |name: &str| format!("{}{name}", testkit::tls::TLS_DIR);
    the_reply_is_published(
        &nats,
        "tls-1",
        &[
            ("NATS_URL", &nats.url()),
            ("NATS_TLS_CA_FILE", &fixture("ca.pem")),
            ("NATS_TLS_CERT_FILE", &fixture("client.pem")),
            ("NATS_TLS_KEY_FILE", &fixture("client.key")),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_refused_token_is_a_retryable_503_that_does_not_show_it() {
    let nats = server(
        "authorization { token: \"right-t0ken\" }\n",
        ConnectOptions::with_token("right-t0ken".into()),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let token = secret(&dir, "token", "wr0ng-t0ken");
    let app = app(
        &simulator().await,
        &[("NATS_URL", &nats.url()), ("NATS_TOKEN_FILE", &token)],
    )
    .await;
    let answer = send(
        &app,
        event("ai.tts.request")
            .json(&json!({"request_id": "bad-1", "text": "Hi."}))
            .binary(),
    )
    .await;
    assert_error(&answer, 503, "backend_unavailable");
    let body = String::from_utf8_lossy(&answer.body);
    assert!(body.contains("authorization violation"), "{body}");
    assert!(
        !body.contains("wr0ng-t0ken") && !body.contains("right-t0ken"),
        "{body}"
    );
}
