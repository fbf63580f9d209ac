//! Random steps replayed against a `PortalMember` through the rig of
//! `mesa_core::sim::portal`, which plays the driver against the model of Redis: the
//! link opening (with Redis restarted, its keys lost) or failing, Redis answering
//! the oldest command or the `PING` rightly, wrongly, with an error or never, stale
//! answers, client events addressed to it or to another portal, garbage bytes on
//! its channel or another, time passing, and closing (any number of times).
//!
//! Invariants (checked by the rig after every step, see its docs): unique tokens,
//! nothing asked without a link or after stopping, one `PING` at a time, only
//! events addressed to it unless it reports all, announcements that follow the
//! set, `Joined` only when Redis holds the id, one `SREM` and one `Stopped` at most
//! (`Ok` only when Redis no longer holds the id), the backoff within its cap,
//! timeouts idempotent; and once the link works, a portal not closed is back in
//! the pool and a closed one has stopped.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesa_core::sim::PortalRig;
use mesa_core::sim::portal::{Answer, Step};

#[derive(Arbitrary, Debug)]
enum Op {
    LinkUp { restarted: bool },
    LinkDown,
    Answer { ping: bool, how: How },
    Stale { token: u8 },
    Event { to_me: bool },
    Garbage { elsewhere: bool, bytes: Vec<u8> },
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

fuzz_target!(|input: (bool, u64, Vec<Op>)| {
    let (report_all, seed, ops) = input;
    let mut rig = PortalRig::new(report_all, seed, start());
    for op in ops {
        rig.step(match op {
            Op::LinkUp { restarted } => Step::LinkUp { restarted },
            Op::LinkDown => Step::LinkDown,
            Op::Answer { ping, how } => {
                let how = match how {
                    How::Right => Answer::Right,
                    How::Wrong => Answer::Wrong,
                    How::Error => Answer::Error,
                    How::Lost => Answer::Lost,
                };
                Step::Answer { ping, how }
            }
            Op::Stale { token } => Step::Stale {
                token: u64::from(token),
            },
            Op::Event { to_me } => Step::Event { to_me },
            Op::Garbage { elsewhere, bytes } => Step::Garbage { elsewhere, bytes },
            Op::Advance { ms } => Step::Advance { ms },
            Op::Close => Step::Close,
        });
    }
    rig.heal();
});
