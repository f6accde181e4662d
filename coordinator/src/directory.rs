//! Who holds a name across coordinators: the directory a hello claims its
//! name in before the registry admits it.
//!
//! A coordinator on its own uses [`LocalDirectory`], which grants every
//! claim: its [`crate::registry::Registry`] alone decides, as it always
//! has. Coordinators in a cluster use the etcd directory
//! ([`crate::cluster::EtcdDirectory`], feature `etcd`), where a claim is an
//! etcd transaction bound to the coordinator's lease, so that one name is
//! held by one coordinator at a time. The rest of the coordinator sees
//! only this trait: claim before admitting, confirm after, release at the
//! leave.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use qmesh_certs::Fingerprint;
use serde::{Deserialize, Serialize};

use crate::registry::Rejection;

/// A claim on its way.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The credential a name is claimed with: what "the same credential"
/// compares across coordinators (the certificate, or its public key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimCredential {
    /// The certificate's fingerprint.
    pub fingerprint: Fingerprint,
    /// SHA-256 of its public key, when it could be read.
    pub key: Option<[u8; 32]>,
}

/// A claim the directory granted; given back with [`Directory::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Claim(pub u64);

/// A name held on this coordinator that the directory no longer gives it:
/// its session must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameLost {
    /// The name.
    pub name: String,
    /// The same credential took it over on another coordinator (a client
    /// that reconnected elsewhere); otherwise another client holds it now.
    pub replaced: bool,
    /// A sentence for the session's close.
    pub reason: String,
}

/// What the coordinator does when a name is lost ([`Directory::on_lost`]).
pub type OnLost = Box<dyn Fn(NameLost) + Send + Sync>;

/// What the coordinator does with a certificate another member revoked
/// ([`Directory::on_revoked`]): the fingerprint and the name it was
/// revoked for.
pub type OnRevoked = Box<dyn Fn(Fingerprint, String) + Send + Sync>;

/// A coordinator of the cluster, as the directory lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its id (random, made at its start).
    pub id: String,
    /// The address clients reach it on.
    pub clients: String,
    /// When it started (Unix seconds).
    pub started: u64,
    /// The address of its member link endpoint, which the other members
    /// dial (`None`: it takes no links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<String>,
    /// The fingerprint (hex) of the certificate its link endpoint
    /// presents: the only one a link to it may present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// What the directory knows of the cluster, for operators (`info`,
/// `clients`, `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The cluster's name.
    pub cluster: String,
    /// This coordinator's member id.
    pub me: String,
    /// Whether claims can be made now (the directory answers and this
    /// member's lease is live).
    pub available: bool,
    /// The members, this one included, by id.
    pub members: Vec<Member>,
    /// Every name held in the cluster, with the id of the member holding
    /// it, by name.
    pub names: Vec<(String, String)>,
}

/// Where names are claimed. See the module documentation.
pub trait Directory: Send + Sync + fmt::Debug {
    /// Claim `name` for a hello with `credential`. A refusal is a hello's
    /// refusal: `NameTaken` (another credential holds it on another
    /// coordinator) or `Unavailable` (the directory cannot be asked now).
    fn claim<'a>(
        &'a self,
        name: &'a str,
        credential: ClaimCredential,
    ) -> Pending<'a, Result<Claim, Rejection>>;

    /// The registry admitted the session that made `claim` for `name`: it
    /// is the one whose release gives the name up.
    fn admitted(&self, name: &str, claim: Claim);

    /// The session that made `claim` left (or was not admitted): give the
    /// name up, unless a newer session holds it.
    fn release(&self, name: &str, claim: Claim);

    /// The cluster as this directory sees it; `None` for a coordinator on
    /// its own.
    fn view(&self) -> Option<ClusterView>;

    /// Set what happens when a name held here is lost.
    fn on_lost(&self, f: OnLost);

    /// The fingerprint `name` was claimed with on another member, if it is
    /// held there: what a revocation by name revokes for a client that is
    /// not connected here.
    fn fingerprint_elsewhere(&self, name: &str) -> Option<Fingerprint>;

    /// Tell every member that these certificates (fingerprint, name) are
    /// revoked: each adds them to its revocation list and closes their
    /// sessions. Returns once the directory has them, or why not.
    fn publish_revoked<'a>(
        &'a self,
        revoked: &'a [(Fingerprint, String)],
    ) -> Pending<'a, Result<(), String>>;

    /// Set what happens when another member revokes a certificate (and,
    /// at the start, for every certificate revoked before).
    fn on_revoked(&self, f: OnRevoked);

    /// The coordinator has stopped: leave the cluster, freeing every name
    /// it held at once.
    fn leave(&self) -> Pending<'_, ()>;

    /// The member id holding `name`, when another member holds it.
    fn member_of(&self, _name: &str) -> Option<String> {
        None
    }

    /// Changes when the members or the names held elsewhere change: what
    /// the member links and presence follow. `None` on a coordinator on
    /// its own.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// The directory of a coordinator on its own: every claim is granted, and
/// the registry decides.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalDirectory;

impl Directory for LocalDirectory {
    fn claim<'a>(
        &'a self,
        _name: &'a str,
        _credential: ClaimCredential,
    ) -> Pending<'a, Result<Claim, Rejection>> {
        Box::pin(std::future::ready(Ok(Claim::default())))
    }

    fn admitted(&self, _name: &str, _claim: Claim) {}

    fn release(&self, _name: &str, _claim: Claim) {}

    fn view(&self) -> Option<ClusterView> {
        None
    }

    fn on_lost(&self, _f: OnLost) {}

    fn fingerprint_elsewhere(&self, _name: &str) -> Option<Fingerprint> {
        None
    }

    fn publish_revoked<'a>(
        &'a self,
        _revoked: &'a [(Fingerprint, String)],
    ) -> Pending<'a, Result<(), String>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn on_revoked(&self, _f: OnRevoked) {}

    fn leave(&self) -> Pending<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}
