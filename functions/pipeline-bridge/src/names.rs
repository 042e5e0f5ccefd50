//! Names derived from request ids, so a redelivered request finds what its first delivery made.
//!
//! A run's name is a pure function of its pipeline and `request_id`: creating it twice is an
//! `AlreadyExists`, never a second run. Names are DNS-1123 labels (at most 63 characters, the
//! limit for Jobs, whose name also becomes a pod label value) whatever the id contains.

use ring::digest::{Context, SHA256};

/// Label every created resource carries; the ApiServerSource selects on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "pipeline-bridge";
/// Label carrying the catalog entry's name (a DNS label, so always a valid label value).
pub const PIPELINE_LABEL: &str = "pipeline-bridge/pipeline";
/// Annotation carrying the `request_id` verbatim (annotations take any text; labels do not).
pub const REQUEST_ID_ANNOTATION: &str = "pipeline-bridge/request-id";
/// Annotation naming the lock Lease the run holds, released when it finishes.
pub const LOCK_ANNOTATION: &str = "pipeline-bridge/lock";

/// Hex of the first `bytes` bytes of SHA-256 over the parts, separated so ("a", "bc") and
/// ("ab", "c") differ.
pub fn short_hash(parts: &[&str], bytes: usize) -> String {
    let mut hash = Context::new(&SHA256);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            hash.update(b"\0");
        }
        hash.update(part.as_bytes());
    }
    hex::encode(&hash.finish().as_ref()[..bytes])
}

/// Lowercase letters, digits and single dashes, trimmed to `max` characters.
fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(max);
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        if out.len() == max {
            break;
        }
        out.push(c);
    }
    out.trim_end_matches('-').to_string()
}

/// The name of the run `request_id` of `pipeline`: `{pipeline (<= 46)}-{16 hex}`.
pub fn run_name(pipeline: &str, request_id: &str) -> String {
    let prefix = sanitize(pipeline, 46);
    let hash = short_hash(&[pipeline, request_id], 8);
    if prefix.is_empty() {
        format!("run-{hash}")
    } else {
        format!("{prefix}-{hash}")
    }
}

/// The Lease that implements the lock `key`: `pipeline-lock-{key (<= 36)}-{12 hex}`.
pub fn lease_name(key: &str) -> String {
    let readable = sanitize(key, 36);
    let hash = short_hash(&[key], 6);
    if readable.is_empty() {
        format!("pipeline-lock-{hash}")
    } else {
        format!("pipeline-lock-{readable}-{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::is_dns_label;

    #[test]
    fn names_are_stable_dns_labels_whatever_the_id() {
        let long = "x".repeat(300);
        for (pipeline, id) in [
            ("train", "req-1"),
            ("train", "Ünïcödé id with spaces/and.dots"),
            (&long[..63], long.as_str()),
        ] {
            let name = run_name(pipeline, id);
            assert!(is_dns_label(&name), "{name}");
            assert_eq!(name, run_name(pipeline, id));
        }
        assert_ne!(run_name("train", "a"), run_name("train", "b"));
        assert!(run_name("train", "a").starts_with("train-"));
        let lease = lease_name("deploy/Prod env");
        assert!(is_dns_label(&lease), "{lease}");
        assert!(
            lease.starts_with("pipeline-lock-deploy-prod-env-"),
            "{lease}"
        );
        assert!(is_dns_label(&lease_name(&long)));
    }
}
