//! Random steps replayed against a `DurablePortal` through the rig of
//! `mesa_core::sim::durable_portal`, which plays the driver against a small model of
//! Redis streams: entries appended (readable or junk), leases taken by another
//! portal or freed, the link opening or failing, Redis answering the oldest command
//! rightly, wrongly, with an error or never, the application settling events, time
//! passing, closing (any number of times). The rig checks its invariants after every
//! step (see its docs); at the end, unless closed, healing must lose nothing.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesa_core::sim::DurableRig;
use mesa_core::sim::durable_portal::{Answer, Step};

#[derive(Arbitrary, Debug)]
enum Op {
    Append { partition: u8, readable: bool },
    Steal { partition: u8 },
    FreeLeases,
    LinkUp,
    LinkDown,
    Answer { how: How },
    Settle { index: u16, ok: bool },
    Advance { ms: u16 },
    Close,
}

#[derive(Arbitrary, Debug)]
enum How {
    Right,
    Wrong,
    Error,
    Lost,
}

fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fuzz_target!(|input: (u64, Vec<Op>)| {
    let (seed, ops) = input;
    let mut rig = DurableRig::new(seed, start());
    for op in ops.into_iter().take(2000) {
        rig.step(match op {
            Op::Append { partition, readable } => Step::Append { partition, readable },
            Op::Steal { partition } => Step::Steal { partition },
            Op::FreeLeases => Step::FreeLeases,
            Op::LinkUp => Step::LinkUp,
            Op::LinkDown => Step::LinkDown,
            Op::Answer { how } => Step::Answer(match how {
                How::Right => Answer::Right,
                How::Wrong => Answer::Wrong,
                How::Error => Answer::Error,
                How::Lost => Answer::Lost,
            }),
            Op::Settle { index, ok } => Step::Settle { index, ok },
            Op::Advance { ms } => Step::Advance { ms },
            Op::Close => Step::Close,
        });
    }
    rig.heal();
});
