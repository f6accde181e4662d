//! Who may join: the auth modes, enrollment, revocation.
//!
//! - `open` (development only): any client certificate; a name is bound to
//!   the certificate that holds it for the life of the session.
//! - `token`: clients enroll once with a one-use token and get a
//!   short-lived certificate for their own key, signed by the
//!   coordinator's client CA (`client-ca.pem` in the state directory); they
//!   join with it and renew it before it expires.
//! - `ca`: clients present certificates signed by a configured client CA;
//!   the names a certificate may use are its DNS subject alternative names.
//!
//! In every mode revoked certificates are refused in the TLS handshake
//! (alert `certificate_revoked`), and the revocation list is kept in the
//! state directory.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use qmesh_certs::{Ca, ClientAuth, Fingerprint};
use qmesh_proto::codes::RejectCode;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;

use crate::files::write_private;
use crate::token::{TokenKey, UsedTokens};

/// The auth mode a coordinator runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Any client certificate may join (development only).
    Open,
    /// Clients enroll with one-use tokens and get short-lived certificates.
    Token,
    /// Clients present certificates signed by a configured client CA.
    Ca,
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMode::Open => "open",
            AuthMode::Token => "token",
            AuthMode::Ca => "ca",
        })
    }
}

/// Default lifetime of a certificate issued in `token` mode.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Append one line to a state file (created 0600).
fn append_line(path: &Path, line: &str) {
    if let Err(e) = crate::files::append_private(path, line) {
        tracing::error!(file = %path.display(), cause = %e, "cannot write a state file");
    }
}

/// Lines of a state file as whitespace-separated fields (missing file: none).
fn read_records(path: &Path) -> Result<Vec<Vec<String>>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .filter(|f| !f.is_empty() && !f[0].starts_with('#'))
        .collect())
}

/// Revoked certificate fingerprints, kept in `revoked` in the state
/// directory (one `fingerprint name unix-time` per line).
#[derive(Debug, Default)]
pub struct Revocations {
    set: RwLock<HashSet<Fingerprint>>,
    file: Option<PathBuf>,
}

impl Revocations {
    fn load(dir: Option<&Path>) -> Result<Revocations> {
        let file = dir.map(|d| d.join("revoked"));
        let mut set = HashSet::new();
        if let Some(path) = &file {
            for fields in read_records(path)? {
                if let Ok(fp) = fields[0].parse::<Fingerprint>() {
                    set.insert(fp);
                }
            }
        }
        Ok(Revocations {
            set: RwLock::new(set),
            file,
        })
    }

    /// Whether `fp` is revoked.
    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.set
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(fp)
    }

    /// Revoke `fp` (held by `name`); returns whether it was new.
    pub fn add(&self, fp: Fingerprint, name: &str) -> bool {
        let new = self
            .set
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fp);
        if new {
            if let Some(path) = &self.file {
                append_line(path, &format!("{fp} {name} {}\n", now_secs()));
            }
        }
        new
    }

    /// How many fingerprints are revoked.
    pub fn len(&self) -> usize {
        self.set.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The state of `token` mode.
struct TokenState {
    ca: Ca,
    key: TokenKey,
    used: UsedTokens,
    ttl: Duration,
    /// Certificates issued per name, until they expire: what `revoke NAME`
    /// revokes besides the sessions it finds.
    issued: RwLock<HashMap<String, Vec<(Fingerprint, u64)>>>,
    issued_file: PathBuf,
}

/// The coordinator's authentication: what the TLS layer admits and what a
/// hello or an enrollment must show.
pub struct Auth {
    mode: AuthMode,
    client: ClientAuth,
    token: Option<TokenState>,
    revoked: Arc<Revocations>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

/// The client CA of `token` mode in `dir`: `client-ca.pem` and
/// `client-ca-key.pem`, made when missing.
pub fn token_ca(dir: &Path) -> Result<Ca> {
    let (cert, key) = (dir.join("client-ca.pem"), dir.join("client-ca-key.pem"));
    if cert.exists() && key.exists() {
        return Ca::load(&cert, &key).with_context(|| format!("loading {}", cert.display()));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = Ca::generate("qmesh client CA")?;
    ca.save(&cert, &key)?;
    Ok(ca)
}

/// The token key of `token` mode in `dir` (`token.key`), made when missing.
pub fn token_key(dir: &Path) -> Result<TokenKey> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    TokenKey::load_or_create(&dir.join("token.key"))
}

impl Auth {
    fn build(
        mode: AuthMode,
        state_dir: Option<&Path>,
        roots: Vec<CertificateDer<'static>>,
        token: Option<TokenState>,
    ) -> Result<Auth> {
        let revoked = Arc::new(Revocations::load(state_dir)?);
        let check = {
            let revoked = revoked.clone();
            Arc::new(move |fp: &Fingerprint| revoked.contains(fp))
        };
        let client = match mode {
            AuthMode::Open => ClientAuth::any(check),
            AuthMode::Ca => ClientAuth::ca(roots, false, check)?,
            AuthMode::Token => ClientAuth::ca(roots, true, check)?,
        };
        Ok(Auth {
            mode,
            client,
            token,
            revoked,
        })
    }

    /// `open` mode with revocations in memory only.
    pub fn development() -> Auth {
        let revoked = Arc::new(Revocations::default());
        let check = {
            let revoked = revoked.clone();
            Arc::new(move |fp: &Fingerprint| revoked.contains(fp))
        };
        Auth {
            mode: AuthMode::Open,
            client: ClientAuth::any(check),
            token: None,
            revoked,
        }
    }

    /// `open` mode. Revocations are kept in `state_dir` when given.
    pub fn open(state_dir: Option<&Path>) -> Result<Auth> {
        Auth::build(AuthMode::Open, state_dir, Vec::new(), None)
    }

    /// `ca` mode: clients present certificates that chain to `client_ca`.
    pub fn ca(client_ca: Vec<CertificateDer<'static>>, state_dir: Option<&Path>) -> Result<Auth> {
        Auth::build(AuthMode::Ca, state_dir, client_ca, None)
    }

    /// `token` mode with its state in `state_dir` (client CA, token key,
    /// used tokens, issued certificates); issued certificates live `ttl`.
    pub fn token(state_dir: &Path, ttl: Duration) -> Result<Auth> {
        let ca = token_ca(state_dir)?;
        let key = token_key(state_dir)?;
        let used = UsedTokens::load(&state_dir.join("tokens-used"))?;
        let issued_file = state_dir.join("issued");
        let now = now_secs();
        let mut issued: HashMap<String, Vec<(Fingerprint, u64)>> = HashMap::new();
        for f in read_records(&issued_file)? {
            if let (Some(fp), Some(name), Some(exp)) = (
                f.first().and_then(|s| s.parse::<Fingerprint>().ok()),
                f.get(1),
                f.get(2).and_then(|s| s.parse::<u64>().ok()),
            ) {
                if exp >= now {
                    issued.entry(name.clone()).or_default().push((fp, exp));
                }
            }
        }
        let kept: String = issued
            .iter()
            .flat_map(|(n, v)| v.iter().map(move |(fp, e)| format!("{fp} {n} {e}\n")))
            .collect();
        write_private(&issued_file, kept.as_bytes())?;
        let roots = vec![ca.cert_der().clone()];
        let state = TokenState {
            ca,
            key,
            used,
            ttl,
            issued: RwLock::new(issued),
            issued_file,
        };
        Auth::build(AuthMode::Token, Some(state_dir), roots, Some(state))
    }

    /// The mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The TLS-level check of client certificates.
    pub fn client_auth(&self) -> &ClientAuth {
        &self.client
    }

    /// The revocation list.
    pub fn revocations(&self) -> &Revocations {
        &self.revoked
    }

    /// Certificates issued for `name` that have not expired (`token` mode).
    pub fn issued_for(&self, name: &str) -> Vec<Fingerprint> {
        let Some(t) = &self.token else {
            return Vec::new();
        };
        let now = now_secs();
        t.issued
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|v| {
                v.iter()
                    .filter(|(_, e)| *e >= now)
                    .map(|(fp, _)| *fp)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether a hello for `name` with the certificate chain `chain` may
    /// join; the refusal says what to do.
    pub(crate) fn check_hello(
        &self,
        name: &str,
        chain: &[CertificateDer<'static>],
    ) -> Result<(), (RejectCode, String)> {
        // The TLS layer checked these already, except on a resumed TLS
        // session, where rustls restores the certificate from the ticket
        // without verifying it again.
        let Some(leaf) = chain.first() else {
            return Err((RejectCode::NotAuthorised, "no certificate presented".into()));
        };
        if self.revoked.contains(&Fingerprint::of(leaf)) {
            return Err((
                RejectCode::NotAuthorised,
                "this certificate has been revoked by the operator; ask them for a new credential"
                    .into(),
            ));
        }
        let now = now_secs() as i64;
        match qmesh_certs::clientauth::validity(leaf) {
            Some((from, until)) if from <= now && now <= until => {}
            _ => {
                return Err((
                    RejectCode::NotAuthorised,
                    "this certificate has expired or is not valid yet; check the clock, renew it, \
                     or enroll again with a new token"
                        .into(),
                ))
            }
        }
        match self.mode {
            AuthMode::Open => Ok(()),
            AuthMode::Ca | AuthMode::Token => {
                let Some(names) = self.client.issued_names(chain) else {
                    let what = if self.mode == AuthMode::Token {
                        "this coordinator admits enrolled clients only: ask the operator for a token \
                         (qmesh-coordinator token create --name NAME) and connect once with --token"
                    } else {
                        "this coordinator admits certificates from its client CA only; \
                         ask the operator for one and pass it with --cert/--key"
                    };
                    return Err((RejectCode::NotAuthorised, what.into()));
                };
                if names.iter().any(|n| n == name) {
                    Ok(())
                } else {
                    Err((
                        RejectCode::NotAuthorised,
                        format!(
                            "this certificate is for {}, so it cannot join as {name}; \
                             connect with --name {}",
                            if names.is_empty() {
                                "no name".to_owned()
                            } else {
                                names.join(", ")
                            },
                            names.first().map(String::as_str).unwrap_or("…")
                        ),
                    ))
                }
            }
        }
    }

    /// Enrollment (with a token) or renewal (without): a certificate for
    /// `name` and the key of `chain[0]`, PEM, and when it expires.
    pub(crate) fn enroll(
        &self,
        name: &str,
        token: Option<&str>,
        chain: &[CertificateDer<'static>],
    ) -> Result<(String, u64), (RejectCode, String)> {
        let Some(state) = &self.token else {
            return Err((
                RejectCode::NotAuthorised,
                format!(
                    "this coordinator runs in {} mode and issues no certificates; connect without --token",
                    self.mode
                ),
            ));
        };
        if let Err(e) = qmesh_proto::name::validate_client_name(name) {
            return Err((RejectCode::InvalidName, e.to_string()));
        }
        let Some(leaf) = chain.first() else {
            return Err((RejectCode::NotAuthorised, "no certificate presented".into()));
        };
        match token {
            Some(token) => {
                let claims = state
                    .key
                    .verify(token)
                    .map_err(|e| (RejectCode::BadToken, e.to_string()))?;
                state
                    .used
                    .redeem(&claims, name)
                    .map_err(|e| (RejectCode::BadToken, e.to_string()))?;
            }
            None => {
                self.check_hello(name, chain)
                    .map_err(|(code, msg)| (code, format!("cannot renew: {msg}")))?;
                // Renewal is for certificates past half their life: a
                // client cannot make the coordinator sign in a loop.
                if let Some((from, until)) = qmesh_certs::clientauth::validity(leaf) {
                    let half = from + (until - from) / 2;
                    let now = now_secs() as i64;
                    if now < half {
                        return Err((
                            RejectCode::NotAuthorised,
                            format!(
                                "cannot renew yet: this certificate is not past half its life; \
                                 renew in {} s",
                                half - now
                            ),
                        ));
                    }
                }
            }
        }
        let issued = state
            .ca
            .issue_client_for(leaf, name, state.ttl)
            .map_err(|e| {
                (
                    RejectCode::InvalidName,
                    format!("cannot issue a certificate for {name}: {e}"),
                )
            })?;
        let fp = Fingerprint::of(&issued.cert);
        {
            let now = now_secs();
            let mut map = state.issued.write().unwrap_or_else(|e| e.into_inner());
            let list = map.entry(name.to_owned()).or_default();
            list.retain(|(_, e)| *e >= now);
            list.push((fp, issued.expires));
        }
        append_line(
            &state.issued_file,
            &format!("{fp} {name} {}\n", issued.expires),
        );
        // A revocation that landed while this was issued covers the
        // presented certificate; it covers the new one too.
        if self.revoked.contains(&Fingerprint::of(leaf)) {
            self.revoked.add(fp, name);
            return Err((
                RejectCode::NotAuthorised,
                "this certificate has been revoked by the operator; ask them for a new credential"
                    .into(),
            ));
        }
        Ok((qmesh_certs::pem_encode_cert(&issued.cert), issued.expires))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use time::OffsetDateTime;

    use super::*;

    const HOUR: i64 = 3600;

    /// A client CA made with rcgen, to sign certificates with chosen names.
    struct TestCa {
        der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        fn new(common_name: &str) -> TestCa {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate().unwrap();
            let der = params.self_signed(&key).unwrap().der().clone();
            TestCa {
                der,
                issuer: Issuer::new(params, key),
            }
        }

        /// A client certificate with the DNS names `sans`, valid from an
        /// hour ago to an hour from now.
        fn issue(&self, common_name: &str, sans: &[&str]) -> CertificateDer<'static> {
            let now = now_secs() as i64;
            leaf(
                Some(&self.issuer),
                common_name,
                sans,
                now - HOUR,
                now + HOUR,
            )
        }
    }

    /// A client certificate for a fresh key, valid from `not_before` to
    /// `not_after` (Unix seconds), signed by `issuer` or else self-signed.
    fn leaf(
        issuer: Option<&Issuer<'_, KeyPair>>,
        common_name: &str,
        sans: &[&str],
        not_before: i64,
        not_after: i64,
    ) -> CertificateDer<'static> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = OffsetDateTime::from_unix_timestamp(not_before).unwrap();
        params.not_after = OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = match issuer {
            Some(issuer) => params.signed_by(&key, issuer),
            None => params.self_signed(&key),
        };
        cert.unwrap().der().clone()
    }

    /// A self-signed certificate for `name`, valid an hour either side of now.
    fn self_signed(name: &str) -> CertificateDer<'static> {
        let now = now_secs() as i64;
        leaf(None, name, &[name], now - HOUR, now + HOUR)
    }

    /// Runs `f` with the current Unix second, again if the clock ticked to
    /// the next second while it ran. `check_hello` reads the wall clock, so
    /// a test of the exact validity boundaries needs its certificates and
    /// the check to agree on "now"; a retry happens only when a second
    /// boundary fell inside `f`, and nothing sleeps.
    fn in_one_second<T>(mut f: impl FnMut(i64) -> T) -> T {
        for _ in 0..5 {
            let now = now_secs();
            let out = f(now as i64);
            if now_secs() == now {
                return out;
            }
        }
        panic!("the clock ticked during each of five tries");
    }

    /// The message of a `NotAuthorised` refusal; panics on anything else.
    fn refusal(result: Result<(), (RejectCode, String)>) -> String {
        match result {
            Ok(()) => panic!("admitted, but a refusal was expected"),
            Err((code, msg)) => {
                assert_eq!(code, RejectCode::NotAuthorised, "{msg}");
                msg
            }
        }
    }

    #[test]
    fn no_certificate_is_refused_in_every_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("client CA");
        for auth in [
            Auth::development(),
            Auth::ca(vec![ca.der.clone()], None).unwrap(),
            Auth::token(dir.path(), DEFAULT_CERT_TTL).unwrap(),
        ] {
            let msg = refusal(auth.check_hello("alice", &[]));
            assert!(msg.contains("no certificate"), "{}: {msg}", auth.mode());
        }
    }

    #[test]
    fn a_revoked_certificate_is_refused_in_every_mode() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("client CA");
        let token = Auth::token(dir.path(), DEFAULT_CERT_TTL).unwrap();
        let token_ca = token_ca(dir.path()).unwrap();
        let cases = [
            (Auth::development(), self_signed("alice")),
            (
                Auth::ca(vec![ca.der.clone()], None).unwrap(),
                ca.issue("alice", &["alice"]),
            ),
            (
                token,
                token_ca.issue_client("alice").unwrap().chain.remove(0),
            ),
        ];
        for (auth, cert) in cases {
            let mode = auth.mode();
            let chain = [cert];
            assert_eq!(auth.check_hello("alice", &chain), Ok(()), "{mode}");
            assert!(auth.revocations().add(Fingerprint::of(&chain[0]), "alice"));
            assert!(!auth.revocations().add(Fingerprint::of(&chain[0]), "alice"));
            let msg = refusal(auth.check_hello("alice", &chain));
            assert!(msg.contains("revoked"), "{mode}: {msg}");
        }
    }

    #[test]
    fn revocations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let revoked = self_signed("alice");
        let auth = Auth::open(Some(dir.path())).unwrap();
        auth.revocations().add(Fingerprint::of(&revoked), "alice");
        drop(auth);

        let auth = Auth::open(Some(dir.path())).unwrap();
        assert_eq!(auth.revocations().len(), 1);
        let msg = refusal(auth.check_hello("alice", std::slice::from_ref(&revoked)));
        assert!(msg.contains("revoked"), "{msg}");
        assert_eq!(auth.check_hello("alice", &[self_signed("alice")]), Ok(()));
    }

    #[test]
    fn a_revocation_file_may_hold_blank_lines_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let revoked = self_signed("alice");
        let fp = Fingerprint::of(&revoked);
        std::fs::write(
            dir.path().join("revoked"),
            format!("# revoked by hand\n\n{fp} alice 1\n   \nnot-a-fingerprint bob 2\n"),
        )
        .unwrap();
        let auth = Auth::open(Some(dir.path())).unwrap();
        assert_eq!(auth.revocations().len(), 1);
        assert!(auth.revocations().contains(&fp));
        assert!(!auth.revocations().is_empty());
        assert!(auth
            .revocations()
            .add(Fingerprint::of(&self_signed("bob")), "bob"));
        assert_eq!(auth.revocations().len(), 2);
        let none = Auth::development();
        assert!(none.revocations().is_empty());
        assert_eq!(none.revocations().len(), 0);
    }

    #[test]
    fn a_mode_shows_as_the_name_the_config_takes() {
        use clap::ValueEnum;
        for mode in [AuthMode::Open, AuthMode::Token, AuthMode::Ca] {
            let name = mode.to_string();
            assert_eq!(AuthMode::from_str(&name, false), Ok(mode), "{name}");
            let parsed: AuthMode =
                serde::de::Deserialize::deserialize(serde::de::value::StrDeserializer::<
                    serde::de::value::Error,
                >::new(&name))
                .unwrap();
            assert_eq!(parsed, mode);
        }
    }

    #[test]
    fn the_token_ca_is_kept_and_made_again_only_without_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let first = token_ca(dir.path()).unwrap();
        let again = token_ca(dir.path()).unwrap();
        assert_eq!(again.cert_der(), first.cert_der());
        // Half a CA (the key file gone) is not loaded: a new one is made.
        std::fs::remove_file(dir.path().join("client-ca-key.pem")).unwrap();
        let new = token_ca(dir.path()).unwrap();
        assert_ne!(new.cert_der(), first.cert_der());
        assert!(dir.path().join("client-ca-key.pem").exists());
    }

    #[test]
    fn a_token_enrolls_its_names_once() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::token(dir.path(), DEFAULT_CERT_TTL).unwrap();
        let token = token_key(dir.path())
            .unwrap()
            .create("ci-*", Duration::from_secs(60))
            .unwrap();
        let chain = [self_signed("ci-1")];
        let code = |r: Result<(String, u64), (RejectCode, String)>| r.unwrap_err().0;
        assert_eq!(
            code(auth.enroll("ci-1", Some(&token), &[])),
            RejectCode::NotAuthorised
        );
        assert_eq!(
            code(auth.enroll("CI 1", Some(&token), &chain)),
            RejectCode::InvalidName
        );
        assert_eq!(
            code(auth.enroll("alice", Some(&token), &chain)),
            RejectCode::BadToken
        );
        assert_eq!(
            code(auth.enroll("ci-1", Some("qmt1_junk"), &chain)),
            RejectCode::BadToken
        );
        let now = now_secs();
        let (pem, expires) = auth.enroll("ci-1", Some(&token), &chain).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        let ttl = DEFAULT_CERT_TTL.as_secs();
        assert!(
            expires >= now + ttl - 600 && expires <= now_secs() + ttl,
            "{expires} for a TTL of {ttl} s from {now}"
        );
        assert_eq!(auth.issued_for("ci-1").len(), 1);
        // A second enrollment keeps the first certificate listed.
        let again = token_key(dir.path())
            .unwrap()
            .create("ci-1", Duration::from_secs(60))
            .unwrap();
        auth.enroll("ci-1", Some(&again), &chain).unwrap();
        assert_eq!(auth.issued_for("ci-1").len(), 2);
        // Used up.
        let (code, msg) = auth.enroll("ci-2", Some(&token), &chain).unwrap_err();
        assert_eq!(code, RejectCode::BadToken);
        assert!(msg.contains("already used"), "{msg}");
        // Other modes issue nothing.
        let (code, msg) = Auth::development()
            .enroll("ci-1", Some(&token), &chain)
            .unwrap_err();
        assert_eq!(code, RejectCode::NotAuthorised);
        assert!(msg.contains("issues no certificates"), "{msg}");
    }

    #[test]
    fn a_certificate_renews_from_half_its_life_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::token(dir.path(), DEFAULT_CERT_TTL).unwrap();
        // Sign test certificates with the token CA itself.
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        let key = KeyPair::from_pem(&read("client-ca-key.pem")).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&read("client-ca.pem"), key).unwrap();
        let (early, at_half) = in_one_second(|now| {
            // Half of [now - 10, now + 100] is 45 s away; of
            // [now - 50, now + 50] it is now.
            let young = leaf(Some(&issuer), "alice", &["alice"], now - 10, now + 100);
            let half = leaf(Some(&issuer), "alice", &["alice"], now - 50, now + 50);
            (
                auth.enroll("alice", None, &[young]),
                auth.enroll("alice", None, &[half]),
            )
        });
        let (code, msg) = early.unwrap_err();
        assert_eq!(code, RejectCode::NotAuthorised);
        assert!(msg.contains("renew in 45 s"), "{msg}");
        let (pem, _) = at_half.unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        // A certificate revoked meanwhile renews nothing.
        let old = leaf(Some(&issuer), "alice", &["alice"], 0, i64::from(u32::MAX));
        auth.revocations().add(Fingerprint::of(&old), "alice");
        let (code, msg) = auth.enroll("alice", None, &[old]).unwrap_err();
        assert_eq!(code, RejectCode::NotAuthorised);
        assert!(msg.contains("cannot renew"), "{msg}");
    }

    #[test]
    fn issued_certificates_live_a_day_by_default() {
        // docs/security.md and operations.md: `cert_ttl`, 24 h by default.
        assert_eq!(DEFAULT_CERT_TTL, Duration::from_secs(86_400));
    }

    #[test]
    fn a_certificate_is_valid_through_its_last_second() {
        let auth = Auth::development();
        let (last_second, expired) = in_one_second(|now| {
            let last_second = leaf(None, "alice", &["alice"], now - HOUR, now);
            let expired = leaf(None, "alice", &["alice"], now - HOUR, now - 1);
            (
                auth.check_hello("alice", &[last_second]),
                auth.check_hello("alice", &[expired]),
            )
        });
        assert_eq!(last_second, Ok(()));
        let msg = refusal(expired);
        assert!(msg.contains("expired or is not valid yet"), "{msg}");
    }

    #[test]
    fn a_certificate_is_valid_from_its_first_second() {
        let auth = Auth::development();
        let (first_second, early) = in_one_second(|now| {
            let first_second = leaf(None, "alice", &["alice"], now, now + HOUR);
            let early = leaf(None, "alice", &["alice"], now + 1, now + HOUR);
            (
                auth.check_hello("alice", &[first_second]),
                auth.check_hello("alice", &[early]),
            )
        });
        assert_eq!(first_second, Ok(()));
        let msg = refusal(early);
        assert!(msg.contains("expired or is not valid yet"), "{msg}");
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_refused() {
        let auth = Auth::development();
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let msg = refusal(auth.check_hello("alice", &[garbage]));
        assert!(msg.contains("expired or is not valid yet"), "{msg}");
    }

    #[test]
    fn open_mode_admits_any_name_with_any_certificate() {
        let auth = Auth::development();
        assert_eq!(auth.mode(), AuthMode::Open);
        let alice = [self_signed("alice")];
        assert_eq!(auth.check_hello("alice", &alice), Ok(()));
        assert_eq!(auth.check_hello("bob", &alice), Ok(()));
        let now = now_secs() as i64;
        let nameless = leaf(None, "nobody", &[], now - HOUR, now + HOUR);
        assert_eq!(auth.check_hello("carol", &[nameless]), Ok(()));
    }

    #[test]
    fn ca_mode_admits_exactly_the_dns_names_of_the_certificate() {
        let ca = TestCa::new("client CA");
        let auth = Auth::ca(vec![ca.der.clone()], None).unwrap();
        assert_eq!(auth.mode(), AuthMode::Ca);
        let chain = [ca.issue("carol", &["alice", "alice-laptop"])];
        assert_eq!(auth.check_hello("alice", &chain), Ok(()));
        assert_eq!(auth.check_hello("alice-laptop", &chain), Ok(()));
        // Not another name, not the common name, not a prefix or extension.
        for name in ["bob", "carol", "ali", "alice-laptop2"] {
            let msg = refusal(auth.check_hello(name, &chain));
            assert_eq!(
                msg,
                format!(
                    "this certificate is for alice, alice-laptop, so it cannot join as {name}; \
                     connect with --name alice"
                )
            );
        }
    }

    #[test]
    fn ca_mode_certificate_without_dns_names_takes_no_name() {
        let ca = TestCa::new("client CA");
        let auth = Auth::ca(vec![ca.der.clone()], None).unwrap();
        let chain = [ca.issue("alice", &[])];
        let msg = refusal(auth.check_hello("alice", &chain));
        assert!(msg.contains("this certificate is for no name"), "{msg}");
    }

    #[test]
    fn ca_mode_refuses_certificates_its_client_ca_did_not_sign() {
        let ca = TestCa::new("client CA");
        let other = TestCa::new("another CA");
        let auth = Auth::ca(vec![ca.der.clone()], None).unwrap();
        for chain in [[self_signed("alice")], [other.issue("alice", &["alice"])]] {
            let msg = refusal(auth.check_hello("alice", &chain));
            assert!(
                msg.contains("admits certificates from its client CA only"),
                "{msg}"
            );
        }
    }

    #[test]
    fn token_mode_admits_enrolled_certificates_for_their_own_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::token(dir.path(), DEFAULT_CERT_TTL).unwrap();
        assert_eq!(auth.mode(), AuthMode::Token);
        // The TLS layer lets self-signed certificates through to enroll;
        // the hello must not.
        let msg = refusal(auth.check_hello("alice", &[self_signed("alice")]));
        assert!(msg.contains("admits enrolled clients only"), "{msg}");
        assert!(msg.contains("--token"), "{msg}");

        let enrolled = token_ca(dir.path())
            .unwrap()
            .issue_client("alice")
            .unwrap()
            .chain;
        assert_eq!(auth.check_hello("alice", &enrolled), Ok(()));
        let msg = refusal(auth.check_hello("bob", &enrolled));
        assert!(msg.contains("cannot join as bob"), "{msg}");

        // Enrolled with another coordinator: not this one's client.
        let elsewhere = tempfile::tempdir().unwrap();
        let foreign = token_ca(elsewhere.path())
            .unwrap()
            .issue_client("alice")
            .unwrap()
            .chain;
        let msg = refusal(auth.check_hello("alice", &foreign));
        assert!(msg.contains("admits enrolled clients only"), "{msg}");
    }

    #[test]
    fn issued_for_lists_the_unexpired_certificates_of_a_name() {
        let fp = |b: u8| Fingerprint([b; 32]);
        let (alice, bob, carol, kept) = in_one_second(|now| {
            let dir = tempfile::tempdir().unwrap();
            let records = format!(
                "# fingerprint name expiry\n\
                 {a1} alice {later}\n\
                 {a2} alice {now}\n\
                 {a3} alice {before}\n\
                 {b1} bob {later}\n\
                 not-a-fingerprint alice {later}\n",
                a1 = fp(1),
                a2 = fp(2),
                a3 = fp(3),
                b1 = fp(4),
                later = now + HOUR,
                before = now - 1,
            );
            std::fs::write(dir.path().join("issued"), records).unwrap();
            let auth = Auth::token(dir.path(), DEFAULT_CERT_TTL).unwrap();
            let kept = std::fs::read_to_string(dir.path().join("issued")).unwrap();
            (
                auth.issued_for("alice"),
                auth.issued_for("bob"),
                auth.issued_for("carol"),
                kept,
            )
        });
        // Expiring this very second still counts; a second ago does not.
        assert_eq!(alice, vec![fp(1), fp(2)]);
        assert_eq!(bob, vec![fp(4)]);
        assert_eq!(carol, Vec::new());
        // The state file is rewritten without what expired.
        assert_eq!(kept.lines().count(), 3, "{kept}");
        for b in [1, 2, 4] {
            assert!(kept.contains(&fp(b).to_string()), "{kept}");
        }
        assert!(!kept.contains(&fp(3).to_string()), "{kept}");
        // Only `token` mode issues certificates.
        assert!(Auth::development().issued_for("alice").is_empty());
    }
}
