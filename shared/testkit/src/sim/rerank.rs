//! Rerank endpoints: TEI-style `POST /rerank` and Cohere/Jina-style `POST /v1/rerank`.

use std::collections::BTreeSet;

use axum::Json;
use axum::body::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, count_tokens, parse_json, words};

/// Jaccard similarity of the word sets of `query` and `text`, in `[0, 1]`.
pub(super) fn score(query: &str, text: &str) -> f32 {
    let query: BTreeSet<String> = words(query).collect();
    let text: BTreeSet<String> = words(text).collect();
    let union = query.union(&text).count();
    if union == 0 {
        return 0.0;
    }
    query.intersection(&text).count() as f32 / union as f32
}

/// `(index, score)` for every text, best first; equal scores keep input order so
/// the ranking is fully deterministic.
fn ranked<'a>(query: &str, texts: impl Iterator<Item = &'a str>) -> Vec<(usize, f32)> {
    let mut scored: Vec<(usize, f32)> = texts
        .enumerate()
        .map(|(i, text)| (i, score(query, text)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored
}

#[derive(Deserialize)]
struct TeiRequest {
    query: String,
    texts: Vec<String>,
    #[serde(default)]
    raw_scores: bool,
    #[serde(default)]
    return_text: bool,
}

pub(super) async fn tei(body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: TeiRequest = parse_json(&body)?;
    if request.texts.is_empty() {
        return Err(ApiError::bad_request("texts must not be empty"));
    }
    let results: Vec<Value> = ranked(&request.query, request.texts.iter().map(String::as_str))
        .into_iter()
        .map(|(index, score)| {
            // TEI's raw scores are logits; the logit of the overlap keeps the order.
            let score = if request.raw_scores {
                let p = score.clamp(1e-4, 1.0 - 1e-4);
                (p / (1.0 - p)).ln()
            } else {
                score
            };
            let mut result = json!({ "index": index, "score": score });
            if request.return_text {
                result["text"] = Value::from(request.texts[index].as_str());
            }
            result
        })
        .collect();
    Ok(Json(Value::Array(results)))
}

#[derive(Deserialize)]
struct CohereRequest {
    query: String,
    documents: Vec<Document>,
    #[serde(default)]
    top_n: Option<usize>,
    #[serde(default)]
    model: Option<String>,
    /// Jina returns documents by default; Cohere clients turn this off explicitly.
    #[serde(default = "default_true")]
    return_documents: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    fn text(&self) -> &str {
        match self {
            Self::Text(text) | Self::Object { text } => text,
        }
    }
}

pub(super) async fn cohere(body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: CohereRequest = parse_json(&body)?;
    if request.documents.is_empty() {
        return Err(ApiError::bad_request("documents must not be empty"));
    }
    let mut ranking = ranked(&request.query, request.documents.iter().map(Document::text));
    if let Some(top_n) = request.top_n {
        ranking.truncate(top_n);
    }
    let results: Vec<Value> = ranking
        .into_iter()
        .map(|(index, score)| {
            let mut result = json!({ "index": index, "relevance_score": score });
            if request.return_documents {
                result["document"] = json!({ "text": request.documents[index].text() });
            }
            result
        })
        .collect();
    let tokens = count_tokens(&request.query) * request.documents.len()
        + request
            .documents
            .iter()
            .map(|d| count_tokens(d.text()))
            .sum::<usize>();
    let mut response = json!({
        "results": results,
        "usage": { "total_tokens": tokens },
    });
    if let Some(model) = request.model {
        response["model"] = Value::from(model);
    }
    Ok(Json(response))
}
