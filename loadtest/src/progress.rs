//! The once-a-second progress line on stderr. Each scenario supplies a closure that renders the
//! line from its live counters; the task is stopped when the returned guard is dropped.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// Stops the progress task when dropped.
pub struct ProgressGuard(Option<JoinHandle<()>>);

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Print `render(elapsed)` to stderr every second (nothing when `quiet`, or when it returns
/// `None`).
pub fn spawn<F>(quiet: bool, mut render: F) -> ProgressGuard
where
    F: FnMut(Duration) -> Option<String> + Send + 'static,
{
    if quiet {
        return ProgressGuard(None);
    }
    let started = Instant::now();
    let handle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Some(line) = render(started.elapsed()) {
                eprintln!("{line}");
            }
        }
    });
    ProgressGuard(Some(handle))
}

/// Format microseconds for humans: `850µs`, `12.3ms`, `1.20s`.
pub fn fmt_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_us;

    #[test]
    fn human_latencies() {
        assert_eq!(fmt_us(850), "850µs");
        assert_eq!(fmt_us(12_345), "12.3ms");
        assert_eq!(fmt_us(1_200_000), "1.20s");
    }
}
