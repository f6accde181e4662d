//! Exact events: every action ends in exactly one terminal event.
//!
//! | action | ends in exactly one of |
//! |---|---|
//! | connect | [`Event::Connected`] / [`Event::ConnectError`] |
//! | a lost session | [`Event::Reconnected`] / [`Event::SessionEnded`], after one [`Event::Reconnecting`] per attempt |
//! | a connected client | [`Event::SessionEnded`], once, at its end (not when it is dropped) |
//! | open (and accept) | [`Event::Ready`] / [`Event::OpenError`] |
//! | a ready channel | [`Event::Closed`] / [`Event::Lost`] |
//! | request | [`Event::Reply`] / [`Event::ReplyMissing`] |
//!
//! The return values of [`crate::Client::connect`], [`crate::Client::open`],
//! [`crate::Channel::ended`] and [`crate::Channel::request`] carry the same
//! outcomes; an [`Events`] hub reports them as they happen, two ways:
//!
//! - **handlers** registered per channel name ([`Events::on`]), called in
//!   line for every event of a channel of that name;
//! - **polling** ([`Events::next`]), every event in order.
//!
//! Both see the same events in the same order: each event is handed to the
//! handlers and queued for polling in one step, under one lock.
//!
//! ```
//! use qmesh_client::events::{Event, Events};
//!
//! let events = Events::new();
//! events.on("chat", |e: &Event| println!("chat: {e}"));
//! // config.events = Some(events.clone()); Client::connect(config) …
//! # drop(events);
//! ```
//!
//! Handlers run on the task that produced the event: they must be quick and
//! must not block; spawn a task for anything slow. The polling queue holds
//! [`Events::with_capacity`] events (4096 by default); a poller that falls
//! further behind gets [`Event::Lagged`] with the number it missed, instead
//! of an unbounded queue.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::end::{ChannelEnd, Side};
use crate::sync::lock;

/// Which channel an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRef {
    /// `opener>callee!channel`.
    pub label: String,
    /// The other side's client name.
    pub peer: String,
    /// The channel name.
    pub name: String,
}

/// One event. See the [module documentation](self) for which are terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session is up.
    Connected {
        /// This client's name.
        name: String,
        /// The coordinator's session number.
        session: u64,
    },
    /// Connecting failed.
    ConnectError {
        /// The name the client asked for.
        name: String,
        /// What went wrong, as the error says it.
        message: String,
    },
    /// The session was lost (or the last attempt failed) and attempt
    /// `attempt` to join again is starting. Not terminal: a
    /// [`Event::Reconnected`] or [`Event::SessionEnded`] follows.
    Reconnecting {
        /// This client's name.
        name: String,
        /// Which attempt, 1 for the first after the loss.
        attempt: u32,
        /// Why the session was lost, or why the previous attempt failed.
        cause: String,
    },
    /// The coordinator said it is going away (stopping or restarting): no
    /// new channels; live ones may run for `within`, then the session ends
    /// and a [`Event::Reconnecting`] follows. Not terminal.
    GoingAway {
        /// This client's name.
        name: String,
        /// How long the coordinator lets live channels run.
        within: std::time::Duration,
    },
    /// The client joined again after losing its session.
    Reconnected {
        /// This client's name.
        name: String,
        /// The new session's number.
        session: u64,
        /// How long after the loss.
        after: std::time::Duration,
    },
    /// The client's session is over for good: it left, was refused, or
    /// reconnecting is off or used up its attempts.
    SessionEnded {
        /// This client's name.
        name: String,
        /// Why, as [`crate::Client::closed`] says it.
        reason: String,
    },
    /// A channel is ready (opened by this client, or accepted).
    Ready {
        /// The channel.
        channel: ChannelRef,
    },
    /// Opening (or accepting) a channel failed.
    OpenError {
        /// The channel that was asked for.
        channel: ChannelRef,
        /// What went wrong.
        message: String,
    },
    /// A ready channel was closed gracefully.
    Closed {
        /// The channel.
        channel: ChannelRef,
        /// Who closed it.
        by: Side,
        /// The closer's reason.
        reason: String,
    },
    /// A ready channel was lost.
    Lost {
        /// The channel.
        channel: ChannelRef,
        /// What was seen.
        reason: String,
    },
    /// A request got its reply.
    Reply {
        /// The channel.
        channel: ChannelRef,
        /// The request's id on the channel.
        id: u64,
        /// The reply.
        body: Bytes,
    },
    /// A request ended without a reply (timeout, channel ended, not sent).
    ReplyMissing {
        /// The channel.
        channel: ChannelRef,
        /// The request's id on the channel (0 when it never got one).
        id: u64,
        /// Why.
        reason: String,
    },
    /// The poller fell behind and `missed` events were dropped for it
    /// (handlers saw them).
    Lagged {
        /// Events dropped from the polling queue.
        missed: u64,
    },
}

impl Event {
    /// The channel the event is about, if any.
    pub fn channel(&self) -> Option<&ChannelRef> {
        match self {
            Event::Ready { channel }
            | Event::OpenError { channel, .. }
            | Event::Closed { channel, .. }
            | Event::Lost { channel, .. }
            | Event::Reply { channel, .. }
            | Event::ReplyMissing { channel, .. } => Some(channel),
            _ => None,
        }
    }

    /// Whether this event ends an action (everything but `Lagged` and
    /// `Reconnecting`).
    pub fn is_terminal(&self) -> bool {
        !matches!(self, Event::Lagged { .. } | Event::Reconnecting { .. })
    }

    pub(crate) fn ended(channel: ChannelRef, end: &ChannelEnd) -> Event {
        match end {
            ChannelEnd::Closed { by, reason } => Event::Closed {
                channel,
                by: *by,
                reason: reason.clone(),
            },
            ChannelEnd::Lost { reason } => Event::Lost {
                channel,
                reason: reason.clone(),
            },
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Connected { name, session } => {
                write!(f, "connected as {name} (session {session})")
            }
            Event::ConnectError { name, message } => {
                write!(f, "connect error for {name}: {message}")
            }
            Event::Reconnecting {
                name,
                attempt,
                cause,
            } => {
                write!(f, "{name} reconnecting, attempt {attempt} ({cause})")
            }
            Event::GoingAway { name, within } => write!(
                f,
                "{name}'s coordinator is going away: live channels may run for {} ms",
                within.as_millis()
            ),
            Event::Reconnected {
                name,
                session,
                after,
            } => write!(
                f,
                "{name} reconnected after {} ms (session {session})",
                after.as_millis()
            ),
            Event::SessionEnded { name, reason } => write!(f, "{name} session over: {reason}"),
            Event::Ready { channel } => write!(f, "{} ready", channel.label),
            Event::OpenError { channel, message } => {
                write!(f, "{} open error: {message}", channel.label)
            }
            Event::Closed {
                channel,
                by,
                reason,
            } => {
                let who = match by {
                    Side::Local => "this side",
                    Side::Peer => "the peer",
                };
                write!(f, "{} closed by {who}: {reason}", channel.label)
            }
            Event::Lost { channel, reason } => write!(f, "{} lost: {reason}", channel.label),
            Event::Reply { channel, id, body } => {
                write!(
                    f,
                    "{} reply to request {id} ({} bytes)",
                    channel.label,
                    body.len()
                )
            }
            Event::ReplyMissing {
                channel,
                id,
                reason,
            } => {
                write!(
                    f,
                    "{} reply missing for request {id}: {reason}",
                    channel.label
                )
            }
            Event::Lagged { missed } => write!(f, "{missed} events missed"),
        }
    }
}

type Handler = Arc<dyn Fn(&Event) + Send + Sync>;

struct Hub {
    state: Mutex<State>,
    ready: Notify,
    capacity: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Event>,
    missed: u64,
    handlers: HashMap<String, Vec<Handler>>,
    all: Vec<Handler>,
}

/// An event hub: attach it to a client with
/// [`crate::ClientConfig::events`], then register handlers or poll. Cheap
/// to clone; clones share the hub.
#[derive(Clone)]
pub struct Events {
    hub: Arc<Hub>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("capacity", &self.hub.capacity)
            .finish_non_exhaustive()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// A hub whose polling queue holds 4096 events.
    pub fn new() -> Self {
        Self::with_capacity(4096)
    }

    /// A hub whose polling queue holds `capacity` events.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            hub: Arc::new(Hub {
                state: Mutex::new(State::default()),
                ready: Notify::new(),
                capacity: capacity.max(1),
            }),
        }
    }

    /// Call `handler` for every event of every channel named `channel`.
    pub fn on(&self, channel: &str, handler: impl Fn(&Event) + Send + Sync + 'static) {
        lock(&self.hub.state)
            .handlers
            .entry(channel.to_owned())
            .or_default()
            .push(Arc::new(handler));
    }

    /// Call `handler` for every event.
    pub fn on_all(&self, handler: impl Fn(&Event) + Send + Sync + 'static) {
        lock(&self.hub.state).all.push(Arc::new(handler));
    }

    /// The next event, waiting for one.
    pub async fn next(&self) -> Event {
        loop {
            let notified = self.hub.ready.notified();
            if let Some(e) = self.try_next() {
                return e;
            }
            notified.await;
        }
    }

    /// The next event, if one is waiting.
    pub fn try_next(&self) -> Option<Event> {
        let mut st = lock(&self.hub.state);
        if st.missed > 0 {
            let missed = std::mem::take(&mut st.missed);
            return Some(Event::Lagged { missed });
        }
        st.queue.pop_front()
    }

    /// Report `event`: to the handlers, then to the polling queue, in one
    /// step.
    pub(crate) fn emit(&self, event: Event) {
        let mut st = lock(&self.hub.state);
        if let Some(name) = event.channel().map(|c| c.name.clone()) {
            if let Some(hs) = st.handlers.get(&name) {
                for h in hs {
                    h(&event);
                }
            }
        }
        for h in &st.all {
            h(&event);
        }
        if st.queue.len() >= self.hub.capacity {
            st.missed += 1;
        } else {
            st.queue.push_back(event);
        }
        drop(st);
        self.hub.ready.notify_one();
    }
}

/// Emit to an optional hub.
pub(crate) fn emit(events: &Option<Events>, event: impl FnOnce() -> Event) {
    if let Some(e) = events {
        e.emit(event());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chan(name: &str) -> ChannelRef {
        ChannelRef {
            label: format!("a>b!{name}"),
            peer: "b".into(),
            name: name.into(),
        }
    }

    #[test]
    fn handlers_and_polling_see_the_same_events_in_order() {
        let events = Events::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        events.on("chat", move |e| s.lock().unwrap().push(e.clone()));
        for i in 0..10 {
            let name = if i % 2 == 0 { "chat" } else { "other" };
            events.emit(Event::Ready {
                channel: chan(name),
            });
        }
        let mut polled = Vec::new();
        while let Some(e) = events.try_next() {
            if e.channel().is_some_and(|c| c.name == "chat") {
                polled.push(e);
            }
        }
        assert_eq!(*seen.lock().unwrap(), polled);
        assert_eq!(polled.len(), 5);
    }

    #[test]
    fn a_poller_that_falls_behind_is_told_how_many_it_missed() {
        let events = Events::with_capacity(2);
        for _ in 0..5 {
            events.emit(Event::Ready { channel: chan("x") });
        }
        assert_eq!(events.try_next(), Some(Event::Lagged { missed: 3 }));
        assert!(matches!(events.try_next(), Some(Event::Ready { .. })));
        assert!(matches!(events.try_next(), Some(Event::Ready { .. })));
        assert_eq!(events.try_next(), None);
    }
}
