//! Opening a channel, decided: plain functions with no I/O.
//!
//! [`decide`] takes the opener, its request, the callee as the registry
//! has it, the policy in force and the channel limit, and returns an
//! [`OpenPlan`] (what to offer the callee, what to tell both sides once it
//! accepts) or a [`Refusal`] (the `OpenFailCode` and its sentence).
//! [`judge_answer`] does the same for the callee's answer, and
//! [`introduce`] for the direct-path introductions. The `channel` module
//! does the I/O the plan says.

use std::net::SocketAddr;
use std::time::Duration;

use qmesh_proto::codes::{ConnCode, OpenFailCode};
use qmesh_proto::limits::clip_reason;
use qmesh_proto::manifest::Interface;
use qmesh_proto::msg::{Incoming, IncomingAnswer, PathMode, PeerIntro, Ready};
use qmesh_proto::name::{validate_channel_name, validate_client_name};
use qmesh_proto::{ChannelId, SessionId};

use crate::policy::{Decision, Policy};
use qmesh_proto::codec::Read;

/// One side of an open, as the decision sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Party<'a> {
    /// Its client name.
    pub(crate) name: &'a str,
    /// The addresses it reported, or `None` when it cannot take direct
    /// channels.
    pub(crate) direct: Option<&'a [SocketAddr]>,
    /// Channels it is part of now (joined or being opened).
    pub(crate) channels: usize,
}

/// The callee as the registry has it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Callee<'a> {
    /// The callee's side.
    pub(crate) party: Party<'a>,
    /// The interfaces it declares (empty: it declares none).
    pub(crate) interfaces: &'a [Interface],
}

/// What the opener asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    /// The callee's name.
    pub(crate) peer: &'a str,
    /// The channel name.
    pub(crate) channel: &'a str,
    /// The path the opener wants.
    pub(crate) path: PathMode,
}

/// An open that may go ahead: offer it to the callee, and on its accept
/// tell both sides `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenPlan {
    /// The path the channel takes: the opener's, or relay when the policy
    /// allows no direct path.
    pub(crate) path: PathMode,
    /// The callee's declared interface for the channel, when it declares
    /// any.
    pub(crate) interface: Option<Interface>,
}

impl OpenPlan {
    /// The offer to the callee.
    pub(crate) fn incoming(&self, from: &str, channel: &str) -> Incoming {
        Incoming {
            from: from.into(),
            channel: channel.into(),
            path: self.path,
        }
    }

    /// Whether the two sides are introduced for a direct path on join.
    pub(crate) fn introduces(&self) -> bool {
        self.path != PathMode::Relay
    }

    /// The `Ready` for one side of joined channel `number`, with its
    /// introduction to the other side, if any.
    pub(crate) fn ready(&self, number: ChannelId, peer: Option<PeerIntro>) -> Ready {
        Ready {
            channel: number,
            peer,
            interface: self.interface.clone(),
        }
    }
}

/// Why an open failed: what the opener is told in `OpenAnswer::Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The typed reason.
    pub(crate) code: OpenFailCode,
    /// What happened and what to do, in a sentence.
    pub(crate) message: String,
}

impl Refusal {
    fn new(code: OpenFailCode, message: String) -> Self {
        Self { code, message }
    }

    /// `who` ("this client is" / "the peer is") is in `max` channels.
    pub(crate) fn too_many_channels(who: &str, max: usize) -> Self {
        Self::new(
            OpenFailCode::TooManyChannels,
            format!(
                "{who} already in {max} channels, the most this coordinator allows one \
                 client; close some first"
            ),
        )
    }

    /// No client named `peer` is connected.
    pub(crate) fn not_present(peer: &str) -> Self {
        Self::new(
            OpenFailCode::PeerNotPresent,
            format!(
                "peer not present: no client named \"{peer}\" is connected to this coordinator"
            ),
        )
    }

    /// `peer` is a client of coordinator `member`, and there is no live
    /// link to it.
    pub(crate) fn unlinked(peer: &str, member: &str) -> Self {
        Self::new(
            OpenFailCode::PeerNotPresent,
            format!(
                "\"{peer}\" is connected to coordinator {member}, and this coordinator has no \
                 link to it now; try again shortly, or check that the members reach each \
                 other's --peer-listen addresses"
            ),
        )
    }

    /// `peer` declares interfaces, and `channel` is not one of them.
    pub(crate) fn no_such_interface(peer: &str, channel: &str, offered: &[Interface]) -> Self {
        Self::new(
            OpenFailCode::NoSuchInterface,
            format!(
                "no such interface: \"{peer}\" does not offer \"{channel}\"; it offers: {}",
                qmesh_proto::manifest::names(offered)
            ),
        )
    }

    /// The callee's connection ended before the offer reached it.
    pub(crate) fn left_before_offer(peer: &str) -> Self {
        Self::new(
            OpenFailCode::PeerLeft,
            format!("peer \"{peer}\" left before the channel could be offered"),
        )
    }

    /// The coordinator is draining before it stops.
    pub(crate) fn draining() -> Self {
        Self::new(
            OpenFailCode::ShuttingDown,
            "the coordinator is stopping and takes no new channels; open again once this \
             client has reconnected"
                .into(),
        )
    }

    /// No stream to the callee could be opened in time.
    pub(crate) fn no_room(peer: &str) -> Self {
        Self::new(
            OpenFailCode::Timeout,
            format!("peer \"{peer}\" has no room for another channel; try again later"),
        )
    }
}

/// Which side of an open: the words a refusal uses for it.
pub(crate) const OPENER: &str = "this client is";
/// The callee's words in a refusal.
pub(crate) const CALLEE: &str = "the peer is";

/// Decide an open from its inputs. The checks run in a fixed order, and
/// the first that fails is the refusal: the address, the opener's own
/// name, the policy (before presence, so a denied client learns nothing
/// about who is connected), presence, the callee's interfaces, the
/// channel limit on both sides, and last a direct path on both sides.
pub(crate) fn decide(
    opener: Party<'_>,
    request: Request<'_>,
    callee: Option<Callee<'_>>,
    policy: &Policy,
    max_channels: usize,
) -> Result<OpenPlan, Refusal> {
    let Request {
        peer,
        channel,
        mut path,
    } = request;
    if let Err(e) = validate_client_name(peer) {
        return Err(Refusal::new(OpenFailCode::InvalidAddress, e.to_string()));
    }
    if let Err(e) = validate_channel_name(channel) {
        return Err(Refusal::new(OpenFailCode::InvalidAddress, e.to_string()));
    }
    if peer == opener.name {
        return Err(Refusal::new(
            OpenFailCode::SelfChannel,
            format!("\"{peer}\" is this client's own name; a channel joins two different clients"),
        ));
    }
    match policy.decide(opener.name, peer, channel) {
        Decision::Deny => {
            return Err(Refusal::new(
                OpenFailCode::Denied,
                format!(
                    "denied by the coordinator's policy: \"{}\" may not open channel \
                     \"{channel}\" on \"{peer}\"; ask the operator to allow it",
                    opener.name
                ),
            ))
        }
        Decision::Allow { direct: false } if path == PathMode::Direct => {
            return Err(Refusal::new(
                OpenFailCode::Denied,
                format!(
                    "denied by the coordinator's policy: channel \"{channel}\" from \"{}\" to \
                     \"{peer}\" may not go direct; open with path auto or relay",
                    opener.name
                ),
            ))
        }
        Decision::Allow { direct: false } => path = PathMode::Relay,
        Decision::Allow { direct: true } => {}
    }
    let Some(callee) = callee else {
        return Err(Refusal::not_present(peer));
    };
    let interface = callee
        .interfaces
        .iter()
        .find(|i| i.name == channel)
        .cloned();
    if interface.is_none() && !callee.interfaces.is_empty() {
        return Err(Refusal::no_such_interface(peer, channel, callee.interfaces));
    }
    for (side, who) in [(opener, OPENER), (callee.party, CALLEE)] {
        if side.channels >= max_channels {
            return Err(Refusal::too_many_channels(who, max_channels));
        }
    }
    if path == PathMode::Direct {
        let unable = [opener, callee.party]
            .into_iter()
            .find(|s| s.direct.is_none());
        if let Some(s) = unable {
            return Err(Refusal::new(
                OpenFailCode::DirectUnavailable,
                format!(
                    "no direct path possible: \"{}\" cannot take direct channels (it shares its \
                     UDP socket or has them turned off); open with path auto or relay instead",
                    s.name
                ),
            ));
        }
    }
    Ok(OpenPlan { path, interface })
}

/// What the callee's answer to an offer means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// It accepted: join the channel.
    Accepted,
    /// The open failed. `finish` says whether the callee's stream ends
    /// cleanly (it refused) or is reset (it never answered);
    /// `violation`, when set, is how the callee broke the protocol: its
    /// connection is closed with that code and sentence.
    Failed {
        /// What the opener is told.
        refusal: Refusal,
        /// How the callee's side of the offer ends.
        callee_stream: CalleeStream,
        /// The callee's protocol violation, if it made one.
        violation: Option<(ConnCode, String)>,
    },
}

/// How the coordinator ends its stream to the callee after a failed offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CalleeStream {
    /// Finish it: the callee refused.
    Finish,
    /// Reset it: the callee did not answer in time.
    Reset,
    /// Leave it: the callee's stream or connection is gone.
    Leave,
}

/// Judge what the callee sent in answer to an offer of `channel` from
/// `peer` (the callee's name), given `answer_timeout`.
pub(crate) fn judge_answer(
    answer: Read<IncomingAnswer>,
    peer: &str,
    channel: &str,
    answer_timeout: Duration,
) -> Answer {
    let failed = |code, message: String, callee_stream, violation| Answer::Failed {
        refusal: Refusal::new(code, message),
        callee_stream,
        violation,
    };
    match answer {
        Read::Frame(IncomingAnswer::Accept) => Answer::Accepted,
        Read::Frame(IncomingAnswer::Refuse { reason }) => failed(
            OpenFailCode::Refused,
            format!(
                "peer \"{peer}\" refused channel \"{channel}\": {}",
                clip_reason(&reason)
            ),
            CalleeStream::Finish,
            None,
        ),
        Read::Finished | Read::Failed(_) => {
            let violation = match &answer {
                Read::Failed(e) => e
                    .conn_code()
                    .map(|code| (code, format!("bad channel answer: {e}"))),
                _ => None,
            };
            failed(
                OpenFailCode::PeerLeft,
                format!("peer \"{peer}\" left before answering"),
                CalleeStream::Leave,
                violation,
            )
        }
        Read::Late => failed(
            OpenFailCode::Timeout,
            format!(
                "peer \"{peer}\" did not answer within {} s",
                answer_timeout.as_secs()
            ),
            CalleeStream::Reset,
            None,
        ),
    }
}

/// One side of a channel as a direct-path introduction describes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reachable<'a> {
    /// Its client name.
    pub(crate) name: &'a str,
    /// The fingerprint of the certificate it presented.
    pub(crate) fingerprint: [u8; 32],
    /// Its address as the coordinator sees it.
    pub(crate) observed: SocketAddr,
    /// The addresses it reported, or `None` when it cannot take direct
    /// channels.
    pub(crate) direct: Option<&'a [SocketAddr]>,
    /// Its session.
    pub(crate) session: SessionId,
}

/// Introduce `a` and `b` to each other for a direct path: each learns the
/// other's certificate fingerprint (from the TLS handshake), observed
/// address and reported addresses. The client whose name sorts first
/// dials, so every channel between two clients agrees on one dialer.
/// `(None, None)` when either cannot take direct channels.
pub(crate) fn introduce(
    a: Reachable<'_>,
    b: Reachable<'_>,
) -> (Option<PeerIntro>, Option<PeerIntro>) {
    let (Some(a_addrs), Some(b_addrs)) = (a.direct, b.direct) else {
        return (None, None);
    };
    let a_dials = a.name < b.name;
    let intro = |other: Reachable<'_>, addrs: &[SocketAddr], dial| PeerIntro {
        fingerprint: other.fingerprint,
        observed: other.observed,
        addrs: addrs.to_vec(),
        dial,
        session: other.session,
    };
    (
        Some(intro(b, b_addrs, a_dials)),
        Some(intro(a, a_addrs, !a_dials)),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use qmesh_proto::codec::{decode, encode, ReadFrameError};
    use qmesh_proto::manifest::Direction;
    use qmesh_proto::msg::{Open, StreamRequest};

    use super::*;
    use crate::policy::{PolicySpec, RuleSpec};

    const ADDRS: &[SocketAddr] = &[];

    fn party(name: &str) -> Party<'_> {
        Party {
            name,
            direct: Some(ADDRS),
            channels: 0,
        }
    }

    fn callee<'a>(name: &'a str, interfaces: &'a [Interface]) -> Option<Callee<'a>> {
        Some(Callee {
            party: party(name),
            interfaces,
        })
    }

    fn ask<'a>(peer: &'a str, channel: &'a str, path: PathMode) -> Request<'a> {
        Request {
            peer,
            channel,
            path,
        }
    }

    /// `from` may open `channels` on `to`, direct when `direct`.
    fn allow(from: &str, to: &str, channels: &str, direct: bool) -> Policy {
        let spec = PolicySpec {
            groups: Default::default(),
            allow: vec![RuleSpec {
                from: vec![from.into()],
                to: vec![to.into()],
                channels: vec![channels.into()],
                direct,
            }],
        };
        Policy::from_spec(&spec).unwrap()
    }

    fn interface(name: &str) -> Interface {
        Interface {
            name: name.into(),
            purpose: "talk".into(),
            direction: Direction::Both,
            schema: String::new(),
            json_schema: None,
            version: "1".into(),
            forward: None,
        }
    }

    fn refused(r: Result<OpenPlan, Refusal>) -> (OpenFailCode, String) {
        let r = r.unwrap_err();
        (r.code, r.message)
    }

    #[test]
    fn an_allowed_open_to_a_present_peer_is_planned_on_the_path_asked_for() {
        let all = Policy::allow_all();
        for path in [PathMode::Auto, PathMode::Direct, PathMode::Relay] {
            let plan = decide(
                party("alice"),
                ask("bob", "chat", path),
                callee("bob", &[]),
                &all,
                4,
            )
            .unwrap();
            assert_eq!(
                plan,
                OpenPlan {
                    path,
                    interface: None
                }
            );
            assert_eq!(plan.introduces(), path != PathMode::Relay);
            assert_eq!(
                plan.incoming("alice", "chat"),
                Incoming {
                    from: "alice".into(),
                    channel: "chat".into(),
                    path
                }
            );
        }
    }

    #[test]
    fn a_callee_that_declares_the_interface_has_it_sent_with_ready() {
        let offered = [interface("logs"), interface("chat")];
        let plan = decide(
            party("alice"),
            ask("bob", "chat", PathMode::Auto),
            callee("bob", &offered),
            &Policy::allow_all(),
            4,
        )
        .unwrap();
        assert_eq!(plan.interface, Some(interface("chat")));
        assert_eq!(
            plan.ready(ChannelId(7), None),
            Ready {
                channel: ChannelId(7),
                peer: None,
                interface: Some(interface("chat"))
            }
        );
    }

    #[test]
    fn a_policy_without_direct_turns_auto_into_relay_and_refuses_direct() {
        let relay_only = allow("alice", "bob", "*", false);
        let plan = decide(
            party("alice"),
            ask("bob", "chat", PathMode::Auto),
            callee("bob", &[]),
            &relay_only,
            4,
        )
        .unwrap();
        assert_eq!(plan.path, PathMode::Relay);
        assert!(!plan.introduces());
        let (code, msg) = refused(decide(
            party("alice"),
            ask("bob", "chat", PathMode::Direct),
            callee("bob", &[]),
            &relay_only,
            4,
        ));
        assert_eq!(code, OpenFailCode::Denied);
        assert!(msg.contains("may not go direct"), "{msg}");
    }

    #[test]
    fn bad_addresses_are_refused_first() {
        for (peer, channel) in [("Bob!", "chat"), ("bob", ""), ("bob", "no spaces")] {
            let (code, _) = refused(decide(
                party("alice"),
                ask(peer, channel, PathMode::Auto),
                None,
                &Policy::allow_all(),
                0,
            ));
            assert_eq!(code, OpenFailCode::InvalidAddress, "{peer}!{channel}");
        }
    }

    #[test]
    fn a_client_cannot_open_a_channel_to_itself() {
        let (code, msg) = refused(decide(
            party("alice"),
            ask("alice", "chat", PathMode::Auto),
            callee("alice", &[]),
            &Policy::allow_all(),
            4,
        ));
        assert_eq!(code, OpenFailCode::SelfChannel);
        assert!(msg.contains("own name"), "{msg}");
    }

    #[test]
    fn the_policy_is_asked_before_presence_so_a_denied_client_learns_nothing() {
        let only_carol = allow("carol", "*", "*", true);
        let (code, msg) = refused(decide(
            party("alice"),
            ask("bob", "chat", PathMode::Auto),
            None,
            &only_carol,
            4,
        ));
        assert_eq!(code, OpenFailCode::Denied);
        assert!(!msg.contains("not present"), "{msg}");
        assert!(msg.contains("ask the operator"), "{msg}");
    }

    #[test]
    fn an_absent_peer_is_not_present() {
        let (code, msg) = refused(decide(
            party("alice"),
            ask("bob", "chat", PathMode::Auto),
            None,
            &Policy::allow_all(),
            4,
        ));
        assert_eq!(code, OpenFailCode::PeerNotPresent);
        assert!(msg.contains("\"bob\""), "{msg}");
    }

    #[test]
    fn a_channel_the_callee_does_not_offer_is_refused_with_what_it_offers() {
        let offered = [interface("logs")];
        let (code, msg) = refused(decide(
            party("alice"),
            ask("bob", "chat", PathMode::Auto),
            callee("bob", &offered),
            &Policy::allow_all(),
            4,
        ));
        assert_eq!(code, OpenFailCode::NoSuchInterface);
        assert!(msg.contains("it offers: logs"), "{msg}");
    }

    #[test]
    fn the_channel_limit_counts_both_sides() {
        let mut busy = party("alice");
        busy.channels = 2;
        let (code, msg) = refused(decide(
            busy,
            ask("bob", "chat", PathMode::Auto),
            callee("bob", &[]),
            &Policy::allow_all(),
            2,
        ));
        assert_eq!(code, OpenFailCode::TooManyChannels);
        assert!(msg.starts_with("this client is already in 2"), "{msg}");
        let mut bob = callee("bob", &[]).unwrap();
        bob.party.channels = 2;
        let (code, msg) = refused(decide(
            party("alice"),
            ask("bob", "chat", PathMode::Auto),
            Some(bob),
            &Policy::allow_all(),
            2,
        ));
        assert_eq!(code, OpenFailCode::TooManyChannels);
        assert!(msg.starts_with("the peer is already in 2"), "{msg}");
        bob.party.channels = 1;
        assert!(decide(
            party("alice"),
            ask("bob", "chat", PathMode::Auto),
            Some(bob),
            &Policy::allow_all(),
            2,
        )
        .is_ok());
    }

    #[test]
    fn direct_needs_both_sides_able_to_take_direct_channels() {
        let mut bob = callee("bob", &[]).unwrap();
        bob.party.direct = None;
        let (code, msg) = refused(decide(
            party("alice"),
            ask("bob", "chat", PathMode::Direct),
            Some(bob),
            &Policy::allow_all(),
            4,
        ));
        assert_eq!(code, OpenFailCode::DirectUnavailable);
        assert!(msg.contains("\"bob\" cannot take direct"), "{msg}");
        let mut alice = party("alice");
        alice.direct = None;
        let (code, msg) = refused(decide(
            alice,
            ask("bob", "chat", PathMode::Direct),
            callee("bob", &[]),
            &Policy::allow_all(),
            4,
        ));
        assert_eq!(code, OpenFailCode::DirectUnavailable);
        assert!(msg.contains("\"alice\" cannot take direct"), "{msg}");
        // Auto falls back to the relay instead.
        assert!(decide(
            alice,
            ask("bob", "chat", PathMode::Auto),
            Some(bob),
            &Policy::allow_all(),
            4
        )
        .is_ok());
    }

    const T: Duration = Duration::from_secs(10);

    fn failed(a: Answer) -> (OpenFailCode, String, CalleeStream, Option<ConnCode>) {
        match a {
            Answer::Failed {
                refusal,
                callee_stream,
                violation,
            } => (
                refusal.code,
                refusal.message,
                callee_stream,
                violation.map(|v| v.0),
            ),
            Answer::Accepted => panic!("accepted"),
        }
    }

    #[test]
    fn an_accept_joins_the_channel() {
        assert_eq!(
            judge_answer(Read::Frame(IncomingAnswer::Accept), "bob", "chat", T),
            Answer::Accepted
        );
    }

    #[test]
    fn a_refusal_is_passed_on_and_the_offer_finished() {
        let answer = Read::Frame(IncomingAnswer::Refuse {
            reason: "busy".into(),
        });
        let (code, msg, stream, violation) = failed(judge_answer(answer, "bob", "chat", T));
        assert_eq!(code, OpenFailCode::Refused);
        assert_eq!(msg, "peer \"bob\" refused channel \"chat\": busy");
        assert_eq!(stream, CalleeStream::Finish);
        assert_eq!(violation, None);
    }

    #[test]
    fn a_wrong_answer_does_not_decode_and_disconnects_the_callee() {
        let open = StreamRequest::Open(Open {
            peer: "x".into(),
            channel: "y".into(),
            path: PathMode::Auto,
        });
        let body = encode(&open).unwrap();
        let err = decode::<IncomingAnswer>(&body).unwrap_err();
        let answer = Read::Failed(ReadFrameError::Decode(err));
        let (code, msg, stream, violation) = failed(judge_answer(answer, "bob", "chat", T));
        assert_eq!(code, OpenFailCode::PeerLeft);
        assert!(msg.contains("left before answering"), "{msg}");
        assert_eq!(stream, CalleeStream::Leave);
        assert_eq!(violation, Some(ConnCode::Malformed));
    }

    #[test]
    fn a_callee_that_goes_away_has_left_and_only_a_bad_frame_is_a_violation() {
        let (code, _, stream, violation) = failed(judge_answer(Read::Finished, "bob", "c", T));
        assert_eq!(
            (code, stream, violation),
            (OpenFailCode::PeerLeft, CalleeStream::Leave, None)
        );
        let gone = Read::Failed(ReadFrameError::Io(std::io::Error::other("reset")));
        let (code, _, _, violation) = failed(judge_answer(gone, "bob", "c", T));
        assert_eq!((code, violation), (OpenFailCode::PeerLeft, None));
        let cut = Read::Failed(ReadFrameError::Truncated);
        let (code, msg, _, violation) = failed(judge_answer(cut, "bob", "c", T));
        assert_eq!(
            (code, violation),
            (OpenFailCode::PeerLeft, Some(ConnCode::Malformed))
        );
        assert!(msg.contains("left before answering"), "{msg}");
    }

    #[test]
    fn no_answer_in_time_resets_the_offer() {
        let (code, msg, stream, _) = failed(judge_answer(Read::Late, "bob", "c", T));
        assert_eq!(code, OpenFailCode::Timeout);
        assert_eq!(msg, "peer \"bob\" did not answer within 10 s");
        assert_eq!(stream, CalleeStream::Reset);
    }

    #[test]
    fn the_name_that_sorts_first_dials_and_each_side_learns_the_other() {
        let a_addrs = ["10.0.0.1:1".parse().unwrap()];
        let b_addrs = ["10.0.0.2:2".parse().unwrap()];
        let side = |name, fp, direct| Reachable {
            name,
            fingerprint: [fp; 32],
            observed: "192.0.2.1:9".parse().unwrap(),
            direct,
            session: SessionId(u64::from(fp)),
        };
        let (to_a, to_b) = introduce(
            side("zed", 1, Some(&a_addrs[..])),
            side("amy", 2, Some(&b_addrs[..])),
        );
        let (to_a, to_b) = (to_a.unwrap(), to_b.unwrap());
        assert_eq!(
            (to_a.fingerprint, to_a.addrs.clone()),
            ([2; 32], b_addrs.to_vec())
        );
        assert_eq!(
            (to_b.fingerprint, to_b.addrs.clone()),
            ([1; 32], a_addrs.to_vec())
        );
        assert!(!to_a.dial && to_b.dial, "amy sorts first and dials");
        assert_eq!((to_a.session, to_b.session), (SessionId(2), SessionId(1)));
        let none = introduce(side("zed", 1, None), side("amy", 2, Some(&b_addrs[..])));
        assert_eq!(none, (None, None));
        // Whoever opens, amy dials: the same dialer for every channel.
        let (to_amy, to_zed) = introduce(
            side("amy", 2, Some(&b_addrs[..])),
            side("zed", 1, Some(&a_addrs[..])),
        );
        assert!(to_amy.unwrap().dial && !to_zed.unwrap().dial);
    }
}
