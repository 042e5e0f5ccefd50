//! Typed configuration from environment variables.
//!
//! Configuration is read once at start-up through [`ConfigReader`], which keeps going after a
//! problem so the operator sees *every* bad or missing variable in one go, then
//! [`load_or_exit`] exits with status 64 (`EX_USAGE`). Variables are read through the [`Env`]
//! lookup trait so tests pass a map instead of mutating the process environment.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Where configuration values come from.
pub trait Env {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

fn lookup<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)], key: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k.as_ref() == key)
        .map(|(_, v)| v.as_ref().to_string())
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, key: &str) -> Option<String> {
        lookup(self, key)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Env for Vec<(K, V)> {
    fn get(&self, key: &str) -> Option<String> {
        lookup(self, key)
    }
}

/// Every configuration problem found, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.0.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// Reads typed values and collects problems instead of stopping at the first.
pub struct ConfigReader<'a> {
    env: &'a dyn Env,
    problems: Vec<String>,
}

impl<'a> ConfigReader<'a> {
    /// A reader over `env`.
    pub fn new(env: &'a dyn Env) -> Self {
        Self {
            env,
            problems: Vec::new(),
        }
    }

    /// The value of `key`; an empty value counts as unset.
    pub fn optional(&mut self, key: &str) -> Option<String> {
        self.env
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The value of `key`, or `default`.
    pub fn string(&mut self, key: &str, default: &str) -> String {
        self.optional(key).unwrap_or_else(|| default.to_string())
    }

    /// The value of `key`, recording a problem when it is missing.
    pub fn required(&mut self, key: &str, what: &str) -> String {
        self.optional(key).unwrap_or_else(|| {
            self.problems.push(format!("{key} is required ({what})"));
            String::new()
        })
    }

    /// `key` parsed as `T`, or `default` when unset.
    pub fn parse<T>(&mut self, key: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.optional(key) {
            None => default,
            Some(raw) => raw.parse().unwrap_or_else(|e| {
                self.problems.push(format!("{key}={raw:?} is invalid: {e}"));
                default
            }),
        }
    }

    /// A positive count (concurrency, sizes): zero is a problem, because it would stall work.
    pub fn positive(&mut self, key: &str, default: usize) -> usize {
        let value = self.parse(key, default);
        if value == 0 {
            self.problems.push(format!("{key} must be at least 1"));
            return default;
        }
        value
    }

    /// A duration given in milliseconds.
    pub fn millis(&mut self, key: &str, default_ms: u64) -> Duration {
        Duration::from_millis(self.parse(key, default_ms))
    }

    /// A duration with a unit (`500ms`, `30s`, `10m`, `2h`, `1d`), see [`parse_duration`].
    pub fn duration(&mut self, key: &str, default: Duration) -> Duration {
        match self.optional(key) {
            None => default,
            Some(raw) => parse_duration(&raw).unwrap_or_else(|e| {
                self.problems.push(format!("{key}={raw:?} is invalid: {e}"));
                default
            }),
        }
    }

    /// One of a fixed set of words.
    pub fn choice(&mut self, key: &str, default: &str, allowed: &[&str]) -> String {
        let value = self.string(key, default).to_ascii_lowercase();
        if !allowed.contains(&value.as_str()) {
            self.problems.push(format!(
                "{key}={value:?} is invalid: expected one of {}",
                allowed.join(", ")
            ));
            return default.to_string();
        }
        value
    }

    /// An `http://` or `https://` base URL, trailing slashes removed.
    pub fn http_url(&mut self, key: &str, what: &str) -> String {
        let raw = self.required(key, what);
        if !(raw.is_empty() || raw.starts_with("http://") || raw.starts_with("https://")) {
            self.problems.push(format!(
                "{key}={raw:?} is invalid: expected an http(s):// URL"
            ));
        }
        raw.trim_end_matches('/').to_string()
    }

    /// Records a problem found by the caller's own checks.
    pub fn problem(&mut self, message: impl Into<String>) {
        self.problems.push(message.into());
    }

    /// Ok when nothing was wrong, else every problem found.
    pub fn finish(self) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.problems))
        }
    }
}

/// Parses a duration written as a whole number and a unit: `ms`, `s`, `m`, `h` or `d`
/// (`750ms`, `90s`, `30m`, `24h`, `7d`). A unit is required: a bare number is ambiguous.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{raw:?} has no unit (ms, s, m, h, d)"))?;
    let (number, unit) = raw.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} does not start with a whole number"))?;
    let seconds = |factor: u64| {
        n.checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{raw:?} is too long"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => seconds(1),
        "m" => seconds(60),
        "h" => seconds(3600),
        "d" => seconds(86_400),
        other => Err(format!("unknown unit {other:?} (ms, s, m, h, d)")),
    }
}

/// Reads configuration with `read` from `env`, returning every problem at once.
pub fn load<T>(env: &dyn Env, read: impl FnOnce(&mut ConfigReader) -> T) -> Result<T, ConfigError> {
    let mut reader = ConfigReader::new(env);
    let config = read(&mut reader);
    reader.finish().map(|()| config)
}

/// Reads configuration from the process environment; on problems prints them all and exits 64.
pub fn load_or_exit<T>(read: impl FnOnce(&mut ConfigReader) -> T) -> T {
    load(&ProcessEnv, read).unwrap_or_else(|err| {
        for problem in &err.0 {
            eprintln!("config error: {problem}");
        }
        std::process::exit(64)
    })
}

/// Settings every function shares.
#[derive(Debug, Clone)]
pub struct BaseConfig {
    /// `PORT` (default 8080): the HTTP port; Knative sets it.
    pub port: u16,
    /// `CE_SOURCE` (default `K_SERVICE`, else the function's name): `source` of replies.
    pub source: String,
    /// `MAX_BODY_BYTES` (default per function): events above it get 413 before parsing.
    pub max_body_bytes: usize,
    /// `EVENT_TIMEOUT_MS` (default 60000): one deadline for everything an event does.
    pub event_timeout: Duration,
    /// `SHUTDOWN_GRACE_MS` (default 20000): how long in-flight events may finish after
    /// SIGTERM; keep it below the pod's `terminationGracePeriodSeconds`.
    pub shutdown_grace: Duration,
    /// `NATS_URL` (unset: no publishing): where replies and stream chunks are published; with
    /// the credential (`NATS_CREDS_FILE`, `NATS_NKEY_FILE`, `NATS_TOKEN_FILE`,
    /// `NATS_USER_FILE` + `NATS_PASSWORD_FILE`) and TLS (`NATS_TLS_*_FILE`) files, see
    /// [`crate::nats::NatsConfig`].
    pub nats: Option<crate::nats::NatsConfig>,
}

impl BaseConfig {
    /// Reads the shared settings for the function `name`.
    pub fn read(r: &mut ConfigReader, name: &str, default_body_bytes: usize) -> Self {
        let default_source = r.optional("K_SERVICE").unwrap_or_else(|| name.to_string());
        Self {
            port: r.parse("PORT", 8080),
            source: r.string("CE_SOURCE", &default_source),
            max_body_bytes: r.positive("MAX_BODY_BYTES", default_body_bytes),
            event_timeout: r.millis("EVENT_TIMEOUT_MS", 60_000),
            shutdown_grace: r.millis("SHUTDOWN_GRACE_MS", 20_000),
            nats: crate::nats::NatsConfig::read(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_at_once() {
        let env = [("PORT", "eighty"), ("MODE", "loud"), ("LIMIT", "0")];
        let err = load(&env, |r| {
            let port: u16 = r.parse("PORT", 8080);
            let mode = r.choice("MODE", "quiet", &["quiet", "normal"]);
            let limit = r.positive("LIMIT", 4);
            let url = r.http_url("BACKEND_URL", "the backend");
            (port, mode, limit, url)
        })
        .expect_err("must fail");
        assert_eq!(err.0.len(), 4, "{err}");
        assert!(err.0[0].starts_with("PORT=\"eighty\" is invalid"));
        assert!(err.0[3].contains("BACKEND_URL is required"));
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("750ms"), Ok(Duration::from_millis(750)));
        assert_eq!(parse_duration(" 90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["", "10", "m", "1.5h", "3w", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let env = [("RETRY_TIMEOUT", "2h"), ("BAD", "2")];
        let set = load(&env, |r| r.duration("RETRY_TIMEOUT", Duration::ZERO)).expect("valid");
        assert_eq!(set, Duration::from_secs(7200));
        let err = load(&env, |r| r.duration("BAD", Duration::ZERO)).expect_err("no unit");
        assert!(err.0[0].starts_with("BAD=\"2\" is invalid"), "{err}");
    }

    #[test]
    fn defaults_apply_and_empty_counts_as_unset() {
        let env = [("NATS_URL", ""), ("K_SERVICE", "tts")];
        let base = load(&env, |r| BaseConfig::read(r, "tts-module", 1024)).expect("valid");
        assert_eq!(base.port, 8080);
        assert_eq!(base.source, "tts");
        assert!(base.nats.is_none());
        assert_eq!(base.max_body_bytes, 1024);
    }

    #[test]
    fn urls_are_checked_and_normalised() {
        let env = [("A", "http://x:1/"), ("B", "x:1")];
        let err = load(&env, |r| (r.http_url("A", "a"), r.http_url("B", "b"))).expect_err("B bad");
        assert_eq!(err.0.len(), 1);
        let ok = load(&env, |r| r.http_url("A", "a")).expect("A ok");
        assert_eq!(ok, "http://x:1");
    }
}
