//! Corpus replay for the workspace's tests (std only, so any crate's tests can include it).

use std::path::Path;

/// Runs `run` on every file of `corpus/<target>` under `corpus_root` (the committed seeds and
/// crash reproducers), naming the file that fails. Fails when there is none, so a renamed
/// directory cannot make the test pass by replaying nothing.
pub fn replay(corpus_root: &Path, target: &str, run: impl Fn(&[u8])) {
    let dir = corpus_root.join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no seeds", dir.display());
    for path in files {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
        if let Err(panic) = outcome {
            eprintln!("{target}: {} fails", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}
