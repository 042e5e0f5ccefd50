//! Vector search in Milvus over its RESTful API: v2 (Milvus 2.4 and later) or v1 (2.3).
//!
//! REST keeps gRPC and protobuf code generation out of the functions' binaries; one search is
//! one small JSON request. Both API versions answer HTTP 200 even when the search failed and
//! put the verdict in the body's `code`, so the client reads that: a missing collection or a
//! wrong field name will not fix itself and is a rejection, while the codes Milvus itself marks
//! retriable (not ready, rate limited, still loading) count as transient failures, like HTTP 5xx
//! and connection errors.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use handler_kit::HandlerError;
use handler_kit::config::ConfigReader;
use handler_kit::http::{check, read_json};
use handler_kit::resilience::{Backend, BackendConfig, CallError};

/// Which REST API the Milvus server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MilvusApi {
    /// Milvus 2.4+: `POST {url}/v2/vectordb/entities/search`; success is `code: 0`.
    V2,
    /// Milvus 2.3: `POST {url}/v1/vector/search`; success is `code: 200`.
    V1,
}

/// Configuration of the Milvus backend.
#[derive(Debug, Clone)]
pub struct MilvusConfig {
    /// `MILVUS_URL` (required): the proxy's address, e.g. `http://milvus:19530`.
    pub url: String,
    /// `MILVUS_API` (default `v2`): `v2` for Milvus 2.4 and later, `v1` for 2.3.
    pub api: MilvusApi,
    /// `MILVUS_TOKEN` (optional): sent as `Authorization: Bearer`; `user:password` or an API
    /// key, for servers with authentication on.
    pub token: Option<String>,
    /// `MILVUS_DB` (optional): the database; Milvus's `default` when unset.
    pub db_name: Option<String>,
    /// `MILVUS_VECTOR_FIELD` (default `vector`): the vector field searched (v2's `annsField`;
    /// v1 always searches a collection's only vector field).
    pub vector_field: String,
    /// `MILVUS_TIMEOUT_MS` (default 5000), `MILVUS_CONCURRENCY`, `MILVUS_QUEUE_TIMEOUT_MS`,
    /// `MILVUS_BREAKER_*`, and `MILVUS_MAX_RESPONSE_BYTES` (default 8 MiB): the largest answer.
    /// A search answers at most `CHAT_MAX_TOP_K` (64) hits, and a `VARCHAR` holds at most
    /// 65,535 bytes: 64 such texts are 4 MiB, twice that leaves room for JSON escapes.
    pub backend: BackendConfig,
}

impl MilvusConfig {
    /// Reads the `MILVUS_*` variables.
    pub fn read(r: &mut ConfigReader) -> Self {
        let api = match r.choice("MILVUS_API", "v2", &["v2", "v1"]).as_str() {
            "v1" => MilvusApi::V1,
            _ => MilvusApi::V2,
        };
        Self {
            url: r.http_url("MILVUS_URL", "address of the Milvus proxy (REST API)"),
            api,
            token: r.optional("MILVUS_TOKEN"),
            db_name: r.optional("MILVUS_DB"),
            vector_field: r.string("MILVUS_VECTOR_FIELD", "vector"),
            backend: BackendConfig::read(
                r,
                "MILVUS",
                BackendConfig {
                    timeout: Duration::from_secs(5),
                    max_response_bytes: 8 * 1024 * 1024,
                    ..BackendConfig::default()
                },
            ),
        }
    }
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The primary key (numbers as their decimal text).
    pub id: String,
    /// The answer's `distance`: its meaning depends on the metric (for `COSINE` and `IP`,
    /// higher is nearer; for `L2`, lower is).
    pub score: f32,
    /// The requested output fields, by name.
    pub fields: Map<String, Value>,
}

/// A guarded Milvus search client.
#[derive(Debug, Clone)]
pub struct MilvusClient {
    http: reqwest::Client,
    config: MilvusConfig,
    backend: Backend,
}

impl MilvusClient {
    /// A client for `config`, sharing `http` with the function's other clients.
    pub fn new(http: reqwest::Client, config: MilvusConfig) -> Self {
        let backend = Backend::new("milvus", config.backend.clone());
        Self {
            http,
            config,
            backend,
        }
    }

    /// The `limit` entities of `collection` nearest to `vector`, nearest first, with their
    /// `output_fields`. A limit of zero asks nothing and finds nothing.
    pub async fn search(
        &self,
        collection: &str,
        vector: &[f32],
        limit: usize,
        output_fields: &[&str],
    ) -> Result<Vec<Hit>, HandlerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let config = &self.config;
        let (path, mut body, success) = match config.api {
            MilvusApi::V2 => (
                "/v2/vectordb/entities/search",
                json!({
                    "collectionName": collection,
                    "data": [vector],
                    "annsField": config.vector_field,
                    "limit": limit,
                    "outputFields": output_fields,
                }),
                0,
            ),
            MilvusApi::V1 => (
                "/v1/vector/search",
                json!({
                    "collectionName": collection,
                    "vector": vector,
                    "limit": limit,
                    "outputFields": output_fields,
                }),
                200,
            ),
        };
        if let Some(db) = &config.db_name {
            body["dbName"] = db.as_str().into();
        }
        let mut request = self.http.post(format!("{}{path}", config.url)).json(&body);
        if let Some(token) = &config.token {
            request = request.bearer_auth(token);
        }
        let limit = config.backend.max_response_bytes;
        self.backend
            .call(async move {
                let response = check(request.send().await).await?;
                let answer: Answer = read_json(response, limit).await?;
                if answer.code != success {
                    let detail = format!("code {}: {}", answer.code, answer.message());
                    return Err(if RETRIABLE_CODES.contains(&answer.code) {
                        CallError::Transient(detail)
                    } else {
                        CallError::Rejected(detail)
                    });
                }
                hits(answer.data).map_err(CallError::Transient)
            })
            .await
    }
}

/// Body codes Milvus marks retriable (`merr`): service not ready (1), unavailable (2), request
/// limit (4), rate limit (8), resources short (12), collection or partition not fully loaded
/// (103, 202), collection recovering (106), REST rate limit (1807).
const RETRIABLE_CODES: [i64; 9] = [1, 2, 4, 8, 12, 103, 106, 202, 1807];

/// The envelope of every REST answer.
#[derive(Deserialize)]
struct Answer {
    code: i64,
    #[serde(default)]
    message: Option<String>,
    /// Early 2.3 builds put the cause here and a summary in `message`.
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Value,
}

impl Answer {
    fn message(&self) -> String {
        match (&self.message, &self.error) {
            (Some(m), Some(e)) => format!("{m}: {e}"),
            (Some(m), None) | (None, Some(m)) => m.clone(),
            (None, None) => "no message".into(),
        }
    }
}

/// The hits of a one-vector search: `[{id, distance, ..fields}]` (or nested one level, as
/// multi-vector searches answer).
fn hits(data: Value) -> Result<Vec<Hit>, String> {
    let rows = match data {
        Value::Null => return Ok(Vec::new()),
        Value::Array(rows) => rows,
        other => {
            return Err(format!(
                "answered data that is not a list: {}",
                snippet(&other)
            ));
        }
    };
    let rows = match rows.first() {
        Some(Value::Array(_)) => match rows.into_iter().next() {
            Some(Value::Array(first)) => first,
            _ => Vec::new(),
        },
        _ => rows,
    };
    rows.into_iter().map(hit).collect()
}

fn hit(row: Value) -> Result<Hit, String> {
    let Value::Object(mut fields) = row else {
        return Err(format!(
            "answered a hit that is not an object: {}",
            snippet(&row)
        ));
    };
    let id = match fields.remove("id") {
        Some(Value::String(id)) => id,
        Some(Value::Number(id)) => id.to_string(),
        other => return Err(format!("answered a hit without a usable id: {other:?}")),
    };
    let score = match fields.remove("distance").as_ref().and_then(Value::as_f64) {
        Some(distance) => distance as f32,
        None => return Err(format!("answered hit {id} without a distance")),
    };
    Ok(Hit { id, score, fields })
}

fn snippet(value: &Value) -> String {
    value.to_string().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;

    fn client(env: &[(&str, &str)]) -> MilvusClient {
        let config =
            handler_kit::config::load(&env.to_vec(), MilvusConfig::read).expect("valid config");
        MilvusClient::new(
            handler_kit::http::client(Duration::from_secs(2)).expect("HTTP client"),
            config,
        )
    }

    fn fields(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn config_defaults() {
        let config =
            handler_kit::config::load(&[("MILVUS_URL", "http://m:19530")], MilvusConfig::read)
                .expect("valid");
        assert_eq!(config.api, MilvusApi::V2);
        assert_eq!(config.vector_field, "vector");
        assert_eq!((config.token, config.db_name), (None, None));
        assert_eq!(config.backend.timeout, Duration::from_secs(5));
        let err = handler_kit::config::load(&[("MILVUS_API", "v3")], MilvusConfig::read)
            .expect_err("no url, bad api");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[tokio::test]
    async fn v2_search_sends_the_documented_body_and_parses_hits() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v2/vectordb/entities/search"))
            .and(header("authorization", "Bearer root:Milvus"))
            .and(body_json(json!({
                "dbName": "docs",
                "collectionName": "chunks",
                "data": [[0.5, 0.25]],
                "annsField": "embedding",
                "limit": 2,
                "outputFields": ["text", "source"],
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "code": 0,
                "cost": 0,
                "data": [
                    {"id": 448, "distance": 0.91, "text": "near", "source": "a.md"},
                    {"id": "449", "distance": 0.52, "text": "far", "source": "b.md"},
                ],
            })))
            .expect(1)
            .mount(&server)
            .await;
        let milvus = client(&[
            ("MILVUS_URL", server.uri().as_str()),
            ("MILVUS_TOKEN", "root:Milvus"),
            ("MILVUS_DB", "docs"),
            ("MILVUS_VECTOR_FIELD", "embedding"),
        ]);
        let hits = milvus
            .search("chunks", &[0.5, 0.25], 2, &["text", "source"])
            .await
            .expect("hits");
        assert_eq!(
            hits,
            vec![
                Hit {
                    id: "448".into(),
                    score: 0.91,
                    fields: fields(&[("text", json!("near")), ("source", json!("a.md"))]),
                },
                Hit {
                    id: "449".into(),
                    score: 0.52,
                    fields: fields(&[("text", json!("far")), ("source", json!("b.md"))]),
                },
            ]
        );
    }

    #[tokio::test]
    async fn v1_search_sends_the_documented_body_and_parses_hits() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/vector/search"))
            .and(body_json(json!({
                "collectionName": "chunks",
                "vector": [0.5, 0.25],
                "limit": 3,
                "outputFields": ["text"],
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "code": 200,
                "data": [{"distance": 0.75, "id": "470707424075448356", "text": "alpha"}],
            })))
            .expect(1)
            .mount(&server)
            .await;
        let milvus = client(&[("MILVUS_URL", server.uri().as_str()), ("MILVUS_API", "v1")]);
        let hits = milvus
            .search("chunks", &[0.5, 0.25], 3, &["text"])
            .await
            .expect("hits");
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].id, "470707424075448356");
        assert_eq!(hits[0].score, 0.75);
        assert_eq!(hits[0].fields, fields(&[("text", json!("alpha"))]));
        let received = &server.received_requests().await.expect("recorded")[0];
        assert!(!received.headers.contains_key("authorization"));
    }

    #[tokio::test]
    async fn error_codes_in_the_body_are_rejections_unless_milvus_says_retry() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v2/vectordb/entities/search"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "code": 100,
                "message": "collection not found[database=default][collection=nope]",
            })))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/v1/vector/search"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "code": 8,
                "message": "rate limit exceeded",
            })))
            .mount(&server)
            .await;
        let v2 = client(&[
            ("MILVUS_URL", server.uri().as_str()),
            ("MILVUS_BREAKER_FAILURES", "1"),
        ]);
        for _ in 0..2 {
            let err = v2
                .search("nope", &[1.0], 1, &[])
                .await
                .expect_err("code 100");
            assert!(
                matches!(&err, HandlerError::BackendRejected { backend: "milvus", detail }
                    if detail.contains("code 100") && detail.contains("collection not found")),
                "{err:?}"
            );
        }
        let v1 = client(&[("MILVUS_URL", server.uri().as_str()), ("MILVUS_API", "v1")]);
        let err = v1.search("c", &[1.0], 1, &[]).await.expect_err("code 8");
        assert!(
            matches!(&err, HandlerError::Backend { detail, .. } if detail.contains("rate limit")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn server_errors_are_transient() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(502).set_body_string("upstream down"))
            .mount(&server)
            .await;
        let err = client(&[("MILVUS_URL", server.uri().as_str())])
            .search("c", &[1.0], 1, &[])
            .await
            .expect_err("502");
        assert!(matches!(err, HandlerError::Backend { .. }), "{err:?}");
    }

    #[test]
    fn hits_accept_nested_and_empty_data_and_refuse_garbage() {
        assert!(hits(Value::Null).expect("null").is_empty());
        assert!(hits(json!([])).expect("empty").is_empty());
        let nested = hits(json!([[{"id": 7, "distance": 1.5}]])).expect("nested");
        assert_eq!(nested[0].id, "7");
        assert!(hits(json!({"id": 1})).is_err());
        assert!(hits(json!([{"distance": 0.1}])).is_err());
        assert!(hits(json!([{"id": 1}])).is_err());
    }

    /// Against a real Milvus 2.3 (v1 API): the nearest document comes first, with its fields.
    #[tokio::test]
    async fn v1_search_against_a_real_milvus() {
        let started = std::time::Instant::now();
        let server = testkit::milvus_server::MilvusServer::start()
            .await
            .expect("milvus-server starts (run `just tools`)");
        let ready = started.elapsed();
        let created = server
            .post(
                "/v1/vector/collections/create",
                &json!({
                    "collectionName": "docs",
                    "dimension": 4,
                    "metricType": "COSINE",
                    "primaryField": "id",
                    "vectorField": "vector",
                }),
            )
            .await
            .expect("create");
        assert_eq!(created["code"], 200, "{created}");
        let inserted = server
            .post(
                "/v1/vector/insert",
                &json!({
                    "collectionName": "docs",
                    "data": [
                        {"vector": [1.0, 0.0, 0.0, 0.0], "text": "about cats", "source": "cats.md"},
                        {"vector": [0.0, 1.0, 0.0, 0.0], "text": "about dogs", "source": "dogs.md"},
                        {"vector": [0.0, 0.0, 1.0, 0.0], "text": "about fish", "source": "fish.md"},
                    ],
                }),
            )
            .await
            .expect("insert");
        assert_eq!(inserted["code"], 200, "{inserted}");

        let milvus = client(&[
            ("MILVUS_URL", server.url().as_str()),
            ("MILVUS_API", "v1"),
            ("MILVUS_TIMEOUT_MS", "20000"),
        ]);
        // The collection loads and the insert becomes visible asynchronously.
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        let hits = loop {
            match milvus
                .search("docs", &[0.1, 0.9, 0.1, 0.0], 2, &["text", "source"])
                .await
            {
                Ok(hits) if hits.len() == 2 => break hits,
                other if std::time::Instant::now() < deadline => {
                    eprintln!("not searchable yet: {other:?}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => panic!("no results within 45 s: {other:?}"),
            }
        };
        assert_eq!(hits[0].fields["text"], "about dogs", "{hits:?}");
        assert_eq!(hits[0].fields["source"], "dogs.md");
        assert!(hits[0].score > hits[1].score, "{hits:?}");
        assert!(!hits[0].id.is_empty());

        let err = milvus
            .search("missing", &[1.0, 0.0, 0.0, 0.0], 1, &[])
            .await
            .expect_err("no such collection");
        assert!(
            matches!(err, HandlerError::BackendRejected { .. }),
            "{err:?}"
        );
        eprintln!(
            "real Milvus: ready in {ready:?}, whole test {:?}",
            started.elapsed()
        );
    }
}
