//! `Address` parsing (`str::parse`) on arbitrary UTF-8 text.
//!
//! Parsing must never panic. An address that parses must display to text
//! that parses back to an equal address, and that text is a fixpoint of
//! display. The typed views and the named-value form are exercised on every
//! parsed address; the named values must convert back to the same address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmesh_proto::Address;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(address) = text.parse::<Address>() else {
        return;
    };
    let shown = address.to_string();
    let again = shown
        .parse::<Address>()
        .unwrap_or_else(|e| panic!("{text:?} parsed, but its display {shown:?} does not: {e}"));
    assert_eq!(again, address, "{text:?} displays as {shown:?}, which parses differently");
    assert_eq!(again.to_string(), shown, "display of {text:?} is not a fixpoint");

    let _ = address.socket_addr(7447);
    let _ = address.mesh();
    let _ = address.quic_endpoint();
    let fields = address.to_fields();
    assert_eq!(
        Address::from_fields(&fields).as_ref(),
        Ok(&address),
        "named values of {shown:?} do not convert back"
    );
});
