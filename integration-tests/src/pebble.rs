//! Let's Encrypt's ACME test server, `pebble`, with its mock DNS server
//! `pebble-challtestsrv` (Debian package `pebble`, installed by `.ci/run`),
//! on loopback ports of their own.
//!
//! The DNS server answers every name with 127.0.0.1 (and no IPv6
//! address), so pebble validates an HTTP-01 challenge for `coord.test` by
//! connecting to 127.0.0.1 at [`Pebble::http01_port`]. Pebble's own HTTPS
//! listener has a certificate for `127.0.0.1` from a CA made here
//! ([`Pebble::listener_ca`], what the coordinator's `--acme-ca` takes);
//! the CA that signs the certificates it issues is new at every start and
//! is read from its management port ([`Pebble::root`]).
//!
//! Validation runs at once (`PEBBLE_VA_NOSLEEP`), no nonce is refused on
//! purpose and no authorization is reused, so an order takes well under a
//! second and every order validates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::programs::{free_port, require, run, Program};

/// A running pebble and its DNS server; both stop when this is dropped.
#[derive(Debug)]
pub struct Pebble {
    pebble: Program,
    _dns: Program,
    files: tempfile::TempDir,
    acme_port: u16,
    management_port: u16,
    http01_port: u16,
}

impl Pebble {
    /// Start both, pebble issuing certificates valid for `validity`
    /// seconds; `None` when pebble is not installed outside CI (the test
    /// is skipped, loudly), a panic under `CI=true`.
    pub fn start(validity: u64) -> Option<Pebble> {
        let pebble_bin = require("pebble")?;
        let dns_bin = require("pebble-challtestsrv")?;
        require("curl")?;
        let files = tempfile::tempdir().expect("a temporary directory");
        qmesh_coordinator::devcert::write_certs(
            files.path(),
            &["127.0.0.1".to_owned(), "localhost".to_owned()],
            false,
        )
        .expect("pebble's listener certificate");
        let (dns_port, dns_management) = (free_port(), free_port());
        let dns = Program::start(
            dns_bin.to_str().expect("path"),
            &[
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                &format!("127.0.0.1:{dns_management}"),
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ],
        );
        let (acme_port, management_port, http01_port, tls_port) =
            (free_port(), free_port(), free_port(), free_port());
        let config = files.path().join("pebble-config.json");
        let json = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": files.path().join("coordinator.pem"),
                "privateKey": files.path().join("coordinator-key.pem"),
                "httpPort": http01_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": validity,
            }
        });
        std::fs::write(&config, json.to_string()).expect("writing pebble's config");
        let pebble = start_pebble(&pebble_bin, &config, dns_port);
        let mut started = Pebble {
            pebble,
            _dns: dns,
            files,
            acme_port,
            management_port,
            http01_port,
        };
        started.wait_for_directory();
        Some(started)
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The CA of pebble's own HTTPS listener (for `--acme-ca`).
    pub fn listener_ca(&self) -> PathBuf {
        self.files.path().join("ca.pem")
    }

    /// The TCP port pebble connects to for HTTP-01 challenges.
    pub fn http01_port(&self) -> u16 {
        self.http01_port
    }

    /// The root CA of the certificates pebble issues, written to a file
    /// in `dir` (what a client's `SSL_CERT_FILE` names).
    pub fn root(&self, dir: &Path) -> PathBuf {
        let path = dir.join("pebble-root.pem");
        let out = run(
            "curl",
            &[
                "-sS",
                "--fail",
                "--cacert",
                self.listener_ca().to_str().expect("path"),
                "-o",
                path.to_str().expect("path"),
                &format!("https://127.0.0.1:{}/roots/0", self.management_port),
            ],
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "fetching pebble's root: {}",
            crate::programs::show(&out)
        );
        path
    }

    /// The serial numbers (hex, lower case) of the certificates pebble
    /// has issued, in order, from its log.
    pub fn issued(&self) -> Vec<String> {
        let read =
            |name: &str| std::fs::read_to_string(self.pebble.dir().join(name)).unwrap_or_default();
        let log = read("stdout.log") + &read("stderr.log");
        log.lines()
            .filter_map(|l| l.split("Issued certificate serial ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_lowercase)
            .collect()
    }

    /// What pebble printed, for failure messages.
    pub fn log(&self) -> String {
        self.pebble.log()
    }

    /// Stop pebble (the DNS server goes on): the ACME server is gone.
    pub fn stop(&mut self) {
        let pid = self.pebble.pid();
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let _ = self.pebble_exited();
    }

    fn pebble_exited(&mut self) -> bool {
        for _ in 0..500 {
            if self.pebble.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Wait until the directory answers over HTTPS.
    fn wait_for_directory(&mut self) {
        for _ in 0..200 {
            if let Some(status) = self.pebble.exited() {
                panic!("pebble exited ({status}): {}", self.pebble.log());
            }
            let out = run(
                "curl",
                &[
                    "-sS",
                    "--fail",
                    "-o",
                    "/dev/null",
                    "--cacert",
                    self.listener_ca().to_str().expect("path"),
                    &self.directory(),
                ],
                Duration::from_secs(5),
            );
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "pebble's directory did not answer within 10 s: {}",
            self.pebble.log()
        );
    }
}

fn start_pebble(bin: &Path, config: &Path, dns_port: u16) -> Program {
    // The variables go to pebble through `env`, as Program passes none.
    Program::start(
        "env",
        &[
            "PEBBLE_VA_NOSLEEP=1",
            "PEBBLE_WFE_NONCEREJECT=0",
            "PEBBLE_AUTHZREUSE=0",
            bin.to_str().expect("path"),
            "-config",
            config.to_str().expect("path"),
            "-dnsserver",
            &format!("127.0.0.1:{dns_port}"),
            "-strict",
        ],
    )
}
