//! A run's state, read from what Kubernetes (or KFP) says about it.

use serde::Serialize;
use serde_json::Value;

use crate::catalog::Kind;

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created, not started yet.
    Submitted,
    /// Started.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished badly (or was deleted before it finished).
    Failed,
    /// No run exists for the request (status requests only).
    NotFound,
}

impl RunState {
    /// Finished, one way or the other: its lock can go.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }

    /// The word used in subjects and message ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::NotFound => "not_found",
        }
    }
}

/// The state of a run object and, when it failed, why.
pub fn of_object(kind: Kind, object: &Value) -> (RunState, Option<String>) {
    match kind {
        Kind::Argo => workflow(object),
        Kind::Job => job(object),
        Kind::Kubeflow => kubeflow(object),
    }
}

/// Argo's `status.phase`: Pending, Running, Succeeded, Failed, Error.
fn workflow(object: &Value) -> (RunState, Option<String>) {
    let status = &object["status"];
    let message = status["message"].as_str().map(str::to_string);
    match status["phase"].as_str().unwrap_or("") {
        "Running" => (RunState::Running, None),
        "Succeeded" => (RunState::Succeeded, None),
        "Failed" | "Error" => (RunState::Failed, message),
        _ => (RunState::Submitted, None),
    }
}

/// A Job's terminal conditions (`Complete`, `Failed`), else running once it has started.
fn job(object: &Value) -> (RunState, Option<String>) {
    let status = &object["status"];
    let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    for condition in &conditions {
        if condition["status"] != "True" {
            continue;
        }
        match condition["type"].as_str() {
            Some("Complete") => return (RunState::Succeeded, None),
            Some("Failed") => {
                let reason = [&condition["reason"], &condition["message"]]
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(": ");
                return (RunState::Failed, Some(reason).filter(|r| !r.is_empty()));
            }
            _ => {}
        }
    }
    let active = status["active"].as_u64().unwrap_or(0) > 0;
    if active || status["startTime"].is_string() {
        (RunState::Running, None)
    } else {
        (RunState::Submitted, None)
    }
}

/// KFP v2beta1 `state`.
fn kubeflow(run: &Value) -> (RunState, Option<String>) {
    match run["state"].as_str().unwrap_or("") {
        "RUNNING" | "CANCELING" | "PAUSED" => (RunState::Running, None),
        "SUCCEEDED" | "SKIPPED" => (RunState::Succeeded, None),
        "FAILED" | "CANCELED" => {
            let reason = run["error"]["message"].as_str().map_or_else(
                || run["state"].as_str().unwrap_or("").to_lowercase(),
                str::to_string,
            );
            (RunState::Failed, Some(reason))
        }
        _ => (RunState::Submitted, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn states_follow_each_kind_of_run() {
        assert_eq!(of_object(Kind::Argo, &json!({})).0, RunState::Submitted);
        assert_eq!(
            of_object(Kind::Argo, &json!({"status": {"phase": "Running"}})).0,
            RunState::Running
        );
        assert_eq!(
            of_object(
                Kind::Argo,
                &json!({"status": {"phase": "Error", "message": "oom"}})
            ),
            (RunState::Failed, Some("oom".into()))
        );
        let job = |status: Value| of_object(Kind::Job, &json!({ "status": status }));
        assert_eq!(job(json!({})).0, RunState::Submitted);
        assert_eq!(job(json!({"active": 1})).0, RunState::Running);
        assert_eq!(
            job(
                json!({"conditions": [{"type": "SuccessCriteriaMet", "status": "True"},
                                       {"type": "Complete", "status": "True"}]})
            )
            .0,
            RunState::Succeeded
        );
        assert_eq!(
            job(json!({"conditions": [{"type": "Failed", "status": "True",
                                        "reason": "BackoffLimitExceeded", "message": "too many"}]})),
            (
                RunState::Failed,
                Some("BackoffLimitExceeded: too many".into())
            )
        );
        assert_eq!(
            of_object(Kind::Kubeflow, &json!({"state": "SUCCEEDED"})).0,
            RunState::Succeeded
        );
    }
}
