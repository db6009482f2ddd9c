//! The agent's refusals as an actor's clients see them: curl's and `openssl s_client`'s
//! messages, the 403 with its body, and a clean EOF (never a reset) for any other TCP client.

use std::{net::SocketAddr, process::Command};

use crate::{
    cgroup::Cgroup,
    client::bash_tcp_command,
    netns::Netns,
    process::{self, Output},
    world::T,
};

/// The body of the agent's 403 (egress_agent::refuse::HTTP_403_BODY).
pub const HTTP_403_BODY: &str = "Forbidden: the destination was refused by egress policy.";

/// Adds `-w` to a curl command so its output ends with `http_code=NNN` (curl prints a 403's
/// body and exits 0 without `-f`).
pub fn with_status(mut curl: Command) -> Command {
    curl.args(["-w", "\nhttp_code=%{http_code}\n"]);
    curl
}

/// curl was answered the agent's 403 and its body, and the connection ended cleanly (exit 0:
/// a reset or a cut-off body would fail it). Needs a command made with [`with_status`].
pub fn assert_curl_got_403(out: &Output) {
    out.expect_success("curl gets the agent's 403 and a clean close");
    assert!(
        out.stdout.contains("http_code=403") && out.stdout.contains(HTTP_403_BODY),
        "the agent's 403 and body: {}",
        out.describe()
    );
}

/// curl's TLS handshake was answered with a fatal `access_denied` alert (OpenSSL: exit 35,
/// `tlsv1 alert access denied`), not a reset.
pub fn assert_curl_tls_access_denied(out: &Output) {
    assert_eq!(out.code(), Some(35), "curl's TLS error: {}", out.describe());
    assert!(
        out.stderr.contains("tlsv1 alert access denied"),
        "curl prints the alert: {}",
        out.describe()
    );
}

/// `openssl s_client -connect ADDR -servername NAME` in `netns`/`cgroup` (run with stdin
/// closed, it ends after the handshake either way).
pub fn s_client_command(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    addr: SocketAddr,
    name: &str,
) -> Command {
    let mut cmd = process::command_in("openssl", netns, cgroup);
    cmd.args(["s_client", "-connect"])
        .arg(addr.to_string())
        .args(["-servername", name]);
    cmd
}

/// Runs [`s_client_command`] and checks that it printed `alert access denied`.
pub fn assert_s_client_access_denied(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    addr: SocketAddr,
    name: &str,
) {
    let out = process::run(&mut s_client_command(netns, cgroup, addr, name), T);
    assert!(
        !out.success() && out.stderr.contains("alert access denied"),
        "openssl s_client prints the alert: {}",
        out.describe()
    );
}

/// A raw TCP client in `netns`/`cgroup`: connects to `addr`, sends `first` (bash printf
/// syntax; empty: nothing), reads to EOF and prints `bytes=N`; exits 3 if the read failed
/// (a reset), 7 if the connect did.
pub fn raw_tcp_command(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    addr: SocketAddr,
    first: &str,
) -> Command {
    let send = if first.is_empty() {
        String::new()
    } else {
        format!("printf '{first}' >&3\n")
    };
    bash_tcp_command(
        netns,
        cgroup,
        addr,
        &format!(
            "set -o pipefail\n{send}bytes=$(timeout 10 cat <&3 | wc -c) || exit 3\n\
             echo \"bytes=$bytes\"\n"
        ),
    )
}

/// Runs [`raw_tcp_command`] and checks that the agent closed with no bytes and no reset.
pub fn assert_raw_tcp_clean_eof(
    netns: Option<&Netns>,
    cgroup: Option<&Cgroup>,
    addr: SocketAddr,
    first: &str,
) {
    let out = process::run(&mut raw_tcp_command(netns, cgroup, addr, first), T);
    out.expect_success("a refused raw TCP client reads a clean EOF (no reset)");
    assert!(
        out.stdout.contains("bytes=0"),
        "no bytes before the EOF: {}",
        out.describe()
    );
}
