//! What every section's results share: failed measurements and the targets they are held to.

use crate::harness::error::Error;
use serde::Serialize;

/// A measurement that failed.
#[derive(Debug, Clone, Serialize)]
pub struct MeasureError {
    /// Which one (a name of its section's).
    pub measure: &'static str,
    /// Why, with its cause chain.
    pub error: String,
}

/// Which side of its limit a value must stay on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bound {
    /// `value <= limit`.
    Max,
    /// `value >= limit`.
    Min,
}

/// One target checked for one function.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    /// The function.
    pub function: String,
    /// What is checked, e.g. `idle RSS <= 8 MiB`.
    pub target: String,
    /// The measured value (None: not measured).
    pub value: Option<f64>,
    /// The limit it is held to (None: no floor to derive it from).
    pub limit: Option<f64>,
    /// Unit of both.
    pub unit: &'static str,
    /// Whether the limit is a maximum or a minimum.
    pub bound: Bound,
    /// Whether it passes; a missing value fails.
    pub pass: bool,
}

/// Checks `value <= limit`.
pub fn check_max(
    function: &str,
    target: String,
    value: Option<f64>,
    limit: Option<f64>,
    unit: &'static str,
) -> TargetCheck {
    check_bound(function, target, value, limit, unit, Bound::Max)
}

/// Checks `value` against `limit` on the side `bound` says; a missing value or limit fails.
pub fn check_bound(
    function: &str,
    target: String,
    value: Option<f64>,
    limit: Option<f64>,
    unit: &'static str,
    bound: Bound,
) -> TargetCheck {
    let pass = match (value, limit, bound) {
        (Some(v), Some(l), Bound::Max) => v <= l,
        (Some(v), Some(l), Bound::Min) => v >= l,
        _ => false,
    };
    TargetCheck {
        function: function.to_string(),
        target,
        value,
        limit,
        unit,
        bound,
        pass,
    }
}

/// Records `error` (with its cause chain) as the failure of `measure`.
pub fn fail(errors: &mut Vec<MeasureError>, measure: &'static str, error: &Error) {
    errors.push(MeasureError {
        measure,
        error: format!("{error:#}"),
    });
}

/// Whether `measure` failed.
pub fn failed(errors: &[MeasureError], measure: &str) -> bool {
    errors.iter().any(|e| e.measure == measure)
}
