//! The capture loop's drain timer: a periodic timer the kernel keeps
//! (timerfd), one wake-up per period.
//!
//! tokio's `interval` woke the thread twice per drain here: its timer wheel
//! wakes a few milliseconds early, then sleeps the rest (strace: an
//! `epoll_wait` that times out, another of 2-7 ms, then the drain), and
//! re-arming it wrote the runtime's eventfd once more. A wake-up costs this
//! VM ~70 us of CPU, so the drain timer was most of the sidecar's CPU at
//! rest.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, RawFd},
    time::Duration,
};

use nix::sys::{
    time::TimeSpec,
    timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
};
use tokio::io::unix::AsyncFd;

/// A timerfd, for [`AsyncFd`] (which wants `AsRawFd`).
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct Ticker(AsyncFd<Fd>);

impl Ticker {
    /// Ticks every `period`, the first one `period` from now. Must be
    /// called within the runtime.
    pub fn new(period: Duration) -> io::Result<Ticker> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC)?;
        fd.set(Expiration::Interval(TimeSpec::from_duration(period)), TimerSetTimeFlags::empty())?;
        // SAFETY: the AsyncFd owns the timerfd, so the fd outlives the registration.
        Ok(Ticker(unsafe { AsyncFd::register_with_interest(Fd(fd), tokio::io::Interest::READABLE) }?))
    }

    /// Waits for the next tick. Periods missed meanwhile (a long drain)
    /// make one tick, as tokio's `MissedTickBehavior::Delay` did.
    pub async fn tick(&mut self) {
        loop {
            let Ok(mut ready) = self.0.readable_mut().await else {
                // Only if the runtime's reactor is gone (shutdown): nothing
                // left to tick for.
                return std::future::pending().await;
            };
            // Reads the expiry count (8 bytes): every expiry so far is
            // consumed, so readiness is cleared at once (not by one more read
            // that finds nothing); the next expiry signals afresh.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(Ok(())) => {
                    ready.clear_ready();
                    return;
                }
                Ok(Err(e)) => {
                    tracing::error!("drain timer failed: {e}");
                    return std::future::pending().await;
                }
                // Readiness that was stale: wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test(flavor = "current_thread")]
    async fn ticks_once_per_period_and_folds_missed_ones() {
        let period = Duration::from_millis(20);
        let start = Instant::now();
        let mut t = Ticker::new(period).unwrap();
        for n in 1..=3 {
            t.tick().await;
            assert!(start.elapsed() >= period * n, "tick {n} came early: {:?}", start.elapsed());
        }
        // Three periods pass without a wait (expiries 4, 5 and 6): they make
        // one tick, so the one after it waits for the 7th. Lower bounds only
        // (the kernel never fires early), nothing a slow machine can break.
        std::thread::sleep(period * 3);
        t.tick().await;
        t.tick().await;
        assert!(start.elapsed() >= period * 7, "the missed periods ticked more than once: {:?}", start.elapsed());
    }
}
