//! Child processes that cannot outlive the runner, free ports, and memory from `/proc`.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::harness::error::{Context as _, Result, bail};

/// A running child process, killed (SIGKILL) and reaped when dropped: on success, on error and
/// on panic alike.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

/// Builds the command for `binary`: a clean environment holding only `env`, stdin closed,
/// stdout and stderr to `log` (truncated), so a failed start can be explained.
pub fn command(
    binary: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<Command> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Ok(cmd)
}

impl Proc {
    /// Spawns `cmd` (returns once the binary has been exec'd). `log` is where `cmd` writes.
    pub fn spawn(cmd: &mut Command, name: &str, log: &Path) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            child,
            name: name.to_string(),
            log: log.to_path_buf(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited, quoting the end of its output.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited early ({status}); its output ends with:\n{}",
                self.name,
                tail(&self.log, 1500)
            ),
        }
    }

    /// `VmRSS` (resident set) in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        status_kib(self.pid(), "VmRSS")
    }

    /// `VmHWM` (peak resident set) in KiB.
    pub fn hwm_kib(&self) -> Result<u64> {
        status_kib(self.pid(), "VmHWM")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a `kB` field of `/proc/<pid>/status`.
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&text, field).with_context(|| format!("no {field} in {path}"))
}

/// CPU time (user + system) of a process so far, in clock ticks (`USER_HZ`, 100 per second),
/// from `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_ticks(&text).with_context(|| format!("no utime/stime in {path}"))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line; the command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// The last `max` bytes of a file, lossily decoded; a placeholder if it cannot be read.
pub fn tail(path: &Path, max: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "(no output)".to_string(),
        Ok(text) => text.trim_end().to_string(),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let text = "Name:\tx\nVmHWM:\t    5120 kB\nVmRSS:\t    4096 kB\n";
        assert_eq!(parse_status_kib(text, "VmRSS"), Some(4096));
        assert_eq!(parse_status_kib(text, "VmHWM"), Some(5120));
        assert_eq!(parse_status_kib(text, "VmSwap"), None);
    }

    #[test]
    fn stat_ticks() {
        let line = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 11 17 5 0 0 20 0 1 0 100 200 3";
        assert_eq!(parse_stat_ticks(line), Some(11 + 17));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert!(cpu_ticks(std::process::id()).is_ok());
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(status_kib(std::process::id(), "VmRSS").unwrap() > 0);
    }
}
