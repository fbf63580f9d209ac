//! The payloads other processes put in Redis: the `ws` envelope, portal events, portal
//! pool updates and an id's stored message array.
//!
//! Invariants: decoding never panics, and whatever decodes re-encodes to a payload
//! that decodes to the same value (and re-encodes to the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesa_core::sync::{decode_stored, encode_stored};
use mesa_core::{Envelope, PortalEvent, PortalUpdate, Recipients};

fn envelope(text: &str) {
    let Ok(envelope) = Envelope::decode(text) else {
        return;
    };
    assert_eq!(envelope.message.s, None, "an envelope carries no sequence");
    if let Recipients::Ids(ids) = &envelope.recipients {
        assert!(!ids.iter().any(|id| id == "*"), "`*` must mean everyone");
    }
    let encoded = envelope.encode();
    let again = Envelope::decode(&encoded);
    assert_eq!(
        again.as_ref(),
        Ok(&envelope),
        "envelope {encoded} (from {text:?}) did not round-trip"
    );
    assert_eq!(
        again.unwrap().encode(),
        encoded,
        "envelope encoding is not stable"
    );
}

fn portal_event(text: &str) {
    let Ok(event) = PortalEvent::decode(text) else {
        return;
    };
    let encoded = event.encode();
    let again = PortalEvent::decode(&encoded);
    assert_eq!(
        again.as_ref(),
        Ok(&event),
        "portal event {encoded} (from {text:?}) did not round-trip"
    );
    assert_eq!(
        again.unwrap().encode(),
        encoded,
        "portal event encoding is not stable"
    );
}

fn portal_update(text: &str) {
    let Ok(update) = PortalUpdate::decode(text) else {
        return;
    };
    let encoded = update.encode();
    let again = PortalUpdate::decode(&encoded);
    assert_eq!(
        again.as_ref(),
        Ok(&update),
        "portal update {encoded} (from {text:?}) did not round-trip"
    );
}

fn stored(text: &str) {
    let Ok((messages, skipped)) = decode_stored(text) else {
        return;
    };
    assert!(
        messages.iter().all(|m| m.s.is_none()),
        "stored messages carry no sequence"
    );
    let entries: Vec<String> = messages.iter().map(encode_stored).collect();
    let encoded = format!("[{}]", entries.join(","));
    let again = decode_stored(&encoded);
    assert_eq!(
        again,
        Ok((messages, 0)),
        "stored array {encoded} (from {text:?}, {skipped} skipped) did not round-trip"
    );
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    envelope(&text);
    portal_event(&text);
    portal_update(&text);
    stored(&text);
});
