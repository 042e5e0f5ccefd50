//! knative/observability/: the alerts and recording rules pass `promtool check rules`, every
//! alert is unit-tested by `promtool test rules` (fires on synthetic series, quiet on their
//! healthy twins), and every alert tells the operator what it means and what to do.
//!
//! A real Prometheus scraping chat-handler and its source finds every series the rules and the
//! dashboard read, and raises the dead-letter and breaker alerts.
//!
//! promtool and Prometheus come from Debian's `prometheus` package, which `just tools`
//! installs; `PROMTOOL` and `PROMETHEUS` name other binaries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::nats_server::NatsServer;

use crate::support::eventually;

const OBSERVABILITY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../knative/observability");

fn promtool() -> PathBuf {
    let path =
        std::env::var_os("PROMTOOL").map_or_else(|| PathBuf::from("promtool"), PathBuf::from);
    let found = Command::new(&path).arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "promtool not found ({}): `just tools` installs Debian's prometheus package",
        path.display()
    );
    path
}

/// The PrometheusRule's `spec` (its `groups`), as the plain rule file Prometheus and promtool
/// read.
pub fn rule_groups() -> serde_json::Value {
    let text = std::fs::read_to_string(Path::new(OBSERVABILITY).join("prometheusrule.yaml"))
        .expect("prometheusrule.yaml");
    let rule: serde_json::Value =
        serde_saphyr::from_str(&text).expect("prometheusrule.yaml is YAML");
    assert_eq!(rule["kind"], "PrometheusRule");
    serde_json::json!({ "groups": rule["spec"]["groups"] })
}

/// Every rule of the file: (alert or record name, expression, annotations).
pub fn rules(groups: &serde_json::Value) -> Vec<(String, String, serde_json::Value)> {
    groups["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| {
            let name = r["alert"].as_str().or(r["record"].as_str()).expect("named");
            (
                name.to_string(),
                r["expr"].as_str().expect("expr").to_string(),
                r["annotations"].clone(),
            )
        })
        .collect()
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn the_rules_pass_promtool_and_every_alert_is_unit_tested() {
    let promtool = promtool();
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = rule_groups();
    std::fs::write(dir.path().join("rules.json"), groups.to_string()).expect("write rules");
    let tests = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/api/observability/alerts.test.yaml"
    ))
    .expect("alerts.test.yaml");
    std::fs::write(dir.path().join("alerts.test.yaml"), &tests).expect("write tests");

    let checked = run(Command::new(&promtool)
        .args(["check", "rules", "rules.json"])
        .current_dir(dir.path()));
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yaml"])
        .current_dir(dir.path()));
    assert!(tested.contains("SUCCESS"), "{tested}");

    let alerts: Vec<_> = rules(&groups)
        .into_iter()
        .filter(|(name, _, _)| name.starts_with("AIHandler"))
        .collect();
    assert!(alerts.len() >= 8, "{} alerts", alerts.len());
    for (name, _, annotations) in &alerts {
        for key in ["summary", "runbook"] {
            assert!(
                annotations[key].as_str().is_some_and(|t| t.len() > 20),
                "{name} has no {key}"
            );
        }
        // Fires somewhere in the unit tests (the quiet twins are in the same groups).
        let firing = format!("alertname=\"{name}\",alertstate=\"firing\"");
        assert!(
            tests.contains(&firing),
            "{name} is never seen firing in alerts.test.yaml"
        );
    }
}

/// The series an expression reads: each `metric{matchers}` (or bare metric) whose name is one
/// of ours (`handler_`, `source_`, `chat_`, a recording rule's `level:metric:op`) or `up`.
pub fn selectors(expr: &str) -> Vec<String> {
    let ours = |name: &str| {
        ["handler_", "source_", "chat_"]
            .iter()
            .any(|p| name.starts_with(p))
            || name.contains(':')
            || name == "up"
    };
    let bytes = expr.as_bytes();
    let mut found = Vec::new();
    let mut i = 0;
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip a quoted string (label values, label_replace arguments).
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'[' => {
                // A range ([5m]) or a subquery: not a name.
                while i < bytes.len() && bytes[i] != b']' {
                    i += 1;
                }
            }
            b if b.is_ascii_alphabetic() || b == b'_' => {
                let start = i;
                while i < bytes.len() && ident(bytes[i]) {
                    i += 1;
                }
                let name = &expr[start..i];
                let mut selector = name.to_string();
                if bytes.get(i) == Some(&b'{') {
                    let close = expr[i..].find('}').map_or(expr.len(), |c| i + c + 1);
                    selector.push_str(&expr[i..close]);
                    i = close;
                }
                if ours(name) && !found.contains(&selector) {
                    found.push(selector);
                }
            }
            _ => i += 1,
        }
    }
    found
}

/// Every query of the dashboard, with its variables set to "all" (`.*`).
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(OBSERVABILITY).join("dashboard.json"))
        .expect("dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("expr")
                .replace("$namespace", ".*")
                .replace("$function", ".*")
                .replace("$source", ".*")
        })
        .collect()
}

#[test]
fn selectors_are_found_in_expressions() {
    assert_eq!(
        selectors(
            r#"sum by (namespace, source) (increase(source_messages_total{outcome=~"a|b"}[10m])) > 0 and on (source) label_replace(max by (function) (up{function!=""}) == 1, "source", "$1-source", "function", "(.+)") unless source:lag"#
        ),
        [
            r#"source_messages_total{outcome=~"a|b"}"#,
            r#"up{function!=""}"#,
            "source:lag"
        ]
    );
    assert!(
        dashboard_queries()
            .iter()
            .all(|q| !selectors(q).is_empty() && !q.contains('$')),
        "every panel reads one of our series, with no variable left"
    );
}

fn prometheus_binary() -> PathBuf {
    let path =
        std::env::var_os("PROMETHEUS").map_or_else(|| PathBuf::from("prometheus"), PathBuf::from);
    let found = Command::new(&path).arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "prometheus not found ({}): `just tools` installs Debian's prometheus package",
        path.display()
    );
    path
}

/// A Prometheus server on a free port, scraping every second with the rules evaluated every
/// second (their `for:` unchanged, so alerts become pending first); killed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(dir: &Path, functions: &[(&str, String)], sources: &[(&str, String)]) -> Self {
        let mut groups = rule_groups();
        for group in groups["groups"].as_array_mut().expect("groups") {
            group["interval"] = "1s".into();
        }
        std::fs::write(dir.join("rules.json"), groups.to_string()).expect("rules");
        let job = |name: &str, label: &str, targets: &[(&str, String)]| {
            serde_json::json!({
                "job_name": name,
                "static_configs": targets.iter().map(|(value, address)| serde_json::json!({
                    "targets": [address],
                    "labels": {"namespace": "test", label: value},
                })).collect::<Vec<_>>(),
            })
        };
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.json"],
            "scrape_configs": [job("functions", "function", functions), job("sources", "source", sources)],
        });
        // JSON is YAML: Prometheus reads it as its configuration file.
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).expect("config");
        let port = testkit::nats_server::free_port().expect("port");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(prometheus_binary())
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: handler_kit::http::client(Duration::from_secs(5)).expect("client"),
        };
        let ready = eventually(Duration::from_secs(30), || async {
            let r = prometheus
                .http
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "prometheus not ready: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        prometheus
    }

    /// How many series `query` returns now (None: the query itself failed).
    async fn series(&self, query: &str) -> Option<usize> {
        let answer: serde_json::Value = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (answer["status"] == "success").then(|| {
            answer["data"]["result"]
                .as_array()
                .map_or(0, std::vec::Vec::len)
        })
    }

    /// The alerts Prometheus holds now: (name, state).
    async fn alerts(&self) -> Vec<(String, String)> {
        let answer: serde_json::Value = match self
            .http
            .get(format!("{}/api/v1/alerts", self.url))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return Vec::new(),
        };
        answer["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    a["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn address(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// chat-handler and its source as processes, a real Prometheus scraping them with the rules.
/// Traffic: answered chat messages through the source, one the function refuses (a dead
/// letter), and retrieval requests against an embeddings backend that is down (502, then 503
/// once its breaker opens). Then every series the rules and the dashboard read must exist, and
/// the dead-letter and breaker alerts must be pending or firing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_finds_every_series_the_rules_and_the_dashboard_read() {
    use crate::cluster_faults::processes::{Service, function_binary};

    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start().await.expect("nats");
    let sim = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim_url = format!("http://{}", sim.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(
            sim,
            testkit::sim::router(testkit::sim::SimConfig::default()),
        )
        .await
    });
    // Nothing listens here: the embeddings and Milvus backends are down.
    let down = format!(
        "http://127.0.0.1:{}",
        testkit::nats_server::free_port().expect("port")
    );
    let chat_binary = tokio::task::spawn_blocking(|| function_binary("chat-handler"))
        .await
        .expect("build");
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    };
    let chat = Service::start(
        "chat-handler",
        &chat_binary,
        env(&[
            ("NATS_URL", &nats.url()),
            ("LLM_URL", &sim_url),
            ("EMBED_URL", &down),
            ("MILVUS_URL", &down),
            ("CHAT_ON_RETRIEVAL_FAILURE", "fail"),
            ("EMBED_BREAKER_FAILURES", "2"),
            ("EMBED_BREAKER_OPEN_MS", "600000"),
            ("RUST_LOG", "warn"),
        ]),
        dir.path(),
    )
    .await;
    let source = Service::start(
        "nats-source",
        Path::new(env!("CARGO_BIN_EXE_nats-source")),
        env(&[
            ("NATS_URL", &nats.url()),
            ("K_SINK", &chat.url()),
            ("STREAM", "AI_CHAT"),
            ("CONSUMER", "chat-handler"),
            ("SUBJECTS", "ai.chat.request"),
            ("CREATE", "true"),
            ("MAX_DELIVER", "2"),
            ("LAG_INTERVAL_MS", "500"),
            ("BACKOFF_BASE_MS", "100"),
            ("BACKOFF_MAX_MS", "1000"),
            ("DEFAULT_CONTENT_TYPE", "application/json"),
            ("RUST_LOG", "warn"),
        ]),
        dir.path(),
    )
    .await;
    let prometheus = Prometheus::start(
        dir.path(),
        &[("chat-handler", address(&chat.url()))],
        &[("chat-handler-source", address(&source.url()))],
    )
    .await;

    // Prometheus has seen the dead-letter counter at 0 before anything happens: an increase is
    // measured from a sample before it.
    let scraped = eventually(Duration::from_secs(30), || async {
        (prometheus
            .series(r#"source_messages_total{outcome="dead_lettered"} == 0"#)
            .await
            .unwrap_or(0)
            > 0)
        .then_some(())
    })
    .await;
    assert!(
        scraped.is_some(),
        "the source's counters were never scraped at 0"
    );
    let client = nats.client().await.expect("client");
    let js = async_nats::jetstream::new(client);
    for i in 0..5 {
        let body = serde_json::json!({"request_id": format!("ok-{i}"), "message": "Hello?", "enable_rag": false});
        js.publish("ai.chat.request", body.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    // An empty message is a final 422: dead-lettered at once.
    js.publish("ai.chat.request", r#"{"message": ""}"#.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let http = handler_kit::http::client(Duration::from_secs(10)).expect("client");
    let mut statuses = Vec::new();
    for i in 0..4 {
        let answer = http
            .post(chat.url())
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("rag-{i}"))
            .header("ce-type", "ai.chat.request")
            .header("ce-source", "/test")
            .header("content-type", "application/json")
            .body(r#"{"message": "What does the handbook say?"}"#)
            .send()
            .await
            .expect("answer");
        statuses.push(answer.status().as_u16());
    }
    assert_eq!(
        statuses,
        [502, 502, 503, 503],
        "the embeddings breaker opens after two failures"
    );

    let mut queries: Vec<String> = dashboard_queries();
    for (name, expr, _) in rules(&rule_groups()) {
        if !name.starts_with("AIHandler") {
            queries.push(name);
        }
        queries.extend(selectors(&expr));
    }
    queries.sort();
    queries.dedup();
    let mut missing = queries.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !missing.is_empty() && tokio::time::Instant::now() < deadline {
        let mut still = Vec::new();
        for q in missing {
            if prometheus.series(&q).await.unwrap_or(0) == 0 {
                still.push(q);
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} queries returned no series:\n{}",
        missing.len(),
        queries.len(),
        missing.join("\n")
    );
    let raised = eventually(Duration::from_secs(30), || async {
        let alerts = prometheus.alerts().await;
        let raised = |name: &str| {
            alerts
                .iter()
                .any(|(n, state)| n == name && (state == "pending" || state == "firing"))
        };
        (raised("AIHandlerDeadLetters") && raised("AIHandlerBreakerOpen")).then_some(alerts)
    })
    .await;
    assert!(
        raised.is_some(),
        "the dead-letter and breaker alerts were not raised: {:?}",
        prometheus.alerts().await
    );
}
