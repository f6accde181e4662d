//! Access control: which clients may open which channels on which peers,
//! and which channels may go direct.
//!
//! The policy is the `[policy]` table of the coordinator's TOML config:
//!
//! ```toml
//! [policy.groups]
//! ops = ["alice", "bob"]
//! sensors = ["sensor-*"]
//!
//! [[policy.allow]]
//! from = ["@sensors"]          # names, `*`/`?` patterns, or @group
//! to = ["collector"]
//! channels = ["metrics", "logs-*"]
//!
//! [[policy.allow]]
//! from = ["@ops"]
//! to = ["*"]
//! channels = ["*"]
//! direct = true                # may go peer to peer (default false)
//! ```
//!
//! Without a `[policy]` table everything is allowed, direct paths too.
//! With one, an open is allowed when some rule lists the opener in `from`,
//! the callee in `to` and the channel in `channels`; everything else is
//! denied. A channel may go direct when a rule that allows it says
//! `direct = true`; otherwise it stays relayed.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

/// The `[policy]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Named lists of client names or patterns, referred to as `@name`.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// The rules; an open is allowed when one matches.
    #[serde(default)]
    pub allow: Vec<RuleSpec>,
}

/// One `[[policy.allow]]` rule as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Openers: names, patterns or `@group`.
    pub from: Vec<String>,
    /// Callees: names, patterns or `@group`.
    pub to: Vec<String>,
    /// Channel names or patterns.
    pub channels: Vec<String>,
    /// Whether the channels this rule allows may go direct.
    #[serde(default)]
    pub direct: bool,
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// A rule's names or patterns: each entry one written name or pattern, or
/// the members of a group it names. A group's members are held once and
/// shared by every rule that names it, so a policy's memory grows with
/// the file, not with groups times mentions (copying them, a 3,676-byte
/// file asked for 4.9 MB at once; found by the `config` fuzz target).
type Entries = Vec<Arc<[String]>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    from: Entries,
    to: Entries,
    channels: Entries,
    direct: bool,
}

/// What the policy says about one open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Denied.
    Deny,
    /// Allowed; `direct` says whether it may go peer to peer.
    Allow {
        /// A direct path is allowed.
        direct: bool,
    },
}

fn matches_any(entries: &[Arc<[String]>], name: &str) -> bool {
    entries
        .iter()
        .flat_map(|e| e.iter())
        .any(|p| crate::token::pattern_matches(p, name))
}

/// Whether `pattern` is a name with at most `*` and `?` wildcards.
fn pattern_ok(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 64
        && pattern
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-*?".contains(c))
}

impl Policy {
    /// Allow everything, direct paths too (no `[policy]` table).
    pub fn allow_all() -> Policy {
        let all: Entries = vec![Arc::from(vec!["*".to_owned()])];
        Policy {
            rules: vec![Rule {
                from: all.clone(),
                to: all.clone(),
                channels: all,
                direct: true,
            }],
        }
    }

    /// Check a spec; every error is reported, each naming its rule.
    pub fn from_spec(spec: &PolicySpec) -> Result<Policy, Vec<String>> {
        let mut errors = Vec::new();
        for (group, members) in &spec.groups {
            if !pattern_ok(group) || group.contains(['*', '?']) {
                errors.push(format!(
                    "group name `{group}` must be a plain name (a-z 0-9 . _ -)"
                ));
            }
            for m in members {
                if !pattern_ok(m) {
                    errors.push(format!(
                        "group `{group}`: `{m}` is not a client name or pattern (a-z 0-9 . _ - * ?)"
                    ));
                }
            }
        }
        let groups: BTreeMap<&str, Arc<[String]>> = spec
            .groups
            .iter()
            .map(|(name, members)| (name.as_str(), Arc::from(members.clone())))
            .collect();
        let mut rules = Vec::new();
        for (i, r) in spec.allow.iter().enumerate() {
            let at = format!("rule {} (allow #{})", i + 1, i + 1);
            let mut expand = |field: &str, list: &[String], groups_ok: bool| -> Entries {
                if list.is_empty() {
                    errors.push(format!(
                        "{at}: `{field}` is empty, so the rule allows nothing"
                    ));
                }
                let mut out = Vec::new();
                for item in list {
                    if let Some(g) = item.strip_prefix('@') {
                        if !groups_ok {
                            errors.push(format!("{at}: `{field}` cannot name groups (`{item}`)"));
                        } else if let Some(members) = groups.get(g) {
                            out.push(members.clone());
                        } else {
                            errors.push(format!("{at}: `{field}` names group `{g}`, which is not defined in [policy.groups]"));
                        }
                    } else if pattern_ok(item) {
                        out.push(Arc::from(vec![item.clone()]));
                    } else {
                        errors.push(format!(
                            "{at}: `{field}` entry `{item}` is not a name or pattern (a-z 0-9 . _ - * ?)"
                        ));
                    }
                }
                out
            };
            let from = expand("from", &r.from, true);
            let to = expand("to", &r.to, true);
            let channels = expand("channels", &r.channels, false);
            rules.push(Rule {
                from,
                to,
                channels,
                direct: r.direct,
            });
        }
        if errors.is_empty() {
            Ok(Policy { rules })
        } else {
            Err(errors)
        }
    }

    /// What the policy says about `from` opening `channel` on `to`.
    pub fn decide(&self, from: &str, to: &str, channel: &str) -> Decision {
        let mut decision = Decision::Deny;
        for r in &self.rules {
            if matches_any(&r.from, from)
                && matches_any(&r.to, to)
                && matches_any(&r.channels, channel)
            {
                if r.direct {
                    return Decision::Allow { direct: true };
                }
                decision = Decision::Allow { direct: false };
            }
        }
        decision
    }

    /// How many rules it has.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether it has none (denies everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, Vec<String>> {
        #[derive(Deserialize)]
        struct File {
            policy: PolicySpec,
        }
        let f: File = toml::from_str(text).unwrap();
        Policy::from_spec(&f.policy)
    }

    #[test]
    fn rules_allow_what_they_list_and_nothing_else() {
        let p = parse(
            r#"
            [policy.groups]
            ops = ["alice", "bob"]
            [[policy.allow]]
            from = ["sensor-*"]
            to = ["collector"]
            channels = ["metrics", "logs-*"]
            [[policy.allow]]
            from = ["@ops"]
            to = ["*"]
            channels = ["*"]
            direct = true
            "#,
        )
        .unwrap();
        assert_eq!(
            p.decide("sensor-1", "collector", "logs-a"),
            Decision::Allow { direct: false }
        );
        assert_eq!(p.decide("sensor-1", "collector", "shell"), Decision::Deny);
        assert_eq!(p.decide("sensor-1", "alice", "metrics"), Decision::Deny);
        assert_eq!(
            p.decide("bob", "sensor-9", "shell"),
            Decision::Allow { direct: true }
        );
        assert_eq!(p.decide("carol", "bob", "chat"), Decision::Deny);
        assert_eq!(
            Policy::allow_all().decide("x", "y", "z"),
            Decision::Allow { direct: true }
        );
    }

    #[test]
    fn every_error_is_reported() {
        let errs = parse(
            r#"
            [policy.groups]
            "Bad Group" = ["UPPER"]
            [[policy.allow]]
            from = ["@nobody"]
            to = []
            channels = ["@ops", "ok"]
            "#,
        )
        .unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:#?}");
        assert!(
            errs.iter().any(|e| e.contains("group `nobody`")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("`to` is empty")),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_name_or_pattern_is_1_to_64_of_the_allowed_characters() {
        for good in ["a", "sensor-*", "x.y_z-1?", &"a".repeat(64)] {
            assert!(pattern_ok(good), "{good}");
        }
        for bad in ["", "Alice", "a b", "a/b", "@ops", &"a".repeat(65)] {
            assert!(!pattern_ok(bad), "{bad}");
        }
    }

    #[test]
    fn group_names_are_plain_names() {
        let errs = parse(
            r#"
            [policy.groups]
            "ops-*" = ["alice"]
            ok = ["bob"]
            "#,
        )
        .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].contains("group name `ops-*`"), "{errs:#?}");
    }

    #[test]
    fn a_rule_needs_its_opener_callee_and_channel_to_match() {
        let p = parse(
            r#"
            [policy.groups]
            ops = ["alice"]
            [[policy.allow]]
            from = ["@ops"]
            to = ["bob"]
            channels = ["shell"]
            "#,
        )
        .unwrap();
        assert_eq!(p.len(), 1);
        assert!(!p.is_empty());
        assert_eq!(
            p.decide("alice", "bob", "shell"),
            Decision::Allow { direct: false }
        );
        // Each of the three alone is not enough.
        assert_eq!(p.decide("carol", "bob", "shell"), Decision::Deny);
        assert_eq!(p.decide("alice", "carol", "shell"), Decision::Deny);
        assert_eq!(p.decide("alice", "bob", "web"), Decision::Deny);
        assert_eq!(p.decide("bob", "alice", "shell"), Decision::Deny);
    }

    #[test]
    fn any_allowing_rule_that_says_direct_makes_the_channel_direct() {
        let p = parse(
            r#"
            [[policy.allow]]
            from = ["*"]
            to = ["*"]
            channels = ["*"]
            [[policy.allow]]
            from = ["alice"]
            to = ["*"]
            channels = ["*"]
            direct = true
            [[policy.allow]]
            from = ["*"]
            to = ["*"]
            channels = ["logs"]
            "#,
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(
            p.decide("alice", "bob", "logs"),
            Decision::Allow { direct: true }
        );
        assert_eq!(
            p.decide("bob", "alice", "logs"),
            Decision::Allow { direct: false }
        );
    }

    #[test]
    fn an_empty_policy_denies_everything() {
        let p = parse("[policy]\n").unwrap();
        assert!(p.is_empty());
        assert_eq!(p.len(), 0);
        assert_eq!(p.decide("alice", "bob", "shell"), Decision::Deny);
        assert_eq!(Policy::allow_all().len(), 1);
        assert!(!Policy::allow_all().is_empty());
    }

    /// A group named many times is held once: 400 members named 400 times
    /// in one rule (and in another) is one shared list per mention, and
    /// decides as the copies did.
    #[test]
    fn a_group_named_many_times_is_shared_not_copied() {
        let members: Vec<String> = (0..400).map(|i| format!("m{i}")).collect();
        let mentions = vec!["@g".to_owned(); 400];
        let spec = PolicySpec {
            groups: [("g".to_owned(), members)].into_iter().collect(),
            allow: vec![
                RuleSpec {
                    from: mentions.clone(),
                    to: vec!["hub".into()],
                    channels: vec!["*".into()],
                    direct: false,
                },
                RuleSpec {
                    from: vec!["hub".into()],
                    to: mentions,
                    channels: vec!["c".into()],
                    direct: true,
                },
            ],
        };
        let p = Policy::from_spec(&spec).unwrap();
        let shared =
            |entries: &Entries| entries.iter().all(|e| Arc::ptr_eq(e, &p.rules[0].from[0]));
        assert!(shared(&p.rules[0].from) && shared(&p.rules[1].to));
        assert_eq!(
            p.decide("m399", "hub", "x"),
            Decision::Allow { direct: false }
        );
        assert_eq!(p.decide("hub", "m0", "c"), Decision::Allow { direct: true });
        assert_eq!(p.decide("m400", "hub", "x"), Decision::Deny);
    }
}
