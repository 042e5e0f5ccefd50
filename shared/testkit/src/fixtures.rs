//! Recorded test audio shipped with the crate: real speech for VAD and speech-to-text tests.
//!
//! The files and the table of where each utterance starts and ends are made together by
//! `scripts/make-speech-fixtures.sh`; the boundaries are read back from the folder's README so
//! that regenerated audio and the timings the tests expect cannot drift apart.

use anyhow::{Context, bail};

/// The folder holding the speech fixtures and their README.
pub const SPEECH_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/speech/");

/// The bytes of the speech fixture `name` (e.g. `two-utterances-16k.wav`).
///
/// # Panics
///
/// If the file is missing: a test that names a fixture cannot run without it.
pub fn speech(name: &str) -> Vec<u8> {
    let path = format!("{SPEECH_DIR}{name}");
    std::fs::read(&path).unwrap_or_else(|e| panic!("speech fixture {path}: {e}"))
}

/// Where each utterance of the fixture `name` starts and ends, in ms from the start of the
/// file, as recorded in the README's "Expected speech" table.
///
/// # Panics
///
/// If the README is missing or lists nothing for `name`.
pub fn speech_boundaries(name: &str) -> Vec<(u64, u64)> {
    let path = format!("{SPEECH_DIR}README.md");
    let readme =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("speech fixtures {path}: {e}"));
    let rows = parse_boundaries(&readme, name).unwrap_or_else(|e| panic!("{path}: {e:#}"));
    assert!(!rows.is_empty(), "{path} lists no utterances for {name}");
    rows
}

/// Rows `| name | n | start_ms | end_ms | text |` of a Markdown table, in order.
fn parse_boundaries(readme: &str, name: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut rows = Vec::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // A row splits into ["", file, n, start, end, text, ""].
        if cells.len() < 6 || cells[1] != name {
            continue;
        }
        let number = |i: usize| -> anyhow::Result<u64> {
            cells[i]
                .parse()
                .with_context(|| format!("bad number {:?} in row {line:?}", cells[i]))
        };
        let (start, end) = (number(3)?, number(4)?);
        if end <= start {
            bail!("row {line:?} ends before it starts");
        }
        rows.push((start, end));
    }
    Ok(rows)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test, with its location
mod tests {
    use super::*;

    #[test]
    fn fixtures_are_wavs_and_their_boundaries_are_listed() {
        for (name, utterances, rate, channels) in [
            ("two-utterances-16k.wav", 2, 16_000, 1),
            ("three-utterances-44k-stereo.wav", 3, 44_100, 2),
        ] {
            let info = crate::wav::wav_info(&speech(name)).unwrap();
            assert_eq!(
                (info.sample_rate, info.channels),
                (rate, channels),
                "{name}"
            );
            let spans = speech_boundaries(name);
            assert_eq!(spans.len(), utterances, "{name}");
            assert!(
                spans.windows(2).all(|w| w[0].1 < w[1].0),
                "{name}: {spans:?}"
            );
            assert!(spans.last().unwrap().1 < info.duration_ms, "{name}");
        }
    }

    #[test]
    fn table_rows_are_parsed_and_bad_numbers_reported() {
        let md =
            "| a.wav | 1 | 10 | 20 | hi |\n| b.wav | 1 | 5 | 6 | x |\n| a.wav | 2 | 30 | 40 | yo |";
        assert_eq!(
            parse_boundaries(md, "a.wav").unwrap(),
            vec![(10, 20), (30, 40)]
        );
        assert!(parse_boundaries("| a.wav | 1 | ten | 20 | hi |", "a.wav").is_err());
    }
}
