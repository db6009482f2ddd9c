//! The embedded policy: what an actor may reach when the agent decides by itself (no PEP for
//! its template, or `pep = false`), and the pre-filter applied before the PEP (`prefilter`).
//!
//! A TOML file ([`file`]) lists, per actor template, a `deny` list evaluated first and an
//! `allow` list; nothing matched means deny. Substrate's `EgressPolicy` YAML ([`yaml`]: ordered
//! `hostnames` / `cidrs` / `all` allow rules) compiles into the same rules. Some destinations are denied whatever the rules
//! say ([`always`]): cloud metadata services, link-local, loopback, unspecified, the node's own
//! addresses and the actor's gateway, unless an allow rule names that exact address. The policy
//! is immutable; [`Shared`] swaps in a new one on SIGHUP or when the file changes
//! ([`spawn_reloader`]), so a decision always sees one whole policy. See `docs/policy.md`.
use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;

mod always;
mod file;
mod reload;
mod yaml;

pub use always::{always_denied, always_denied_name, default_gateways, node_addresses, normalize};
pub use reload::{Shared, spawn_reloader};

/// Largest policy file the agent reads: far above any real policy, small enough to parse at
/// once on a reload.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Why a policy file cannot be used, each saying where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("reading policy file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a regular file (a FIFO or a device would block or never end).
    #[error("policy file {} is not a regular file: point the agent at a TOML file", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error(
        "policy file {} is larger than {max} bytes: a policy this large is almost certainly \
         not one; check the path, or merge templates with wildcards",
        path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// The text is not a valid policy; `line` and `col` point at the problem (1-based).
    #[error("{}:{line}:{col}: {message}", origin.display())]
    Invalid {
        /// The file (or the name given to [`Policy::parse`]).
        origin: PathBuf,
        /// Line of the problem, from 1.
        line: usize,
        /// Column of the problem, from 1 (in characters).
        col: usize,
        /// What is wrong and what to do.
        message: String,
    },
}

/// A whole policy: per-template rules and the default. Immutable; share it in an `Arc`.
#[derive(Debug)]
pub struct Policy {
    origin: PathBuf,
    default: TemplatePolicy,
    /// namespace -> template name -> rules, for entries that name a namespace.
    namespaced: HashMap<String, HashMap<String, TemplatePolicy>>,
    /// template name -> rules, for entries without a namespace (any namespace).
    any_namespace: HashMap<String, TemplatePolicy>,
}

impl Policy {
    /// Parses policy text; `origin` names it in error messages (usually the file's path).
    /// TOML, or Substrate `EgressPolicy` YAML when `origin` ends in `.yaml`/`.yml` or the text's
    /// first document says `kind: EgressPolicy`.
    pub fn parse(text: &str, origin: &Path) -> Result<Policy, Error> {
        if yaml::is_yaml(origin, text) {
            yaml::parse(text, origin)
        } else {
            file::parse(text, origin)
        }
    }

    /// Reads (at most [`MAX_FILE_BYTES`]) and parses the policy file at `path`.
    pub fn load(path: &Path) -> Result<Policy, Error> {
        let text = file::read(path)?;
        Policy::parse(&text, path)
    }

    /// The policy when no file is given: every template has no rules, so the agent denies
    /// everything it would decide itself; templates still defer to the PEP when there is one.
    pub fn deny_all() -> Policy {
        Policy::new(
            Path::new("(no policy file)"),
            TemplatePolicy::empty("no policy file"),
        )
    }

    /// A policy from `origin` with only `default`; the parsers add the templates' entries.
    fn new(origin: &Path, default: TemplatePolicy) -> Policy {
        Policy {
            origin: origin.to_path_buf(),
            default,
            namespaced: HashMap::new(),
            any_namespace: HashMap::new(),
        }
    }

    /// Adds the rules of template `name` in `namespace`, or in any namespace when `None`.
    fn add(&mut self, namespace: Option<String>, name: String, rules: TemplatePolicy) {
        match namespace {
            Some(ns) => {
                self.namespaced.entry(ns).or_default().insert(name, rules);
            }
            None => {
                self.any_namespace.insert(name, rules);
            }
        }
    }

    /// The rules for an actor of `template` in `namespace`: the entry naming both, else the
    /// entry naming the template alone, else `[default]`.
    pub fn template(&self, namespace: &str, template: &str) -> &TemplatePolicy {
        self.namespaced
            .get(namespace)
            .and_then(|by_name| by_name.get(template))
            .or_else(|| self.any_namespace.get(template))
            .unwrap_or(&self.default)
    }

    /// One line for the "policy loaded" log: where from, the templates and their rule counts
    /// (the first few dozen; the rest are counted).
    pub fn summary(&self) -> String {
        const SHOWN: usize = 32;
        let mut entries: Vec<&TemplatePolicy> = self
            .namespaced
            .values()
            .flat_map(HashMap::values)
            .chain(self.any_namespace.values())
            .collect();
        entries.sort_by(|a, b| a.label.cmp(&b.label));
        let mut out = format!(
            "{}: {} template entr{}; {}",
            self.origin.display(),
            entries.len(),
            if entries.len() == 1 { "y" } else { "ies" },
            self.default.summary()
        );
        for t in entries.iter().take(SHOWN) {
            out.push_str("; ");
            out.push_str(&t.summary());
        }
        if entries.len() > SHOWN {
            out.push_str(&format!("; and {} more", entries.len() - SHOWN));
        }
        out
    }

    /// The name the policy was parsed under (its file).
    pub fn origin(&self) -> &Path {
        &self.origin
    }
}

/// The rules of one template entry (or of `[default]`).
#[derive(Debug)]
pub struct TemplatePolicy {
    /// With a PEP configured, let the PEP decide (`true`, the default) or decide here and dial
    /// directly (`false`).
    pub pep: bool,
    /// With a PEP deciding, apply these rules first and refuse what they deny.
    pub prefilter: bool,
    label: Arc<str>,
    deny: Vec<Rule>,
    allow: Vec<Rule>,
    no_match: RuleRef,
}

impl TemplatePolicy {
    fn empty(label: &str) -> TemplatePolicy {
        TemplatePolicy::new(label, true, false, Vec::new(), Vec::new())
    }

    fn new(
        label: &str,
        pep: bool,
        prefilter: bool,
        deny: Vec<Rule>,
        allow: Vec<Rule>,
    ) -> TemplatePolicy {
        let no_match = if allow.is_empty() {
            format!("{label}: no allow rules (deny all)")
        } else {
            format!("{label}: no allow rule matched (deny by default)")
        };
        TemplatePolicy {
            pep,
            prefilter,
            label: label.into(),
            deny,
            allow,
            no_match: RuleRef::new(RuleKind::NoMatch, no_match),
        }
    }

    /// The entry for logs: `template team-a/coder`, `template coder`, `default`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Decides a flow that has a name (TLS SNI, HTTP Host, or a name learned from DNS) to
    /// `port`: always-denied names, then the deny list, then the allow list; nothing matched
    /// means deny. Only `host` rules apply. A name that is an IP literal (`10.0.0.1`,
    /// `[fd00::1]`) is decided as that address by [`TemplatePolicy::decide_ip`]; a name that is
    /// neither a valid host name nor a plain address is denied.
    pub fn decide_name(&self, name: &str, port: u16) -> Decision {
        let name = match classify_name(name) {
            Name::Ip(ip) => return self.decide_ip(ip, port),
            Name::Invalid(why) => return Decision::deny(invalid_name(why, name)),
            Name::Valid(name) => name,
        };
        // An always-denied name passes only through an allow rule naming it exactly, and
        // that rule is what allows it (after the deny list).
        let exact = match always::denied_name(&name) {
            Some(reason) => match self.exact_host(&name, Some(port)) {
                Some(rule) => Some(rule),
                None => return Decision::deny(always_ref(reason, &name)),
            },
            None => None,
        };
        if let Some(rule) = first_match(&self.deny, |r| r.matches_name(&name, Some(port))) {
            return Decision::deny(rule.clone());
        }
        if let Some(rule) = exact {
            return Decision::allow(rule.clone());
        }
        match first_match(&self.allow, |r| r.matches_name(&name, Some(port))) {
            Some(rule) => Decision::allow(rule.clone()),
            None => Decision::deny(self.no_match.clone()),
        }
    }

    /// Decides a flow by its destination address (no name known): always-denied addresses
    /// (without the node's addresses and gateways: see [`TemplatePolicy::decide_ip_with`]),
    /// then the deny list, then the allow list. Only `cidr` rules apply.
    pub fn decide_ip(&self, ip: IpAddr, port: u16) -> Decision {
        self.decide_ip_with(ip, port, &[])
    }

    /// [`TemplatePolicy::decide_ip`] with `extra` always-denied addresses: the node's own
    /// addresses and the actor's gateways. An allow rule naming the exact address (and a
    /// matching port) overrides the always-denied list; the deny list still applies.
    pub fn decide_ip_with(&self, ip: IpAddr, port: u16, extra: &[IpAddr]) -> Decision {
        let ip = normalize(ip);
        let exact = match always_denied(ip, extra) {
            Some(reason) => match self.names_exact(ip, port) {
                Some(rule) => Some(rule),
                None => return Decision::deny(always_ref(reason, &ip.to_string())),
            },
            None => None,
        };
        if let Some(rule) = first_match(&self.deny, |r| r.matches_ip(ip, port)) {
            return Decision::deny(rule.clone());
        }
        if let Some(rule) = exact {
            return Decision::allow(rule);
        }
        match first_match(&self.allow, |r| r.matches_ip(ip, port)) {
            Some(rule) => Decision::allow(rule.clone()),
            None => Decision::deny(self.no_match.clone()),
        }
    }

    /// Decides a DNS question for `name` (for the DNS forwarder, which knows no port):
    /// denied when it is an always-denied name (unless an allow rule names it exactly), when a
    /// deny `host` rule without `ports` matches it, or when no allow `host` rule matches it on
    /// any port.
    pub fn decide_dns(&self, name: &str) -> Decision {
        let name = match classify_name(name) {
            Name::Ip(_) => {
                return Decision::deny(invalid_name("an address, not a name", name));
            }
            Name::Invalid(why) => return Decision::deny(invalid_name(why, name)),
            Name::Valid(name) => name,
        };
        let exact = match always::denied_name(&name) {
            Some(reason) => match self.exact_host(&name, None) {
                Some(rule) => Some(rule),
                None => return Decision::deny(always_ref(reason, &name)),
            },
            None => None,
        };
        if let Some(rule) = first_match(&self.deny, |r| {
            r.ports.is_none() && r.matches_name(&name, None)
        }) {
            return Decision::deny(rule.clone());
        }
        if let Some(rule) = exact {
            return Decision::allow(rule.clone());
        }
        match first_match(&self.allow, |r| r.matches_name(&name, None)) {
            Some(rule) => Decision::allow(rule.clone()),
            None => Decision::deny(self.no_match.clone()),
        }
    }

    /// The allow rule whose `cidr` is exactly `ip` (a bare address, /32 or /128) and whose
    /// ports match `port`: such a rule overrides the always-denied list for that address. The
    /// caller uses it when it checks resolved addresses with [`always_denied`] itself.
    pub fn names_exact(&self, ip: IpAddr, port: u16) -> Option<RuleRef> {
        let ip = normalize(ip);
        first_match(&self.allow, |r| {
            r.is_exact_ip(ip) && r.matches_port(Some(port))
        })
        .cloned()
    }

    /// An allow rule that names `name` exactly (no wildcard), on `port` or any port.
    fn exact_host(&self, name: &str, port: Option<u16>) -> Option<&RuleRef> {
        first_match(&self.allow, |r| {
            matches!(&r.target, Target::Name(NamePattern::Exact(h)) if h == name)
                && r.matches_port(port)
        })
    }

    fn summary(&self) -> String {
        format!(
            "{} (pep={}, prefilter={}, {} deny, {} allow)",
            self.label,
            self.pep,
            self.prefilter,
            self.deny.len(),
            self.allow.len()
        )
    }
}

fn first_match(rules: &[Rule], pred: impl Fn(&Rule) -> bool) -> Option<&RuleRef> {
    rules.iter().find(|r| pred(r)).map(|r| &r.rule_ref)
}

fn always_ref(reason: &str, what: &str) -> RuleRef {
    RuleRef::new(
        RuleKind::AlwaysDenied,
        format!("always denied: {reason} {what}"),
    )
}

fn invalid_name(why: &str, name: &str) -> RuleRef {
    // Bounded and escaped: the name comes from the actor.
    let shown: String = name.chars().take(80).collect();
    RuleRef::new(
        RuleKind::InvalidName,
        format!("invalid name {shown:?}: {why}"),
    )
}

/// The outcome of a decision and the rule that made it.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Whether the flow may go on.
    pub allowed: bool,
    /// What decided it, for logs and metrics.
    pub rule: RuleRef,
}

impl Decision {
    fn allow(rule: RuleRef) -> Decision {
        Decision {
            allowed: true,
            rule,
        }
    }

    fn deny(rule: RuleRef) -> Decision {
        Decision {
            allowed: false,
            rule,
        }
    }
}

/// What made a decision: its kind and a line for logs, e.g.
/// `template team-a/coder allow[2] host=*.github.com ports=443` or
/// `always denied: cloud metadata address 169.254.169.254`.
#[derive(Clone, Debug)]
pub struct RuleRef {
    kind: RuleKind,
    text: Arc<str>,
}

impl RuleRef {
    fn new(kind: RuleKind, text: String) -> RuleRef {
        RuleRef {
            kind,
            text: text.into(),
        }
    }

    /// The kind of rule, e.g. for a metrics label.
    pub fn kind(&self) -> RuleKind {
        self.kind
    }
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which kind of rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// An entry of an `allow` list.
    Allow,
    /// An entry of a `deny` list.
    Deny,
    /// No allow rule matched: denied by default.
    NoMatch,
    /// An always-denied address or name.
    AlwaysDenied,
    /// The name is not a valid host name (or is an address where a name is needed).
    InvalidName,
}

impl RuleKind {
    /// A short lowercase label: `allow`, `deny`, `no_match`, `always_denied`, `invalid_name`.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Allow => "allow",
            RuleKind::Deny => "deny",
            RuleKind::NoMatch => "no_match",
            RuleKind::AlwaysDenied => "always_denied",
            RuleKind::InvalidName => "invalid_name",
        }
    }
}

/// One compiled rule.
#[derive(Debug)]
struct Rule {
    target: Target,
    /// `None`: any port.
    ports: Option<Vec<(u16, u16)>>,
    rule_ref: RuleRef,
}

impl Rule {
    fn matches_port(&self, port: Option<u16>) -> bool {
        match (&self.ports, port) {
            (None, _) | (Some(_), None) => true,
            (Some(ranges), Some(p)) => ranges.iter().any(|&(lo, hi)| lo <= p && p <= hi),
        }
    }

    /// `name` is canonical (lowercase, no trailing dot); `port` `None` means any port.
    fn matches_name(&self, name: &str, port: Option<u16>) -> bool {
        let Target::Name(pattern) = &self.target else {
            return false;
        };
        let name_ok = match pattern {
            NamePattern::Any => true,
            NamePattern::Exact(h) => h == name,
            // `suffix` keeps its leading dot: "a.github.com" matches ".github.com", while
            // "github.com" and "xgithub.com" do not.
            NamePattern::Suffix(suffix) => name.len() > suffix.len() && name.ends_with(&**suffix),
        };
        name_ok && self.matches_port(port)
    }

    /// `ip` is normalized.
    fn matches_ip(&self, ip: IpAddr, port: u16) -> bool {
        matches!(&self.target, Target::Net(net) if net.contains(&ip))
            && self.matches_port(Some(port))
    }

    fn is_exact_ip(&self, ip: IpAddr) -> bool {
        matches!(&self.target, Target::Net(net) if net.prefix_len() == net.max_prefix_len() && net.addr() == ip)
    }
}

#[derive(Debug)]
enum Target {
    Name(NamePattern),
    Net(IpNet),
}

#[derive(Debug)]
enum NamePattern {
    /// `*`: any name.
    Any,
    /// An exact name, canonical.
    Exact(String),
    /// `*.suffix`, stored as `.suffix`.
    Suffix(String),
}

/// A name as the policy sees it.
enum Name<'a> {
    /// A valid host name: lowercase, without the trailing dot.
    Valid(Cow<'a, str>),
    /// A plain IP literal (`10.0.0.1`, `fd00::1`, `[fd00::1]`).
    Ip(IpAddr),
    /// Neither: why.
    Invalid(&'static str),
}

/// Longest DNS name in text form (RFC 1035), without the trailing dot.
const MAX_NAME: usize = 253;
/// Longest DNS label.
const MAX_LABEL: usize = 63;

fn classify_name(raw: &str) -> Name<'_> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let literal = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Name::Ip(ip);
    }
    if let Err(why) = check_name(name) {
        return Name::Invalid(why);
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Name::Valid(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Name::Valid(Cow::Borrowed(name))
    }
}

/// Checks the shape of a host name (without trailing dot): non-empty labels of letters,
/// digits, `-` and `_`, within DNS lengths, and a last label that is not numeric (clients read
/// `1.2.3.010` or `0x7f.1` as IPv4 addresses, so such a name does not mean what it says).
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > MAX_LABEL {
            return Err("a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("characters other than letters, digits, '-', '_' and '.'");
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if hex || last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a numeric last label, which clients read as an IPv4 address");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
