//! Reranking client: Hugging Face TEI's `POST /rerank` or Cohere-style `POST /v1/rerank`.
//!
//! A cross-encoder scores each retrieved text against the query far better than vector
//! distance does, so retrieval asks the vector store for more candidates than it needs and
//! keeps the best few after reranking. Both APIs answer with indices into the texts sent; the
//! client checks them (an index outside the list would attach a score to the wrong document)
//! and returns the ranking best first. Reranking is optional: without `RERANK_URL` there is no
//! config, and the caller keeps the vector store's order.

use std::time::Duration;

use serde::Deserialize;

use handler_kit::HandlerError;
use handler_kit::config::ConfigReader;
use handler_kit::http::{check, read_json};
use handler_kit::resilience::{Backend, BackendConfig, CallError};

/// Which HTTP API the reranker speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RerankApi {
    /// Text Embeddings Inference: `POST {url}/rerank {query, texts}` -> `[{index, score}]`.
    Tei,
    /// Cohere-style (also Jina, vLLM, Infinity): `POST {url}/v1/rerank {model, query, documents}`
    /// -> `{results: [{index, relevance_score}]}`.
    Cohere,
}

/// Configuration of the reranking backend.
#[derive(Debug, Clone)]
pub struct RerankConfig {
    /// `RERANK_URL` (unset: no reranking): base URL of the reranker, e.g. `http://tei-rerank:80`.
    pub url: String,
    /// `RERANK_API` (default `tei`): `tei` or `cohere`.
    pub api: RerankApi,
    /// `RERANK_MODEL` (optional): the `model` sent to Cohere-style servers; TEI serves one model.
    pub model: Option<String>,
    /// `RERANK_API_KEY` (optional): sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// `RERANK_TIMEOUT_MS` (default 10000), `RERANK_CONCURRENCY`, `RERANK_QUEUE_TIMEOUT_MS`,
    /// `RERANK_BREAKER_*`, and `RERANK_MAX_RESPONSE_BYTES` (default 8 MiB): the largest
    /// answer. Scores alone take 40 bytes a text, but some servers echo every text back
    /// (vLLM's `/v1/rerank` does), so this fits what a Milvus search may answer.
    pub backend: BackendConfig,
}

impl RerankConfig {
    /// Reads the `RERANK_*` variables; `None` when `RERANK_URL` is unset.
    pub fn read_optional(r: &mut ConfigReader) -> Option<Self> {
        r.optional("RERANK_URL")?;
        let api = match r.choice("RERANK_API", "tei", &["tei", "cohere"]).as_str() {
            "cohere" => RerankApi::Cohere,
            _ => RerankApi::Tei,
        };
        Some(Self {
            url: r.http_url("RERANK_URL", "base URL of the reranker"),
            api,
            model: r.optional("RERANK_MODEL"),
            api_key: r.optional("RERANK_API_KEY"),
            backend: BackendConfig::read(
                r,
                "RERANK",
                BackendConfig {
                    timeout: Duration::from_secs(10),
                    max_response_bytes: 8 * 1024 * 1024,
                    ..BackendConfig::default()
                },
            ),
        })
    }
}

/// One text's place in the ranking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// Position of the text in the slice given to [`RerankClient::rerank`].
    pub index: usize,
    /// Relevance to the query; higher is better (the scale depends on the model).
    pub score: f32,
}

/// A guarded reranking client.
#[derive(Debug, Clone)]
pub struct RerankClient {
    http: reqwest::Client,
    config: RerankConfig,
    backend: Backend,
}

impl RerankClient {
    /// A client for `config`, sharing `http` with the function's other clients.
    pub fn new(http: reqwest::Client, config: RerankConfig) -> Self {
        let backend = Backend::new("rerank", config.backend.clone());
        Self {
            http,
            config,
            backend,
        }
    }

    /// Scores `texts` against `query`, best first. No texts, no call.
    pub async fn rerank(&self, query: &str, texts: &[String]) -> Result<Vec<Ranked>, HandlerError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let config = &self.config;
        let mut request = match config.api {
            RerankApi::Tei => self
                .http
                .post(format!("{}/rerank", config.url))
                .json(&serde_json::json!({"query": query, "texts": texts})),
            RerankApi::Cohere => {
                let mut body = serde_json::json!({"query": query, "documents": texts});
                if let Some(model) = &config.model {
                    body["model"] = model.as_str().into();
                }
                self.http
                    .post(format!("{}/v1/rerank", config.url))
                    .json(&body)
            }
        };
        if let Some(key) = &config.api_key {
            request = request.bearer_auth(key);
        }
        let api = config.api;
        let count = texts.len();
        let limit = config.backend.max_response_bytes;
        self.backend
            .call(async move {
                let response = check(request.send().await).await?;
                let ranking = match api {
                    RerankApi::Tei => read_json::<Vec<TeiRank>>(response, limit)
                        .await?
                        .into_iter()
                        .map(|r| Ranked {
                            index: r.index,
                            score: r.score,
                        })
                        .collect(),
                    RerankApi::Cohere => read_json::<CohereAnswer>(response, limit)
                        .await?
                        .results
                        .into_iter()
                        .map(|r| Ranked {
                            index: r.index,
                            score: r.relevance_score,
                        })
                        .collect(),
                };
                best_first(ranking, count).map_err(CallError::Transient)
            })
            .await
    }
}

#[derive(Deserialize)]
struct TeiRank {
    index: usize,
    score: f32,
}

#[derive(Deserialize)]
struct CohereAnswer {
    results: Vec<CohereRank>,
}

#[derive(Deserialize)]
struct CohereRank {
    index: usize,
    relevance_score: f32,
}

/// Checks every index points into the `count` texts and sorts by score, best first.
fn best_first(mut ranking: Vec<Ranked>, count: usize) -> Result<Vec<Ranked>, String> {
    if let Some(bad) = ranking.iter().find(|r| r.index >= count) {
        return Err(format!("answered index {} for {count} texts", bad.index));
    }
    ranking.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(ranking)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    fn client(env: &[(&str, &str)]) -> RerankClient {
        let config = handler_kit::config::load(&env.to_vec(), RerankConfig::read_optional)
            .expect("valid config")
            .expect("configured");
        RerankClient::new(
            handler_kit::http::client(Duration::from_secs(2)).expect("HTTP client"),
            config,
        )
    }

    fn texts() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn config_is_optional_and_checked() {
        let none =
            handler_kit::config::load(&[("RERANK_API", "cohere")], RerankConfig::read_optional)
                .expect("valid");
        assert!(none.is_none());
        let tei =
            handler_kit::config::load(&[("RERANK_URL", "http://r/")], RerankConfig::read_optional)
                .expect("valid")
                .expect("some");
        assert_eq!((tei.url.as_str(), tei.api), ("http://r", RerankApi::Tei));
        assert_eq!(tei.backend.timeout, Duration::from_secs(10));
        let err = handler_kit::config::load(
            &[("RERANK_URL", "http://r"), ("RERANK_API", "jina")],
            RerankConfig::read_optional,
        )
        .expect_err("bad api");
        assert!(err.0[0].contains("RERANK_API"), "{err}");
    }

    #[tokio::test]
    async fn tei_answers_are_sorted_best_first() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/rerank"))
            .and(body_json(json!({"query": "q", "texts": ["a", "b", "c"]})))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!([
                {"index": 0, "score": 0.1},
                {"index": 2, "score": 0.9},
                {"index": 1, "score": 0.5},
            ])))
            .expect(1)
            .mount(&server)
            .await;
        let ranking = client(&[("RERANK_URL", server.uri().as_str())])
            .rerank("q", &texts())
            .await
            .expect("ranking");
        let order: Vec<usize> = ranking.iter().map(|r| r.index).collect();
        assert_eq!(order, vec![2, 1, 0]);
        assert_eq!(ranking[0].score, 0.9);
    }

    #[tokio::test]
    async fn cohere_answers_are_sorted_best_first() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/rerank"))
            .and(header("authorization", "Bearer k"))
            .and(body_json(json!({
                "model": "rerank-v3",
                "query": "q",
                "documents": ["a", "b", "c"],
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": "x",
                "results": [
                    {"index": 1, "relevance_score": 0.2},
                    {"index": 0, "relevance_score": 0.7},
                ],
            })))
            .expect(1)
            .mount(&server)
            .await;
        let ranking = client(&[
            ("RERANK_URL", server.uri().as_str()),
            ("RERANK_API", "cohere"),
            ("RERANK_MODEL", "rerank-v3"),
            ("RERANK_API_KEY", "k"),
        ])
        .rerank("q", &texts())
        .await
        .expect("ranking");
        assert_eq!(
            ranking,
            vec![
                Ranked {
                    index: 0,
                    score: 0.7
                },
                Ranked {
                    index: 1,
                    score: 0.2
                },
            ]
        );
    }

    #[tokio::test]
    async fn an_index_outside_the_texts_is_a_backend_error() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!([{"index": 3, "score": 0.9}, {"index": 0, "score": 0.1}])),
            )
            .mount(&server)
            .await;
        let err = client(&[("RERANK_URL", server.uri().as_str())])
            .rerank("q", &texts())
            .await
            .expect_err("index 3 of 3");
        assert!(
            matches!(&err, HandlerError::Backend { backend: "rerank", detail } if detail.contains("index 3 for 3 texts")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn no_texts_no_call() {
        let ranking = client(&[("RERANK_URL", "http://127.0.0.1:9")])
            .rerank("q", &[])
            .await
            .expect("empty");
        assert!(ranking.is_empty());
    }
}
