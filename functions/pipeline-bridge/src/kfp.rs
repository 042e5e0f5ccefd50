//! Kubeflow Pipelines runs over its REST API (v2beta1).
//!
//! KFP has no `AlreadyExists` for runs: creating the same run twice starts it twice. So the run
//! gets a deterministic `display_name` (the same derived name a Job or Workflow would get), and
//! a create is preceded by a lookup with a `display_name EQUALS` filter; an existing run is
//! answered as the result. Two deliveries racing between the lookup and the create can still
//! both create (KFP offers no conditional create); the lock of a catalog entry with `lock` set
//! closes that window too, since only one of them can hold it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use handler_kit::HandlerError;
use handler_kit::resilience::{Backend, BackendConfig, CallError};
use serde_json::{Value, json};

use crate::catalog::KubeflowRef;
use crate::cluster::CreateFailed;

/// KFP's API server.
#[derive(Debug, Clone)]
pub struct Kfp {
    http: reqwest::Client,
    base: String,
    token_file: Option<PathBuf>,
    backend: Backend,
    max_answer_bytes: usize,
}

impl Kfp {
    /// A client of the KFP API at `base` (e.g. `http://ml-pipeline.kubeflow:8888`).
    pub fn new(
        http: reqwest::Client,
        base: String,
        token_file: Option<PathBuf>,
        config: BackendConfig,
    ) -> Self {
        Self {
            http,
            base,
            token_file,
            max_answer_bytes: config.max_response_bytes,
            backend: Backend::new("kubeflow", config),
        }
    }

    /// The bearer token, read on every call: a projected service-account token rotates.
    fn authorize(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, CallError> {
        match &self.token_file {
            None => Ok(request),
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    CallError::Transient(format!("KFP_TOKEN_FILE {}: {e}", path.display()))
                })?;
                Ok(request.bearer_auth(token.trim()))
            }
        }
    }

    /// Sends `request` and reads its JSON answer under `KFP_MAX_RESPONSE_BYTES`.
    async fn answer(&self, request: reqwest::RequestBuilder) -> Result<Value, CallError> {
        let response = handler_kit::http::check(request.send().await).await?;
        handler_kit::http::read_json(response, self.max_answer_bytes).await
    }

    /// The run named `display_name`, if there is one (the newest when there are several).
    pub async fn find(
        &self,
        display_name: &str,
        experiment_id: Option<&str>,
    ) -> Result<Option<Value>, HandlerError> {
        let filter = json!({
            "predicates": [{
                "key": "display_name",
                "operation": "EQUALS",
                "string_value": display_name,
            }]
        })
        .to_string();
        let mut query = vec![
            ("filter", filter),
            ("page_size", "10".to_string()),
            ("sort_by", "created_at desc".to_string()),
        ];
        if let Some(experiment) = experiment_id {
            query.push(("experiment_id", experiment.to_string()));
        }
        let url = format!("{}/apis/v2beta1/runs", self.base);
        let list: Value = self
            .backend
            .call(async {
                let request = self.authorize(self.http.get(&url).query(&query))?;
                self.answer(request).await
            })
            .await?;
        Ok(list["runs"]
            .as_array()
            .and_then(|runs| runs.iter().find(|r| r["display_name"] == display_name))
            .cloned())
    }

    /// Creates a run of `pipeline` named `display_name`; an existing run of that name is
    /// returned instead (`created: false`).
    ///
    /// A failure is a refusal ([`CreateFailed::refused`]) when the lookup failed (nothing was
    /// sent) or KFP rejected the run (a 4xx verdict); any other failure of the `POST` (no
    /// answer, a 5xx, an unreadable answer) may have started it, and the redelivery's lookup
    /// finds it.
    pub async fn create(
        &self,
        display_name: &str,
        description: &str,
        pipeline: &KubeflowRef,
        parameters: &BTreeMap<String, String>,
    ) -> Result<(Value, bool), CreateFailed> {
        if let Some(run) = self
            .find(display_name, pipeline.experiment_id.as_deref())
            .await
            .map_err(CreateFailed::refused)?
        {
            return Ok((run, false));
        }
        let mut reference = json!({ "pipeline_id": pipeline.pipeline_id });
        if let Some(version) = &pipeline.pipeline_version_id {
            reference["pipeline_version_id"] = json!(version);
        }
        let mut body = json!({
            "display_name": display_name,
            "description": description,
            "pipeline_version_reference": reference,
            "runtime_config": { "parameters": parameters },
        });
        if let Some(experiment) = &pipeline.experiment_id {
            body["experiment_id"] = json!(experiment);
        }
        let url = format!("{}/apis/v2beta1/runs", self.base);
        let run: Value = self
            .backend
            .call(async {
                let request = self.authorize(self.http.post(&url).json(&body))?;
                self.answer(request).await
            })
            .await
            .map_err(|error| match error {
                HandlerError::BackendRejected { .. } => CreateFailed::refused(error),
                _ => CreateFailed::unclear(error),
            })?;
        Ok((run, true))
    }
}
