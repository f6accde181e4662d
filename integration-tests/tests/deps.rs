//! Cargo.lock keeps the QUIC and TLS stacks at or above the releases with
//! known remote denial-of-service fixes.

use std::path::Path;

/// Every version of `name` in Cargo.lock.
fn locked_versions(lock: &str, name: &str) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut current: Option<&str> = None;
    for line in lock.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            current = None;
        } else if let Some(n) = line.strip_prefix("name = ") {
            current = Some(n.trim_matches('"'));
        } else if let Some(v) = line.strip_prefix("version = ") {
            if current == Some(name) {
                let parts: Vec<u64> = v
                    .trim_matches('"')
                    .split(['.', '-', '+'])
                    .take(3)
                    .map(|p| p.parse().unwrap_or(0))
                    .collect();
                if let [a, b, c] = parts[..] {
                    out.push((a, b, c));
                }
            }
        }
    }
    out
}

#[test]
fn quinn_proto_and_rustls_are_at_or_above_their_dos_fixes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lock = std::fs::read_to_string(&path).expect("reading Cargo.lock");
    for (name, floor) in [("quinn-proto", (0, 11, 19)), ("rustls", (0, 23, 46))] {
        let found = locked_versions(&lock, name);
        assert!(!found.is_empty(), "{name} is not in Cargo.lock");
        for v in found {
            assert!(
                v >= floor,
                "Cargo.lock has {name} {}.{}.{}, below {}.{}.{} (known remote \
                 denial-of-service fixes): run `cargo update -p {name}`",
                v.0,
                v.1,
                v.2,
                floor.0,
                floor.1,
                floor.2
            );
        }
    }
}

#[test]
fn the_version_reader_sees_old_versions() {
    let lock = "[[package]]\nname = \"rustls\"\nversion = \"0.23.45\"\n\n[[package]]\nname = \"other\"\nversion = \"9.9.9\"\n";
    assert_eq!(locked_versions(lock, "rustls"), vec![(0, 23, 45)]);
    assert!(locked_versions(lock, "rustls")[0] < (0, 23, 46));
}
