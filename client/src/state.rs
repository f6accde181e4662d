//! A channel's life as one plain type: [`ChannelState`] takes what happens
//! to a channel (local close, the peer's close, streams arriving, the
//! control stream ending, …) and answers with what to do — the close to
//! send, the events to report. It has no sockets, tasks or clock, so the
//! promise that every channel ends exactly once, closed or lost, is checked
//! by unit tests over every order of events. [`Life`] is its one owner.

use std::sync::Mutex;

use qmesh_proto::limits::clip_reason;
use tokio::sync::watch;

use crate::end::{ChannelEnd, Side};
use crate::sync::lock;

/// What has happened to a channel so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChannelState {
    /// How the channel ended, once it has.
    end: Option<ChannelEnd>,
    /// The peer's close arrived, with the number of streams it sent.
    peer_close: Option<u64>,
    /// The control stream is over (lost, or closed both ways).
    done: bool,
    /// The peer's message streams that arrived.
    msg_streams: u64,
    /// The peer's data streams that arrived (accepted or not).
    data_arrived: u64,
    /// Of the peer's message streams, the ones still being read.
    msg_readers: u64,
    /// Data streams this side opened on the channel.
    opened: u64,
    /// Of those, the ones sent through the coordinator.
    relayed: u64,
    /// This side has decided its close (sent, or no longer possible).
    close_sent: bool,
    /// Why the control stream ended, when it ended after the channel had
    /// ended without the peer's close (this side's close went unanswered).
    unanswered: Option<String>,
    /// Ready has been reported.
    ready: bool,
    /// The end has been reported (only ever after Ready).
    end_reported: bool,
}

/// The close this side sends on the channel's control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    /// The reason, clipped to the wire limit.
    pub(crate) reason: String,
    /// Data streams this side opened (the peer waits for that many).
    pub(crate) streams: u64,
    /// Of those, the ones sent through the coordinator.
    pub(crate) relayed: u64,
}

/// A lifecycle event to report to the events hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Report {
    /// The channel is ready.
    Ready,
    /// The channel ended (closed or lost).
    Ended(ChannelEnd),
}

/// What a transition asks its caller to do.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Effects {
    /// The channel has just ended this way: log it, fail waiting requests.
    pub(crate) ended: Option<ChannelEnd>,
    /// Report these, in order.
    pub(crate) reports: Vec<Report>,
    /// Finish the message stream, then send this close on the control
    /// stream and finish it.
    pub(crate) close: Option<Close>,
    /// Finish the control stream without a close (it is over).
    pub(crate) finish_control: bool,
}

/// The channel has ended or this side has closed it: no new streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended;

impl ChannelState {
    /// How the channel ended, if it has.
    pub(crate) fn end(&self) -> Option<&ChannelEnd> {
        self.end.as_ref()
    }

    /// The user closed the channel (or a quota did): end it closed by this
    /// side if it has not ended, and send this side's close if not yet sent.
    pub(crate) fn close_local(&mut self, reason: &str) -> Effects {
        let mut fx = self.finish(ChannelEnd::Closed {
            by: Side::Local,
            reason: clip_reason(reason),
        });
        fx.close = self.take_close(reason);
        fx
    }

    /// The channel was dropped: a channel that has not ended closes with
    /// "channel dropped"; one that has ended stays as it is.
    pub(crate) fn dropped(&mut self) -> Effects {
        if self.end.is_some() {
            return Effects::default();
        }
        self.close_local("channel dropped")
    }

    /// The peer's close arrived, counting the streams it sent: end closed
    /// by the peer, and answer with this side's close.
    pub(crate) fn peer_closed(&mut self, reason: &str, streams: u64) -> Effects {
        self.peer_close = Some(streams);
        let mut fx = self.finish(ChannelEnd::Closed {
            by: Side::Peer,
            reason: reason.to_owned(),
        });
        fx.close = self.take_close(reason);
        fx
    }

    /// The direct path of a direct-only channel went down after it was up:
    /// the channel is lost; tell the peer with a close.
    pub(crate) fn direct_lost(&mut self, reason: &str) -> Effects {
        let mut fx = self.finish(ChannelEnd::Lost {
            reason: reason.to_owned(),
        });
        fx.close = self.take_close(reason);
        fx
    }

    /// The control stream is over; `reason` is why, should the channel not
    /// have ended yet (then it is lost).
    pub(crate) fn control_ended(&mut self, reason: String) -> Effects {
        if self.end.is_some() && self.peer_close.is_none() {
            self.unanswered = Some(reason.clone());
        }
        let mut fx = self.finish(ChannelEnd::Lost { reason });
        self.done = true;
        fx.finish_control = !self.close_sent;
        self.close_sent = true;
        fx
    }

    /// Ready is to be reported (once); the end too, if it came first.
    pub(crate) fn ready(&mut self) -> Effects {
        let mut fx = Effects::default();
        if self.ready {
            return fx;
        }
        self.ready = true;
        fx.reports.push(Report::Ready);
        if let Some(end) = &self.end {
            self.end_reported = true;
            fx.reports.push(Report::Ended(end.clone()));
        }
        fx
    }

    /// A data stream from the peer arrived.
    pub(crate) fn data_arrived(&mut self) {
        self.data_arrived += 1;
    }

    /// A message stream from the peer arrived; its reader starts.
    pub(crate) fn message_stream_arrived(&mut self) {
        self.msg_streams += 1;
        self.msg_readers += 1;
    }

    /// A reader of the peer's message streams finished.
    pub(crate) fn message_stream_read(&mut self) {
        self.msg_readers = self.msg_readers.saturating_sub(1);
    }

    /// This side may open a new stream only while the channel lives.
    pub(crate) fn may_open(&self) -> Result<(), Ended> {
        if self.close_sent || self.end.is_some() {
            return Err(Ended);
        }
        Ok(())
    }

    /// This side opens a stream (`relayed` through the coordinator); it
    /// counts in the close.
    pub(crate) fn stream_opening(&mut self, relayed: bool) -> Result<(), Ended> {
        self.may_open()?;
        self.opened += 1;
        self.relayed += u64::from(relayed);
        Ok(())
    }

    /// A direct stream that failed is being retried through the relay.
    pub(crate) fn stream_rerouted(&mut self) {
        self.relayed += 1;
    }

    /// A stream counted by [`Self::stream_opening`] never left.
    pub(crate) fn stream_failed(&mut self, relayed: bool) {
        self.opened = self.opened.saturating_sub(1);
        self.relayed = self.relayed.saturating_sub(u64::from(relayed));
    }

    /// The peer's close has arrived.
    pub(crate) fn peer_has_closed(&self) -> bool {
        self.peer_close.is_some()
    }

    /// The peer confirmed this side's close (its own close arrived), or the
    /// control stream is over.
    pub(crate) fn close_answered(&self) -> bool {
        self.peer_close.is_some() || self.done
    }

    /// Once [`Self::close_answered`]: `Ok` when the peer's close arrived,
    /// else why the control stream ended without it (the channel was lost,
    /// before or after this side closed it).
    pub(crate) fn close_outcome(&self) -> Result<(), String> {
        if self.peer_close.is_some() {
            return Ok(());
        }
        match (&self.end, &self.unanswered) {
            (Some(ChannelEnd::Lost { reason }), _) | (_, Some(reason)) => Err(reason.clone()),
            _ => Err("the control stream ended without the peer's close".into()),
        }
    }

    /// Whether no more of the peer's one-way messages and requests can come:
    /// the channel ended, every stream the peer announced arrived (or the
    /// control stream is over, when it announced none) and all its message
    /// streams are read.
    pub(crate) fn messages_done(&self) -> bool {
        let all_arrived = match self.peer_close {
            Some(n) => self.data_arrived + self.msg_streams >= n,
            None => self.done,
        };
        self.end.is_some() && self.msg_readers == 0 && all_arrived
    }

    /// Whether no more data streams can come for a reader that accepted
    /// `accepted` of them: the peer's close counted that many (with its
    /// message streams), or the control stream ended without one.
    pub(crate) fn streams_done(&self, accepted: u64) -> bool {
        match self.peer_close {
            Some(n) => accepted + self.msg_streams >= n,
            None => self.done,
        }
    }

    /// End the channel with `end` unless it has ended.
    fn finish(&mut self, end: ChannelEnd) -> Effects {
        let mut fx = Effects::default();
        if self.end.is_some() {
            return fx;
        }
        if self.ready && !self.end_reported {
            self.end_reported = true;
            fx.reports.push(Report::Ended(end.clone()));
        }
        fx.ended = Some(end.clone());
        self.end = Some(end);
        fx
    }

    /// This side's close, unless it was sent or the control stream is over.
    fn take_close(&mut self, reason: &str) -> Option<Close> {
        if self.close_sent {
            return None;
        }
        self.close_sent = true;
        Some(Close {
            reason: clip_reason(reason),
            streams: self.opened,
            relayed: self.relayed,
        })
    }
}

/// The one owner of a channel's [`ChannelState`]: transitions run under
/// one lock, never held across an await; watchers see each new state after
/// its reports went out.
#[derive(Debug, Default)]
pub(crate) struct Life {
    state: Mutex<ChannelState>,
    seen: watch::Sender<ChannelState>,
}

impl Life {
    /// Run transition `f`; `report` gets its outcome before anyone
    /// watching sees the new state (so a caller that saw the end finds its
    /// event already reported).
    pub(crate) fn apply<R>(
        &self,
        f: impl FnOnce(&mut ChannelState) -> R,
        report: impl FnOnce(&R),
    ) -> R {
        let mut state = lock(&self.state);
        let out = f(&mut state);
        report(&out);
        self.seen.send_if_modified(|seen| {
            if *seen == *state {
                return false;
            }
            *seen = state.clone();
            true
        });
        out
    }

    /// Run a transition that reports nothing.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut ChannelState) -> R) -> R {
        self.apply(f, |_| {})
    }

    /// The state as last published.
    pub(crate) fn now(&self) -> watch::Ref<'_, ChannelState> {
        self.seen.borrow()
    }

    /// Watch the state change.
    pub(crate) fn watch(&self) -> watch::Receiver<ChannelState> {
        self.seen.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Something that can happen to a channel, for the tests.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Input {
        Ready,
        CloseLocal,
        Dropped,
        PeerClose(u64),
        DirectLost,
        ControlEnded,
        DataArrived,
        OpenStream,
    }

    impl Input {
        /// The end this input brings when it comes first.
        fn end(self) -> Option<ChannelEnd> {
            match self {
                Input::CloseLocal => Some(ChannelEnd::Closed {
                    by: Side::Local,
                    reason: "bye".into(),
                }),
                Input::Dropped => Some(ChannelEnd::Closed {
                    by: Side::Local,
                    reason: "channel dropped".into(),
                }),
                Input::PeerClose(_) => Some(ChannelEnd::Closed {
                    by: Side::Peer,
                    reason: "peer bye".into(),
                }),
                Input::DirectLost => Some(ChannelEnd::Lost {
                    reason: "direct path lost".into(),
                }),
                Input::ControlEnded => Some(ChannelEnd::Lost {
                    reason: "control stream failed".into(),
                }),
                Input::Ready | Input::DataArrived | Input::OpenStream => None,
            }
        }

        fn apply(self, s: &mut ChannelState) -> Effects {
            match self {
                Input::Ready => s.ready(),
                Input::CloseLocal => s.close_local("bye"),
                Input::Dropped => s.dropped(),
                Input::PeerClose(n) => s.peer_closed("peer bye", n),
                Input::DirectLost => s.direct_lost("direct path lost"),
                Input::ControlEnded => s.control_ended("control stream failed".into()),
                Input::DataArrived => {
                    s.data_arrived();
                    Effects::default()
                }
                Input::OpenStream => {
                    let _ = s.stream_opening(false);
                    Effects::default()
                }
            }
        }
    }

    /// Call `f` with every order of `items` (Heap's algorithm).
    fn each_order<T: Clone>(items: &[T], mut f: impl FnMut(&[T])) {
        fn go<T: Clone>(k: usize, a: &mut Vec<T>, f: &mut dyn FnMut(&[T])) {
            if k <= 1 {
                f(a);
                return;
            }
            go(k - 1, a, f);
            for i in 0..k - 1 {
                if k % 2 == 0 {
                    a.swap(i, k - 1);
                } else {
                    a.swap(0, k - 1);
                }
                go(k - 1, a, f);
            }
        }
        let mut a = items.to_vec();
        go(a.len(), &mut a, &mut f);
    }

    #[test]
    fn each_order_visits_every_permutation_once() {
        let mut seen = std::collections::HashSet::new();
        each_order(&[1, 2, 3, 4], |o| assert!(seen.insert(o.to_vec())));
        assert_eq!(seen.len(), 24);
    }

    /// Run `inputs` in every order and check the promises of a channel's
    /// end in each.
    fn check_every_order(inputs: &[Input]) -> usize {
        let mut runs = 0;
        each_order(inputs, |order| {
            runs += 1;
            let mut s = ChannelState::default();
            let mut ended = Vec::new();
            let mut reports = Vec::new();
            let mut closes = Vec::new();
            let mut control_over = false;
            let mut opened = 0;
            for input in order {
                if *input == Input::OpenStream && s.may_open().is_ok() {
                    opened += 1;
                }
                let fx = input.apply(&mut s);
                ended.extend(fx.ended.clone());
                reports.extend(fx.reports.clone());
                if let Some(close) = fx.close {
                    assert!(
                        !control_over,
                        "{order:?}: a close after the control stream ended"
                    );
                    assert_eq!(
                        close.streams, opened,
                        "{order:?}: the close counts the streams sent"
                    );
                    closes.push(close);
                }
                if *input == Input::ControlEnded {
                    control_over = true;
                }
            }
            let first = order.iter().find_map(|i| i.end());
            // Exactly once, closed or lost, as the first ending input says;
            // never neither when something ended it.
            assert_eq!(s.end().cloned(), first, "{order:?}");
            assert_eq!(
                ended,
                first.iter().cloned().collect::<Vec<_>>(),
                "{order:?}"
            );
            // The end is reported once, after Ready, only if Ready was.
            let readies = reports.iter().filter(|r| **r == Report::Ready).count();
            let ends: Vec<_> = reports
                .iter()
                .filter_map(|r| match r {
                    Report::Ended(e) => Some(e.clone()),
                    Report::Ready => None,
                })
                .collect();
            let was_ready = order.contains(&Input::Ready);
            assert_eq!(readies, usize::from(was_ready), "{order:?}");
            match (&first, was_ready) {
                (Some(end), true) => {
                    assert_eq!(ends, vec![end.clone()], "{order:?}");
                    assert_eq!(reports.first(), Some(&Report::Ready), "{order:?}");
                }
                _ => assert!(ends.is_empty(), "{order:?}"),
            }
            // At most one close, and the peer's close is always answered
            // while the control stream is up.
            assert!(closes.len() <= 1, "{order:?}: {closes:?}");
            let peer_first = order
                .iter()
                .position(|i| matches!(i, Input::PeerClose(_)))
                .zip(order.iter().position(|i| *i == Input::ControlEnded))
                .is_some_and(|(p, c)| p < c);
            if peer_first {
                assert_eq!(closes.len(), 1, "{order:?}: the peer's close unanswered");
            }
            // A close is confirmed only by the peer's close: a channel
            // lost before or after this side closed reports why instead.
            if s.close_answered() {
                let peer_closed = order.iter().any(|i| matches!(i, Input::PeerClose(_)));
                match s.close_outcome() {
                    Ok(()) => assert!(peer_closed, "{order:?}: confirmed without the peer"),
                    Err(why) => {
                        assert!(!peer_closed, "{order:?}: the peer's close not counted");
                        assert!(
                            ["direct path lost", "control stream failed"].contains(&why.as_str()),
                            "{order:?}: {why}"
                        );
                    }
                }
            }
            // Ended means no new streams.
            if s.end().is_some() {
                assert_eq!(s.may_open(), Err(Ended), "{order:?}");
            }
        });
        runs
    }

    #[test]
    fn every_order_of_every_ending_ends_exactly_once() {
        let runs = check_every_order(&[
            Input::Ready,
            Input::CloseLocal,
            Input::PeerClose(2),
            Input::DirectLost,
            Input::ControlEnded,
            Input::Dropped,
            Input::OpenStream,
        ]);
        assert_eq!(runs, 5040);
    }

    #[test]
    fn every_order_of_a_graceful_close_ends_exactly_once() {
        check_every_order(&[
            Input::Ready,
            Input::OpenStream,
            Input::OpenStream,
            Input::CloseLocal,
            Input::PeerClose(1),
            Input::DataArrived,
            Input::ControlEnded,
        ]);
    }

    #[test]
    fn every_order_of_a_loss_ends_exactly_once() {
        check_every_order(&[
            Input::Ready,
            Input::OpenStream,
            Input::ControlEnded,
            Input::DirectLost,
            Input::Dropped,
            Input::DataArrived,
        ]);
    }

    #[test]
    fn a_channel_nothing_ended_has_no_end_and_reports_only_ready() {
        let mut s = ChannelState::default();
        assert_eq!(s.ready().reports, vec![Report::Ready]);
        s.data_arrived();
        assert_eq!(s.end(), None);
        assert_eq!(s.ready(), Effects::default());
        assert_eq!(
            s.dropped().ended,
            Some(ChannelEnd::Closed {
                by: Side::Local,
                reason: "channel dropped".into(),
            })
        );
    }

    #[test]
    fn a_local_close_counts_streams_opened_and_relayed_but_not_failed_ones() {
        let mut s = ChannelState::default();
        s.stream_opening(true).unwrap();
        s.stream_opening(false).unwrap();
        s.stream_rerouted();
        s.stream_opening(false).unwrap();
        s.stream_failed(false);
        let close = s.close_local("done").close.unwrap();
        assert_eq!((close.streams, close.relayed), (2, 2));
        assert_eq!(s.stream_opening(false), Err(Ended));
        // Closing again ends nothing new and sends nothing.
        assert_eq!(s.close_local("again"), Effects::default());
    }

    #[test]
    fn the_close_reason_is_clipped_to_the_wire_limit() {
        let mut s = ChannelState::default();
        let long = "x".repeat(qmesh_proto::limits::MAX_REASON * 2);
        let fx = s.close_local(&long);
        assert_eq!(fx.close.unwrap().reason, clip_reason(&long));
        assert_eq!(
            fx.ended,
            Some(ChannelEnd::Closed {
                by: Side::Local,
                reason: clip_reason(&long)
            })
        );
    }

    #[test]
    fn streams_are_done_when_the_announced_count_arrived() {
        let mut s = ChannelState::default();
        s.peer_closed("bye", 3);
        assert!(!s.streams_done(1));
        s.message_stream_arrived();
        assert!(!s.streams_done(1));
        assert!(s.streams_done(2));
        // Messages: two data streams and the message stream arrived, and
        // its reader must finish.
        s.data_arrived();
        s.data_arrived();
        assert!(!s.messages_done());
        s.message_stream_read();
        assert!(s.messages_done());
    }

    #[test]
    fn without_a_close_streams_are_done_only_when_the_control_stream_is() {
        let mut s = ChannelState::default();
        assert!(!s.streams_done(0));
        assert!(!s.close_answered());
        s.close_local("bye");
        assert!(!s.messages_done());
        let fx = s.control_ended("gone".into());
        assert_eq!(fx.ended, None);
        assert!(!fx.finish_control, "the close already finished it");
        assert!(s.streams_done(0));
        assert!(s.messages_done());
        assert!(s.close_answered());
    }

    #[test]
    fn a_lost_control_stream_is_finished_without_a_close() {
        let mut s = ChannelState::default();
        let fx = s.control_ended("reset".into());
        assert!(fx.finish_control);
        assert_eq!(fx.close, None);
        assert_eq!(s.close_local("late").close, None);
    }

    #[test]
    fn life_publishes_a_state_after_its_reports() {
        let life = Life::default();
        let mut watch = life.watch();
        let seen_in_report = life.apply(
            |s| s.close_local("bye"),
            |_| assert!(life.now().end().is_none(), "published before its report"),
        );
        assert!(seen_in_report.ended.is_some());
        assert!(watch.has_changed().unwrap());
        assert!(watch.borrow_and_update().end().is_some());
    }
}
