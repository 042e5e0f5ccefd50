//! Files the functions run with in the bench: the speech recordings (made by
//! `scripts/make-speech-fixtures.sh`) and the catalog pipeline-bridge reads.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::harness::error::{Context as _, Result};

/// The speech fixtures, in `speech_dir()`.
pub const SPEECH: [&str; 2] = ["two-utterances-16k.wav", "three-utterances-44k-stereo.wav"];

/// The directory of the speech fixtures in the source tree.
pub fn speech_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/fixtures/speech")
}

/// The bytes of the speech fixture `name`.
pub fn read_speech(name: &str) -> Result<Vec<u8>> {
    let path = speech_dir().join(name);
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// pipeline-bridge's default `MAX_BODY_BYTES`: the max-body section's trigger fills it, and the
/// catalog declares as many parameters as that trigger sends.
pub const PIPELINE_MAX_BODY_BYTES: usize = 64 * 1024;
/// The catalog pipeline-bridge runs with in the bench.
pub const CATALOG: &str = r#"pipelines:
  bench:
    kind: job
    namespace: bench
    parameters:
      n: {pattern: "[a-z0-9-]{1,40}", default: "0"}
    job:
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: work
              image: busybox
              args: ["{{parameters.n}}"]
  bench-locked:
    kind: job
    namespace: bench
    lock: "bench-{{parameters.n}}"
    parameters:
      n: {pattern: "[a-z0-9-]{1,40}"}
    job:
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: work
              image: busybox
              args: ["{{parameters.n}}"]
"#;

/// The sample trigger: a new `request_id` per copy, no lock.
pub const TRIGGER_SAMPLE: &str =
    r#"{"request_id":"{id}","pipeline":"bench","parameters":{"n":"1"}}"#;
/// The same with a lock of its own per copy.
pub const LOCKED_SAMPLE: &str =
    r#"{"request_id":"{id}","pipeline":"bench-locked","parameters":{"n":"{id}"}}"#;

/// Where the bench writes [`CATALOG`] (under `target/bench`).
pub fn catalog_path(bin_dir: &Path) -> PathBuf {
    bin_dir
        .parent()
        .unwrap_or(Path::new("."))
        .join("bench")
        .join("pipeline-catalog.yaml")
}

/// Writes [`CATALOG`] and the max-body section's entry ([`pipeline_entry`])
/// to [`catalog_path`].
pub fn write_catalog(bin_dir: &Path, max_body_bytes: usize) -> Result<()> {
    let path = catalog_path(bin_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let entry = pipeline_entry(pipeline_parameters(max_body_bytes));
    std::fs::write(&path, format!("{CATALOG}{entry}"))
        .with_context(|| format!("writing {}", path.display()))
}

/// The longest parameter value pipeline-bridge accepts, characters.
pub const PIPELINE_MAX_VALUE_CHARS: usize = 1024;
/// The catalog entry the pipeline-bridge body triggers.
pub const PIPELINE_ENTRY: &str = "bench-max-body";

/// The parameters of [`PIPELINE_ENTRY`] that fit a trigger of `cap` bytes.
pub fn pipeline_parameters(cap: usize) -> usize {
    // `"p000":"<value>",` per parameter; the rest of the trigger is under 100 bytes.
    (cap - 100) / (PIPELINE_MAX_VALUE_CHARS + 10)
}

/// The catalog entry [`PIPELINE_ENTRY`]: `count` parameters, every one in the Job's args.
pub fn pipeline_entry(count: usize) -> String {
    let mut entry =
        format!("  {PIPELINE_ENTRY}:\n    kind: job\n    namespace: bench\n    parameters:\n");
    for i in 0..count {
        let _ = writeln!(entry, "      p{i:03}: {{pattern: \"[a-z]+\"}}");
    }
    entry.push_str(
        "    job:\n      template:\n        spec:\n          restartPolicy: Never\n          \
         containers:\n            - name: work\n              image: busybox\n              args:\n",
    );
    for i in 0..count {
        let _ = writeln!(entry, "                - \"{{{{parameters.p{i:03}}}}}\"");
    }
    entry
}
