//! `webhook`: pipeline-bridge's git push webhooks (`POST /webhooks/github`, `/webhooks/gitea`)
//! through its `app()`, against the fake cluster ([`crate::pipeline`]).
//!
//! The harness signs the body with the configured secret, so the input reaches the parsing
//! behind the signature check; `:provider: gitea` picks the other route, `:signature: bad` or
//! `:signature: none` sends a wrong one or none. Whatever the headers and body, the answer is
//! never a 500, and an unsigned or wrongly signed body is never parsed (nor answered 2xx).

use axum::http::HeaderValue;
use ring::hmac;

use crate::common::{Raw, check_answer, runtime, send};
use crate::pipeline::{GITEA_SECRET, GITHUB_SECRET};

/// One input: headers, a blank line, the push event's body.
pub fn run(data: &[u8]) {
    let raw = Raw::parse(data);
    let gitea = raw.pseudo("provider") == Some("gitea");
    let (path, secret, header) = if gitea {
        ("/webhooks/gitea", GITEA_SECRET, "x-gitea-signature")
    } else {
        ("/webhooks/github", GITHUB_SECRET, "x-hub-signature-256")
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut signature = hex::encode(hmac::sign(&key, &raw.body).as_ref());
    let forged = match raw.pseudo("signature") {
        Some("none") => None,
        Some("bad") => {
            signature.replace_range(
                ..2,
                if signature.starts_with("00") {
                    "11"
                } else {
                    "00"
                },
            );
            Some(signature)
        }
        _ => Some(signature),
    };
    let signed = forged.as_ref().is_some_and(|s| {
        hmac::verify(&key, &raw.body, &hex::decode(s).unwrap_or_default()).is_ok()
    });
    let mut request = raw.request(path);
    *request.uri_mut() = axum::http::Uri::from_static(path);
    let headers = request.headers_mut();
    headers.remove("x-gitea-signature");
    headers.remove("x-hub-signature-256");
    if let Some(signature) = forged {
        let value = if gitea {
            signature
        } else {
            format!("sha256={signature}")
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header, value);
        }
    }
    let app = crate::pipeline::app();
    runtime().block_on(async {
        let answer = send(&app, request).await;
        check_answer(&answer);
        if !signed {
            let detail = String::from_utf8_lossy(&answer.body);
            assert!(
                !answer.status.is_success() && !detail.contains("not a push event"),
                "an unsigned body was read: {} {detail}",
                answer.status
            );
        }
    });
}
