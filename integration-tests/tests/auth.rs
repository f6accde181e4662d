//! Identity: the auth matrix (every refusal with a clear reason and no
//! application frame processed), token enrollment and renewal, revocation
//! in every mode, and impersonation attempts relayed and direct.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use qmesh_certs::Identity;
use qmesh_client::enroll::enroll;
use qmesh_client::error::ConnectError;
use qmesh_client::{Client, ClientConfig, Path, PathMode};
use qmesh_coordinator::auth::{token_key, Auth};
use qmesh_integration_tests::raw::without_certificate;
use qmesh_integration_tests::{
    next_message, next_stream, open_pair, open_pair_with, within, within_ok, Mesh, STEP,
};
use qmesh_proto::codes::RejectCode;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// A client CA made with rcgen directly, so that tests can issue
/// certificates with any validity period.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate for `name` valid from `from` to `until`.
    fn issue(&self, name: &str, from: OffsetDateTime, until: OffsetDateTime) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::DnsName(name.try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = from;
        params.not_after = until;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    fn valid(&self, name: &str) -> Identity {
        let now = OffsetDateTime::now_utc();
        self.issue(
            name,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
    }
}

fn with_identity(mut config: ClientConfig, identity: Identity) -> ClientConfig {
    config.identity = Some(Arc::new(identity));
    config
}

async fn ca_mesh(ca: &TestCa) -> Mesh {
    let roots = vec![ca.der.clone()];
    Mesh::start_with(|c| c.auth = Arc::new(Auth::ca(roots, None).unwrap())).await
}

async fn token_mesh(dir: &std::path::Path) -> Mesh {
    token_mesh_ttl(dir, Duration::from_secs(3600)).await
}

/// Issued certificates live `ttl` (plus the 5-minute backdate), so with a
/// short one they are past half their life at once and may renew.
async fn token_mesh_ttl(dir: &std::path::Path, ttl: Duration) -> Mesh {
    let auth = Auth::token(dir, ttl).unwrap();
    Mesh::start_with(|c| c.auth = Arc::new(auth)).await
}

/// Enroll `name` with a fresh token from the coordinator in `dir`; returns
/// its configuration carrying the issued certificate.
async fn enrolled(mesh: &Mesh, dir: &std::path::Path, name: &str) -> ClientConfig {
    let token = token_key(dir)
        .unwrap()
        .create(name, Duration::from_secs(60))
        .unwrap();
    let config = mesh.config(name);
    let id = within_ok(STEP, "enroll", enroll(&config, Some(&token)))
        .await
        .identity;
    with_identity(config, id)
}

/// `identity`'s key under a certificate from the token CA in `dir` that is
/// 100 s into a 120 s life: past half, so the coordinator renews it. (A
/// new certificate is due two thirds into its life, later than a test
/// should wait.)
fn aged(dir: &std::path::Path, identity: &Identity, name: &str) -> Identity {
    let ca = qmesh_coordinator::auth::token_ca(dir).unwrap();
    let now = SystemTime::now();
    let issued = ca
        .issue_client_valid(
            &identity.chain[0],
            name,
            now - Duration::from_secs(100),
            now + Duration::from_secs(20),
        )
        .unwrap();
    Identity {
        chain: vec![issued.cert],
        key: identity.key.clone_key(),
    }
}

async fn try_connect(config: ClientConfig) -> Result<Client, ConnectError> {
    within(STEP, "connect", Client::connect(config)).await
}

/// The refusal's text, asserting the connect failed.
fn refusal(r: Result<Client, ConnectError>) -> ConnectError {
    match r {
        Ok(c) => panic!("{} was let in", c.name()),
        Err(e) => e,
    }
}

/// Nothing past authentication happened: no session, channel or stream.
fn nothing_processed(mesh: &Mesh) {
    let s = mesh.coordinator.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        s.sessions_admitted.load(Relaxed),
        0,
        "a session was admitted"
    );
    assert_eq!(s.channels_joined.load(Relaxed), 0);
    assert_eq!(s.streams_relayed.load(Relaxed), 0);
}

fn hellos_refused(mesh: &Mesh) -> u64 {
    mesh.coordinator
        .stats()
        .hellos_refused
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn ca_mode_refuses_each_bad_certificate_with_its_reason() {
    let ca = TestCa::new("clients");
    let mesh = ca_mesh(&ca).await;
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let cases: Vec<(&str, Identity, &str)> = vec![
        (
            "expired",
            ca.issue("alice", now - day * 3, now - day),
            "expired or is not valid yet",
        ),
        (
            "not yet valid",
            ca.issue("alice", now + day, now + day * 3),
            "expired or is not valid yet",
        ),
        (
            "wrong CA",
            TestCa::new("someone else").valid("alice"),
            "not signed by the coordinator's client CA",
        ),
        (
            // Same issuer name, another key: the chain builds and its
            // signature fails (rustls sends decrypt_error).
            "another CA with the same name",
            TestCa::new("clients").valid("alice"),
            "another CA of the same name",
        ),
        (
            "self-signed",
            Identity::self_signed("alice").unwrap(),
            "not signed by the coordinator's client CA",
        ),
    ];
    for (case, identity, expected) in cases {
        let e = refusal(try_connect(with_identity(mesh.config("alice"), identity)).await);
        assert!(
            matches!(&e, ConnectError::CertificateRefused(m) if m.contains(expected)),
            "{case}: {e}"
        );
    }
    // All of those failed in the TLS handshake: not even a hello was read.
    assert_eq!(hellos_refused(&mesh), 0);
    // A good certificate for another name: refused at hello, naming it.
    let e = refusal(try_connect(with_identity(mesh.config("bob"), ca.valid("alice"))).await);
    assert!(
        matches!(&e, ConnectError::Rejected { code: RejectCode::NotAuthorised, message }
            if message.contains("this certificate is for alice") && message.contains("--name alice")),
        "{e}"
    );
    assert_eq!(hellos_refused(&mesh), 1);
    nothing_processed(&mesh);
    // And the right one gets in.
    let alice = try_connect(with_identity(mesh.config("alice"), ca.valid("alice")))
        .await
        .unwrap();
    assert_eq!(alice.name(), "alice");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_in_the_handshake() {
    let mesh = Mesh::start().await;
    let (_, closed) = without_certificate(&mesh.target()).await;
    let code = match &closed {
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        other => panic!("{other}"),
    };
    // CRYPTO_ERROR carrying TLS alert certificate_required (116).
    assert_eq!(code, 0x100 + 116, "{closed}");
    assert_eq!(hellos_refused(&mesh), 0);
    nothing_processed(&mesh);
}

#[tokio::test]
async fn token_mode_enrolls_once_renews_and_refuses_bad_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = token_mesh_ttl(dir.path(), Duration::from_secs(120)).await;
    let key = token_key(dir.path()).unwrap();

    // Without enrolling: told how to get in.
    let e = refusal(try_connect(mesh.config("alice")).await);
    assert!(
        matches!(&e, ConnectError::Rejected { code: RejectCode::NotAuthorised, message }
            if message.contains("token create")),
        "{e}"
    );
    // Bad, expired, foreign-pattern tokens.
    let expired = key
        .create_until("alice", SystemTime::now() - Duration::from_secs(60))
        .unwrap();
    let for_bob = key.create("bob", Duration::from_secs(60)).unwrap();
    for (token, expected) in [
        ("qmt1_00_00", "not issued by this coordinator"),
        ("hello", "not a qmesh enrollment token"),
        (expired.as_str(), "expired"),
        (for_bob.as_str(), "for names matching `bob`"),
    ] {
        let e = within(STEP, "enroll", enroll(&mesh.config("alice"), Some(token)))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ConnectError::Rejected { code: RejectCode::BadToken, message } if message.contains(expected)),
            "{token}: {e}"
        );
    }
    nothing_processed(&mesh);

    // A good token: a certificate for alice's own key.
    let token = key.create("alice", Duration::from_secs(60)).unwrap();
    let own = Identity::self_signed("alice").unwrap();
    let own_key = own.key_pem();
    let config = with_identity(mesh.config("alice"), own);
    let enrolled = within_ok(STEP, "enroll", enroll(&config, Some(&token))).await;
    assert_eq!(
        enrolled.identity.key_pem(),
        own_key,
        "the key never changes hands"
    );
    assert!(enrolled.expires > SystemTime::now() + Duration::from_secs(100));
    // It works once.
    let again = within(STEP, "enroll", enroll(&mesh.config("alice"), Some(&token)))
        .await
        .unwrap_err();
    assert!(
        matches!(&again, ConnectError::Rejected { code: RejectCode::BadToken, message } if message.contains("already used")),
        "{again}"
    );

    // Join with it, and talk to bob (enrolled with a pattern token).
    let alice = try_connect(with_identity(mesh.config("alice"), enrolled.identity))
        .await
        .unwrap();
    let bob_token = key.create("b*", Duration::from_secs(60)).unwrap();
    let bob_config = mesh.config("bob");
    let bob_id = within_ok(STEP, "enroll", enroll(&bob_config, Some(&bob_token)))
        .await
        .identity;
    let bob = try_connect(with_identity(bob_config, bob_id.clone()))
        .await
        .unwrap();
    let (to_bob, from_alice) = open_pair(&alice, &bob, "chat").await;
    let mut out = to_bob.open_stream().await.unwrap();
    out.send(b"enrolled").await.unwrap();
    out.finish().await.unwrap();
    let mut inbox = next_stream(&from_alice).await;
    assert_eq!(&next_message(&mut inbox).await[..], b"enrolled");

    // Renewal: an issued certificate past half its life gets a new one
    // for the same key.
    let bob_id = aged(dir.path(), &bob_id, "bob");
    let renewed = within_ok(
        STEP,
        "renew",
        enroll(&with_identity(mesh.config("bob"), bob_id.clone()), None),
    )
    .await;
    assert_ne!(renewed.identity.fingerprint(), bob_id.fingerprint());
    assert_eq!(renewed.identity.key_pem(), bob_id.key_pem());
    // Renewing for another name than the certificate's is refused.
    let e = within(
        STEP,
        "renew as alice",
        enroll(&with_identity(mesh.config("alice"), bob_id), None),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ConnectError::Rejected { message, .. } if message.contains("this certificate is for bob")),
        "{e}"
    );
}

#[tokio::test]
async fn renewal_before_half_the_lifetime_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = token_mesh(dir.path()).await;
    let config = enrolled(&mesh, dir.path(), "alice").await;
    let e = within(STEP, "renew", enroll(&config, None))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectError::Rejected { message, .. } if message.contains("cannot renew yet")),
        "{e}"
    );
}

#[tokio::test]
async fn a_renewed_certificate_takes_its_name_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = token_mesh_ttl(dir.path(), Duration::from_secs(120)).await;
    let config = enrolled(&mesh, dir.path(), "alice").await;
    let identity = aged(dir.path(), config.identity.as_deref().unwrap(), "alice");
    let config = with_identity(config, identity);
    let old = try_connect(config.clone()).await.unwrap();
    let renewed = enroll(&config, None).await.unwrap().identity;
    // Same key, new certificate: the old session is replaced.
    let new = try_connect(with_identity(mesh.config("alice"), renewed))
        .await
        .unwrap();
    let why = within(STEP, "old session replaced", old.closed()).await;
    assert!(why.contains("replaced"), "{why}");
    assert_eq!(new.name(), "alice");
}

#[tokio::test]
async fn concurrent_enrollments_with_one_token_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = token_mesh(dir.path()).await;
    let token = token_key(dir.path())
        .unwrap()
        .create("alice", Duration::from_secs(60))
        .unwrap();
    let attempts = (0..10).map(|_| {
        let config = mesh.config("alice");
        let token = token.clone();
        async move { enroll(&config, Some(&token)).await }
    });
    let results = within(
        STEP,
        "enrollments",
        futures_util::future::join_all(attempts),
    )
    .await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(r, ConnectError::Rejected { code: RejectCode::BadToken, message } if message.contains("already used")),
            "{r}"
        );
    }
}

/// Connect alice in `mode`'s way; returns her config (with her identity).
async fn alice_config(mesh: &Mesh, ca: &TestCa, dir: &std::path::Path, mode: &str) -> ClientConfig {
    match mode {
        "open" => with_identity(
            mesh.config("alice"),
            Identity::self_signed("alice").unwrap(),
        ),
        "ca" => with_identity(mesh.config("alice"), ca.valid("alice")),
        _ => enrolled(mesh, dir, "alice").await,
    }
}

#[tokio::test]
async fn revoke_disconnects_within_a_second_and_refuses_afterwards_in_every_mode() {
    for mode in ["open", "ca", "token"] {
        let ca = TestCa::new("clients");
        let dir = tempfile::tempdir().unwrap();
        let mesh = match mode {
            "open" => Mesh::start().await,
            "ca" => ca_mesh(&ca).await,
            _ => token_mesh(dir.path()).await,
        };
        let config = alice_config(&mesh, &ca, dir.path(), mode).await;
        let bob_config = match mode {
            "ca" => with_identity(mesh.config("bob"), ca.valid("bob")),
            "token" => enrolled(&mesh, dir.path(), "bob").await,
            _ => mesh.config("bob"),
        };
        let alice = try_connect(config.clone()).await.unwrap();
        let bob = try_connect(bob_config).await.unwrap();
        let (_to_bob, from_alice) = open_pair(&alice, &bob, "chat").await;

        let revoked = mesh.coordinator.control().revoke("alice");
        assert!(revoked.disconnected, "{mode}");
        assert!(revoked.certificates >= 1, "{mode}");
        let why = within(Duration::from_secs(1), "alice disconnected", alice.closed()).await;
        assert!(why.contains("revoked"), "{mode}: {why}");
        let end = within(STEP, "bob's channel ends", from_alice.ended()).await;
        assert!(
            matches!(end, qmesh_client::ChannelEnd::Lost { .. }),
            "{mode}: {end:?}"
        );

        // Refused in the handshake, or at hello when the client resumed its
        // TLS session (rustls does not verify a resumed certificate again).
        let e = refusal(try_connect(config.clone()).await);
        assert!(
            matches!(&e, ConnectError::CertificateRefused(m) if m.contains("revoked"))
                || matches!(&e, ConnectError::Rejected { code: RejectCode::NotAuthorised, message } if message.contains("revoked")),
            "{mode}: {e}"
        );
        // A fresh configuration (no TLS session to resume) with the same
        // certificate is refused in the handshake.
        let mut fresh = mesh.config("alice");
        fresh.identity = config.identity.clone();
        let e = refusal(try_connect(fresh).await);
        assert!(
            matches!(&e, ConnectError::CertificateRefused(m) if m.contains("revoked")),
            "{mode}: {e}"
        );
        if mode == "token" {
            // A revoked certificate cannot renew itself either.
            let e = within(STEP, "renew", enroll(&config, None))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, ConnectError::CertificateRefused(m) if m.contains("revoked"))
                    || matches!(&e, ConnectError::Rejected { message, .. } if message.contains("revoked")),
                "{e}"
            );
        }
        // Bob is untouched.
        assert_eq!(bob.name(), "bob");
        assert!(
            mesh.coordinator
                .control()
                .clients()
                .contains(&"bob".to_owned()),
            "{mode}"
        );
    }
}

#[tokio::test]
async fn no_client_can_appear_as_another_relayed_or_direct() {
    let ca = TestCa::new("clients");
    let mesh = ca_mesh(&ca).await;
    let mallory_id = ca.valid("mallory");
    let mut succeeded = 0;
    // alice offline, then online: mallory's certificate never passes as her.
    for online in [false, true] {
        let _alice = if online {
            Some(
                try_connect(with_identity(mesh.config("alice"), ca.valid("alice")))
                    .await
                    .unwrap(),
            )
        } else {
            None
        };
        match try_connect(with_identity(mesh.config("alice"), mallory_id.clone())).await {
            Ok(_) => succeeded += 1,
            Err(e) => assert!(
                matches!(
                    &e,
                    ConnectError::Rejected {
                        code: RejectCode::NotAuthorised,
                        ..
                    }
                ),
                "{e}"
            ),
        }
    }
    // Connected as herself, mallory's channels carry her name, stamped by
    // the coordinator, on the relay and on a direct path.
    let mallory = try_connect(with_identity(mesh.config("mallory"), mallory_id))
        .await
        .unwrap();
    let bob = try_connect(with_identity(mesh.config("bob"), ca.valid("bob")))
        .await
        .unwrap();
    for mode in [PathMode::Relay, PathMode::Direct] {
        // open_pair_with asserts the callee saw the opener's true name.
        let (out, inn) = open_pair_with(&mallory, &bob, "chat", mode).await;
        assert_eq!(inn.peer(), "mallory");
        assert_eq!(out.peer(), "bob");
        if mode == PathMode::Direct {
            assert!(
                matches!(inn.path(), Path::Direct { .. }),
                "{:?}",
                inn.path()
            );
        }
    }
    assert_eq!(succeeded, 0);
}

#[tokio::test]
async fn open_mode_binds_a_name_to_its_certificate_while_held() {
    let mesh = Mesh::start().await;
    let _alice = mesh.client("alice").await;
    let e = refusal(
        try_connect(with_identity(
            mesh.config("alice"),
            Identity::self_signed("alice").unwrap(),
        ))
        .await,
    );
    assert!(
        matches!(
            &e,
            ConnectError::Rejected {
                code: RejectCode::NameTaken,
                ..
            }
        ),
        "{e}"
    );
    // An Enroll in open mode is refused with the reason.
    let e = within(
        STEP,
        "enroll",
        enroll(&mesh.config("carol"), Some("qmt1_x_y")),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, ConnectError::Rejected { message, .. } if message.contains("open mode")),
        "{e}"
    );
}
