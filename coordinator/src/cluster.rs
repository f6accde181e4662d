//! The etcd directory: names unique across the coordinators of a cluster
//! (`run --etcd URL --cluster NAME`).
//!
//! Every key lives under `/qmesh/<cluster>/` (docs/cluster-design.md):
//!
//! - `members/<id>`: each coordinator, under its own lease;
//! - `names/<name>`: the member holding the name and the credential it was
//!   claimed with, under the holder's lease, so that a dead coordinator's
//!   names free themselves when its lease expires.
//!
//! A claim is one transaction, `If create_revision(names/N) == 0 Then Put
//! Else Get`; a holder with the same credential (a client that reconnected
//! here) is taken over with `If mod_revision(names/N) == seen Then Put`.
//! etcd serialises transactions on a key, so concurrent claims of one name
//! through any number of coordinators commit one `Put`. A release deletes
//! the key only if it is still the claim's revision.
//!
//! One watch of the prefix keeps a local copy of the members and names:
//! a name of this coordinator put by another member is lost (its session
//! is closed), and a name of this coordinator deleted (its lease expired
//! while etcd was away) is claimed again. etcd is never on the data path.
//!
//! When the keep-alive has not been answered for a whole TTL, or etcd says
//! the lease is gone, claims are refused with `Unavailable` (the client
//! retries) until a new lease is granted and every name still served here
//! has been claimed again under it; a name claimed elsewhere meanwhile
//! closes its session here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use qmesh_proto::codes::RejectCode;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::directory::{
    Claim, ClaimCredential, ClusterView, Directory, Member, NameLost, OnLost, OnRevoked, Pending,
};
use crate::registry::Rejection;
use qmesh_certs::Fingerprint;

/// How long one etcd request may take before the directory counts as
/// unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Claims of names serialised on this member: names hash to one of these.
const STRIPES: usize = 64;

/// How a coordinator joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// etcd's client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// The cluster's name: every key is under `/qmesh/<cluster>/`.
    pub cluster: String,
    /// The lease's time to live: how soon a dead coordinator's names are
    /// free.
    pub lease_ttl: Duration,
    /// The address clients reach this coordinator on.
    pub clients: SocketAddr,
    /// The address of this coordinator's member link endpoint and the
    /// fingerprint of the certificate it presents (`None`: no links).
    pub link: Option<(SocketAddr, Fingerprint)>,
}

/// `names/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NameRecord {
    /// The holding member's id.
    member: String,
    /// The certificate's fingerprint, hex.
    fingerprint: String,
    /// SHA-256 of its public key, hex, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl NameRecord {
    fn of(member: &str, credential: &ClaimCredential) -> Self {
        NameRecord {
            member: member.to_owned(),
            fingerprint: hex::encode(credential.fingerprint.0),
            key: credential.key.map(hex::encode),
        }
    }

    /// The same certificate, or one for the same key: today's takeover
    /// rule, across coordinators.
    fn same_credential(&self, credential: &ClaimCredential) -> bool {
        self.fingerprint == hex::encode(credential.fingerprint.0)
            || (credential.key.is_some() && self.key == credential.key.map(hex::encode))
    }
}

/// A name this member holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// The claim of the session whose release gives it up.
    ticket: u64,
    /// The key's revision when this member last wrote it.
    revision: i64,
    credential: ClaimCredential,
}

/// The etcd directory. See the module documentation.
pub struct EtcdDirectory {
    client: Client,
    prefix: String,
    cluster: String,
    me: String,
    ttl: Duration,
    member: Member,
    lease: AtomicI64,
    /// Claims may be made: the lease is live as far as this member knows.
    available: AtomicBool,
    /// Set by `leave`: the keep-alive stops, and no new lease is taken.
    leaving: AtomicBool,
    next_ticket: AtomicU64,
    /// Names held here, by name.
    held: Mutex<HashMap<String, Held>>,
    /// Every name in the cluster → its member and the fingerprint it was
    /// claimed with, from the watch.
    names: Mutex<HashMap<String, (String, String)>>,
    /// Revocations from other members (and those made before the start)
    /// seen before `on_revoked` was set, handed to it when it is.
    early_revoked: Mutex<Vec<(Fingerprint, String)>>,
    on_revoked: OnceLock<OnRevoked>,
    /// The members, from the watch.
    members: Mutex<HashMap<String, Member>>,
    on_lost: OnceLock<OnLost>,
    /// Set when a name held here was found deleted: claim again.
    reclaim: tokio::sync::Notify,
    /// Bumped when the members or the names change.
    changes: tokio::sync::watch::Sender<u64>,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for EtcdDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDirectory")
            .field("prefix", &self.prefix)
            .field("me", &self.me)
            .field("available", &self.available.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// `Unavailable`, with what the client does about it.
fn unavailable(why: &str) -> Rejection {
    Rejection {
        code: RejectCode::Unavailable,
        message: format!(
            "directory unavailable; retrying: the coordinator cannot reach the cluster's \
             directory ({why}), so it cannot claim the name without risking a duplicate"
        ),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random member id: 16 hex digits.
fn random_id() -> String {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random source");
    hex::encode(bytes)
}

/// Run one etcd request within [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
    }
}

impl EtcdDirectory {
    /// Connect to etcd, take a lease, register this coordinator under it,
    /// read the cluster and start the keep-alive and the watch.
    pub async fn join(settings: ClusterSettings) -> anyhow::Result<Arc<EtcdDirectory>> {
        let where_ = settings.endpoints.join(", ");
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let client = tokio::time::timeout(
            REQUEST_TIMEOUT * 2,
            Client::connect(&settings.endpoints, Some(options)),
        )
        .await
        .map_err(|_| anyhow!("etcd at {where_} did not answer"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!("joining the cluster through etcd at {where_}: check that etcd runs there")
        })?;
        let ttl = settings.lease_ttl.max(Duration::from_secs(1));
        let me = random_id();
        let member = Member {
            id: me.clone(),
            clients: settings.clients.to_string(),
            started: now_unix(),
            peers: settings.link.map(|(a, _)| a.to_string()),
            fingerprint: settings.link.map(|(_, f)| hex::encode(f.0)),
        };
        let dir = Arc::new(EtcdDirectory {
            client,
            prefix: format!("/qmesh/{}/", settings.cluster),
            cluster: settings.cluster.clone(),
            me,
            ttl,
            member,
            lease: AtomicI64::new(0),
            available: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            next_ticket: AtomicU64::new(1),
            held: Mutex::default(),
            names: Mutex::default(),
            members: Mutex::default(),
            on_lost: OnceLock::new(),
            early_revoked: Mutex::default(),
            on_revoked: OnceLock::new(),
            reclaim: tokio::sync::Notify::new(),
            changes: tokio::sync::watch::Sender::new(0),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        });
        dir.renew()
            .await
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("joining the cluster through etcd at {where_}"))?;
        let revision = dir
            .snapshot()
            .await
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("reading the cluster from etcd at {where_}"))?;
        info!(cluster = %settings.cluster, member = %dir.me, etcd = %where_, "joined the cluster");
        tokio::spawn(Arc::clone(&dir).keep_alive());
        tokio::spawn(Arc::clone(&dir).watch(revision));
        Ok(dir)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// This coordinator's member id.
    pub fn id(&self) -> &str {
        &self.me
    }

    fn name_key(&self, name: &str) -> String {
        format!("{}names/{name}", self.prefix)
    }

    fn member_key(&self) -> String {
        format!("{}members/{}", self.prefix, self.me)
    }

    fn stripe(&self, name: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        &self.stripes[(h.finish() as usize) % STRIPES]
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lost(&self, lost: NameLost) {
        warn!(name = %qmesh_proto::Untrusted::name(&lost.name), reason = %lost.reason, "a name held here was lost");
        if let Some(f) = self.on_lost.get() {
            f(lost);
        }
    }

    /// The member holding a name, described for a refusal.
    fn describe_member(&self, id: &str) -> String {
        match self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            Some(m) => format!("coordinator {id} at {}", m.clients),
            None => format!("coordinator {id}"),
        }
    }

    async fn claim_name(
        &self,
        name: &str,
        credential: ClaimCredential,
    ) -> Result<Claim, Rejection> {
        if !self.available.load(Ordering::Acquire) {
            return Err(unavailable("this coordinator's lease is not live"));
        }
        let _turn = self.stripe(name).lock().await;
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        if self.held().contains_key(name) {
            // Held here: this coordinator's registry decides between the
            // sessions, as for a coordinator on its own.
            return Ok(Claim(ticket));
        }
        let key = self.name_key(name);
        let record = serde_json::to_string(&NameRecord::of(&self.me, &credential))
            .expect("a name record serialises");
        let mut client = self.client.clone();
        for _ in 0..4 {
            let lease = self.lease.load(Ordering::Acquire);
            let put = TxnOp::put(
                key.as_str(),
                record.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            );
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([put.clone()])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let answer = bounded("claiming the name", client.txn(txn))
                .await
                .map_err(|e| unavailable(&e))?;
            let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
            if answer.succeeded() {
                self.keep(name, ticket, revision, credential);
                return Ok(Claim(ticket));
            }
            let Some(kv) = first_kv(answer.op_responses()) else {
                continue; // released meanwhile: claim again
            };
            let holder: Option<NameRecord> = serde_json::from_slice(kv.value()).ok();
            let takeover = match &holder {
                // A record of this member with no session here: a release
                // on its way.
                Some(h) if h.member == self.me => true,
                Some(h) => h.same_credential(&credential),
                None => false,
            };
            if !takeover {
                let by = holder
                    .map(|h| self.describe_member(&h.member))
                    .unwrap_or_else(|| "another coordinator".into());
                return Err(Rejection {
                    code: RejectCode::NameTaken,
                    message: format!(
                        "the name \"{name}\" is taken by a client with another credential on \
                         {by}; choose another name or wait until that client leaves"
                    ),
                });
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([put]);
            let answer = bounded("taking the name over", client.txn(txn))
                .await
                .map_err(|e| unavailable(&e))?;
            if answer.succeeded() {
                let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
                self.keep(name, ticket, revision, credential);
                return Ok(Claim(ticket));
            }
        }
        Err(unavailable("the name changed hands at every try"))
    }

    fn keep(&self, name: &str, ticket: u64, revision: i64, credential: ClaimCredential) {
        self.held().insert(
            name.to_owned(),
            Held {
                ticket,
                revision,
                credential,
            },
        );
        self.names.lock().unwrap_or_else(|e| e.into_inner()).insert(
            name.to_owned(),
            (self.me.clone(), hex::encode(credential.fingerprint.0)),
        );
    }

    /// Delete `names/N` if it is still at `revision`; tried again while
    /// etcd does not answer (the key is under this member's lease, so it
    /// would otherwise keep the name from everyone else).
    async fn delete_name(self: Arc<Self>, name: String, revision: i64) {
        let key = self.name_key(&name);
        let mut wait = Duration::from_millis(100);
        loop {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            let mut client = self.client.clone();
            match bounded("releasing a name", client.txn(txn)).await {
                Ok(_) => return,
                Err(e) => {
                    warn!(name = %qmesh_proto::Untrusted::name(&name), cause = %e, "the name cannot be released yet; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.ttl);
                }
            }
        }
    }

    /// Take a new lease, register this member under it, and claim every
    /// name held here again under it; then claims may be made.
    async fn renew(&self) -> Result<(), String> {
        self.available.store(false, Ordering::Release);
        let mut client = self.client.clone();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = bounded("taking a lease", client.lease_grant(ttl, None))
            .await?
            .id();
        self.lease.store(lease, Ordering::Release);
        let record = serde_json::to_string(&self.member).expect("a member record serialises");
        bounded(
            "registering this coordinator",
            client.put(
                self.member_key(),
                record,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        self.claim_again(lease).await?;
        self.available.store(true, Ordering::Release);
        info!(lease, "the lease is live: names may be claimed");
        Ok(())
    }

    /// Claim every name held here again, under `lease`: each is either
    /// still this member's (moved to the lease) or free (claimed), or was
    /// claimed elsewhere meanwhile (its session is closed here).
    async fn claim_again(&self, lease: i64) -> Result<(), String> {
        let names: Vec<(String, Held)> = self.held().iter().map(|(n, h)| (n.clone(), *h)).collect();
        let mut client = self.client.clone();
        for (name, held) in names {
            let _turn = self.stripe(&name).lock().await;
            let key = self.name_key(&name);
            let record = serde_json::to_string(&NameRecord::of(&self.me, &held.credential))
                .expect("a name record serialises");
            let put = TxnOp::put(
                key.as_str(),
                record.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            );
            let txn = Txn::new()
                .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                .and_then([put.clone()])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let answer = bounded("claiming a name again", client.txn(txn)).await?;
            let mut revision = answer.header().map(|h| h.revision()).unwrap_or(0);
            if !answer.succeeded() {
                let kv = first_kv(answer.op_responses());
                let holder: Option<NameRecord> = kv
                    .as_ref()
                    .and_then(|kv| serde_json::from_slice(kv.value()).ok());
                match (kv, holder) {
                    (Some(kv), Some(h)) if h.member == self.me => {
                        let txn = Txn::new()
                            .when([Compare::mod_revision(
                                key.as_str(),
                                CompareOp::Equal,
                                kv.mod_revision(),
                            )])
                            .and_then([put]);
                        let answer =
                            bounded("moving a name to the new lease", client.txn(txn)).await?;
                        if !answer.succeeded() {
                            return Err("a name changed while it was moved to the new lease".into());
                        }
                        revision = answer.header().map(|h| h.revision()).unwrap_or(0);
                    }
                    (_, holder) => {
                        let still = {
                            let mut held_now = self.held();
                            match held_now.get(&name) {
                                Some(h) if h.ticket == held.ticket => {
                                    held_now.remove(&name);
                                    true
                                }
                                _ => false,
                            }
                        };
                        if still {
                            let by = holder
                                .as_ref()
                                .map(|h| self.describe_member(&h.member))
                                .unwrap_or_else(|| "another coordinator".into());
                            self.lost(NameLost {
                                replaced: holder
                                    .as_ref()
                                    .is_some_and(|h| h.same_credential(&held.credential)),
                                reason: format!(
                                    "the name was claimed through {by} while this coordinator \
                                     could not reach the cluster's directory"
                                ),
                                name,
                            });
                        }
                        continue;
                    }
                }
            }
            if let Some(h) = self.held().get_mut(&name) {
                h.revision = revision;
            }
        }
        Ok(())
    }

    /// Keep the lease alive at a third of its TTL. Past a whole TTL without
    /// an answer, or when etcd says the lease is gone, claims stop until
    /// [`EtcdDirectory::renew`] succeeds.
    async fn keep_alive(self: Arc<Self>) {
        let every = self.ttl / 3;
        let mut last_ok = Instant::now();
        loop {
            if self.leaving.load(Ordering::Acquire) {
                return;
            }
            let lease = self.lease.load(Ordering::Acquire);
            let mut client = self.client.clone();
            let stream = bounded("keeping the lease alive", client.lease_keep_alive(lease)).await;
            let (mut keeper, mut answers) = match stream {
                Ok(s) => s,
                Err(e) => {
                    self.not_answered(&mut last_ok, &e).await;
                    tokio::time::sleep(every).await;
                    continue;
                }
            };
            let mut tick = tokio::time::interval(every);
            loop {
                if self.leaving.load(Ordering::Acquire) {
                    return;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = self.reclaim.notified() => {
                        if let Err(e) = self.claim_again(lease).await {
                            warn!(cause = %e, "claiming this coordinator's names again failed; it will be tried with a new lease");
                            self.not_answered(&mut last_ok, &e).await;
                        }
                        if self.lease.load(Ordering::Acquire) != lease {
                            break;
                        }
                        continue;
                    }
                }
                let sent = async {
                    keeper.keep_alive().await?;
                    answers.message().await
                };
                match tokio::time::timeout(every.max(Duration::from_millis(500)), sent).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                        last_ok = Instant::now();
                        if !self.available.load(Ordering::Acquire) {
                            // etcd answered again before the lease ended.
                            match self.claim_again(lease).await {
                                Ok(()) => {
                                    self.available.store(true, Ordering::Release);
                                    info!("the directory answers again: names may be claimed");
                                }
                                Err(e) => {
                                    warn!(cause = %e, "claiming this coordinator's names again failed")
                                }
                            }
                        }
                    }
                    Ok(Ok(Some(_))) => {
                        warn!(lease, "the lease has expired; taking a new one");
                        self.available.store(false, Ordering::Release);
                        self.renew_until_done(&mut last_ok).await;
                        break;
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        self.not_answered(&mut last_ok, "the keep-alive stream ended")
                            .await;
                        break;
                    }
                    Err(_) => {
                        self.not_answered(&mut last_ok, "no answer to the keep-alive")
                            .await;
                        if self.lease.load(Ordering::Acquire) != lease {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The keep-alive went unanswered: past a whole TTL since the last
    /// answer, stop claims and take a new lease.
    async fn not_answered(&self, last_ok: &mut Instant, why: &str) {
        if last_ok.elapsed() < self.ttl {
            return;
        }
        if self.available.swap(false, Ordering::AcqRel) {
            warn!(cause = %why, ttl_s = self.ttl.as_secs(), "the directory has not answered for a whole lease: claims are refused until it does");
        }
        self.renew_until_done(last_ok).await;
    }

    async fn renew_until_done(&self, last_ok: &mut Instant) {
        let mut wait = Duration::from_millis(200);
        loop {
            if self.leaving.load(Ordering::Acquire) {
                return;
            }
            match self.renew().await {
                Ok(()) => {
                    *last_ok = Instant::now();
                    return;
                }
                Err(e) => {
                    warn!(cause = %e, "taking a new lease failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.ttl);
                }
            }
        }
    }

    /// Read the whole prefix into the local copy; returns the revision it
    /// was read at.
    async fn snapshot(&self) -> Result<i64, String> {
        let mut client = self.client.clone();
        let answer = bounded(
            "reading the cluster",
            client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut names = HashMap::new();
        let mut members = HashMap::new();
        for kv in answer.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            if let Some(name) = key.strip_prefix(&format!("{}names/", self.prefix)) {
                if let Ok(r) = serde_json::from_slice::<NameRecord>(kv.value()) {
                    names.insert(name.to_owned(), (r.member, r.fingerprint));
                }
            } else if let Some(fp) = key.strip_prefix(&format!("{}revoked/", self.prefix)) {
                self.revoked_seen(fp, kv.value());
            } else if let Some(id) = key.strip_prefix(&format!("{}members/", self.prefix)) {
                if let Ok(m) = serde_json::from_slice::<Member>(kv.value()) {
                    members.insert(id.to_owned(), m);
                }
            }
        }
        // A name held here that the snapshot gives to another member was
        // lost; one it does not have is claimed again.
        let mut missing = false;
        let lost: Vec<(String, String)> = {
            let held = self.held();
            held.keys()
                .filter_map(|n| match names.get(n).map(|(m, _)| m) {
                    Some(m) if *m != self.me => Some((n.clone(), m.clone())),
                    Some(_) => None,
                    None => {
                        missing = true;
                        None
                    }
                })
                .collect()
        };
        *self.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
        *self.members.lock().unwrap_or_else(|e| e.into_inner()) = members;
        self.changed();
        for (name, member) in lost {
            self.taken_elsewhere(&name, &member, None);
        }
        if missing {
            self.reclaim.notify_one();
        }
        Ok(answer.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// `names/N`, held here, was put by `member`: the session here closes.
    fn taken_elsewhere(&self, name: &str, member: &str, record: Option<&NameRecord>) {
        let Some(held) = self.held().remove(name) else {
            return;
        };
        let replaced = record.is_some_and(|r| r.same_credential(&held.credential));
        let reason = if replaced {
            format!(
                "this name was taken over by a new session with the same credential on {}",
                self.describe_member(member)
            )
        } else {
            format!(
                "this name is now held through {}",
                self.describe_member(member)
            )
        };
        self.lost(NameLost {
            name: name.to_owned(),
            replaced,
            reason,
        });
    }

    /// Follow the prefix from `revision`; read it whole again whenever
    /// the watch breaks.
    async fn watch(self: Arc<Self>, mut revision: i64) {
        let names_prefix = format!("{}names/", self.prefix);
        let members_prefix = format!("{}members/", self.prefix);
        let revoked_prefix = format!("{}revoked/", self.prefix);
        loop {
            let mut client = self.client.clone();
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            match bounded(
                "watching the cluster",
                client.watch(self.prefix.as_str(), Some(options)),
            )
            .await
            {
                Ok(mut stream) => {
                    while let Ok(Some(answer)) = stream.message().await {
                        if answer.canceled() {
                            break;
                        }
                        for event in answer.events() {
                            let Some(kv) = event.kv() else { continue };
                            revision = revision.max(kv.mod_revision());
                            let Ok(key) = kv.key_str() else { continue };
                            let put = event.event_type() == EventType::Put;
                            if let Some(name) = key.strip_prefix(&names_prefix) {
                                self.name_event(name, put, kv);
                            } else if let Some(fp) = key.strip_prefix(&revoked_prefix) {
                                if put {
                                    self.revoked_seen(fp, kv.value());
                                }
                            } else if let Some(id) = key.strip_prefix(&members_prefix) {
                                let mut members =
                                    self.members.lock().unwrap_or_else(|e| e.into_inner());
                                match serde_json::from_slice::<Member>(kv.value()) {
                                    Ok(m) if put => {
                                        members.insert(id.to_owned(), m);
                                    }
                                    _ => {
                                        members.remove(id);
                                    }
                                }
                                drop(members);
                                self.changed();
                            }
                        }
                    }
                }
                Err(e) => warn!(cause = %e, "the watch of the cluster failed; trying again"),
            }
            // Broken or cancelled (compacted): read everything again.
            loop {
                match self.snapshot().await {
                    Ok(r) => {
                        revision = r;
                        break;
                    }
                    Err(e) => {
                        warn!(cause = %e, "reading the cluster failed; trying again");
                        tokio::time::sleep(self.ttl / 3).await;
                    }
                }
            }
        }
    }

    /// `revoked/FP` with the name it was revoked for: to the coordinator,
    /// or kept until it listens.
    fn revoked_seen(&self, fp: &str, value: &[u8]) {
        let Ok(fingerprint) = fp.parse::<Fingerprint>() else {
            warn!(key = %qmesh_proto::Untrusted::name(fp), "a revocation in the directory is not a fingerprint; ignored");
            return;
        };
        let name = String::from_utf8_lossy(value).into_owned();
        let mut early = self.early_revoked.lock().unwrap_or_else(|e| e.into_inner());
        match self.on_revoked.get() {
            Some(f) => {
                drop(early);
                f(fingerprint, name);
            }
            None => early.push((fingerprint, name)),
        }
    }

    fn name_event(&self, name: &str, put: bool, kv: &KeyValue) {
        if put {
            let record: Option<NameRecord> = serde_json::from_slice(kv.value()).ok();
            let member = record
                .as_ref()
                .map(|r| r.member.clone())
                .unwrap_or_default();
            let fingerprint = record
                .as_ref()
                .map(|r| r.fingerprint.clone())
                .unwrap_or_default();
            self.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_owned(), (member.clone(), fingerprint));
            if member != self.me {
                self.taken_elsewhere(name, &member, record.as_ref());
            }
        } else {
            self.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
            if self.held().contains_key(name) {
                // Deleted while held here: this member's lease ended.
                self.reclaim.notify_one();
            }
        }
        self.changed();
    }
}

/// The key a `Get` in a transaction's else branch found.
fn first_kv(answers: Vec<TxnOpResponse>) -> Option<KeyValue> {
    answers.into_iter().find_map(|a| match a {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

impl Directory for Arc<EtcdDirectory> {
    fn claim<'a>(
        &'a self,
        name: &'a str,
        credential: ClaimCredential,
    ) -> Pending<'a, Result<Claim, Rejection>> {
        Box::pin(self.claim_name(name, credential))
    }

    fn admitted(&self, name: &str, claim: Claim) {
        if let Some(h) = self.held().get_mut(name) {
            h.ticket = claim.0;
        }
    }

    fn release(&self, name: &str, claim: Claim) {
        let revision = {
            let mut held = self.held();
            match held.get(name) {
                Some(h) if h.ticket == claim.0 => {
                    let r = h.revision;
                    held.remove(name);
                    r
                }
                _ => return,
            }
        };
        tokio::spawn(Arc::clone(self).delete_name(name.to_owned(), revision));
    }

    fn view(&self) -> Option<ClusterView> {
        let mut members: Vec<Member> = self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let mut names: Vec<(String, String)> = self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, (m, _))| (n.clone(), m.clone()))
            .collect();
        names.sort();
        Some(ClusterView {
            cluster: self.cluster.clone(),
            me: self.me.clone(),
            available: self.available.load(Ordering::Acquire),
            members,
            names,
        })
    }

    fn on_lost(&self, f: OnLost) {
        let _ = self.on_lost.set(f);
    }

    fn member_of(&self, name: &str) -> Option<String> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let (member, _) = names.get(name)?;
        (*member != self.me).then(|| member.clone())
    }

    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    fn fingerprint_elsewhere(&self, name: &str) -> Option<Fingerprint> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let (member, fp) = names.get(name)?;
        (*member != self.me).then(|| fp.parse().ok()).flatten()
    }

    fn publish_revoked<'a>(
        &'a self,
        revoked: &'a [(Fingerprint, String)],
    ) -> Pending<'a, Result<(), String>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            for (fp, name) in revoked {
                let key = format!("{}revoked/{}", self.prefix, hex::encode(fp.0));
                bounded(
                    "publishing a revocation",
                    client.put(key, name.as_str(), None),
                )
                .await?;
            }
            Ok(())
        })
    }

    fn leave(&self) -> Pending<'_, ()> {
        Box::pin(async move {
            self.leaving.store(true, Ordering::Release);
            self.available.store(false, Ordering::Release);
            let lease = self.lease.load(Ordering::Acquire);
            let mut client = self.client.clone();
            match bounded("leaving the cluster", client.lease_revoke(lease)).await {
                Ok(_) => info!(member = %self.me, "left the cluster: its names are free"),
                Err(e) => {
                    warn!(cause = %e, "leaving the cluster failed; its names are free when its lease ends")
                }
            }
        })
    }

    fn on_revoked(&self, f: OnRevoked) {
        let early = {
            let mut early = self.early_revoked.lock().unwrap_or_else(|e| e.into_inner());
            if self.on_revoked.set(f).is_err() {
                return;
            }
            std::mem::take(&mut *early)
        };
        if let Some(f) = self.on_revoked.get() {
            for (fp, name) in early {
                f(fp, name);
            }
        }
    }
}
