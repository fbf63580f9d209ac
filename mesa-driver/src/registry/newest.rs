//! A value observers are told after the registry's lock is released, the newest
//! last. Two inputs that settle at once take their values under the lock in one
//! order but may release it and tell in the other: told as they come, the older
//! value would be the last one heard (a gauge left stale until the next change).

use std::sync::{Mutex, TryLockError};

use super::conn::lock;

/// The newest value not yet told, and who is telling.
pub(crate) struct Newest<T> {
    /// Set under the registry's lock, so a later value replaces an earlier one.
    pending: Mutex<Option<T>>,
    /// Held by the one thread telling: values are told one at a time, in order.
    telling: Mutex<()>,
}

impl<T> Newest<T> {
    /// Nothing pending, nobody telling.
    pub(crate) fn new() -> Self {
        Newest {
            pending: Mutex::new(None),
            telling: Mutex::new(()),
        }
    }

    /// `value` is the newest (call it under the registry's lock).
    pub(crate) fn set(&self, value: T) {
        *lock(&self.pending) = Some(value);
    }

    /// Tell `observe` what is pending, unless another thread is telling: that one
    /// tells it, as it looks again once it stopped. An observer that causes a new
    /// value (it feeds the registry) finds the telling taken and returns, and the
    /// loop tells its value next.
    pub(crate) fn tell(&self, mut observe: impl FnMut(T)) {
        loop {
            let telling = match self.telling.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            loop {
                // Taken in a statement of its own: the guard is released before the
                // observer runs (it may set a value).
                let pending = lock(&self.pending).take();
                let Some(value) = pending else {
                    break;
                };
                observe(value);
            }
            drop(telling);
            if lock(&self.pending).is_none() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_last_value_told_is_the_newest_whatever_the_threads_do() {
        for _ in 0..200 {
            let newest = Arc::new(Newest::new());
            let told = Arc::new(Mutex::new(Vec::new()));
            // The values are set in order under one lock, as the registry does.
            let order = Arc::new(Mutex::new(0u32));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (newest, told, order) = (newest.clone(), told.clone(), order.clone());
                    std::thread::spawn(move || {
                        for _ in 0..50 {
                            {
                                let mut next = lock(&order);
                                *next += 1;
                                newest.set(*next);
                            }
                            newest.tell(|value| lock(&told).push(value));
                        }
                    })
                })
                .collect();
            threads.into_iter().for_each(|t| t.join().unwrap());
            let told = lock(&told);
            assert_eq!(told.last(), Some(&200));
            assert!(told.windows(2).all(|w| w[0] < w[1]), "{told:?}");
        }
    }

    #[test]
    fn an_observer_that_sets_a_value_has_it_told_after_its_own() {
        let newest = Newest::new();
        newest.set(1);
        let mut told = Vec::new();
        newest.tell(|value| {
            told.push(value);
            if value == 1 {
                newest.set(2);
                newest.tell(|_| unreachable!("the outer loop tells it"));
            }
        });
        assert_eq!(told, [1, 2]);
    }
}
