//! A connection's timers, moved instead of made anew for every wait.
//!
//! `tokio::time::timeout` registers a timer in the runtime's wheel for each
//! wait that does not finish at once and removes it afterwards, and
//! tokio's time driver wakes its own runtime (an eventfd write, then an
//! `epoll_wait` that returns at once) whenever a timer is registered that
//! is due before the instant the runtime last went to sleep for. A busy
//! connection waits twice per request (the upstream's response, the
//! client's next request): two registrations, two removals and 0.32
//! eventfd writes per request (`strace -c` under `wrk -c4`, TLS `/obj4k`).
//!
//! A [`Timer`] is one [`Sleep`] kept for a connection's life; a connection
//! has two, one for its waits on the client and one for those on the
//! upstream, so that each one's waits are mostly of one length and each
//! new deadline is later than the last. Moving a deadline later is an
//! atomic store: tokio leaves the entry where it is in the wheel and, when
//! that earlier slot comes, files it again for the new deadline
//! (`TimerEntry::reset` → `extend_expiration`), without waking anyone. Only
//! a deadline moved sooner, or one set after the timer fired, goes through
//! the wheel.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::time::Sleep;

/// The wait did not finish in time.
#[derive(Debug)]
pub(super) struct Elapsed;

/// Made at the first wait that has to wait: a connection whose client
/// sends its request before the first read (most new connections) does
/// not allocate a client-side timer.
pub(super) struct Timer(Option<Pin<Box<Sleep>>>);

impl Timer {
    pub(super) fn new() -> Self {
        Self(None)
    }

    /// `fut`'s output, or [`Elapsed`] if it is not ready within `limit`.
    /// A future ready at its first poll does not touch the timer.
    pub(super) async fn within<F: Future>(
        &mut self,
        limit: Duration,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        self.until(Instant::now() + limit, fut).await
    }

    /// `fut`'s output, or [`Elapsed`] if it is not ready at `deadline`.
    pub(super) async fn until<F: Future>(
        &mut self,
        deadline: Instant,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        let mut fut = pin!(fut);
        let mut armed = false;
        poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let sleep = match &mut self.0 {
                Some(sleep) => {
                    if !armed {
                        sleep.as_mut().reset(deadline.into());
                    }
                    sleep
                }
                None => self
                    .0
                    .insert(Box::pin(tokio::time::sleep_until(deadline.into()))),
            };
            armed = true;
            sleep.as_mut().poll(cx).map(|()| Err(Elapsed))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> std::future::Pending<()> {
        std::future::pending()
    }

    /// Real time (the production clock, not tokio's paused one): each wait
    /// must not end before its deadline, and must end well before any
    /// other deadline the timer held.
    #[tokio::test]
    async fn each_wait_ends_at_its_own_deadline_whichever_way_it_moved() {
        let ms = Duration::from_millis;
        let mut timer = Timer::new();
        assert!(matches!(timer.within(ms(1000), async { 7 }).await, Ok(7)));

        // Registered for 1 s, finished at 0.1 s by the future.
        assert!(timer
            .within(ms(1000), tokio::time::sleep(ms(100)))
            .await
            .is_ok());
        // Moved later: the wheel still holds the 1 s slot, which must not
        // end this wait.
        let start = Instant::now();
        assert!(timer.within(ms(1500), never()).await.is_err());
        let took = start.elapsed();
        assert!(took >= ms(1500) && took < ms(2500), "{took:?}");

        // After firing, sooner than the last deadline.
        let start = Instant::now();
        assert!(timer.within(ms(300), never()).await.is_err());
        let took = start.elapsed();
        assert!(took >= ms(300) && took < ms(1300), "{took:?}");

        // Moved far later, then sooner, without firing in between.
        assert!(timer
            .within(ms(60_000), tokio::time::sleep(ms(10)))
            .await
            .is_ok());
        let start = Instant::now();
        assert!(timer.within(ms(400), never()).await.is_err());
        let took = start.elapsed();
        assert!(took >= ms(400) && took < ms(1400), "{took:?}");
    }
}
