//! Network namespaces a test makes for itself: `ip netns add`, its
//! loopback up, deleted when dropped. Needs root and iproute2. A test
//! that cannot make one calls [`unavailable`]: under `CI=true` that fails
//! the test (CI runs as root and installs the tools), elsewhere it prints
//! a loud notice and the test checks nothing.

use std::process::{Command, Stdio};

/// A network namespace of the test's own; deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace named `PREFIX` + this process's id, with `lo` up
    /// (so every 127.0.0.0/8 address works inside it); or why it cannot
    /// be made.
    pub fn new(prefix: &str) -> Result<Netns, String> {
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, for `ip netns exec` and [`crate::process::Proc::spawn_in`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Run a command to its end; its standard error when it fails.
fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A namespace could not be made (`why`): fail under `CI=true`, else say
/// so loudly. Returns so the caller can end the test without checking
/// anything.
pub fn unavailable(test: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        panic!("{test} needs a network namespace, and CI must be able to make one: {why}");
    }
    eprintln!("\n!!!!!!!! {test} SKIPPED: {why}. Nothing was checked. !!!!!!!!\n");
}
