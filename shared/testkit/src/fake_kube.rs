//! A fake Kubernetes API server and a fake Kubeflow Pipelines API, each on its own free port.
//!
//! Both answer the way the real servers do for the calls the functions make, so a test can drive
//! the real client code (kube-rs through a kubeconfig file, reqwest for KFP) and then assert the
//! exact requests that were sent.
//!
//! [`FakeKube`] stores objects of any namespaced resource under
//! `/api/v1/namespaces/{ns}/{resource}` and `/apis/{group}/{version}/namespaces/{ns}/{resource}`:
//! - `POST` a collection creates (201 with `metadata.uid`, `resourceVersion`,
//!   `creationTimestamp`, `generation` set; `generateName` honoured); a taken name is a 409
//!   `Status` with `reason: AlreadyExists` and `details {name, group, kind}` like the real one;
//! - `GET` an item (404 `Status` `NotFound` when missing) or a collection (a `...List` with
//!   `items`, `labelSelector` of `key=value` pairs honoured);
//! - `PUT` an item replaces it; a stale `metadata.resourceVersion` is a 409 `Conflict` `Status`;
//! - `DELETE` an item answers the deleted object (404 when missing).
//!
//! A test changes objects as a controller or a user would with [`FakeKube::update`] and
//! [`FakeKube::remove`].
//!
//! Every request is recorded ([`Recorded`]: method, path, query, JSON body). Failures can be
//! injected per method and path ([`FakeKube::fail`]: refused, nothing changes), answers lost
//! after the request took effect ([`FakeKube::lose_answer`]: the object is stored, then the
//! answer hangs or is a 5xx, as when the API server or the network fails between etcd and the
//! client), and latency added to every answer ([`FakeKube::set_latency`]). [`FakeKube::write_kubeconfig`] writes a kubeconfig pointing at the
//! server, so a function under test goes through kube-rs' own configuration path.
//!
//! [`FakeKfp`] answers the Kubeflow Pipelines v2beta1 runs API: `POST /apis/v2beta1/runs`,
//! `GET /apis/v2beta1/runs` (with a `filter` on `display_name`) and `GET /apis/v2beta1/runs/{id}`;
//! [`FakeKfp::lose_create_answer`] loses the answer of a create that took effect.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One request as the fake server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// `GET`, `POST`, `PUT`, `DELETE`, ...
    pub method: String,
    /// The path, e.g. `/apis/batch/v1/namespaces/ml/jobs`.
    pub path: String,
    /// The raw query string (empty when there was none).
    pub query: String,
    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub body: Value,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// A failure to answer instead of the normal one, for requests matching method and path.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The method to match (e.g. `POST`).
    pub method: String,
    /// Matches when the request path contains this.
    pub path_contains: String,
    /// The HTTP status (and `Status.code`).
    pub code: u16,
    /// `Status.reason`, e.g. `Forbidden`, `Invalid`, `InternalError`.
    pub reason: String,
    /// How many requests it applies to (`None`: all of them).
    pub times: Option<usize>,
}

/// How a request that took effect is answered instead of with its result.
#[derive(Debug, Clone)]
pub enum LostAnswer {
    /// No answer for this long (longer than the client's timeout: it gives up not knowing).
    Hang(Duration),
    /// A `Status` of this code and reason (e.g. 504 `Timeout`, 500 `InternalError`).
    Status(u16, String),
}

/// Requests, matched by method and path, that take effect and whose answer is lost.
#[derive(Debug, Clone)]
pub struct Lost {
    /// The method to match (e.g. `POST`).
    pub method: String,
    /// Matches when the request path contains this.
    pub path_contains: String,
    /// What the client gets instead of the result.
    pub answer: LostAnswer,
    /// How many requests it applies to (`None`: all of them).
    pub times: Option<usize>,
}

#[derive(Debug, Default)]
struct Store {
    /// Objects by collection path (`/apis/batch/v1/namespaces/ml/jobs`) and name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    requests: Vec<Recorded>,
    /// False: `requests` stays empty (the `fake-kube` process, whose log nobody reads).
    unrecorded: bool,
    failures: Vec<Failure>,
    lost: Vec<Lost>,
    latency: Duration,
}

#[derive(Debug, Default)]
struct Shared {
    store: Mutex<Store>,
    version: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_version(&self) -> u64 {
        self.version.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A running fake Kubernetes API server; it stops when dropped.
#[derive(Debug)]
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeKube {
    /// Starts a server on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .fallback(kube_handler)
            .with_state(shared.clone());
        let (addr, task) = spawn(app).await?;
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The requests so far with method `method` (e.g. `POST`) whose path contains `path`.
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path.contains(path))
            .collect()
    }

    /// Forgets the recorded requests (objects stay).
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Stops (false) or resumes keeping the request log [`Self::requests`] reads; a long-lived
    /// server under load (the benchmark's) would otherwise grow with every request.
    pub fn set_recording(&self, on: bool) {
        self.shared.lock().unrecorded = !on;
    }

    /// Adds `latency` before every answer (0 to turn it off).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// Answers matching requests with `failure` (a `Status` of its code and reason) until it
    /// is used up.
    pub fn fail(&self, failure: Failure) {
        self.shared.lock().failures.push(failure);
    }

    /// Carries out matching requests, then answers them with `lost.answer` instead of their
    /// result, until it is used up.
    pub fn lose_answer(&self, lost: Lost) {
        self.shared.lock().lost.push(lost);
    }

    /// Removes every injected failure and lost answer.
    pub fn clear_failures(&self) {
        let mut store = self.shared.lock();
        store.failures.clear();
        store.lost.clear();
    }

    /// The stored object at `path` (`/apis/batch/v1/namespaces/ml/jobs/NAME`).
    pub fn object(&self, path: &str) -> Option<Value> {
        let (collection, name) = path.rsplit_once('/')?;
        self.shared
            .lock()
            .objects
            .get(collection)?
            .get(name)
            .cloned()
    }

    /// The objects of a collection (`/apis/batch/v1/namespaces/ml/jobs`), by name.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .get(collection)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Changes a stored object as a controller would (a new `resourceVersion` is set); returns
    /// the new object, or `None` when there is none at `path`.
    pub fn update(&self, path: &str, change: impl FnOnce(&mut Value)) -> Option<Value> {
        let (collection, name) = path.rsplit_once('/')?;
        let version = self.shared.next_version();
        let mut store = self.shared.lock();
        let object = store.objects.get_mut(collection)?.get_mut(name)?;
        change(object);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        Some(object.clone())
    }

    /// Deletes the object at `path` as a user or controller would; returns it, or `None` when
    /// there is none.
    pub fn remove(&self, path: &str) -> Option<Value> {
        let (collection, name) = path.rsplit_once('/')?;
        self.shared.lock().objects.get_mut(collection)?.remove(name)
    }

    /// Writes a kubeconfig whose current context points at this server (plain HTTP, no
    /// credentials, namespace `default`) to `dir/kubeconfig`, and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

async fn spawn(app: Router) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

/// Reads method, path, query and body, and records them.
async fn record(request: Request, requests: impl FnOnce(Recorded)) -> (Recorded, Bytes) {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        authorization: parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    requests(recorded.clone());
    (recorded, bytes)
}

/// `{resource}.{group}` as the API server names a resource in messages.
struct ResourcePath {
    collection: String,
    group: String,
    resource: String,
    name: Option<String>,
}

impl ResourcePath {
    fn parse(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => (String::new(), rest),
            ["apis", group, _version, rest @ ..] => ((*group).to_string(), rest),
            _ => return None,
        };
        let (resource, name) = match rest {
            ["namespaces", _ns, resource] => (*resource, None),
            ["namespaces", _ns, resource, name] => (*resource, Some((*name).to_string())),
            _ => return None,
        };
        let collection_len =
            path.trim_end_matches('/').len() - name.as_ref().map_or(0, |n| n.len() + 1);
        Some(Self {
            collection: path[..collection_len].to_string(),
            group,
            resource: resource.to_string(),
            name,
        })
    }

    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    fn status(&self, code: u16, reason: &str, message: String, name: &str) -> Response {
        status_response(code, reason, &message, name, &self.group, &self.resource)
    }
}

/// A real API server's `Status` answer.
fn status_response(
    code: u16,
    reason: &str,
    message: &str,
    name: &str,
    group: &str,
    kind: &str,
) -> Response {
    let mut details = json!({ "name": name, "kind": kind });
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    });
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(body)).into_response()
}

async fn kube_handler(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (recorded, _) = record(request, |r| {
        let mut store = shared.lock();
        if !store.unrecorded {
            store.requests.push(r);
        }
    })
    .await;
    let latency = shared.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(failure) = take_failure(&shared, &recorded) {
        let name = recorded.path.rsplit('/').next().unwrap_or_default();
        return status_response(
            failure.code,
            &failure.reason,
            &format!("injected {} failure", failure.reason),
            name,
            "",
            "",
        );
    }
    let Some(target) = ResourcePath::parse(&recorded.path) else {
        return (StatusCode::NOT_FOUND, "404 page not found").into_response();
    };
    let method = Method::from_bytes(recorded.method.as_bytes()).unwrap_or(Method::GET);
    let lost = take_lost(&shared, &recorded);
    let answer = match (method, target.name.clone()) {
        (Method::POST, None) => create(&shared, &target, recorded.body),
        (Method::GET, None) => list(&shared, &target, &recorded.query),
        (Method::GET, Some(name)) => get(&shared, &target, &name),
        (Method::PUT, Some(name)) => replace(&shared, &target, &name, recorded.body),
        (Method::DELETE, Some(name)) => delete(&shared, &target, &name),
        _ => status_response(405, "MethodNotAllowed", "method not allowed", "", "", ""),
    };
    match lost {
        None => answer,
        Some(LostAnswer::Hang(for_how_long)) => {
            tokio::time::sleep(for_how_long).await;
            answer
        }
        Some(LostAnswer::Status(code, reason)) => {
            let name = target.name.as_deref().unwrap_or_default();
            target.status(
                code,
                &reason,
                format!("injected {reason} after the request took effect"),
                name,
            )
        }
    }
}

fn take_lost(shared: &Shared, recorded: &Recorded) -> Option<LostAnswer> {
    let mut store = shared.lock();
    let index = store.lost.iter().position(|l| {
        l.method == recorded.method
            && recorded.path.contains(&l.path_contains)
            && l.times != Some(0)
    })?;
    let lost = &mut store.lost[index];
    if let Some(times) = lost.times.as_mut() {
        *times -= 1;
    }
    Some(lost.answer.clone())
}

fn take_failure(shared: &Shared, recorded: &Recorded) -> Option<Failure> {
    let mut store = shared.lock();
    let index = store.failures.iter().position(|f| {
        f.method == recorded.method
            && recorded.path.contains(&f.path_contains)
            && f.times != Some(0)
    })?;
    let failure = &mut store.failures[index];
    if let Some(times) = failure.times.as_mut() {
        *times -= 1;
    }
    Some(failure.clone())
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn create(shared: &Shared, target: &ResourcePath, mut body: Value) -> Response {
    if !body.is_object() {
        return target.status(
            400,
            "BadRequest",
            "the body is not a JSON object".into(),
            "",
        );
    }
    let version = shared.next_version();
    let name = match body["metadata"]["name"].as_str() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => match body["metadata"]["generateName"].as_str() {
            Some(prefix) => format!("{prefix}{version:05x}"),
            None => {
                return target.status(
                    422,
                    "Invalid",
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value",
                        target.qualified()
                    ),
                    "",
                );
            }
        },
    };
    let mut store = shared.lock();
    let collection = store.objects.entry(target.collection.clone()).or_default();
    if collection.contains_key(&name) {
        return target.status(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", target.qualified()),
            &name,
        );
    }
    let namespace = target
        .collection
        .split('/')
        .skip_while(|p| *p != "namespaces")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let metadata = &mut body["metadata"];
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(namespace);
    metadata["uid"] = json!(format!("00000000-0000-4000-8000-{version:012x}"));
    metadata["resourceVersion"] = json!(version.to_string());
    metadata["creationTimestamp"] = json!(now_rfc3339());
    metadata["generation"] = json!(1);
    let answer = (StatusCode::CREATED, axum::Json(&body)).into_response();
    collection.insert(name, body);
    answer
}

fn get(shared: &Shared, target: &ResourcePath, name: &str) -> Response {
    let store = shared.lock();
    match store
        .objects
        .get(&target.collection)
        .and_then(|c| c.get(name))
    {
        Some(object) => axum::Json(object.clone()).into_response(),
        None => not_found(target, name),
    }
}

fn not_found(target: &ResourcePath, name: &str) -> Response {
    target.status(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", target.qualified()),
        name,
    )
}

fn list(shared: &Shared, target: &ResourcePath, query: &str) -> Response {
    let selector: Vec<(String, String)> = url_decode_pairs(query)
        .into_iter()
        .filter(|(k, _)| k == "labelSelector")
        .flat_map(|(_, v)| {
            v.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let store = shared.lock();
    let items: Vec<Value> = store
        .objects
        .get(&target.collection)
        .map(|c| {
            c.values()
                .filter(|o| {
                    selector
                        .iter()
                        .all(|(k, v)| o["metadata"]["labels"][k].as_str() == Some(v))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let kind = items
        .first()
        .and_then(|o| o["kind"].as_str())
        .map_or_else(|| "List".to_string(), |k| format!("{k}List"));
    let version = shared.version.load(Ordering::Relaxed);
    axum::Json(json!({
        "kind": kind,
        "apiVersion": items.first().map_or(json!("v1"), |o| o["apiVersion"].clone()),
        "metadata": { "resourceVersion": version.to_string() },
        "items": items,
    }))
    .into_response()
}

fn replace(shared: &Shared, target: &ResourcePath, name: &str, mut body: Value) -> Response {
    let version = shared.next_version();
    let mut store = shared.lock();
    let Some(current) = store
        .objects
        .get_mut(&target.collection)
        .and_then(|c| c.get_mut(name))
    else {
        return not_found(target, name);
    };
    let sent = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
    let stored = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("");
    if !sent.is_empty() && sent != stored {
        return target.status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                target.qualified()
            ),
            name,
        );
    }
    // Fields the server owns survive a replace.
    for field in ["uid", "creationTimestamp", "namespace", "generation"] {
        body["metadata"][field] = current["metadata"][field].clone();
    }
    body["metadata"]["resourceVersion"] = json!(version.to_string());
    *current = body.clone();
    axum::Json(body).into_response()
}

fn delete(shared: &Shared, target: &ResourcePath, name: &str) -> Response {
    let mut store = shared.lock();
    match store
        .objects
        .get_mut(&target.collection)
        .and_then(|c| c.remove(name))
    {
        Some(object) => axum::Json(object).into_response(),
        None => not_found(target, name),
    }
}

/// `a=b&c=d` with percent-decoding (and `+` as a space), enough for the queries clients send.
fn url_decode_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running fake Kubeflow Pipelines API server (v2beta1 runs); it stops when dropped.
#[derive(Debug)]
pub struct FakeKfp {
    addr: SocketAddr,
    shared: Arc<KfpShared>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct KfpShared {
    state: Mutex<KfpState>,
}

#[derive(Debug, Default)]
struct KfpState {
    runs: Vec<Value>,
    requests: Vec<Recorded>,
    /// Answers that replace the next creates' (which still take effect).
    lost_creates: Vec<LostAnswer>,
}

impl Drop for FakeKfp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeKfp {
    /// Starts a server on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let shared = Arc::new(KfpShared::default());
        let app = Router::new()
            .fallback(kfp_handler)
            .with_state(shared.clone());
        let (addr, task) = spawn(app).await?;
        Ok(Self { addr, shared, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Every run created so far.
    pub fn runs(&self) -> Vec<Value> {
        self.lock().runs.clone()
    }

    /// Lets the next create take effect (the run is stored) and answers it with `answer`
    /// instead (a `Status` is answered as grpc-gateway's error of that code); several calls
    /// queue up, one per create.
    pub fn lose_create_answer(&self, answer: LostAnswer) {
        self.lock().lost_creates.push(answer);
    }

    /// Sets the `state` (e.g. `RUNNING`, `SUCCEEDED`, `FAILED`) of the run `run_id`.
    pub fn set_state(&self, run_id: &str, state: &str) {
        let mut s = self.lock();
        if let Some(run) = s.runs.iter_mut().find(|r| r["run_id"] == run_id) {
            run["state"] = json!(state);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KfpState> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn kfp_handler(State(shared): State<Arc<KfpShared>>, request: Request) -> Response {
    let lock = || shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let (recorded, _) = record(request, |r| lock().requests.push(r)).await;
    let error = |code: u16, message: &str| {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // grpc-gateway's error shape: {error, code (gRPC), message, details}.
        let grpc = match code {
            400 => 3,
            404 => 5,
            _ => 13,
        };
        (
            status,
            axum::Json(json!({"error": message, "code": grpc, "message": message, "details": []})),
        )
            .into_response()
    };
    match (recorded.method.as_str(), recorded.path.as_str()) {
        ("POST", "/apis/v2beta1/runs") => {
            let body = recorded.body;
            if body["display_name"].as_str().unwrap_or("").is_empty() {
                return error(400, "Invalid input error: run display_name is required");
            }
            if body["pipeline_version_reference"]["pipeline_id"]
                .as_str()
                .unwrap_or("")
                .is_empty()
            {
                return error(
                    400,
                    "Invalid input error: pipeline_version_reference is required",
                );
            }
            let (run, lost) = {
                let mut state = lock();
                let n = state.runs.len() + 1;
                let mut run = body.clone();
                run["run_id"] = json!(format!("00000000-0000-4000-9000-{n:012x}"));
                run["state"] = json!("PENDING");
                run["created_at"] = json!(now_rfc3339());
                run["storage_state"] = json!("AVAILABLE");
                if run["experiment_id"].is_null() {
                    run["experiment_id"] = json!("00000000-0000-4000-a000-000000000001");
                }
                state.runs.push(run.clone());
                let lost = (!state.lost_creates.is_empty()).then(|| state.lost_creates.remove(0));
                (run, lost)
            };
            match lost {
                None => axum::Json(run).into_response(),
                Some(LostAnswer::Hang(for_how_long)) => {
                    tokio::time::sleep(for_how_long).await;
                    axum::Json(run).into_response()
                }
                Some(LostAnswer::Status(code, reason)) => error(code, &reason),
            }
        }
        ("GET", "/apis/v2beta1/runs") => {
            let filter = url_decode_pairs(&recorded.query)
                .into_iter()
                .find(|(k, _)| k == "filter")
                .map(|(_, v)| v);
            let wanted: Vec<(String, String)> = match filter {
                None => Vec::new(),
                Some(f) => match serde_json::from_str::<Value>(&f) {
                    Ok(v) => v["predicates"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .filter(|p| p["operation"] == "EQUALS")
                        .map(|p| {
                            let value = p["string_value"]
                                .as_str()
                                .or_else(|| p["stringValue"].as_str())
                                .unwrap_or_default();
                            (
                                p["key"].as_str().unwrap_or_default().to_string(),
                                value.to_string(),
                            )
                        })
                        .collect(),
                    Err(e) => return error(400, &format!("Invalid input error: filter: {e}")),
                },
            };
            let state = lock();
            let runs: Vec<Value> = state
                .runs
                .iter()
                .filter(|r| wanted.iter().all(|(k, v)| r[k.as_str()] == v.as_str()))
                .cloned()
                .collect();
            let total = runs.len();
            if runs.is_empty() {
                // The real server omits empty fields.
                return axum::Json(json!({})).into_response();
            }
            axum::Json(json!({"runs": runs, "total_size": total})).into_response()
        }
        ("GET", path) if path.starts_with("/apis/v2beta1/runs/") => {
            let id = &path["/apis/v2beta1/runs/".len()..];
            match lock().runs.iter().find(|r| r["run_id"] == id) {
                Some(run) => axum::Json(run.clone()).into_response(),
                None => error(404, &format!("Run {id} not found")),
            }
        }
        _ => error(404, "Not Found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_collection_group_and_item() {
        let p = ResourcePath::parse("/apis/batch/v1/namespaces/ml/jobs/train-1").expect("path");
        assert_eq!(p.collection, "/apis/batch/v1/namespaces/ml/jobs");
        assert_eq!(p.qualified(), "jobs.batch");
        assert_eq!(p.name.as_deref(), Some("train-1"));
        let core = ResourcePath::parse("/api/v1/namespaces/a/configmaps").expect("path");
        assert_eq!(core.qualified(), "configmaps");
        assert!(core.name.is_none());
        assert!(ResourcePath::parse("/version").is_none());
    }

    #[test]
    fn queries_are_percent_decoded() {
        assert_eq!(
            url_decode_pairs("labelSelector=a%3Db%2Cc%3Dd&x=1+2"),
            vec![
                ("labelSelector".to_string(), "a=b,c=d".to_string()),
                ("x".to_string(), "1 2".to_string())
            ]
        );
    }
}
