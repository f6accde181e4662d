//! The coordinator's TOML config file (coordinator/src/file.rs) and its
//! `[policy]` table (coordinator/src/policy.rs) on arbitrary UTF-8 text.
//!
//! The text goes to `file::check_text`, as `qmesh-coordinator run --config`
//! and `policy check` give it (through `check_file`), with relative paths
//! taken from corpus/cert (so `client_ca = "ca.pem"` in `ca` mode loads a
//! real CA certificate). When it checks and has a policy:
//! - the policy has one rule per `[[policy.allow]]`;
//! - for each of the first 16 rules, names made from its `from`, `to` and
//!   `channels` entries (groups expanded; each `*` dropped and each `?` made
//!   `a`) are allowed, and direct when the rule says `direct = true`;
//! - `decide` on up to 5 names the text contains (runs of a-z 0-9 . _ -),
//!   each against each, does not panic; without rules everything is denied.
//!
//! None of it may panic.
//!
//! Allocation bound, around `check_text`: no single allocation larger than
//! 80 bytes per byte of text plus 4 KiB. file.rs documents none
//! (`check_file` only caps the file at 1 MiB), so the bound is linear in
//! the text: the toml parser keeps every token and event of the text in
//! `Vec`s of 24-byte entries, and a dotted key keeps one 40-byte key per
//! `.` (text of dots only: one key per byte), in a `Vec` up to twice as
//! large as needed: at most 80 bytes per byte. The fixed part covers error
//! texts and reading the 550-byte CA file in ca mode (under 1.1 KiB
//! measured). Two findings break this bound, log filters with regexes and
//! policy groups named many times (fuzz/README.md, "Findings"; inputs in
//! fuzz/artifacts-found/config).
//!
//! check_text reads one file: `[auth] client_ca` in `ca` mode. Inputs whose
//! client_ca is absolute or leaves the base directory (`..`) are skipped, so
//! that the fuzzer cannot make it read /dev/zero and the like.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use qmesh_coordinator::file::{check_text, FileConfig};
use qmesh_coordinator::policy::{Decision, Policy, PolicySpec};
use qmesh_fuzz::check_allocation;

/// Relative paths in the config are taken from here; it holds `ca.pem`.
const BASE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/cert");

/// A name `pattern` matches: each `*` dropped, each `?` made `a`.
fn name_for(pattern: &str) -> String {
    pattern
        .chars()
        .filter(|&c| c != '*')
        .map(|c| if c == '?' { 'a' } else { c })
        .collect()
}

/// The entries of a rule field with `@group` expanded, as names.
fn names(spec: &PolicySpec, list: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for item in list {
        match item.strip_prefix('@') {
            Some(group) => out.extend(spec.groups[group].iter().map(|m| name_for(m))),
            None => out.push(name_for(item)),
        }
    }
    out
}

fn check_policy(spec: &PolicySpec, policy: &Policy, text: &str) {
    assert_eq!(
        policy.len(),
        spec.allow.len(),
        "one rule per [[policy.allow]]"
    );
    assert_eq!(policy.is_empty(), spec.allow.is_empty());
    for (i, rule) in spec.allow.iter().enumerate().take(16) {
        let from = names(spec, &rule.from);
        let to = names(spec, &rule.to);
        let channels = names(spec, &rule.channels);
        for f in from.iter().take(4) {
            for t in to.iter().take(4) {
                for c in channels.iter().take(4) {
                    match policy.decide(f, t, c) {
                        Decision::Allow { direct } => assert!(
                            direct || !rule.direct,
                            "rule {} says direct, but {f} -> {t}!{c} is relayed only",
                            i + 1
                        ),
                        Decision::Deny => {
                            panic!("rule {} allows {f} -> {t}!{c}, but it is denied", i + 1)
                        }
                    }
                }
            }
        }
    }
    // Names in the text, each against each.
    let mut words: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)))
        .filter(|w| !w.is_empty())
        .collect();
    words.sort_unstable();
    words.dedup();
    words.truncate(5);
    for f in &words {
        for t in &words {
            for c in &words {
                let d = policy.decide(f, t, c);
                if policy.is_empty() {
                    assert_eq!(
                        d,
                        Decision::Deny,
                        "a policy without rules allowed {f} -> {t}!{c}"
                    );
                }
            }
        }
    }
}

/// Bytes of a single allocation per byte of text (see above).
const PER_BYTE: usize = 80;
/// The fixed part of the bound (see above).
const FIXED: usize = 4096;

/// Whether `path` stays inside the base directory.
fn inside(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        if file.auth.client_ca.as_deref().is_some_and(|p| !inside(p)) {
            return;
        }
    }
    let result = check_allocation(
        format_args!("check_text of {} bytes", text.len()),
        PER_BYTE * text.len() + FIXED,
        "80 bytes per byte of text plus 4 KiB: file.rs documents no bound",
        || check_text(text, Path::new(BASE)),
    );
    let checked = match result {
        Ok(checked) => checked,
        Err(errors) => {
            assert!(!errors.is_empty(), "check_text failed with no error");
            return;
        }
    };
    match (&checked.file.policy, &checked.policy) {
        (Some(spec), Some(policy)) => check_policy(spec, policy, text),
        (None, None) => {}
        (spec, policy) => panic!("policy table {spec:?} checked as {policy:?}"),
    }
    for d in [
        checked.cert_ttl,
        checked.hello_timeout,
        checked.idle_timeout,
        checked.burst,
        checked.flood_after,
    ]
    .into_iter()
    .flatten()
    {
        assert!(!d.is_zero(), "a checked duration is zero");
    }
});
