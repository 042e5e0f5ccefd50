//! Sources from a real Milvus 2.3.5 (REST v1), embeddings and answers from the simulator.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::milvus_server::MilvusServer;

use crate::support::{app, chat, eventually, send};

const DOCS: [(&str, &str); 3] = [
    (
        "JetStream stores messages in streams and replays them to durable consumers.",
        "jetstream.md",
    ),
    (
        "Knative scales idle services to zero and activates them on the first request.",
        "knative.md",
    ),
    (
        "Milvus searches vectors by similarity to find related documents.",
        "milvus.md",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_come_from_a_real_milvus_collection() {
    let milvus = MilvusServer::start().await.expect("milvus");
    let (sim, _task) = testkit::sim::spawn(testkit::sim::SimConfig::default())
        .await
        .expect("sim");
    let sim = format!("http://{sim}");
    let http = handler_kit::http::client(Duration::from_secs(10)).expect("client");
    let post = |path: &str, body: Value| {
        let request = http.post(format!("{}{path}", milvus.url())).json(&body);
        async move {
            request
                .send()
                .await
                .expect("milvus answered")
                .json::<Value>()
                .await
                .expect("JSON")
        }
    };
    let created = post(
        "/v1/vector/collections/create",
        json!({"collectionName": "docs", "dimension": 384, "metricType": "COSINE"}),
    )
    .await;
    assert_eq!(created["code"], 200, "{created}");
    let texts: Vec<&str> = DOCS.iter().map(|d| d.0).collect();
    let embedded: Value = http
        .post(format!("{sim}/v1/embeddings"))
        .json(&json!({"model": "m", "input": texts}))
        .send()
        .await
        .expect("sim")
        .json()
        .await
        .expect("JSON");
    let rows: Vec<Value> = DOCS
        .iter()
        .enumerate()
        .map(|(i, (text, source))| json!({"vector": embedded["data"][i]["embedding"], "text": text, "source": source}))
        .collect();
    let inserted = post(
        "/v1/vector/insert",
        json!({"collectionName": "docs", "data": rows}),
    )
    .await;
    assert_eq!(inserted["code"], 200, "{inserted}");

    let app = app(
        &[
            ("LLM_URL".to_string(), sim.clone()),
            ("EMBED_URL".to_string(), sim.clone()),
            ("MILVUS_URL".to_string(), milvus.url()),
        ],
        &[
            ("MILVUS_API", "v1"),
            ("CHAT_COLLECTION", "docs"),
            ("CHAT_RERANK_TOP_N", "2"),
        ],
    )
    .await;
    // Inserts become searchable shortly after: poll until the answer has sources.
    let data = eventually(Duration::from_secs(60), || async {
        let answer = send(
            &app,
            chat(json!({"message": "How does JetStream store messages for durable consumers?"})),
        )
        .await;
        let data = answer.json();
        (answer.status == 200 && data["sources"].as_array().is_some_and(|s| !s.is_empty()))
            .then_some(data)
    })
    .await
    .expect("an answer with sources from Milvus");
    assert_eq!(data["path"], "rag");
    assert_eq!(data["sources"][0]["source"], "jetstream.md", "{data}");
    assert_eq!(data["sources"][0]["text"], DOCS[0].0);
    assert!(
        data["response"]
            .as_str()
            .unwrap_or_default()
            .contains("[1]"),
        "{data}"
    );
}
