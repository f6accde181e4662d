//! `Address` parsing (`str::parse`) on arbitrary UTF-8 text.
//!
//! Parsing must never panic. An address that parses must display to text
//! that parses back to an equal address, and that text is a fixpoint of
//! display. The typed views and the named-value form are exercised on every
//! parsed address; the named values must convert back to the same address.
//!
//! Allocation bound: proto/src/address.rs documents none, so the target
//! holds parsing to one linear in the text: no single allocation larger
//! than 24 bytes (`size_of::<String>()`) per byte of text plus 256 bytes.
//! The parser copies the input and its parts (at most the text's length
//! each) and keeps the dotted namespace of the connector as one `String`
//! per part: a part takes at least two bytes (`a.`), and a `Vec` holds at
//! most twice the elements it needs, so that list is at most 24 bytes per
//! byte of connector. The constant covers the fixed error texts. Checked
//! around `str::parse` (the input and its display) and `from_fields`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmesh_fuzz::check_allocation;
use qmesh_proto::{Address, AddressError};

/// The bound above for `len` bytes of text.
fn bound(len: usize) -> usize {
    std::mem::size_of::<String>() * len + 256
}

/// `str::parse::<Address>`, checked against the bound.
fn parse(text: &str) -> Result<Address, AddressError> {
    check_allocation(
        format_args!("parsing a {} byte address", text.len()),
        bound(text.len()),
        "24 bytes per byte of text plus 256: address.rs documents no bound",
        || text.parse::<Address>(),
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(address) = parse(text) else {
        return;
    };
    let shown = address.to_string();
    let again = parse(&shown)
        .unwrap_or_else(|e| panic!("{text:?} parsed, but its display {shown:?} does not: {e}"));
    assert_eq!(
        again, address,
        "{text:?} displays as {shown:?}, which parses differently"
    );
    assert_eq!(
        again.to_string(),
        shown,
        "display of {text:?} is not a fixpoint"
    );

    let _ = address.socket_addr(7447);
    let _ = address.mesh();
    let _ = address.quic_endpoint();
    let fields = address.to_fields();
    let back = check_allocation(
        format_args!("from_fields of {shown:?}"),
        bound(shown.len()),
        "24 bytes per byte of the address's text plus 256: address.rs documents no bound",
        || Address::from_fields(&fields),
    );
    assert_eq!(
        back.as_ref(),
        Ok(&address),
        "named values of {shown:?} do not convert back"
    );
});
