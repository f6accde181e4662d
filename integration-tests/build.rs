//! Marks the network namespace tests (the NAT lab, packet loss, DNS and
//! flood labs) as ignored, with the reason, when this machine cannot make
//! network namespaces: `cargo test` then lists them as ignored in its
//! summary instead of passing them having checked nothing. Under
//! `CI=true` they are never ignored (CI runs as root and installs the
//! tools, so a lab that cannot run there must fail).

use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(qmesh_no_netns)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=PATH");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        return;
    }
    if !can_make_namespaces() {
        println!("cargo::rustc-cfg=qmesh_no_netns");
    }
}

/// Root, with `ip` and `nft` on PATH: what the labs need.
fn can_make_namespaces() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let found = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    root && found("ip") && found("nft")
}
