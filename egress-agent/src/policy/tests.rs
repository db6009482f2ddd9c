//! Decisions and parse errors of the policy module.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use proptest::prelude::*;

use super::*;

fn parse(text: &str) -> Policy {
    Policy::parse(text, Path::new("policy.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn parse_err(text: &str) -> String {
    match Policy::parse(text, Path::new("policy.toml")) {
        Ok(_) => panic!("parsed, expected an error:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts the error points at `line` and mentions `needle`.
fn assert_err_at(text: &str, line: usize, needle: &str) {
    let err = parse_err(text);
    let prefix = format!("policy.toml:{line}:");
    assert!(err.starts_with(&prefix), "expected {prefix}, got: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const EXAMPLE: &str = r#"
[default]
allow = [ { host = "default.test" } ]

[[template]]
name = "coder"
deny = [ { host = "*.evil.test" }, { host = "bad.test", ports = [22] } ]
allow = [
  { host = "web.egress.test", ports = [443, "8000-8999"] },
  { host = "*.github.com" },
  { cidr = "10.252.0.0/16", ports = [22] },
  { cidr = "fd00:1::/64" },
  { host = "bad.test" },
]

[[template]]
name = "coder"
namespace = "team-a"
pep = false
allow = [ { host = "team-a.test" } ]

[[template]]
name = "open"
prefilter = true
deny = [ { cidr = "10.9.0.0/16" } ]
allow = [
  { host = "*" },
  { cidr = "0.0.0.0/0" },
  { cidr = "::/0" },
  { cidr = "169.254.169.254", ports = [80] },
  { cidr = "::ffff:100.100.100.200" },
  { host = "metadata.google.internal", ports = [80] },
]
"#;

#[test]
fn empty_file_denies_all() {
    let p = parse("");
    let t = p.template("any", "thing");
    assert!(t.pep && !t.prefilter);
    let d = t.decide_name("web.egress.test", 443);
    assert!(!d.allowed);
    assert_eq!(d.rule.kind(), RuleKind::NoMatch);
    assert!(!t.decide_ip(ip("10.0.0.1"), 443).allowed);
    assert!(!t.decide_dns("web.egress.test").allowed);
    assert!(d.rule.to_string().contains("no [default]"), "{}", d.rule);
}

#[test]
fn deny_all_denies_and_defers_to_the_pep() {
    let p = Policy::deny_all();
    let t = p.template("ns", "t");
    assert!(t.pep);
    assert!(!t.decide_name("a.test", 443).allowed);
    assert_eq!(
        t.decide_name("a.test", 443).rule.to_string(),
        "no policy file: no allow rules (deny all)"
    );
}

#[test]
fn missing_template_uses_default() {
    let p = parse(EXAMPLE);
    let t = p.template("team-z", "other");
    assert_eq!(t.label(), "default");
    assert!(t.decide_name("default.test", 1).allowed);
    assert!(!t.decide_name("web.egress.test", 443).allowed);
}

#[test]
fn namespace_entry_beats_name_only() {
    let p = parse(EXAMPLE);
    let a = p.template("team-a", "coder");
    assert_eq!(a.label(), "template team-a/coder");
    assert!(!a.pep);
    assert!(a.decide_name("team-a.test", 443).allowed);
    assert!(!a.decide_name("web.egress.test", 443).allowed);
    let b = p.template("team-b", "coder");
    assert_eq!(b.label(), "template coder");
    assert!(b.pep);
    assert!(b.decide_name("web.egress.test", 443).allowed);
    assert!(!b.decide_name("team-a.test", 443).allowed);
}

#[test]
fn deny_list_is_evaluated_first() {
    let p = parse(EXAMPLE);
    let t = p.template("x", "coder");
    // `bad.test` is allowed on any port but denied on 22.
    let d = t.decide_name("bad.test", 22);
    assert!(!d.allowed);
    assert_eq!(
        d.rule.to_string(),
        "template coder deny[1] host=bad.test ports=22"
    );
    assert_eq!(d.rule.kind(), RuleKind::Deny);
    assert!(t.decide_name("bad.test", 443).allowed);
    // `*.evil.test` is denied even if an allow rule would match.
    let d = t.decide_name("a.evil.test", 443);
    assert_eq!(
        d.rule.to_string(),
        "template coder deny[0] host=*.evil.test"
    );
    // In the `open` template a deny cidr beats the allow-all cidr.
    let o = p.template("x", "open");
    assert!(!o.decide_ip(ip("10.9.1.1"), 443).allowed);
    assert!(o.decide_ip(ip("10.8.1.1"), 443).allowed);
}

#[test]
fn exact_and_wildcard_hosts() {
    let p = parse(EXAMPLE);
    let t = p.template("x", "coder");
    let d = t.decide_name("web.egress.test", 443);
    assert!(d.allowed);
    assert_eq!(
        d.rule.to_string(),
        "template coder allow[0] host=web.egress.test ports=443,8000-8999"
    );
    assert_eq!(d.rule.kind(), RuleKind::Allow);
    assert!(!t.decide_name("x.web.egress.test", 443).allowed);
    assert!(!t.decide_name("egress.test", 443).allowed);

    let d = t.decide_name("api.github.com", 1234);
    assert!(d.allowed);
    assert_eq!(
        d.rule.to_string(),
        "template coder allow[1] host=*.github.com"
    );
    assert!(t.decide_name("a.b.github.com", 443).allowed);
    assert!(!t.decide_name("github.com", 443).allowed);
    assert!(!t.decide_name("xgithub.com", 443).allowed);
    assert!(!t.decide_name("github.com.evil", 443).allowed);

    let o = p.template("x", "open");
    assert!(o.decide_name("anything.example", 1).allowed);
    assert!(o.decide_name("x", 65535).allowed);
}

#[test]
fn case_and_trailing_dot_do_not_matter() {
    let p = parse(
        r#"[default]
allow = [ { host = "Web.Egress.Test." }, { host = "*.GitHub.com" } ]"#,
    );
    let t = p.template("a", "b");
    assert!(t.decide_name("web.egress.test", 443).allowed);
    assert!(t.decide_name("WEB.EGRESS.TEST.", 443).allowed);
    assert!(t.decide_name("API.github.COM.", 443).allowed);
    assert!(t.decide_dns("Web.Egress.Test.").allowed);
}

#[test]
fn ports_and_ranges() {
    let p = parse(EXAMPLE);
    let t = p.template("x", "coder");
    for port in [443, 8000, 8500, 8999] {
        assert!(t.decide_name("web.egress.test", port).allowed, "{port}");
    }
    for port in [0, 80, 442, 444, 7999, 9000, 65535] {
        assert!(!t.decide_name("web.egress.test", port).allowed, "{port}");
    }
}

#[test]
fn cidr_rules_v4_and_v6() {
    let p = parse(EXAMPLE);
    let t = p.template("x", "coder");
    let d = t.decide_ip(ip("10.252.3.4"), 22);
    assert!(d.allowed);
    assert_eq!(
        d.rule.to_string(),
        "template coder allow[2] cidr=10.252.0.0/16 ports=22"
    );
    assert!(!t.decide_ip(ip("10.252.3.4"), 23).allowed);
    assert!(!t.decide_ip(ip("10.253.0.1"), 22).allowed);
    // The v4-mapped form of an allowed address is that address.
    assert!(t.decide_ip(ip("::ffff:10.252.3.4"), 22).allowed);
    assert!(t.decide_ip(ip("fd00:1::5"), 443).allowed);
    assert!(!t.decide_ip(ip("fd00:2::5"), 443).allowed);
    // Host rules do not apply to addresses, cidr rules not to names.
    assert!(!t.decide_ip(ip("10.9.9.9"), 443).allowed);
    assert!(!t.decide_name("github.com", 22).allowed);
}

#[test]
fn ip_literal_names_are_decided_as_addresses() {
    let p = parse(EXAMPLE);
    let t = p.template("x", "coder");
    assert!(t.decide_name("10.252.0.1", 22).allowed);
    assert!(t.decide_name("[fd00:1::1]", 80).allowed);
    assert!(!t.decide_name("10.252.0.1", 443).allowed);
    // `*` means any name, not any address.
    let o = parse(
        r#"[default]
allow = [ { host = "*" } ]"#,
    );
    let d = o.template("a", "b").decide_name("192.0.2.1", 443);
    assert!(!d.allowed);
    assert_eq!(d.rule.kind(), RuleKind::NoMatch);
}

#[test]
fn invalid_and_numeric_names_are_denied() {
    let p = parse(
        r#"[default]
allow = [ { host = "*" } ]"#,
    );
    let t = p.template("a", "b");
    for name in [
        "",
        ".",
        "a..b",
        "a b",
        "évil.test",
        "0x7f.1",
        "127.1",
        "2130706433",
        "1.2.3.010",
        "x.0x10",
        "a*b.test",
        "[::1",
        &"a".repeat(64),
        &"a.".repeat(130),
    ] {
        let d = t.decide_name(name, 443);
        assert!(!d.allowed, "{name:?} allowed");
        assert_eq!(d.rule.kind(), RuleKind::InvalidName, "{name:?}: {}", d.rule);
        assert!(!t.decide_dns(name).allowed, "{name:?} allowed by dns");
    }
    assert!(t.decide_name("1.2.3.x", 443).allowed);
    assert!(t.decide_name("under_score.test", 443).allowed);
}

#[test]
fn always_denied_beats_wildcards_and_wide_cidrs() {
    let p = parse(EXAMPLE);
    let o = p.template("x", "open");
    for addr in [
        "169.254.170.2",
        "169.254.1.1",
        "127.0.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::",
    ] {
        let d = o.decide_ip(ip(addr), 443);
        assert!(!d.allowed, "{addr}");
        assert_eq!(d.rule.kind(), RuleKind::AlwaysDenied, "{addr}");
    }
    let d = o.decide_ip(ip("169.254.169.254"), 443);
    assert_eq!(
        d.rule.to_string(),
        "always denied: cloud metadata address 169.254.169.254"
    );
    // By name too; `*` never overrides.
    let d = o.decide_name("metadata.goog", 443);
    assert!(!d.allowed);
    assert_eq!(
        d.rule.to_string(),
        "always denied: cloud metadata name metadata.goog"
    );
    assert!(!o.decide_name("localhost", 443).allowed);
    assert!(!o.decide_dns("metadata").allowed);
    assert!(!o.decide_name("127.0.0.1", 443).allowed);
    // The node's own addresses and gateways, passed by the caller.
    let extra = [ip("192.0.2.10"), ip("2001:db8::1")];
    let d = o.decide_ip_with(ip("::ffff:192.0.2.10"), 443, &extra);
    assert!(!d.allowed);
    assert_eq!(
        d.rule.to_string(),
        "always denied: node or gateway address 192.0.2.10"
    );
    assert!(!o.decide_ip_with(ip("2001:db8::1"), 443, &extra).allowed);
    assert!(o.decide_ip_with(ip("192.0.2.11"), 443, &extra).allowed);
}

#[test]
fn v4_mapped_metadata_address_is_denied() {
    let p = parse(EXAMPLE);
    let t = p.template("x", "coder");
    let o = p.template("x", "open");
    for addr in [
        "::ffff:169.254.169.254",
        "::169.254.169.254",
        "::ffff:a9fe:a9fe",
        "64:ff9b::a9fe:a9fe",
    ] {
        assert!(!t.decide_ip(ip(addr), 80).allowed, "{addr}");
        assert!(!o.decide_ip(ip(addr), 443).allowed, "{addr}");
        assert!(!o.decide_name(addr, 443).allowed, "{addr}");
    }
}

#[test]
fn exact_address_rule_overrides_always_denied() {
    let p = parse(EXAMPLE);
    let o = p.template("x", "open");
    // `{ cidr = "169.254.169.254", ports = [80] }` names the address, on port 80 only.
    for form in ["169.254.169.254", "::ffff:169.254.169.254"] {
        let d = o.decide_ip(ip(form), 80);
        assert!(d.allowed, "{form}");
        assert_eq!(
            d.rule.to_string(),
            "template open allow[3] cidr=169.254.169.254 ports=80"
        );
    }
    assert!(!o.decide_ip(ip("169.254.169.254"), 443).allowed);
    assert!(o.names_exact(ip("::ffff:169.254.169.254"), 80).is_some());
    assert!(o.names_exact(ip("169.254.169.254"), 443).is_none());
    // Written v4-mapped in the file, any port.
    assert!(o.decide_ip(ip("100.100.100.200"), 8080).allowed);
    assert!(o.names_exact(ip("100.100.100.200"), 1).is_some());
    // The wide cidrs never count as naming an address.
    assert!(o.names_exact(ip("127.0.0.1"), 80).is_none());
    // The exact-name rule overrides the metadata name on its port; `*` does not on others.
    let d = o.decide_name("metadata.google.internal", 80);
    assert!(d.allowed);
    assert_eq!(
        d.rule.to_string(),
        "template open allow[5] host=metadata.google.internal ports=80"
    );
    assert!(!o.decide_name("metadata.google.internal", 443).allowed);
    assert!(o.decide_dns("metadata.google.internal").allowed);
    // A deny rule still applies to an exactly named address.
    let p = parse(
        r#"[default]
deny = [ { cidr = "169.254.0.0/16" } ]
allow = [ { cidr = "169.254.169.254" } ]"#,
    );
    let d = p.template("a", "b").decide_ip(ip("169.254.169.254"), 80);
    assert!(!d.allowed);
    assert_eq!(d.rule.kind(), RuleKind::Deny);
}

#[test]
fn decide_dns() {
    let p = parse(
        r#"[default]
deny = [ { host = "*.blocked.test" }, { host = "ssh.partly.test", ports = [22] } ]
allow = [
  { host = "web.egress.test", ports = [443] },
  { host = "*.partly.test" },
  { host = "x.blocked.test" },
  { cidr = "0.0.0.0/0" },
]"#,
    );
    let t = p.template("a", "b");
    // An allow rule on some port is enough to resolve the name.
    assert!(t.decide_dns("web.egress.test").allowed);
    // A deny rule limited to some ports does not stop the lookup.
    assert!(t.decide_dns("ssh.partly.test").allowed);
    // A deny rule on every port does, before the allow list.
    let d = t.decide_dns("x.blocked.test");
    assert!(!d.allowed);
    assert_eq!(d.rule.kind(), RuleKind::Deny);
    // No host rule matches: cidr rules do not allow names.
    let d = t.decide_dns("other.test");
    assert!(!d.allowed);
    assert_eq!(d.rule.kind(), RuleKind::NoMatch);
    assert!(!t.decide_dns("10.0.0.1").allowed);
    assert!(!t.decide_dns("metadata.google.internal").allowed);
}

#[test]
fn summary_lists_templates() {
    let p = parse(EXAMPLE);
    let s = p.summary();
    assert!(
        s.starts_with("policy.toml: 3 template entries; default (pep=true"),
        "{s}"
    );
    assert!(
        s.contains("template team-a/coder (pep=false, prefilter=false, 0 deny, 1 allow)"),
        "{s}"
    );
    assert!(
        s.contains("template open (pep=true, prefilter=true, 1 deny, 6 allow)"),
        "{s}"
    );
}

#[test]
fn parse_error_bad_toml() {
    assert_err_at("[default]\nallow = [\n  { host = \"a.test\" \n]\n", 3, "");
    assert_err_at("\n\n[default\n", 3, "");
}

#[test]
fn parse_error_unknown_field() {
    assert_err_at(
        "[default]\nallow = []\n\n[[template]]\nname = \"a\"\nalow = []\n",
        6,
        "unknown field `alow`",
    );
    assert_err_at(
        "[[template]]\nname = \"a\"\nallow = [\n  { host = \"a.test\", port = 443 },\n]\n",
        4,
        "unknown field `port`",
    );
    assert_err_at("colour = 1\n", 1, "unknown field `colour`");
}

#[test]
fn parse_error_bad_cidr() {
    assert_err_at(
        "[default]\nallow = [\n  { cidr = \"10.0.0.0/8\" },\n  { cidr = \"10.0.0.0/33\" },\n]\n",
        4,
        "cidr \"10.0.0.0/33\" is not a network",
    );
    assert_err_at(
        "[default]\nallow = [ { cidr = \"10.0.0.1/8\" } ]\n",
        2,
        "write 10.0.0.0/8 for the network, or 10.0.0.1 for the one address",
    );
    assert_err_at(
        "[default]\n\nallow = [ { cidr = \"example.com\" } ]\n",
        3,
        "not an address",
    );
}

#[test]
fn parse_error_bad_ports() {
    assert_err_at(
        "[default]\nallow = [\n  { host = \"a.test\", ports = [443] },\n  { host = \"b.test\", ports = [\"9000-8000\"] },\n]\n",
        4,
        "backwards: write \"8000-9000\"",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"a.test\", ports = [0] } ]\n",
        2,
        "out of range",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"a.test\", ports = [65536] } ]\n",
        2,
        "out of range",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"a.test\", ports = [\"1-70000\"] } ]\n",
        2,
        "out of range",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"a.test\", ports = [\"http\"] } ]\n",
        2,
        "malformed",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"a.test\", ports = [1.5] } ]\n",
        2,
        "neither a number",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"a.test\", ports = [] } ]\n",
        2,
        "matches nothing",
    );
    let p =
        parse("[default]\nallow = [ { host = \"a.test\", ports = [\"8080\", \" 1 - 2 \"] } ]\n");
    assert!(p.template("a", "b").decide_name("a.test", 8080).allowed);
    assert!(p.template("a", "b").decide_name("a.test", 2).allowed);
}

#[test]
fn parse_error_host_and_cidr() {
    assert_err_at(
        "[default]\nallow = [\n  { host = \"a.test\" },\n  { host = \"b.test\", cidr = \"10.0.0.0/8\" },\n]\n",
        4,
        "either `host` or `cidr`, not both",
    );
    assert_err_at(
        "[default]\nallow = [\n  { ports = [1] },\n]\n",
        3,
        "needs `host",
    );
}

#[test]
fn parse_error_bad_host() {
    assert_err_at(
        "[default]\nallow = [ { host = \"a.*.test\" } ]\n",
        2,
        "`*` is allowed only",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"*x.test\" } ]\n",
        2,
        "`*` is allowed only",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"10.0.0.1\" } ]\n",
        2,
        "write it as `cidr",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"bücher.test\" } ]\n",
        2,
        "punycode",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"a b.test\" } ]\n",
        2,
        "not a host name",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"*.\" } ]\n",
        2,
        "not a host name",
    );
    assert_err_at(
        "[default]\nallow = [ { host = \"\" } ]\n",
        2,
        "not a host name",
    );
}

#[test]
fn parse_error_duplicate_template() {
    let text = "[[template]]\nname = \"coder\"\nnamespace = \"a\"\n\n[[template]]\nname = \"coder\"\n\n[[template]]\nname = \"coder\"\nnamespace = \"a\"\n";
    assert_err_at(
        text,
        9,
        "template a/coder is listed twice (first at line 2)",
    );
    // Same name in different namespaces, and with and without one, is fine.
    parse(
        "[[template]]\nname = \"c\"\nnamespace = \"a\"\n[[template]]\nname = \"c\"\nnamespace = \"b\"\n[[template]]\nname = \"c\"\n",
    );
}

#[test]
fn parse_error_other_checks() {
    assert_err_at("[[template]]\nname = \"\"\n", 2, "template name is empty");
    assert_err_at(
        "[[template]]\nnamespace = \"a\"\n",
        1,
        "missing field `name`",
    );
    assert_err_at(
        "[[template]]\nname = \"a\"\npep = false\nprefilter = true\n",
        2,
        "prefilter = true has no effect with pep = false",
    );
    assert_err_at("[default]\nallow = [ { host = 5 } ]\n", 2, "");
}

#[test]
fn errors_carry_the_origin() {
    let err = Policy::parse("x = 1", Path::new("/etc/egress/policy.toml")).unwrap_err();
    assert!(
        err.to_string().starts_with("/etc/egress/policy.toml:1:1: "),
        "{err}"
    );
    match err {
        Error::Invalid {
            origin, line, col, ..
        } => {
            assert_eq!(origin, PathBuf::from("/etc/egress/policy.toml"));
            assert_eq!((line, col), (1, 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn load_reads_bounded_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, b"[default]\n# \xff\n").unwrap();
    let err = Policy::load(&path).unwrap_err().to_string();
    assert!(err.contains("policy.toml:2:3: not UTF-8"), "{err}");
    let big = vec![b'#'; (MAX_FILE_BYTES + 1) as usize];
    std::fs::write(&path, big).unwrap();
    assert!(matches!(Policy::load(&path), Err(Error::TooLarge { .. })));
    std::fs::write(&path, EXAMPLE).unwrap();
    assert!(
        Policy::load(&path)
            .unwrap()
            .template("x", "coder")
            .decide_name("api.github.com", 443)
            .allowed
    );
    // A FIFO is refused at once instead of blocking.
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    assert!(matches!(Policy::load(&fifo), Err(Error::NotAFile { .. })));
}

#[test]
fn docs_example_parses() {
    // The example in docs/policy.md, kept in sync by hand.
    let text = include_str!("../../../docs/policy.md");
    let start = text
        .find("```toml\n")
        .expect("a toml block in docs/policy.md")
        + 8;
    let end = start + text[start..].find("```").expect("end of the toml block");
    let p = parse(&text[start..end]);
    let t = p.template("team-a", "coder");
    assert!(t.decide_name("api.github.com", 443).allowed);
    assert!(!t.decide_name("x.evil.test", 443).allowed);
}

proptest! {
    #[test]
    fn decisions_never_panic(name in "\\PC{0,300}", port: u16, raw: [u8; 16], v4: bool) {
        let p = parse(EXAMPLE);
        let ip = if v4 {
            IpAddr::from([raw[0], raw[1], raw[2], raw[3]])
        } else {
            IpAddr::from(raw)
        };
        for t in [p.template("team-a", "coder"), p.template("x", "coder"), p.template("x", "open")] {
            let _ = t.decide_name(&name, port);
            let _ = t.decide_dns(&name);
            let _ = t.decide_ip_with(ip, port, &[ip]);
            let _ = t.names_exact(ip, port);
        }
        let _ = always_denied_name(&name);
    }

    #[test]
    fn host_like_names_never_panic(name in "[a-zA-Z0-9*.:\\[\\]_-]{0,80}", port: u16) {
        let p = parse(EXAMPLE);
        let _ = p.template("x", "open").decide_name(&name, port);
        let _ = p.template("x", "coder").decide_dns(&name);
    }

    #[test]
    fn parse_never_panics(text in "\\PC{0,400}") {
        let _ = Policy::parse(&text, Path::new("p.toml"));
    }

    #[test]
    fn parse_of_rule_fragments_never_panics(
        host in "[a-z0-9*.\\[\\]:-]{0,20}",
        cidr in "[0-9a-f.:/]{0,24}",
        lo in any::<i64>(),
        range in "[0-9 -]{0,12}",
    ) {
        let text = format!(
            "[default]\nallow = [ {{ host = {host:?} }}, {{ cidr = {cidr:?}, ports = [{lo}, {range:?}] }} ]\n"
        );
        let _ = Policy::parse(&text, Path::new("p.toml"));
    }
}
