//! The source against a nats-server that requires a credential or TLS: it consumes and
//! delivers with each kind the `NATS_*_FILE` variables give; a bad credential configuration
//! exits 64 without showing the secret, and `redrive` logs in the same way.

use std::sync::Arc;
use std::time::Duration;

use async_nats::ConnectOptions;
use testkit::nats_jwt::Decentralized;
use testkit::nats_server::{NatsOptions, NatsServer};

use crate::support::{Sink, Source, drained, publish_numbered};

/// A server with `config` lines whose own client logs in with `client`.
async fn server(config: &str, client: ConnectOptions) -> NatsServer {
    NatsServer::start_configured(config, client)
        .await
        .expect("nats-server")
}

fn secret(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    testkit::nats_server::secret_file(dir.path(), name, text)
}

/// Runs the source with `env` against `nats`, publishes three messages with `nats`' own
/// client, and checks the sink got each and the consumer acked them all.
async fn consumes_and_delivers(nats: &NatsServer, env: &[(&str, &str)]) {
    let sink = Sink::start(Arc::new(|_: &str, _| 200), Duration::ZERO);
    let source = Source::start(&nats.url(), &sink.url(), env);
    source.ready().await;
    let client = nats.client().await.expect("client");
    publish_numbered(&client, 3, |i| format!("work.auth{i}")).await;
    assert!(drained(&client, Duration::from_secs(10)).await, "not acked");
    let mut subjects: Vec<String> = sink.log().into_iter().map(|r| r.subject).collect();
    subjects.sort();
    assert_eq!(subjects, ["work.auth0", "work.auth1", "work.auth2"]);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_consumes_and_delivers() {
    let nats = server(
        "authorization { token: \"src-t0ken\" }\n",
        ConnectOptions::with_token("src-t0ken".into()),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let token = secret(&dir, "token", "src-t0ken\n");
    consumes_and_delivers(&nats, &[("NATS_TOKEN_FILE", &token)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_files_consume_and_deliver() {
    let nats = server(
        "authorization { users: [{user: source, password: \"src-pa55\"}] }\n",
        ConnectOptions::with_user_and_password("source".into(), "src-pa55".into()),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let user = secret(&dir, "user", "source\n");
    let password = secret(&dir, "password", "src-pa55\n");
    consumes_and_delivers(
        &nats,
        &[("NATS_USER_FILE", &user), ("NATS_PASSWORD_FILE", &password)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_nats_url_consume_and_deliver() {
    let nats = server(
        "authorization { users: [{user: source, password: \"src-pa55\"}] }\n",
        ConnectOptions::with_user_and_password("source".into(), "src-pa55".into()),
    )
    .await;
    let url = format!("nats://source:src-pa55@127.0.0.1:{}", nats.port());
    consumes_and_delivers(&nats, &[("NATS_URL", &url)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_seed_file_consumes_and_delivers() {
    let (source, watcher) = (nkeys::KeyPair::new_user(), nkeys::KeyPair::new_user());
    let nats = server(
        &format!(
            "authorization {{ users: [{{nkey: {}}}, {{nkey: {}}}] }}\n",
            source.public_key(),
            watcher.public_key()
        ),
        ConnectOptions::with_nkey(watcher.seed().expect("seed")),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let seed = secret(&dir, "seed", &source.seed().expect("seed"));
    consumes_and_delivers(&nats, &[("NATS_NKEY_FILE", &seed)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_consumes_and_delivers_in_an_operator_s_account() {
    let operator = Decentralized::new();
    let nats = server(
        &operator.server_config(),
        ConnectOptions::with_credentials(&operator.user_creds("watcher")).expect("creds"),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let creds = secret(&dir, "source.creds", &operator.user_creds("nats-source"));
    consumes_and_delivers(&nats, &[("NATS_CREDS_FILE", &creds)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_consumes_and_delivers() {
    let nats = NatsServer::start_with(NatsOptions::tls("", ConnectOptions::new(), true))
        .await
        .expect("nats-server");
    let fixture = |name: &str| format!("{}{name}", testkit::tls::TLS_DIR);
    consumes_and_delivers(
        &nats,
        &[
            ("NATS_TLS_CA_FILE", &fixture("ca.pem")),
            ("NATS_TLS_CERT_FILE", &fixture("client.pem")),
            ("NATS_TLS_KEY_FILE", &fixture("client.key")),
        ],
    )
    .await;
}

/// The `nats-source` binary (no arguments: the source) with only `env`; what it printed to
/// stderr, and its exit code.
fn run_source(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_nats-source"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_bad_credential_configuration_exits_64_without_showing_the_secret() {
    let dir = tempfile::tempdir().expect("dir");
    let token = secret(&dir, "token", "t0ken-in-file");
    let missing = dir.path().join("missing").display().to_string();
    let base = [
        ("K_SINK", "http://127.0.0.1:1"),
        ("STREAM", "WORK"),
        ("CONSUMER", "worker"),
    ];
    for (extra, says) in [
        (
            vec![
                ("NATS_URL", "nats://svc:hunter2@127.0.0.1:4222"),
                ("NATS_TOKEN_FILE", token.as_str()),
            ],
            "at most one NATS credential",
        ),
        (
            vec![("NATS_URL", "nats://svc:hunter2@nats:42x2")],
            "invalid port",
        ),
        (
            vec![
                ("NATS_URL", "nats://127.0.0.1:4222"),
                ("NATS_PASSWORD_FILE", token.as_str()),
            ],
            "without NATS_USER_FILE",
        ),
        (
            vec![
                ("NATS_URL", "nats://127.0.0.1:4222"),
                ("NATS_CREDS_FILE", missing.as_str()),
            ],
            "NATS_CREDS_FILE",
        ),
    ] {
        let mut env = base.to_vec();
        env.extend(extra);
        let (code, stderr) = run_source(&env);
        assert_eq!(code, Some(64), "{stderr}");
        assert!(stderr.contains(says), "{says:?} not in: {stderr}");
        assert!(
            !stderr.contains("hunter2") && !stderr.contains("t0ken-in-file"),
            "a secret in: {stderr}"
        );
    }
}

#[tokio::test]
async fn redrive_logs_in_with_the_same_files_and_a_refused_one_shows_no_secret() {
    let nats = server(
        "authorization { token: \"redrive-t0ken\" }\n",
        ConnectOptions::with_token("redrive-t0ken".into()),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let right = secret(&dir, "right", "redrive-t0ken");
    let wrong = secret(&dir, "wrong", "wr0ng-t0ken");
    let redrive = |token: String, url: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_nats-source"))
                .args(["redrive", "--dlq-stream", "NONE_DLQ", "--nats-url", &url])
                .env_clear()
                .env("NATS_TOKEN_FILE", token)
                .output()
                .expect("run redrive")
        })
    };
    // Logged in: the run gets as far as asking for the (missing) DLQ stream.
    let output = redrive(right, nats.url()).await.expect("joined");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NONE_DLQ"), "{stderr}");
    assert!(!stderr.contains("authorization"), "{stderr}");

    let output = redrive(wrong, nats.url()).await.expect("joined");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("authorization violation"), "{stderr}");
    assert!(!stderr.contains("wr0ng-t0ken"), "{stderr}");
}
