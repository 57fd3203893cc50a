//! Operating-system plumbing: the open-file limit, and CPU time and resident memory of this
//! process and of watched server processes (read from `/proc/<pid>/stat` and
//! `/proc/<pid>/status`), so a benchmark step can report what the servers spent on it.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// Raise `RLIMIT_NOFILE` as far as allowed: the soft limit to the hard limit, and, where the
/// process may (root), both to `fs.nr_open`. Returns the soft limit in force afterwards.
#[allow(unsafe_code)]
pub fn raise_nofile_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(max) = nr_open.filter(|&m| m > lim.rlim_max) {
        let wanted = libc::rlimit {
            rlim_cur: max,
            rlim_max: max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            return Ok(max);
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        let wanted = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } != 0 {
            bail!(
                "setrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            );
        }
        return Ok(lim.rlim_max);
    }
    Ok(lim.rlim_cur)
}

/// The soft `RLIMIT_NOFILE` in force.
#[allow(unsafe_code)]
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// CPU seconds (user + system) this process has used so far.
#[allow(unsafe_code)]
pub fn self_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct; on failure it stays zeroed, which is a valid rusage.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[allow(unsafe_code)]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `utime + stime` in clock ticks from the text of `/proc/<pid>/stat`.
///
/// The command name (field 2) is in parentheses and may contain spaces, so fields are counted
/// from the last `)`: utime and stime are fields 14 and 15 of the file.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ')' the first field is field 3 (state): utime is 11 further on.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_ascii_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A server process whose CPU time and memory a scenario reports, given as `LABEL=PID` or `PID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub label: String,
    pub pid: u32,
}

impl FromStr for Watched {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (label, pid) = match s.split_once('=') {
            Some((l, p)) if !l.is_empty() => (l.to_string(), p),
            Some(_) => return Err(format!("empty label in {s:?}")),
            None => (s.to_string(), s),
        };
        let pid = pid
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("not a pid: {s:?} (expected LABEL=PID or PID)"))?;
        Ok(Watched { label, pid })
    }
}

impl fmt::Display for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.label, self.pid)
    }
}

/// One reading of a watched process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
}

impl Watched {
    /// Read CPU time and RSS now.
    pub fn sample(&self) -> Result<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .with_context(|| format!("reading /proc/{}/stat ({})", self.pid, self.label))?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("reading /proc/{}/status ({})", self.pid, self.label))?;
        let ticks = parse_stat_cpu_ticks(&stat)
            .with_context(|| format!("unexpected /proc/{}/stat format", self.pid))?;
        let rss_kib = parse_status_rss_kib(&status)
            .with_context(|| format!("no VmRSS in /proc/{}/status", self.pid))?;
        Ok(ProcSample {
            cpu_seconds: ticks as f64 / clock_ticks_per_second(),
            rss_kib,
        })
    }
}

/// What a watched process spent between two samples.
#[derive(Debug, Clone, Serialize)]
pub struct ProcUsage {
    pub label: String,
    pub pid: u32,
    pub cpu_seconds: f64,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
}

/// Samples of every watched process (and of this process) taken at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    samples: Vec<Option<ProcSample>>,
    self_cpu: f64,
    self_rss_kib: u64,
}

/// Take a snapshot of `watched`; a process that cannot be read (it exited) is left out of the
/// usage computed from the snapshot, with a warning on stderr.
pub fn snapshot(watched: &[Watched]) -> Snapshot {
    let samples = watched
        .iter()
        .map(|w| match w.sample() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("warning: {e:#}");
                None
            }
        })
        .collect();
    let self_rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_status_rss_kib(&s))
        .unwrap_or(0);
    Snapshot {
        samples,
        self_cpu: self_cpu_seconds(),
        self_rss_kib,
    }
}

impl Snapshot {
    /// Usage of each watched process from `self` to `later`.
    pub fn usage_until(&self, later: &Snapshot, watched: &[Watched]) -> Vec<ProcUsage> {
        watched
            .iter()
            .zip(self.samples.iter().zip(&later.samples))
            .filter_map(|(w, pair)| match pair {
                (Some(a), Some(b)) => Some(ProcUsage {
                    label: w.label.clone(),
                    pid: w.pid,
                    cpu_seconds: round3(b.cpu_seconds - a.cpu_seconds),
                    rss_kib_before: a.rss_kib,
                    rss_kib_after: b.rss_kib,
                }),
                _ => None,
            })
            .collect()
    }

    /// CPU seconds this load generator used from `self` to `later`.
    pub fn self_cpu_until(&self, later: &Snapshot) -> f64 {
        round3(later.self_cpu - self.self_cpu)
    }

    /// This load generator's RSS when the snapshot was taken.
    pub fn self_rss_kib(&self) -> u64 {
        self.self_rss_kib
    }
}

/// Round to three decimals, for reports.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_counts_fields_after_the_command_name() {
        let stat = "1234 (node server.js) S 1 1234 1234 0 -1 4194560 5000 0 0 0 \
                    250 75 0 0 20 0 11 0 100 1000000 5000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn status_rss_is_read_in_kib() {
        let status = "Name:\tredis-server\nVmPeak:\t  9000 kB\nVmRSS:\t   7424 kB\nThreads:\t5\n";
        assert_eq!(parse_status_rss_kib(status), Some(7424));
        assert_eq!(parse_status_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn watched_accepts_label_and_bare_pid() {
        let w: Watched = "node-a=42".parse().unwrap();
        assert_eq!((w.label.as_str(), w.pid), ("node-a", 42));
        let w: Watched = "7".parse().unwrap();
        assert_eq!((w.label.as_str(), w.pid), ("7", 7));
        assert!("x=".parse::<Watched>().is_err());
        assert!("=5".parse::<Watched>().is_err());
    }

    #[test]
    fn this_process_can_be_sampled() {
        let me = Watched {
            label: "self".into(),
            pid: std::process::id(),
        };
        let s = me.sample().unwrap();
        assert!(s.rss_kib > 0);
    }
}
