//! Properties of the durable portal machine ([`DurablePortal`](mesa_core::DurablePortal))
//! over random faults, through the rig of `mesa_core::sim::durable_portal`, which
//! checks its invariants after every step: an entry is never handed out twice at
//! once, only handled entries are acknowledged, reads name held partitions only,
//! one read and one renewal in flight, outstanding events bounded, `Stopped` once.

use std::sync::OnceLock;
use std::time::Instant;

use mesa_core::sim::DurableRig;
use mesa_core::sim::durable_portal::{Answer, Step};
use proptest::prelude::*;

/// The one clock read of these tests; every other instant is an offset from it.
fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(|| {
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    })
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        12 => Just(Answer::Right),
        1 => Just(Answer::Wrong),
        1 => Just(Answer::Error),
        1 => Just(Answer::Lost),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<u8>(), prop::bool::weighted(0.9))
            .prop_map(|(partition, readable)| Step::Append { partition, readable }),
        1 => any::<u8>().prop_map(|partition| Step::Steal { partition }),
        1 => Just(Step::FreeLeases),
        2 => Just(Step::LinkUp),
        1 => Just(Step::LinkDown),
        8 => answer().prop_map(Step::Answer),
        4 => (any::<u16>(), prop::bool::weighted(0.8))
            .prop_map(|(index, ok)| Step::Settle { index, ok }),
        3 => (0u16..1500).prop_map(|ms| Step::Advance { ms }),
    ]
}

proptest! {
    /// Whatever the faults, once Redis and the application work again every entry
    /// ends acknowledged or dead-lettered: nothing is lost.
    #[test]
    fn nothing_is_lost_after_any_faults(
        steps in prop::collection::vec(step(), 0..120),
        seed in any::<u64>(),
    ) {
        let mut rig = DurableRig::new(seed, t0());
        for step in steps {
            rig.step(step);
        }
        rig.heal();
    }

    /// Closed at any moment (and again), the portal stops exactly once and asks
    /// nothing after.
    #[test]
    fn it_stops_exactly_once(
        before in prop::collection::vec(step(), 0..60),
        after in prop::collection::vec(prop_oneof![9 => step(), 1 => Just(Step::Close)], 0..30),
        seed in any::<u64>(),
    ) {
        let mut rig = DurableRig::new(seed, t0());
        for step in before {
            rig.step(step);
        }
        rig.step(Step::Close);
        for step in after {
            rig.step(step);
        }
        for _ in 0..50 {
            rig.step(Step::LinkUp);
            rig.step(Step::Answer(Answer::Right));
            rig.step(Step::Advance { ms: 400 });
        }
        prop_assert!(rig.stopped().is_some());
    }
}
