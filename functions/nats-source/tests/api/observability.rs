//! knative/observability/: the alerts and recording rules pass `promtool check rules`, every
//! alert is unit-tested by `promtool test rules` (fires on synthetic series, quiet on their
//! healthy twins), and every alert tells the operator what it means and what to do.
//!
//! promtool comes from Debian's `prometheus` package, which `just tools` installs;
//! `PROMTOOL` names another binary.

use std::path::{Path, PathBuf};
use std::process::Command;

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
