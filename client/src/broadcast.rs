//! Broadcast groups: join a named group and exchange messages with every
//! member, relayed by the coordinator.
//!
//! [`Client::join`] opens one stream to the coordinator for the group.
//! [`Group::send`] broadcasts a message; every member (this one included)
//! receives it as [`GroupEvent::Message`] with the sender's name as the
//! coordinator knows it. A member that falls behind is treated as the
//! group's [`GroupPolicy`] says: the group waits (`Block`), the member is
//! told how many messages it skipped with [`GroupEvent::Missed`] (`Lag`),
//! or it is removed with [`GroupEvent::Evicted`] (`Evict`).

use std::sync::Arc;

use qmesh_proto::codes::{OpenFailCode, StreamCode};
use qmesh_proto::limits::{MAX_MESSAGE_CEILING, MAX_REASON};
use qmesh_proto::msg::{JoinAnswer, MembersAnswer, StreamRequest};
use qmesh_proto::name::validate_channel_name;
use qmesh_proto::Untrusted;
use tokio::sync::Mutex;
use tracing::{debug, info};

pub use qmesh_proto::envelope::GroupEvent;
pub use qmesh_proto::msg::GroupPolicy;

use crate::client::{Client, WeakClient};
use crate::error::{OpenError, RecvError, SendError};
use crate::stream::{MessageReceiver, MessageSender};
use crate::sync::lock;

/// Most bytes a [`GroupEvent::Message`] adds in front of the body.
const MESSAGE_HEAD: usize = 2 + u8::MAX as usize;

/// Membership of one broadcast group. Cheap to clone: clones share the
/// membership, and sends from several clones are sent one after another.
#[derive(Debug, Clone)]
pub struct Group {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    members_at_join: u64,
    policy: GroupPolicy,
    max_message: usize,
    /// The client, to join again after a reconnect.
    client: WeakClient,
    /// The connection the membership is on: once it has closed, the
    /// membership is joined again on the client's next session.
    conn: std::sync::Mutex<quinn::Connection>,
    /// One rejoin at a time.
    rejoining: Mutex<()>,
    /// `None` once the member has left.
    send: Mutex<Option<MessageSender>>,
    recv: Mutex<MessageReceiver>,
    /// The receiving side of a rejoin, for `recv` to take up.
    fresh: std::sync::Mutex<Option<MessageReceiver>>,
}

/// A joined membership's streams and terms.
struct Joined {
    send: MessageSender,
    recv: MessageReceiver,
    conn: quinn::Connection,
    members: u64,
    policy: GroupPolicy,
    max_message: usize,
}

impl Client {
    /// Join broadcast group `group` (channel-name rules) and wait for the
    /// coordinator's answer.
    ///
    /// Fails with [`OpenError::Failed`] and
    /// [`OpenFailCode::InvalidAddress`] for a bad group name.
    pub async fn join(&self, group: &str) -> Result<Group, OpenError> {
        check_group(group)?;
        let joined = self.join_stream(group).await?;
        Ok(Group {
            inner: Arc::new(Inner {
                name: group.to_owned(),
                members_at_join: joined.members,
                policy: joined.policy,
                max_message: joined.max_message,
                client: self.downgrade(),
                conn: std::sync::Mutex::new(joined.conn),
                rejoining: Mutex::new(()),
                send: Mutex::new(Some(joined.send)),
                recv: Mutex::new(joined.recv),
                fresh: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Ask the coordinator to join `group` on the current session.
    async fn join_stream(&self, group: &str) -> Result<Joined, OpenError> {
        let join = StreamRequest::Join {
            group: group.into(),
        };
        let (mut send, mut recv, conn) = self.request_stream_on(&join).await?;
        let answer = match self.next_answer(&mut recv).await {
            Ok(JoinAnswer::Joined {
                members,
                policy,
                max_message,
            }) => Ok((members, policy, max_message)),
            Ok(JoinAnswer::Failed(failure)) => Err(OpenError::from(failure)),
            Err(e) => Err(e),
        };
        match answer {
            Ok((members, policy, max_message)) => {
                let max_message = usize::try_from(max_message)
                    .unwrap_or(usize::MAX)
                    .min(MAX_MESSAGE_CEILING - MESSAGE_HEAD);
                info!(group, members, %policy, "joined group");
                // Events: a message with its head, or an eviction reason.
                let max_event = (max_message + MESSAGE_HEAD).max(MAX_REASON + 1);
                Ok(Joined {
                    send: MessageSender::new(send, max_message),
                    recv: MessageReceiver::new(recv, max_event),
                    conn,
                    members,
                    policy,
                    max_message,
                })
            }
            Err(e) => {
                info!(group, cause = %Untrusted::reason(&e), "join failed");
                if matches!(e, OpenError::Timeout { .. }) {
                    let _ = send.reset(StreamCode::Cancelled.varint());
                }
                Err(e)
            }
        }
    }

    /// How many members group `group` has now (0 for a group nobody is
    /// in).
    pub async fn group_members(&self, group: &str) -> Result<u64, OpenError> {
        check_group(group)?;
        let ask = StreamRequest::Members {
            group: group.into(),
        };
        let (mut send, mut recv) = self.request_stream(&ask).await?;
        let _ = send.finish();
        match self.next_answer(&mut recv).await? {
            MembersAnswer::Count {
                group: answered,
                members,
            } if answered == *group => Ok(members),
            MembersAnswer::Count {
                group: answered, ..
            } => Err(OpenError::Protocol(format!(
                "the member count is for group {answered:?}, not {group:?}"
            ))),
            MembersAnswer::Failed(failure) => Err(failure.into()),
        }
    }
}

/// Refuse a bad group name before anything is sent.
fn check_group(group: &str) -> Result<(), OpenError> {
    validate_channel_name(group).map_err(|e| OpenError::Failed {
        code: OpenFailCode::InvalidAddress,
        message: format!("bad group name {group:?}: {e}"),
    })
}

impl Group {
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Members in the group when this one joined, itself included.
    pub fn members_at_join(&self) -> u64 {
        self.inner.members_at_join
    }

    /// What the group does with a member that falls behind.
    pub fn policy(&self) -> GroupPolicy {
        self.inner.policy
    }

    /// The largest message the group carries.
    pub fn max_message(&self) -> usize {
        self.inner.max_message
    }

    /// Broadcast one message to every member, this one included. In a
    /// group with policy `Block` this waits while the slowest member is
    /// behind.
    ///
    /// Fails with [`SendError::TooLarge`] over [`Group::max_message`],
    /// with [`SendError::Stopped`] once this member was evicted (code
    /// [`StreamCode::Evicted`]) or cut off, and with
    /// [`SendError::Stream`] after [`Group::leave`].
    pub async fn send(&self, body: &[u8]) -> Result<(), SendError> {
        if self.lost() {
            self.rejoin()
                .await
                .map_err(|e| SendError::Stream(format!("not sent: {e}")))?;
        }
        let mut send = self.inner.send.lock().await;
        match send.as_mut() {
            Some(s) => s.send(body).await,
            None => Err(SendError::Stream("this member has left the group".into())),
        }
    }

    /// The next event: a member's message, a count of messages this member
    /// missed, or its eviction. `Ok(None)` once the coordinator has ended
    /// the membership (after a leave or an eviction), or the client has
    /// ended.
    ///
    /// A membership whose session is lost is joined again once the client
    /// has reconnected; broadcasts sent while it was away do not reach it.
    pub async fn recv(&self) -> Result<Option<GroupEvent>, RecvError> {
        loop {
            let got = {
                let mut recv = self.inner.recv.lock().await;
                if let Some(fresh) = lock(&self.inner.fresh).take() {
                    *recv = fresh;
                }
                recv.recv().await
            };
            match got {
                Ok(Some(msg)) => {
                    let event =
                        GroupEvent::parse(msg).map_err(|e| RecvError::Malformed(e.to_string()))?;
                    if let GroupEvent::Evicted { reason } = &event {
                        info!(group = %self.inner.name, cause = %Untrusted::reason(reason), "evicted from group");
                    }
                    return Ok(Some(event));
                }
                // The coordinator ended this membership (a leave or an
                // eviction), and no rejoin has replaced it.
                end if (!self.lost() && lock(&self.inner.fresh).is_none())
                    || self.inner.send.lock().await.is_none() =>
                {
                    return end.map(|_| None)
                }
                _ => {
                    let Some(client) = self.inner.client.upgrade() else {
                        return Ok(None);
                    };
                    if client.wait_up().await.is_err() {
                        return Ok(None);
                    }
                    if let Err(e) = self.rejoin().await {
                        info!(group = %self.inner.name, cause = %Untrusted::reason(&e), "joining the group again failed");
                        if !matches!(e, OpenError::Session(_)) {
                            return Err(RecvError::Stream(format!("joining the group again: {e}")));
                        }
                    }
                }
            }
        }
    }

    /// Whether the membership's connection has closed (the session was
    /// lost).
    fn lost(&self) -> bool {
        lock(&self.inner.conn).close_reason().is_some()
    }

    /// Join again on the client's current session, unless another call
    /// already has.
    async fn rejoin(&self) -> Result<(), OpenError> {
        let _one = self.inner.rejoining.lock().await;
        if !self.lost() {
            return Ok(());
        }
        let client = self
            .inner
            .client
            .upgrade()
            .ok_or_else(|| OpenError::Session("the client is gone".into()))?;
        let joined = client.join_stream(&self.inner.name).await?;
        {
            let mut send = self.inner.send.lock().await;
            if send.is_none() {
                // Left meanwhile.
                let s = joined.send;
                let _ = s.finish().await;
                return Ok(());
            }
            *send = Some(joined.send);
        }
        *lock(&self.inner.fresh) = Some(joined.recv);
        *lock(&self.inner.conn) = joined.conn;
        info!(group = %self.inner.name, members = joined.members, "joined the group again after a reconnect");
        Ok(())
    }

    /// Leave the group: end this member's side. The coordinator then ends
    /// the stream, so [`Group::recv`] returns `None` after any events
    /// already on their way. Ends the membership for every clone.
    pub async fn leave(self) -> Result<(), SendError> {
        let taken = self.inner.send.lock().await.take();
        debug!(group = %self.inner.name, "leaving group");
        match taken {
            Some(s) => s.finish().await,
            None => Ok(()),
        }
    }
}
