//! `catalog`: pipeline-bridge's catalog (YAML from a ConfigMap), the validation of a trigger's
//! parameters against it, the filling of templates, the choice of entries for a git push, and
//! the names derived from request ids.
//!
//! Input: up to four parts separated by NUL bytes: the catalog (empty: the API tests' catalog),
//! the trigger's `parameters` as JSON, a push (branch, repository, then changed paths, one a
//! line), and a `request_id`. Invariants: `parse` fails exactly when `parse_all` reports
//! problems; resolved parameters are exactly the entry's, each matching its pattern; filling a
//! Job template never changes its shape (a value lands inside a string, never as structure);
//! run and lock names are DNS labels whatever the id; a push selects only entries whose rule
//! matches it.

use std::collections::BTreeMap;

use pipeline_bridge::catalog::{Catalog, Target, fill, fill_value, is_dns_label};
use pipeline_bridge::names::{lease_name, run_name};
use serde_json::Value;

/// One input; see the module docs for its layout.
pub fn run(data: &[u8]) {
    let mut parts = data.split(|&b| b == 0);
    let yaml = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let parameters = parts.next().unwrap_or_default();
    let push = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let request_id = String::from_utf8_lossy(parts.next().unwrap_or_default());

    let yaml = if yaml.trim().is_empty() {
        crate::pipeline::CATALOG
    } else {
        &yaml
    };
    let (catalog, problems) = Catalog::parse_all(yaml, "default");
    assert_eq!(
        Catalog::parse(yaml, "default").is_ok(),
        problems.is_empty(),
        "parse and parse_all disagree: {problems:?}"
    );
    let given: BTreeMap<String, Value> = serde_json::from_slice(parameters).unwrap_or_default();
    let object: Value = serde_json::from_slice(parameters).unwrap_or_default();

    for entry in catalog.entries() {
        assert!(
            is_dns_label(&entry.name),
            "entry {:?} was accepted",
            entry.name
        );
        assert!(
            is_dns_label(&entry.namespace),
            "namespace {:?}",
            entry.namespace
        );
        let _ = pipeline_bridge::status::of_object(entry.kind(), &object);
        let name = run_name(&entry.name, &request_id);
        assert!(is_dns_label(&name), "run name {name:?}");
        let Ok(resolved) = entry.resolve(&given) else {
            continue;
        };
        assert!(
            resolved.keys().eq(entry.parameters.keys()),
            "resolved {resolved:?} for parameters {:?}",
            entry.parameters.keys().collect::<Vec<_>>()
        );
        for (key, value) in &resolved {
            let parameter = &entry.parameters[key];
            assert!(
                parameter.pattern.is_match(value),
                "{key}={value:?} does not match {}",
                parameter.pattern.as_str()
            );
            assert!(value.chars().count() <= 1024 || !given.contains_key(key));
        }
        if let Some(lock) = &entry.lock {
            let lease = lease_name(&fill(lock, &resolved));
            assert!(is_dns_label(&lease), "lease name {lease:?}");
        }
        if let Target::Job(spec) = &entry.target {
            let filled = fill_value(spec, &resolved);
            assert!(same_shape(spec, &filled), "filling changed the Job's shape");
        }
    }

    let mut lines = push.lines();
    let branch = lines.next().unwrap_or_default();
    let repository = lines.next().filter(|r| !r.is_empty());
    let paths: Vec<String> = lines.map(str::to_string).collect();
    for entry in catalog.select_for_push(repository, branch, &paths) {
        let git = entry
            .git
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no git rule but was selected", entry.name));
        assert!(git.branch.as_deref().is_none_or(|b| b == branch));
        assert!(paths.iter().any(|p| git.paths.is_match(p)));
    }
}

/// Whether `a` and `b` have the same keys, array lengths and value types everywhere.
fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b.iter())
                    .all(|((ka, va), (kb, vb))| ka == kb && same_shape(va, vb))
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_shape(a, b))
        }
        (Value::String(_), Value::String(_)) => true,
        (a, b) => a == b,
    }
}
