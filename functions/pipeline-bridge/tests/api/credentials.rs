//! Credentials from the kubeconfig: what each kind of user sends, and what is refused at start.

use serde_json::json;
use testkit::fake_kube::FakeKube;

use crate::support::Harness;

/// A kubeconfig for `kube` whose user is `user` (YAML lines, indented for `user:`).
fn kubeconfig(kube: &FakeKube, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n\
         users:\n- name: u\n  user:\n{user}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    \
         user: u\ncurrent-context: x\n",
        kube.url()
    )
}

/// Triggers the `train` run through an instance using the kubeconfig at `path` (the harness's
/// own fake API server goes unused); it must succeed. Returns the reply's data.
async fn trigger_through(path: &std::path::Path) -> serde_json::Value {
    let path = path.display().to_string();
    let h = Harness::start_with(&[("KUBECONFIG", path.as_str())]).await;
    let answer = h
        .trigger("c-1", json!({"request_id": "c-1", "pipeline": "train"}))
        .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()
}

/// Starts a harness whose kubeconfig has `user`, triggers one run, and returns the
/// `Authorization` the API server saw.
async fn authorization_with(user: impl FnOnce(&std::path::Path) -> String) -> Option<String> {
    let kube = FakeKube::start().await.expect("fake kube");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("custom-kubeconfig");
    std::fs::write(&path, kubeconfig(&kube, &user(dir.path()))).expect("kubeconfig");
    trigger_through(&path).await;
    let requests = kube.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    requests[0].authorization.clone()
}

#[tokio::test]
async fn a_token_is_sent_as_a_bearer_token() {
    let seen = authorization_with(|_| "    token: abc.def".into()).await;
    assert_eq!(seen.as_deref(), Some("Bearer abc.def"));
}

#[tokio::test]
async fn a_token_file_is_read_like_a_service_account_token() {
    let seen = authorization_with(|dir| {
        let file = dir.join("token");
        std::fs::write(&file, "from-file\n").expect("token");
        format!("    tokenFile: {}", file.display())
    })
    .await;
    assert_eq!(seen.as_deref(), Some("Bearer from-file"));
}

#[tokio::test]
async fn basic_credentials_are_sent_as_basic_auth() {
    let seen = authorization_with(|_| "    username: ada\n    password: s3cret".into()).await;
    // base64("ada:s3cret")
    assert_eq!(seen.as_deref(), Some("Basic YWRhOnMzY3JldA=="));
}

#[tokio::test]
async fn no_credentials_send_none() {
    let seen = authorization_with(|_| "    {}".into()).await;
    assert_eq!(seen, None);
}

/// `State::new`'s error for a kubeconfig whose user is `user`.
async fn refusal(user: &str) -> String {
    let kube = FakeKube::start().await.expect("fake kube");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig(&kube, user)).expect("kubeconfig");
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, crate::support::CATALOG).expect("catalog");
    let env = vec![
        ("KUBECONFIG".to_string(), path.display().to_string()),
        (
            "PIPELINE_CATALOG".to_string(),
            catalog.display().to_string(),
        ),
        ("KFP_URL".to_string(), "http://127.0.0.1:9".to_string()),
    ];
    let config = handler_kit::config::load(&env, pipeline_bridge::Config::read).expect("config");
    let error = pipeline_bridge::State::new(config)
        .await
        .expect_err("the configuration is refused");
    assert!(kube.requests().is_empty());
    error.to_string()
}

#[tokio::test]
async fn credential_plugins_and_half_certificates_are_refused_at_start() {
    let exec = refusal(
        "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: aws\n      args: [eks, get-token]",
    )
    .await;
    assert!(exec.contains("exec"), "{exec}");
    let half = refusal("    client-certificate-data: aGVsbG8=").await;
    assert!(half.contains("needs its key"), "{half}");
}

#[tokio::test]
async fn a_kubeconfig_ca_and_client_certificate_reach_an_https_api_server() {
    use base64::Engine as _;
    let b64 =
        |name: &str| base64::engine::general_purpose::STANDARD.encode(testkit::tls::fixture(name));
    let created = json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "x"}});
    let server = testkit::tls::TlsServer::start(201, &created.to_string())
        .await
        .expect("TLS server");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tls-kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    \
         certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    \
         client-key-data: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n",
        server.url(),
        b64("ca.pem"),
        b64("client.pem"),
        b64("client.key")
    );
    std::fs::write(&path, text).expect("kubeconfig");
    assert_eq!(trigger_through(&path).await["created"], true);
    assert_eq!(
        server.seen(),
        vec![testkit::tls::Seen {
            request_line: "POST /apis/argoproj.io/v1alpha1/namespaces/ml/workflows HTTP/1.1".into(),
            client_chain: 1,
        }]
    );
}
