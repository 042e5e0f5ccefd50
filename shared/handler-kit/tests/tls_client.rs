//! `handler_kit::http::client_with` against a TLS server that requires a client certificate
//! (`testkit::tls`): a private CA is trusted instead of the compiled-in roots, and the client
//! certificate is presented, as for a Kubernetes API server from a kubeconfig.

use std::time::Duration;

use handler_kit::http::{Identity, Tls, client_with};
use testkit::tls::{Seen, TlsServer, certificates, fixture};

fn client_identity() -> Identity {
    Identity {
        certificates: fixture("client.pem"),
        key: fixture("client.key"),
    }
}

async fn get(tls: Tls, server: &TlsServer) -> Result<String, String> {
    let client = client_with(Duration::from_secs(2), tls).map_err(|e| e.to_string())?;
    let answer = client
        .get(format!("{}/apis", server.url()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| handler_kit::http::describe(&e))?;
    answer.text().await.map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_private_ca_and_a_client_certificate_get_through() {
    let server = TlsServer::start(200, "{}").await.expect("server");
    let tls = Tls {
        roots: certificates("ca.pem"),
        identity: Some(client_identity()),
    };
    assert_eq!(get(tls, &server).await.as_deref(), Ok("{}"));
    assert_eq!(
        server.seen(),
        vec![Seen {
            request_line: "GET /apis HTTP/1.1".into(),
            client_chain: 1
        }]
    );
}

#[tokio::test]
async fn without_the_client_certificate_the_server_refuses() {
    let server = TlsServer::start(200, "{}").await.expect("server");
    let tls = Tls {
        roots: certificates("ca.pem"),
        identity: None,
    };
    let error = get(tls, &server).await.expect_err("refused");
    assert!(server.seen().is_empty(), "{error}");
}

#[tokio::test]
async fn a_server_signed_by_another_ca_is_not_trusted() {
    let server = TlsServer::start(200, "{}").await.expect("server");
    // An unrelated CA, then the compiled-in roots (no CA given).
    for roots in [certificates("other-ca.pem"), Vec::new()] {
        let tls = Tls {
            roots,
            identity: Some(client_identity()),
        };
        let error = get(tls, &server).await.expect_err("untrusted server");
        assert!(error.contains("certificate"), "{error}");
    }
    assert!(server.seen().is_empty());
}

#[test]
fn a_key_that_is_not_pem_is_a_setup_error() {
    let tls = Tls {
        roots: certificates("ca.pem"),
        identity: Some(Identity {
            certificates: fixture("client.pem"),
            key: b"not a key".to_vec(),
        }),
    };
    let error = client_with(Duration::from_secs(1), tls).expect_err("bad key");
    assert!(error.to_string().contains("client key"), "{error}");
}
