//! Log lines that a client or a broken upstream can cause, at most a few a
//! second each: under attack the log shows that it happens and how often,
//! without one line per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A budget of lines per second for one call site ([`limited!`]).
pub struct LogLimit {
    per_second: u64,
    /// (second since start) << 32 | lines in that second
    window: AtomicU64,
    suppressed: AtomicU64,
}

fn now_second() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl LogLimit {
    pub const fn new(per_second: u64) -> Self {
        Self {
            per_second,
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were
    /// suppressed since the last one written; `None` when over budget.
    pub fn allow(&self) -> Option<u64> {
        let second = now_second();
        let seen = self.window.load(Ordering::Relaxed);
        let (at, count) = (seen >> 32, seen & 0xffff_ffff);
        let next = if at == second {
            if count >= self.per_second {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            seen + 1
        } else {
            (second << 32) | 1
        };
        // A lost race only lets one more line through or suppresses one.
        let _ = self
            .window
            .compare_exchange(seen, next, Ordering::Relaxed, Ordering::Relaxed);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// `limited!(warn, "...", args)`: like `log::warn!`, at most 10 lines a
/// second from this call site; the next line written says how many were
/// suppressed. `limited!(per_second = 1; warn, "...")` sets another budget.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {
        $crate::limited!(per_second = 10; $level, $($arg)+)
    };
    (per_second = $budget:expr; $level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::observe::log_limit::LogLimit = $crate::observe::log_limit::LogLimit::new($budget);
        if let Some(skipped) = LIMIT.allow() {
            if skipped > 0 {
                log::$level!("{} ({skipped} similar lines suppressed)", format_args!($($arg)+));
            } else {
                log::$level!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_budget_per_second_then_a_count() {
        let l = LogLimit::new(3);
        let allowed: Vec<_> = (0..10).map(|_| l.allow()).collect();
        assert_eq!(&allowed[..3], &[Some(0), Some(0), Some(0)]);
        assert!(allowed[3..].iter().all(Option::is_none));
        // The next window reports what was suppressed in this one.
        l.window.store(0, Ordering::Relaxed);
        assert_eq!(l.allow(), Some(7));
    }
}
