//! Embeddings client for the OpenAI-compatible `POST {url}/v1/embeddings`.
//!
//! TEI, vLLM, Ollama, LocalAI and the hosted APIs all serve it. The answer lists one vector per
//! input with its `index`; the spec does not promise they come in order, so the client puts them
//! back in the order of the texts and refuses an answer that does not cover every text exactly
//! once (a silently shifted vector would file a document under another one's meaning).

use std::time::Duration;

use serde::Deserialize;

use handler_kit::HandlerError;
use handler_kit::config::ConfigReader;
use handler_kit::http::{check, read_json};
use handler_kit::resilience::{Backend, BackendConfig, CallError};

/// Configuration of the embeddings backend.
#[derive(Debug, Clone)]
pub struct EmbedConfig {
    /// `EMBED_URL` (required): base URL of the server, without `/v1`, e.g. `http://tei:80`;
    /// requests go to `{url}/v1/embeddings`.
    pub url: String,
    /// `EMBED_MODEL` (default `default`): the `model` sent with every request; servers hosting
    /// a single model usually ignore it.
    pub model: String,
    /// `EMBED_API_KEY` (optional): sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// `EMBED_TIMEOUT_MS` (default 10000), `EMBED_CONCURRENCY`, `EMBED_QUEUE_TIMEOUT_MS`,
    /// `EMBED_BREAKER_*`, and `EMBED_MAX_RESPONSE_BYTES` (default 4 MiB): the largest answer.
    /// A float takes up to 21 bytes of JSON (Python servers print doubles), so a 4096-dimension
    /// vector about 86 KiB: 4 MiB holds 48 of them, and a chat request embeds one text.
    pub backend: BackendConfig,
}

impl EmbedConfig {
    /// Reads the `EMBED_*` variables.
    pub fn read(r: &mut ConfigReader) -> Self {
        Self {
            url: r.http_url(
                "EMBED_URL",
                "base URL of the OpenAI-compatible embeddings server",
            ),
            model: r.string("EMBED_MODEL", "default"),
            api_key: r.optional("EMBED_API_KEY"),
            backend: BackendConfig::read(
                r,
                "EMBED",
                BackendConfig {
                    timeout: Duration::from_secs(10),
                    max_response_bytes: 4 * 1024 * 1024,
                    ..BackendConfig::default()
                },
            ),
        }
    }
}

/// A guarded embeddings client.
#[derive(Debug, Clone)]
pub struct EmbedClient {
    http: reqwest::Client,
    config: EmbedConfig,
    backend: Backend,
}

impl EmbedClient {
    /// A client for `config`, sharing `http` with the function's other clients.
    pub fn new(http: reqwest::Client, config: EmbedConfig) -> Self {
        let backend = Backend::new("embed", config.backend.clone());
        Self {
            http,
            config,
            backend,
        }
    }

    /// One vector per text, in the order of `texts`. No texts, no call.
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, HandlerError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let mut request = self
            .http
            .post(format!("{}/v1/embeddings", self.config.url))
            .json(&serde_json::json!({
                "model": self.config.model,
                "input": texts,
                "encoding_format": "float",
            }));
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let expected = texts.len();
        let limit = self.config.backend.max_response_bytes;
        self.backend
            .call(async move {
                let response = check(request.send().await).await?;
                let answer: EmbeddingAnswer = read_json(response, limit).await?;
                in_input_order(answer.data, expected).map_err(CallError::Transient)
            })
            .await
    }
}

#[derive(Deserialize)]
struct EmbeddingAnswer {
    data: Vec<Embedding>,
}

#[derive(Deserialize)]
struct Embedding {
    index: usize,
    embedding: Vec<f32>,
}

/// Puts the vectors in input order; each index in `0..expected` must appear exactly once.
fn in_input_order(data: Vec<Embedding>, expected: usize) -> Result<Vec<Vec<f32>>, String> {
    if data.len() != expected {
        return Err(format!(
            "answered {} embeddings for {expected} texts",
            data.len()
        ));
    }
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; expected];
    for item in data {
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            Some(Some(_)) => return Err(format!("answered index {} twice", item.index)),
            None => {
                return Err(format!(
                    "answered index {} for {expected} texts",
                    item.index
                ));
            }
        }
    }
    // Every slot is filled: `expected` items, no index twice, none out of range.
    Ok(slots.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    fn client(url: &str, env: &[(&str, &str)]) -> EmbedClient {
        let mut vars: Vec<(String, String)> = vec![("EMBED_URL".into(), url.into())];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = handler_kit::config::load(&vars, EmbedConfig::read).expect("valid config");
        EmbedClient::new(
            handler_kit::http::client(Duration::from_secs(2)).expect("HTTP client"),
            config,
        )
    }

    fn texts() -> Vec<String> {
        vec!["zero".into(), "one".into(), "two".into()]
    }

    #[test]
    fn config_defaults() {
        let config = handler_kit::config::load(&[("EMBED_URL", "http://tei")], EmbedConfig::read)
            .expect("ok");
        assert_eq!(config.model, "default");
        assert_eq!(config.api_key, None);
        assert_eq!(config.backend.timeout, Duration::from_secs(10));
    }

    #[tokio::test]
    async fn vectors_come_back_in_input_order_whatever_the_answer_order() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/embeddings"))
            .and(header("authorization", "Bearer k"))
            .and(body_json(json!({
                "model": "bge",
                "input": ["zero", "one", "two"],
                "encoding_format": "float",
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "object": "list",
                "data": [
                    {"object": "embedding", "index": 2, "embedding": [2.0, 2.5]},
                    {"object": "embedding", "index": 0, "embedding": [0.0, 0.5]},
                    {"object": "embedding", "index": 1, "embedding": [1.0, 1.5]},
                ],
                "model": "bge",
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            })))
            .expect(1)
            .mount(&server)
            .await;
        let embed = client(
            &server.uri(),
            &[("EMBED_MODEL", "bge"), ("EMBED_API_KEY", "k")],
        );
        let vectors = embed.embed(&texts()).await.expect("vectors");
        assert_eq!(
            vectors,
            vec![vec![0.0, 0.5], vec![1.0, 1.5], vec![2.0, 2.5]]
        );
    }

    #[tokio::test]
    async fn an_answer_that_does_not_cover_every_text_once_is_a_backend_error() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "data": [{"index": 0, "embedding": [0.0]}, {"index": 1, "embedding": [1.0]}],
            })))
            .mount(&server)
            .await;
        let err = client(&server.uri(), &[])
            .embed(&texts())
            .await
            .expect_err("two for three");
        assert!(
            matches!(&err, HandlerError::Backend { backend: "embed", detail } if detail.contains("2 embeddings for 3 texts")),
            "{err:?}"
        );

        let twice = vec![
            Embedding {
                index: 0,
                embedding: vec![0.0],
            },
            Embedding {
                index: 0,
                embedding: vec![0.0],
            },
        ];
        assert!(in_input_order(twice, 2).expect_err("dup").contains("twice"));
        let outside = vec![Embedding {
            index: 1,
            embedding: vec![0.0],
        }];
        assert!(
            in_input_order(outside, 1)
                .expect_err("range")
                .contains("index 1")
        );
    }

    #[tokio::test]
    async fn no_texts_no_call() {
        // Nothing listens there: a call would fail.
        let embed = client("http://127.0.0.1:9", &[]);
        assert!(embed.embed(&[]).await.expect("empty").is_empty());
    }

    #[tokio::test]
    async fn a_refused_input_is_rejected() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(413).set_body_string("batch too large"))
            .mount(&server)
            .await;
        let err = client(&server.uri(), &[])
            .embed(&texts())
            .await
            .expect_err("413");
        assert!(
            matches!(err, HandlerError::BackendRejected { .. }),
            "{err:?}"
        );
    }
}
