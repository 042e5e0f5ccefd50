//! `answers`: how the retrieval clients read their backends' answers: Milvus search (REST v2
//! and v1), reranking (TEI and Cohere-style) and embeddings, each fed by a backend answering
//! the input ([`crate::backend`]).
//!
//! `:api:` picks the client (`milvus-v2` by default, `milvus-v1`, `tei`, `cohere`, `embed`) and
//! `:texts: N` how many texts are sent (1 to 16). Invariants: a ranking only names texts that
//! were sent, best first; embeddings come one per text; no answer is an internal error.

use std::sync::OnceLock;

use chat_handler::embed::{EmbedClient, EmbedConfig};
use chat_handler::milvus::{MilvusClient, MilvusConfig};
use chat_handler::rerank::{RerankClient, RerankConfig};
use handler_kit::HandlerError;

use crate::backend::{self, Canned};
use crate::common::{Raw, runtime};

struct Clients {
    milvus_v2: MilvusClient,
    milvus_v1: MilvusClient,
    tei: RerankClient,
    cohere: RerankClient,
    embed: EmbedClient,
}

fn clients() -> &'static Clients {
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        let _guard = runtime().enter();
        let http = handler_kit::http::client(std::time::Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("http client: {e}"));
        let url = backend::url();
        let with = |prefix: &str, extra: &[(&str, &str)]| {
            let mut env = backend::env(prefix, url);
            env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            env
        };
        let milvus = |api: &str| {
            let env = with("MILVUS", &[("MILVUS_API", api)]);
            handler_kit::config::load(&env, MilvusConfig::read)
                .unwrap_or_else(|e| panic!("milvus config: {e}"))
        };
        let rerank = |api: &str| {
            let env = with("RERANK", &[("RERANK_API", api)]);
            handler_kit::config::load(&env, RerankConfig::read_optional)
                .unwrap_or_else(|e| panic!("rerank config: {e}"))
                .unwrap_or_else(|| panic!("RERANK_URL is set"))
        };
        let embed = handler_kit::config::load(&with("EMBED", &[]), EmbedConfig::read)
            .unwrap_or_else(|e| panic!("embed config: {e}"));
        Clients {
            milvus_v2: MilvusClient::new(http.clone(), milvus("v2")),
            milvus_v1: MilvusClient::new(http.clone(), milvus("v1")),
            tei: RerankClient::new(http.clone(), rerank("tei")),
            cohere: RerankClient::new(http.clone(), rerank("cohere")),
            embed: EmbedClient::new(http, embed),
        }
    })
}

fn not_internal<T>(result: &Result<T, HandlerError>) {
    if let Err(e @ HandlerError::Internal(_)) = result {
        panic!("an internal error from a backend's answer: {e}");
    }
}

/// One input: the backend's answer, with `:api:` and `:texts:`.
pub fn run(data: &[u8]) {
    let raw = Raw::parse(data);
    let count = raw
        .pseudo("texts")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(3)
        .clamp(1, 16);
    let texts: Vec<String> = (0..count).map(|i| format!("text {i}")).collect();
    let clients = clients();
    backend::answer_with(Canned::from_raw(&raw));
    runtime().block_on(async {
        match raw.pseudo("api").unwrap_or("milvus-v2") {
            api @ ("tei" | "cohere") => {
                let client = if api == "tei" {
                    &clients.tei
                } else {
                    &clients.cohere
                };
                let ranked = client.rerank("query", &texts).await;
                not_internal(&ranked);
                if let Ok(ranked) = ranked {
                    assert!(ranked.iter().all(|r| r.index < count), "{ranked:?}");
                    assert!(
                        ranked
                            .windows(2)
                            .all(|w| w[0].score.total_cmp(&w[1].score).is_ge()),
                        "not best first: {ranked:?}"
                    );
                }
            }
            "embed" => {
                let vectors = clients.embed.embed(&texts).await;
                not_internal(&vectors);
                if let Ok(vectors) = vectors {
                    assert_eq!(vectors.len(), count, "one vector per text");
                }
            }
            api => {
                let client = if api == "milvus-v1" {
                    &clients.milvus_v1
                } else {
                    &clients.milvus_v2
                };
                let hits = client.search("docs", &[0.1, 0.2], count, &["text"]).await;
                not_internal(&hits);
            }
        }
    });
}
