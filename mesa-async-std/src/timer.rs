//! The timer the driver arms: async-io's, shared by every runtime of this crate.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use async_io::Timer;

/// The future of [`Runtime::sleep_until`](mesa_driver::Runtime::sleep_until): an
/// [`async_io::Timer`] that completes with `()` (the driver wants no instant back).
#[derive(Debug)]
#[must_use = "a timer does nothing unless polled"]
pub struct Sleep(Timer);

impl Sleep {
    /// A timer firing at `deadline` (on the same clock as `Instant::now`).
    pub(crate) fn until(deadline: Instant) -> Self {
        Sleep(Timer::at(deadline))
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(drop)
    }
}
