//! Unit tests of the core's timed pieces that need one real `Instant` to start from
//! (the core itself never reads a clock, so they live outside `src`).

use std::time::{Duration, Instant};

use mesa_core::rate::TokenBucket;
use mesa_core::{Message, Redelivery, SessionEvent};
use serde_json::json;

fn start() -> Instant {
    // The one clock read of these tests; every other instant is an offset.
    #[allow(clippy::disallowed_methods)]
    Instant::now()
}

#[test]
fn a_full_bucket_admits_its_burst_then_refills_at_the_rate() {
    let t0 = start();
    let mut bucket = TokenBucket::new(100, 200, t0);
    assert_eq!(bucket.available(t0), 200);
    let admitted = (0..1000).filter(|_| bucket.try_take(t0)).count();
    assert_eq!(admitted, 200);
    assert!(!bucket.try_take(t0));
    // 10 ms earns one token at 100/s.
    let later = t0 + Duration::from_millis(10);
    assert_eq!(bucket.available(later), 1);
    assert!(bucket.try_take(later));
    assert!(!bucket.try_take(later));
    // Two idle seconds fill it again, and no further.
    let idle = later + Duration::from_secs(5);
    assert_eq!(bucket.available(idle), 200);
}

#[test]
fn the_next_token_is_due_exactly_when_the_bucket_admits_again() {
    let t0 = start();
    let mut bucket = TokenBucket::new(100, 3, t0);
    assert_eq!(bucket.next_token_at(t0), t0, "a full bucket has one now");
    while bucket.try_take(t0) {}
    let at = bucket.next_token_at(t0);
    assert_eq!(at, t0 + Duration::from_millis(10));
    assert_eq!(bucket.available(at - Duration::from_nanos(1)), 0);
    assert!(!bucket.clone().try_take(at - Duration::from_nanos(1)));
    assert!(bucket.try_take(at));
    assert_eq!(bucket.next_token_at(at), at + Duration::from_millis(10));
}

#[test]
fn a_steady_sender_at_the_rate_is_never_refused() {
    let t0 = start();
    let mut bucket = TokenBucket::new(100, 1, t0);
    for i in 0..10_000 {
        assert!(bucket.try_take(t0 + Duration::from_millis(10 * i)), "{i}");
    }
}

#[test]
fn rounding_never_admits_more_than_the_rate() {
    // 1 s / 3 is not a whole number of nanoseconds: the cost rounds up.
    let t0 = start();
    let mut bucket = TokenBucket::new(3, 1, t0);
    let admitted = (0..=1_000_000u64)
        .filter(|us| bucket.try_take(t0 + Duration::from_micros(*us)))
        .count();
    assert!(admitted <= 1 + 3, "{admitted}");
}

#[test]
fn time_going_backwards_admits_nothing_extra() {
    let t0 = start();
    let later = t0 + Duration::from_secs(1);
    let mut bucket = TokenBucket::new(10, 2, later);
    assert!(bucket.try_take(later));
    assert!(!bucket.try_take(t0));
    assert!(bucket.try_take(later));
    assert!(!bucket.try_take(later));
}

#[test]
fn redelivery_keeps_the_newest_and_numbers_from_one() {
    let start = start();
    let stored: Vec<Message> = (0..5).map(|i| Message::dispatch("N", json!(i))).collect();
    let mut redelivery = Redelivery::new("a".into(), stored, 3, Duration::from_millis(10), start);
    let first = redelivery.poll(start).unwrap();
    assert_eq!((first.d.clone(), first.s), (json!(2), Some(1)));
    assert!(redelivery.poll(start).is_none(), "paced");
    let at = redelivery.poll_timeout().unwrap();
    assert_eq!(redelivery.poll(at).unwrap().s, Some(2));
    let at = redelivery.poll_timeout().unwrap();
    assert_eq!(redelivery.poll(at).unwrap().d, json!(4));
    assert_eq!(redelivery.poll_timeout(), None);
    assert_eq!(
        redelivery.finished_event(),
        SessionEvent::Redelivered {
            id: "a".into(),
            delivered: 3,
            dropped: 2
        }
    );
}
