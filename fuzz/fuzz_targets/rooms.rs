//! Arbitrary text read as everything of rooms that comes from a peer: a client's
//! request (as a dispatch of an extended connection), a server's notice, a frame
//! with its room, and a room channel's payload from Redis (an envelope or a change
//! of presence).
//!
//! Invariants: nothing panics; whatever parses encodes back to something that
//! parses to the same value; a request's refusal names the reference it carried; a
//! valid room name is within the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesa_core::rooms::{
    RoomEnvelope, RoomNotice, RoomPayload, RoomRequest, check_room, decode_room_message,
};
use mesa_core::{Limits, Message};
use serde_json::Value;

fuzz_target!(|text: &str| {
    let limits = Limits::default();
    if let Ok(message) = Message::decode(text, &limits) {
        match RoomRequest::parse(&message, &limits) {
            Some(Ok(request)) => {
                let again = Message::decode(request.encode().as_str(), &limits).expect("ours");
                let parsed = RoomRequest::parse(&again, &limits);
                assert_eq!(parsed, Some(Ok(request.clone())), "round trip");
                let room = match &request {
                    RoomRequest::Subscribe { room, .. }
                    | RoomRequest::Unsubscribe { room, .. }
                    | RoomRequest::Publish { room, .. }
                    | RoomRequest::Presence { room, .. } => room,
                };
                assert!(check_room(room, &limits).is_ok(), "an invalid room passed");
                assert!(room.len() <= limits.max_room_name_bytes);
            }
            Some(Err(refused)) => {
                let reference = message.d.get("ref").cloned().unwrap_or(Value::Null);
                assert_eq!(refused.reference, reference, "the refusal's reference");
                let notice = RoomNotice::Refused(*refused);
                let again = Message::decode(notice.encode().as_str(), &limits).expect("ours");
                assert_eq!(RoomNotice::parse(&again), Some(notice));
            }
            None => {}
        }
        if let Some(notice) = RoomNotice::parse(&message) {
            let again = Message::decode(notice.encode().as_str(), &limits).expect("ours");
            assert_eq!(RoomNotice::parse(&again), Some(notice));
        }
    }
    let _ = decode_room_message(text, &limits);
    match RoomPayload::decode(text) {
        Ok(RoomPayload::Message(envelope)) => {
            assert_eq!(RoomEnvelope::decode(text), Ok(envelope), "one reading");
        }
        Ok(RoomPayload::Presence(change)) => {
            let again = RoomPayload::decode(&change.encode());
            assert_eq!(again, Ok(RoomPayload::Presence(change)), "round trip");
            assert!(RoomEnvelope::decode(text).is_err(), "never both");
        }
        Err(_) => {}
    }
    if let Ok(envelope) = RoomEnvelope::decode(text) {
        assert_eq!(
            RoomEnvelope::decode(&envelope.encode()),
            Ok(envelope),
            "round trip"
        );
    }
});
