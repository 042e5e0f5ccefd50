//! The catalog: the only pipelines this function will start, and what each may be given.
//!
//! It is YAML (mounted from a ConfigMap), read once at start-up; every problem in it is reported
//! with the other configuration problems and the process exits 64, so a bad catalog never reaches
//! an event. Parameter values are checked against anchored patterns before anything is sent to
//! Kubernetes, and a Job template receives them only inside string values of the already-parsed
//! template, so a value can never change the shape of the object.

use std::collections::{BTreeMap, HashMap};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use handler_kit::HandlerError;

/// The pattern of a parameter that names none: a conservative token (no spaces, quotes or
/// shell metacharacters).
pub const DEFAULT_PATTERN: &str = "[A-Za-z0-9._/:@=+-]{0,253}";

/// Longest value accepted for any parameter, checked before its pattern.
const MAX_VALUE_CHARS: usize = 1024;

/// What a catalog entry starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An Argo Workflow submitted from a WorkflowTemplate.
    Argo,
    /// A Kubeflow Pipelines run, created through its REST API (v2beta1).
    Kubeflow,
    /// A `batch/v1` Job built from a template.
    Job,
}

impl Kind {
    /// The name used in status messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Argo => "argo",
            Self::Kubeflow => "kubeflow",
            Self::Job => "job",
        }
    }
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    pipelines: BTreeMap<String, EntryFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    kind: Kind,
    namespace: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, ParameterFile>,
    lock: Option<String>,
    git: Option<GitFile>,
    workflow_template: Option<String>,
    #[serde(default)]
    cluster_workflow_template: bool,
    job: Option<Value>,
    kubeflow: Option<KubeflowRef>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ParameterFile {
    pattern: Option<String>,
    default: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GitFile {
    paths: Vec<String>,
    branch: Option<String>,
    repository: Option<String>,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
}

/// The Kubeflow pipeline version a `kubeflow` entry runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeflowRef {
    /// `pipeline_version_reference.pipeline_id`.
    pub pipeline_id: String,
    /// `pipeline_version_reference.pipeline_version_id` (unset: the pipeline's default version).
    pub pipeline_version_id: Option<String>,
    /// The experiment the run belongs to (unset: KFP's default experiment).
    pub experiment_id: Option<String>,
}

/// One parameter a pipeline accepts.
#[derive(Debug, Clone)]
pub struct Parameter {
    /// The anchored pattern a value must match.
    pub pattern: Regex,
    /// Used when the trigger gives none; without one the parameter is required.
    pub default: Option<String>,
}

/// Which git pushes start an entry.
#[derive(Debug, Clone)]
pub struct GitRule {
    /// Changed paths that select the entry.
    pub paths: GlobSet,
    /// The branch (`refs/heads/<branch>`) a push must be to; any branch when unset.
    pub branch: Option<String>,
    /// The repository (`owner/name`) a push must come from; any when unset.
    pub repository: Option<String>,
    /// Parameters filled from the push: `{{git.after}}`, `{{git.branch}}`, `{{git.repository}}`.
    pub parameters: BTreeMap<String, String>,
}

/// What an entry creates, with what it needs for that.
#[derive(Debug, Clone)]
pub enum Target {
    /// `spec.workflowTemplateRef` of a Workflow.
    Argo {
        /// The WorkflowTemplate (or ClusterWorkflowTemplate) name.
        template: String,
        /// Whether it is a ClusterWorkflowTemplate.
        cluster_scope: bool,
    },
    /// The Job's `spec`, with `{{parameters.NAME}}` in its strings.
    Job(Value),
    /// The KFP pipeline version to run.
    Kubeflow(KubeflowRef),
}

/// A pipeline of the catalog.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name (a DNS label, also used in resource names and labels).
    pub name: String,
    /// Where its resources (and its lock Lease) live.
    pub namespace: String,
    /// What it creates.
    pub target: Target,
    /// Accepted parameters.
    pub parameters: BTreeMap<String, Parameter>,
    /// Lock key template (`{{parameters.NAME}}` filled in); runs sharing a key never overlap.
    pub lock: Option<String>,
    /// Git push rule.
    pub git: Option<GitRule>,
}

impl Entry {
    /// The kind of run.
    pub fn kind(&self) -> Kind {
        match self.target {
            Target::Argo { .. } => Kind::Argo,
            Target::Job(_) => Kind::Job,
            Target::Kubeflow(_) => Kind::Kubeflow,
        }
    }

    /// Checks `given` against the entry and fills defaults: unknown names, values of the wrong
    /// type or not matching their pattern, and missing required values are all 422.
    pub fn resolve(
        &self,
        given: &BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, String>, HandlerError> {
        let mut out = BTreeMap::new();
        for (name, value) in given {
            let Some(parameter) = self.parameters.get(name) else {
                let allowed: Vec<&str> = self.parameters.keys().map(String::as_str).collect();
                return Err(HandlerError::Unprocessable(format!(
                    "pipeline {} has no parameter {name:?} (allowed: {})",
                    self.name,
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                )));
            };
            let text = scalar(value).ok_or_else(|| {
                HandlerError::Unprocessable(format!(
                    "parameter {name:?} must be a string, number or boolean"
                ))
            })?;
            if text.chars().count() > MAX_VALUE_CHARS {
                return Err(HandlerError::Unprocessable(format!(
                    "parameter {name:?} is longer than {MAX_VALUE_CHARS} characters"
                )));
            }
            if !parameter.pattern.is_match(&text) {
                return Err(HandlerError::Unprocessable(format!(
                    "parameter {name:?} value {text:?} does not match {}",
                    parameter.pattern.as_str()
                )));
            }
            out.insert(name.clone(), text);
        }
        for (name, parameter) in &self.parameters {
            if out.contains_key(name) {
                continue;
            }
            match &parameter.default {
                Some(default) => {
                    out.insert(name.clone(), default.clone());
                }
                None => {
                    return Err(HandlerError::Unprocessable(format!(
                        "parameter {name:?} of pipeline {} is required",
                        self.name
                    )));
                }
            }
        }
        Ok(out)
    }
}

/// A number, boolean or string as text; `None` for anything else.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Replaces `{{parameters.NAME}}` with the value of `NAME`.
pub fn fill(template: &str, parameters: &BTreeMap<String, String>) -> String {
    let mut out = template.to_string();
    for (name, value) in parameters {
        out = out.replace(&format!("{{{{parameters.{name}}}}}"), value);
    }
    out
}

/// Fills every string of a JSON template (keys stay as they are).
pub fn fill_value(template: &Value, parameters: &BTreeMap<String, String>) -> Value {
    match template {
        Value::String(s) => Value::String(fill(s, parameters)),
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| fill_value(v, parameters)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill_value(v, parameters)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Every pipeline this function may start.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: HashMap<String, Entry>,
}

impl Catalog {
    /// Parses and checks a catalog: the entries that are valid, and every problem found (a
    /// catalog with problems is refused, but its valid entries still inform other checks).
    pub fn parse_all(yaml: &str, default_namespace: &str) -> (Self, Vec<String>) {
        let file: CatalogFile = match serde_saphyr::from_str(yaml) {
            Ok(file) => file,
            Err(e) => return (Self::default(), vec![format!("catalog: {e}")]),
        };
        let mut problems = Vec::new();
        let mut entries = HashMap::new();
        for (name, raw) in file.pipelines {
            match build_entry(&name, raw, default_namespace) {
                Ok(entry) => {
                    entries.insert(name, entry);
                }
                Err(mut p) => problems.append(&mut p),
            }
        }
        (Self { entries }, problems)
    }

    /// Parses and checks a catalog; every problem found is returned.
    pub fn parse(yaml: &str, default_namespace: &str) -> Result<Self, Vec<String>> {
        let (catalog, problems) = Self::parse_all(yaml, default_namespace);
        if problems.is_empty() {
            Ok(catalog)
        } else {
            Err(problems)
        }
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// Every entry, in name order.
    pub fn entries(&self) -> Vec<&Entry> {
        let mut all: Vec<&Entry> = self.entries.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Whether any entry is a Kubeflow run (then `KFP_URL` is required).
    pub fn uses_kubeflow(&self) -> bool {
        self.entries.values().any(|e| e.kind() == Kind::Kubeflow)
    }

    /// The entries a push to `branch` of `repository` changing `paths` selects, in name order.
    pub fn select_for_push(
        &self,
        repository: Option<&str>,
        branch: &str,
        paths: &[String],
    ) -> Vec<&Entry> {
        self.entries()
            .into_iter()
            .filter(|entry| {
                let Some(git) = &entry.git else {
                    return false;
                };
                git.branch.as_deref().is_none_or(|b| b == branch)
                    && git.repository.as_deref().is_none_or(|r| {
                        repository.is_some_and(|given| given.eq_ignore_ascii_case(r))
                    })
                    && paths.iter().any(|p| git.paths.is_match(p))
            })
            .collect()
    }
}

/// A DNS-1123 label: what Kubernetes accepts as a name and a label value.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Checks and builds one entry, part by part, so that every problem of the entry is found
/// (in the order of its parts), not only the first.
fn build_entry(name: &str, raw: EntryFile, default_namespace: &str) -> Result<Entry, Vec<String>> {
    let mut problems = Problems::of(name);
    check_name(name, &mut problems);
    let namespace = namespace(raw.namespace, default_namespace, &mut problems);
    let parameters = parameters(raw.parameters, &mut problems);
    let targets = TargetFields {
        workflow_template: raw.workflow_template,
        cluster_workflow_template: raw.cluster_workflow_template,
        job: raw.job,
        kubeflow: raw.kubeflow,
    };
    targets.check_apply_to(raw.kind, &mut problems);
    let target = match targets.target(raw.kind) {
        Ok(target) => Some(target),
        Err(missing) => {
            problems.push(missing.describe(raw.kind));
            None
        }
    };
    let git = raw
        .git
        .and_then(|git| git_rule(git, &parameters, &mut problems));
    match (problems.found.is_empty(), target) {
        (true, Some(target)) => Ok(Entry {
            name: name.to_string(),
            namespace,
            target,
            parameters,
            lock: raw.lock,
            git,
        }),
        _ => Err(problems.found),
    }
}

/// The problems found in one entry, each saying which entry it is in.
struct Problems<'a> {
    pipeline: &'a str,
    found: Vec<String>,
}

impl<'a> Problems<'a> {
    fn of(pipeline: &'a str) -> Self {
        Self {
            pipeline,
            found: Vec::new(),
        }
    }

    /// Records `what` as a problem of the entry.
    fn push(&mut self, what: impl std::fmt::Display) {
        self.found
            .push(format!("catalog: pipeline {:?}: {what}", self.pipeline));
    }
}

/// The entry's name: a DNS label, since it goes into resource names and label values.
fn check_name(name: &str, problems: &mut Problems<'_>) {
    if !is_dns_label(name) {
        problems.push("the name must be a DNS label (lowercase letters, digits, '-', at most 63)");
    }
}

/// The entry's namespace, `default_namespace` when it names none: a valid namespace name.
fn namespace(
    given: Option<String>,
    default_namespace: &str,
    problems: &mut Problems<'_>,
) -> String {
    let namespace = given.unwrap_or_else(|| default_namespace.to_string());
    if !is_dns_label(&namespace) {
        problems.push(format!(
            "namespace {namespace:?} is not a valid namespace name"
        ));
    }
    namespace
}

/// The entry's parameters; one whose pattern does not compile is left out (and reported).
fn parameters(
    given: BTreeMap<String, ParameterFile>,
    problems: &mut Problems<'_>,
) -> BTreeMap<String, Parameter> {
    given
        .into_iter()
        .filter_map(|(name, file)| {
            let parameter = parameter(&name, file, problems)?;
            Some((name, parameter))
        })
        .collect()
}

/// One parameter: its pattern ([`DEFAULT_PATTERN`] when it names none) must compile, anchored,
/// and its default, if any, be a string, number or boolean that matches it.
fn parameter(name: &str, file: ParameterFile, problems: &mut Problems<'_>) -> Option<Parameter> {
    let source = file.pattern.as_deref().unwrap_or(DEFAULT_PATTERN);
    let pattern = match Regex::new(&format!("^(?:{source})$")) {
        Ok(r) => r,
        Err(e) => {
            problems.push(format!("parameter {name:?}: bad pattern: {e}"));
            return None;
        }
    };
    let default = match file.default.as_ref().map(|v| scalar(v).ok_or(v)) {
        None => None,
        Some(Ok(text)) => {
            if !pattern.is_match(&text) {
                problems.push(format!(
                    "parameter {name:?}: default {text:?} does not match its pattern"
                ));
            }
            Some(text)
        }
        Some(Err(_)) => {
            problems.push(format!(
                "parameter {name:?}: default must be a string, number or boolean"
            ));
            None
        }
    };
    Some(Parameter { pattern, default })
}

/// The fields of an entry that say what it creates: exactly its kind's must be set.
struct TargetFields {
    workflow_template: Option<String>,
    cluster_workflow_template: bool,
    job: Option<Value>,
    kubeflow: Option<KubeflowRef>,
}

/// Why an entry creates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoTarget {
    /// The field its kind needs is not set.
    Missing,
    /// `job` is set, but is not a Job spec (it has no pod `template`).
    NotAJobSpec,
}

impl NoTarget {
    /// The problem, for an entry of `kind`.
    fn describe(self, kind: Kind) -> String {
        match self {
            Self::Missing => format!("kind {} needs `{}`", kind.as_str(), kind.target_field()),
            Self::NotAJobSpec => "job must be a Job spec with a pod `template`".to_string(),
        }
    }
}

impl Kind {
    /// The entry field that says what an entry of this kind creates.
    fn target_field(self) -> &'static str {
        match self {
            Self::Argo => "workflow_template",
            Self::Job => "job",
            Self::Kubeflow => "kubeflow",
        }
    }
}

impl TargetFields {
    /// Each field set that is not the one of `kind` is a problem: it would be ignored.
    fn check_apply_to(&self, kind: Kind, problems: &mut Problems<'_>) {
        let fields = [
            ("workflow_template", self.workflow_template.is_some()),
            ("job", self.job.is_some()),
            ("kubeflow", self.kubeflow.is_some()),
        ];
        for (field, set) in fields {
            if set && field != kind.target_field() {
                problems.push(format!("{field} does not apply to kind {}", kind.as_str()));
            }
        }
    }

    /// What an entry of `kind` creates, from the field of its kind.
    fn target(self, kind: Kind) -> Result<Target, NoTarget> {
        match kind {
            Kind::Argo => self
                .workflow_template
                .map(|template| Target::Argo {
                    template,
                    cluster_scope: self.cluster_workflow_template,
                })
                .ok_or(NoTarget::Missing),
            Kind::Job => match self.job {
                Some(spec) if spec.get("template").is_some() => Ok(Target::Job(spec)),
                Some(_) => Err(NoTarget::NotAJobSpec),
                None => Err(NoTarget::Missing),
            },
            Kind::Kubeflow => self.kubeflow.map(Target::Kubeflow).ok_or(NoTarget::Missing),
        }
    }
}

/// The entry's git push rule: some path globs (`*` within a directory, `**` across them, as in
/// `.gitignore`) that compile, and parameters that name the entry's own.
fn git_rule(
    file: GitFile,
    parameters: &BTreeMap<String, Parameter>,
    problems: &mut Problems<'_>,
) -> Option<GitRule> {
    let mut builder = GlobSetBuilder::new();
    if file.paths.is_empty() {
        problems.push("git.paths is empty");
    }
    for path in &file.paths {
        match GlobBuilder::new(path).literal_separator(true).build() {
            Ok(glob) => {
                builder.add(glob);
            }
            Err(e) => problems.push(format!("git.paths: {e}")),
        }
    }
    for name in file.parameters.keys() {
        if !parameters.contains_key(name) {
            problems.push(format!(
                "git.parameters names {name:?}, which is not a parameter"
            ));
        }
    }
    match builder.build() {
        Ok(paths) => Some(GitRule {
            paths,
            branch: file.branch,
            repository: file.repository,
            parameters: file.parameters,
        }),
        Err(e) => {
            problems.push(format!("git.paths: {e}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CATALOG: &str = r#"
pipelines:
  train:
    kind: argo
    namespace: ml
    workflow_template: train-model
    parameters:
      model: {pattern: "[a-z0-9-]{1,40}"}
      epochs: {pattern: "[0-9]{1,3}", default: 3}
    lock: "train-{{parameters.model}}"
    git:
      paths: ["models/**"]
      branch: main
  cleanup:
    kind: job
    job:
      backoffLimit: 0
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: c
              image: busybox
              args: ["clean", "{{parameters.target}}"]
    parameters:
      target: {}
"#;

    fn catalog() -> Catalog {
        Catalog::parse(CATALOG, "default").expect("valid catalog")
    }

    #[test]
    fn parameters_are_checked_and_defaults_filled() {
        let c = catalog();
        let train = c.get("train").expect("train");
        let ok = train
            .resolve(&BTreeMap::from([("model".to_string(), json!("bert"))]))
            .expect("valid");
        assert_eq!(ok["epochs"], "3");
        let bad = |given: Value| {
            let params: BTreeMap<String, Value> = serde_json::from_value(given).expect("object");
            train
                .resolve(&params)
                .expect_err("must be refused")
                .to_string()
        };
        assert!(bad(json!({})).contains("\"model\" of pipeline train is required"));
        assert!(bad(json!({"model": "x", "gpu": "1"})).contains("no parameter \"gpu\""));
        assert!(bad(json!({"model": "BERT; rm -rf"})).contains("does not match"));
        assert!(bad(json!({"model": ["a"]})).contains("string, number or boolean"));
        assert!(bad(json!({"model": "a", "epochs": 1000})).contains("does not match"));
    }

    #[test]
    fn job_templates_are_filled_inside_strings_only() {
        let c = catalog();
        let Target::Job(spec) = &c.get("cleanup").expect("cleanup").target else {
            panic!("a job");
        };
        let params = BTreeMap::from([("target".to_string(), "tmp".to_string())]);
        let filled = fill_value(spec, &params);
        assert_eq!(
            filled["template"]["spec"]["containers"][0]["args"],
            json!(["clean", "tmp"])
        );
        assert_eq!(filled["backoffLimit"], 0);
    }

    #[test]
    fn pushes_select_entries_by_branch_and_glob() {
        let c = catalog();
        let paths = vec![
            "README.md".to_string(),
            "models/bert/config.json".to_string(),
        ];
        let names = |v: Vec<&Entry>| v.into_iter().map(|e| e.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(c.select_for_push(None, "main", &paths)), ["train"]);
        assert!(c.select_for_push(None, "dev", &paths).is_empty());
        assert!(
            c.select_for_push(None, "main", &["docs/x.md".to_string()])
                .is_empty()
        );
    }

    #[test]
    fn every_problem_in_a_catalog_is_reported() {
        let bad = r#"
pipelines:
  Bad_Name:
    kind: argo
    workflow_template: t
  nothing:
    kind: job
  pattern:
    kind: argo
    workflow_template: t
    parameters:
      a: {pattern: "(", default: "x"}
      b: {pattern: "[0-9]+", default: "x"}
"#;
        let problems = Catalog::parse(bad, "default").expect_err("invalid");
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(Catalog::parse("pipelines: {x: {kind: cron}}", "d").is_err());
        assert!(Catalog::parse("pipelines: {x: {kind: job, jobb: {}}}", "d").is_err());
    }

    #[test]
    fn an_entry_that_creates_nothing_is_one_problem_whatever_its_name_says() {
        let problems = Catalog::parse("pipelines: {x: {kind: job, job: {backoffLimit: 0}}}", "d")
            .expect_err("invalid");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].contains("job must be a Job spec with a pod `template`"));
        // A name that quotes that sentence hides nothing: both problems are reported.
        let problems = Catalog::parse(r#"pipelines: {"job must be": {kind: argo}}"#, "d")
            .expect_err("invalid");
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[1].contains("kind argo needs `workflow_template`"));
    }
}
