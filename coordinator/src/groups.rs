//! The coordinator's broadcast groups as state: which members each group
//! has, each member's queue and how its time in the group ended. The
//! `broadcast` module serves the streams; this one only keeps the lists.
//!
//! In a cluster a group also has link members: another coordinator that
//! has members of the group and asked for this one's broadcasts
//! (`crate::groupfeed`). They get what this coordinator's members send,
//! never what came over a link, and are not counted as members.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::GroupConfig;

/// The coordinator's broadcast groups, by name. Empty groups are removed.
#[derive(Debug, Default)]
pub(crate) struct Groups {
    map: Mutex<HashMap<String, Arc<Group>>>,
    /// The number the next member gets.
    pub(crate) next_member: AtomicU64,
    /// Bumped when a member of this coordinator joins a group: what the
    /// group feed (`crate::groupfeed`) follows.
    pub(crate) joined: tokio::sync::watch::Sender<u64>,
}

impl Groups {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Group>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Members of `name` on this coordinator now (0 when nobody is in it).
    pub(crate) fn count(&self, name: &str) -> u64 {
        self.map().get(name).map_or(0, |g| g.locals() as u64)
    }

    /// Groups whose broadcasts member coordinator `id` asked for (it has
    /// a link member in each).
    /// Every group with members now.
    pub(crate) fn all(&self) -> Vec<Arc<Group>> {
        self.map().values().cloned().collect()
    }

    pub(crate) fn fed_to(&self, id: &str) -> usize {
        self.map()
            .values()
            .filter(|g| g.members().iter().any(|m| m.link.as_deref() == Some(id)))
            .count()
    }

    /// Add `member` to group `name`, made with `config` if it has no
    /// members; returns the group and its count of members here.
    pub(crate) fn add(
        &self,
        name: &str,
        config: GroupConfig,
        member: Arc<Member>,
    ) -> (Arc<Group>, u64) {
        let mut map = self.map();
        let group = map
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Group {
                    name: name.to_owned(),
                    config,
                    members: Mutex::new(Arc::new(Vec::new())),
                    locals: tokio::sync::watch::Sender::new(0),
                    feeding: AtomicBool::new(false),
                })
            })
            .clone();
        let member_is_local = member.link.is_none();
        let mut members = group.members.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = Vec::with_capacity(members.len() + 1);
        list.extend(members.iter().cloned());
        list.push(member);
        let local = member_is_local;
        let locals = list.iter().filter(|m| m.link.is_none()).count();
        group.locals.send_replace(locals);
        *members = Arc::new(list);
        drop(members);
        drop(map);
        if local {
            self.joined.send_modify(|n| *n += 1);
        }
        (group, locals as u64)
    }

    /// Take member `id` out of `group` (and the group out of the map when
    /// it is left empty). Whether it was still a member.
    pub(crate) fn remove(&self, group: &Group, id: u64) -> bool {
        let mut map = self.map();
        let mut members = group.members.lock().unwrap_or_else(|e| e.into_inner());
        if !members.iter().any(|m| m.id == id) {
            return false;
        }
        let list: Vec<_> = members.iter().filter(|m| m.id != id).cloned().collect();
        let empty = list.is_empty();
        group
            .locals
            .send_replace(list.iter().filter(|m| m.link.is_none()).count());
        *members = Arc::new(list);
        drop(members);
        if empty {
            map.remove(&group.name);
        }
        true
    }
}

/// One group: its configuration and members.
#[derive(Debug)]
pub(crate) struct Group {
    pub(crate) name: String,
    pub(crate) config: GroupConfig,
    /// Replaced (never changed in place) on every join and leave, so a
    /// fan-out takes a snapshot without holding the lock.
    members: Mutex<Arc<Vec<Arc<Member>>>>,
    /// How many of the members are this coordinator's own (not link
    /// members).
    pub(crate) locals: tokio::sync::watch::Sender<usize>,
    /// Whether a task asks the other members for their broadcasts of this
    /// group (at most one does at a time).
    pub(crate) feeding: AtomicBool,
}

impl Group {
    pub(crate) fn members(&self) -> Arc<Vec<Arc<Member>>> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Members on this coordinator now.
    pub(crate) fn locals(&self) -> usize {
        *self.locals.borrow()
    }
}

/// How a member's time in the group ended.
#[derive(Debug, Clone)]
pub(crate) enum End {
    /// It left (finished its side, or its connection ended).
    Left,
    /// It fell behind in a group with policy `evict`.
    Evicted(String),
}

/// One member of a group, as the fan-out sees it.
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) id: u64,
    pub(crate) name: String,
    /// For a link member, the id of the coordinator it stands for.
    pub(crate) link: Option<String>,
    pub(crate) queue: mpsc::Sender<Item>,
    /// Broadcasts dropped for this member (policy `lag`) and not yet
    /// reported. Taken under this lock together with queue operations, so
    /// counts and messages keep their order.
    pub(crate) missed: Mutex<u64>,
    /// Set once, when the member's time in the group ends.
    pub(crate) end: Mutex<Option<End>>,
    pub(crate) ended: CancellationToken,
}

impl Member {
    pub(crate) fn missed(&self) -> MutexGuard<'_, u64> {
        self.missed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record how the member's time ended; the first cause wins.
    pub(crate) fn end(&self, end: End) {
        let mut slot = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(end);
        }
        drop(slot);
        self.ended.cancel();
    }

    pub(crate) fn how_ended(&self) -> Option<End> {
        self.end.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One entry of a member's queue: the broadcasts missed just before it,
/// then the event itself (a whole data message, length prefix included).
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) missed: u64,
    pub(crate) event: Bytes,
}
