//! `bench`: binary size, cold start, RSS and events/s of every function next to the floor.
//! See the library documentation for what is measured and how.

use std::process::ExitCode;

fn main() -> ExitCode {
    match bench::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
