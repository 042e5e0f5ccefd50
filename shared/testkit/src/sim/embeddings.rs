//! `POST /v1/embeddings`, OpenAI-compatible.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, SimConfig, count_tokens, fnv1a, parse_json, words};

const DEFAULT_MODEL: &str = "inference-sim-embedding";

#[derive(Deserialize)]
struct EmbeddingRequest {
    #[serde(default)]
    model: Option<String>,
    input: Input,
    /// OpenAI's optional output length override.
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    encoding_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

/// A unit vector of `dim` floats determined by the words of `text`.
///
/// Words are feature-hashed into buckets with a hash-derived sign, so texts that
/// share words point in similar directions (retrieval tests depend on a question
/// landing nearest the passage that shares its words) while unrelated words
/// rarely interfere.
pub(super) fn embed(text: &str, dim: usize) -> Vec<f32> {
    let mut vector = vec![0.0_f32; dim];
    if dim == 0 {
        return vector;
    }
    for word in words(text) {
        let hash = fnv1a(word.as_bytes());
        // The bucket and the sign come from different bits so they are independent.
        let bucket = usize::try_from(hash % dim as u64).unwrap_or(0);
        let sign = if (hash >> 63) & 1 == 0 { 1.0 } else { -1.0 };
        vector[bucket] += sign;
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        // Wordless text (or a rare exact cancellation) still needs a valid unit
        // vector, and a fixed one keeps it deterministic.
        vector[0] = 1.0;
    } else {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

pub(super) async fn embeddings(
    State(config): State<SimConfig>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let request: EmbeddingRequest = parse_json(&body)?;
    if let Some(format) = request.encoding_format.as_deref()
        && format != "float"
    {
        return Err(ApiError::bad_request(format!(
            "encoding_format {format:?} is not supported by the simulator; use \"float\""
        )));
    }
    let dim = request.dimensions.unwrap_or(config.embedding_dim);
    if dim == 0 {
        return Err(ApiError::bad_request("dimensions must be at least 1"));
    }
    let inputs = match request.input {
        Input::One(text) => vec![text],
        Input::Many(texts) if texts.is_empty() => {
            return Err(ApiError::bad_request("input must not be an empty list"));
        }
        Input::Many(texts) => texts,
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({ "object": "embedding", "index": index, "embedding": embed(text, dim) }))
        .collect();
    let tokens: usize = inputs.iter().map(|text| count_tokens(text)).sum();
    let model = request
        .model
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    })))
}
