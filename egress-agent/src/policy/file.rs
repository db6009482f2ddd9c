//! The policy file: its TOML schema, reading it (bounded) and compiling it into a [`Policy`],
//! with errors that point at the line and column of the problem.
use std::{
    collections::HashMap, fs::File, io::Read as _, net::IpAddr, os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use ipnet::{IpNet, Ipv4Net};
use serde::Deserialize;
use toml::Spanned;

use super::{
    Error, MAX_FILE_BYTES, Name, NamePattern, Policy, Rule, RuleKind, RuleRef, Target,
    TemplatePolicy, check_name, classify_name, normalize,
};

/// Most template entries in one file.
pub(super) const MAX_TEMPLATES: usize = 10_000;
/// Most rules in one `deny` or `allow` list.
pub(super) const MAX_RULES: usize = 10_000;
/// Most entries in one rule's `ports`.
pub(super) const MAX_PORTS: usize = 1_024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    default: Option<Spanned<EntryDoc>>,
    #[serde(default)]
    template: Vec<Spanned<TemplateDoc>>,
}

/// `[default]`: an entry without a name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryDoc {
    pep: Option<bool>,
    prefilter: Option<Spanned<bool>>,
    #[serde(default)]
    deny: Vec<Spanned<RuleDoc>>,
    #[serde(default)]
    allow: Vec<Spanned<RuleDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateDoc {
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    pep: Option<bool>,
    prefilter: Option<Spanned<bool>>,
    #[serde(default)]
    deny: Vec<Spanned<RuleDoc>>,
    #[serde(default)]
    allow: Vec<Spanned<RuleDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    host: Option<Spanned<String>>,
    cidr: Option<Spanned<String>>,
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
}

/// Reads the file at `path`: a regular file of at most [`MAX_FILE_BYTES`], UTF-8.
pub(super) fn read(path: &Path) -> Result<String, Error> {
    let read_err = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    // Non-blocking open: opening a FIFO for reading would otherwise wait for a writer.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(Error::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file at the limit from one above it, even when the
    // file grows while it is read.
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            max: MAX_FILE_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let text = String::from_utf8_lossy(e.as_bytes());
        let (line, col) = line_col(&text, valid);
        Error::Invalid {
            origin: path.to_path_buf(),
            line,
            col,
            message: "not UTF-8 text: save the file as UTF-8".into(),
        }
    })
}

/// Parses and checks a whole policy.
pub(super) fn parse(text: &str, origin: &Path) -> Result<Policy, Error> {
    let at = |offset: usize, message: String| {
        let (line, col) = line_col(text, offset);
        Error::Invalid {
            origin: origin.to_path_buf(),
            line,
            col,
            message,
        }
    };
    let doc: FileDoc = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        // One line: toml's messages may span several.
        at(offset, e.message().trim_end().replace('\n', ": "))
    })?;
    let check = |offset: usize, r: Result<_, String>| r.map_err(|m| at(offset, m));

    if doc.template.len() > MAX_TEMPLATES {
        let offset = doc.template[MAX_TEMPLATES].span().start;
        return Err(at(
            offset,
            format!(
                "more than {MAX_TEMPLATES} [[template]] entries: give templates that share rules \
                 one entry without `namespace`"
            ),
        ));
    }

    let default = match doc.default {
        Some(entry) => {
            let start = entry.span().start;
            let entry = entry.into_inner();
            check(start, check_prefilter(entry.pep, entry.prefilter.as_ref()))?;
            let deny = compile_rules(text, origin, "default", "deny", entry.deny)?;
            let allow = compile_rules(text, origin, "default", "allow", entry.allow)?;
            TemplatePolicy::new(
                "default",
                entry.pep.unwrap_or(true),
                entry.prefilter.is_some_and(|p| *p.get_ref()),
                deny,
                allow,
            )
        }
        None => TemplatePolicy::empty("default (no [default] in the policy file)"),
    };

    let mut policy = Policy::new(origin, default);
    // Where each (namespace, name) was first listed, for the duplicate message.
    let mut first_seen: HashMap<(Option<String>, String), usize> = HashMap::new();
    for entry in doc.template {
        let entry = entry.into_inner();
        let name_at = entry.name.span().start;
        let name = entry.name.into_inner();
        check(name_at, check_identity("name", &name))?;
        let namespace = match entry.namespace {
            Some(ns) => {
                let ns_at = ns.span().start;
                let ns = ns.into_inner();
                check(ns_at, check_identity("namespace", &ns))?;
                Some(ns)
            }
            None => None,
        };
        let label = match &namespace {
            Some(ns) => format!("template {ns}/{name}"),
            None => format!("template {name}"),
        };
        let key = (namespace.clone(), name.clone());
        if let Some(&first) = first_seen.get(&key) {
            let (first_line, _) = line_col(text, first);
            return Err(at(
                name_at,
                format!(
                    "{label} is listed twice (first at line {first_line}): merge the two \
                     entries into one"
                ),
            ));
        }
        first_seen.insert(key, name_at);
        check(
            name_at,
            check_prefilter(entry.pep, entry.prefilter.as_ref()),
        )?;
        let deny = compile_rules(text, origin, &label, "deny", entry.deny)?;
        let allow = compile_rules(text, origin, &label, "allow", entry.allow)?;
        let rules = TemplatePolicy::new(
            &label,
            entry.pep.unwrap_or(true),
            entry.prefilter.is_some_and(|p| *p.get_ref()),
            deny,
            allow,
        );
        policy.add(namespace, name, rules);
    }

    Ok(policy)
}

pub(super) fn check_identity(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!(
            "template {what} is empty: write the actor's template {what} as the agent gets it"
        ));
    }
    if value.len() > 253 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "template {what} {value:?} is not one: at most 253 characters, no spaces or control \
             characters"
        ));
    }
    Ok(())
}

fn check_prefilter(pep: Option<bool>, prefilter: Option<&Spanned<bool>>) -> Result<(), String> {
    if pep == Some(false) && prefilter.is_some_and(|p| *p.get_ref()) {
        return Err(
            "prefilter = true has no effect with pep = false (the rules already decide every \
             flow): remove one of the two"
                .into(),
        );
    }
    Ok(())
}

fn compile_rules(
    text: &str,
    origin: &Path,
    label: &str,
    list: &str,
    rules: Vec<Spanned<RuleDoc>>,
) -> Result<Vec<Rule>, Error> {
    let at = |offset: usize, message: String| {
        let (line, col) = line_col(text, offset);
        Error::Invalid {
            origin: origin.to_path_buf(),
            line,
            col,
            message,
        }
    };
    if rules.len() > MAX_RULES {
        return Err(at(
            rules[MAX_RULES].span().start,
            format!(
                "{label}: more than {MAX_RULES} {list} rules: use wildcards (`*.example.com`) \
                 or wider cidr networks"
            ),
        ));
    }
    let kind = if list == "deny" {
        RuleKind::Deny
    } else {
        RuleKind::Allow
    };
    let mut out = Vec::with_capacity(rules.len());
    for (index, rule) in rules.into_iter().enumerate() {
        let rule_at = rule.span().start;
        let rule = rule.into_inner();
        let (target, shown) = match (rule.host, rule.cidr) {
            (Some(_), Some(_)) => {
                return Err(at(
                    rule_at,
                    "a rule has either `host` or `cidr`, not both: split it into two rules".into(),
                ));
            }
            (None, None) => {
                return Err(at(
                    rule_at,
                    "a rule needs `host = \"...\"` (a name, `*.suffix` or `*`) or \
                     `cidr = \"...\"` (an address or network)"
                        .into(),
                ));
            }
            (Some(host), None) => {
                let host_at = host.span().start;
                let pattern = host_pattern(host.get_ref()).map_err(|m| at(host_at, m))?;
                let shown = match &pattern {
                    NamePattern::Any => "host=*".to_string(),
                    NamePattern::Exact(h) => format!("host={h}"),
                    NamePattern::Suffix(s) => format!("host=*{s}"),
                };
                (Target::Name(pattern), shown)
            }
            (None, Some(cidr)) => {
                let cidr_at = cidr.span().start;
                let net = network(cidr.get_ref()).map_err(|m| at(cidr_at, m))?;
                let shown = if net.prefix_len() == net.max_prefix_len() {
                    format!("cidr={}", net.addr())
                } else {
                    format!("cidr={net}")
                };
                (Target::Net(net), shown)
            }
        };
        let ports = match rule.ports {
            None => None,
            Some(ports) => Some(port_list(ports).map_err(|(offset, m)| at(offset, m))?),
        };
        let mut text = format!("{label} {list}[{index}] {shown}");
        if let Some(ranges) = &ports {
            text.push_str(&shown_ports(ranges));
        }
        out.push(Rule {
            target,
            ports,
            rule_ref: RuleRef::new(kind, text),
        });
    }
    Ok(out)
}

/// ` ports=443,8000-8999`: a rule's ports as its text shows them.
pub(super) fn shown_ports(ranges: &[(u16, u16)]) -> String {
    let shown: Vec<String> = ranges
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect();
    format!(" ports={}", shown.join(","))
}

/// A `host` pattern: `*`, `*.suffix` or an exact name (canonical).
pub(super) fn host_pattern(raw: &str) -> Result<NamePattern, String> {
    if raw == "*" {
        return Ok(NamePattern::Any);
    }
    if !raw.is_ascii() {
        return Err(format!(
            "host {raw:?} is not ASCII: write internationalised names in their xn-- (punycode) \
             form"
        ));
    }
    let (wildcard, rest) = match raw.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    if rest.contains('*') {
        return Err(format!(
            "host {raw:?}: `*` is allowed only alone or as the whole first label, as in \
             \"*.example.com\""
        ));
    }
    match classify_name(rest) {
        Name::Ip(_) if !wildcard => Err(format!(
            "host {raw:?} is an address: write it as `cidr = \"{rest}\"`"
        )),
        Name::Valid(name) => {
            let name = name.into_owned();
            Ok(if wildcard {
                NamePattern::Suffix(format!(".{name}"))
            } else {
                NamePattern::Exact(name)
            })
        }
        Name::Ip(_) | Name::Invalid(_) => {
            let why = check_name(rest.strip_suffix('.').unwrap_or(rest))
                .err()
                .unwrap_or("an address after `*.`");
            Err(format!(
                "host {raw:?} is not a host name ({why}): write a name such as \
                 \"web.example.com\", \"*.example.com\" or \"*\""
            ))
        }
    }
}

/// A `cidr`: a network without bits past its prefix, or a bare address; normalized.
pub(super) fn network(raw: &str) -> Result<IpNet, String> {
    let hint = "expected an address or network, e.g. \"192.0.2.7\", \"10.252.0.0/16\", \
                \"fd00::/8\"";
    let net = if raw.contains('/') {
        let net: IpNet = raw
            .parse()
            .map_err(|_| format!("cidr {raw:?} is not a network: {hint}"))?;
        if net.trunc() != net {
            return Err(format!(
                "cidr {raw:?} has bits set after the /{len} prefix: write {} for the network, \
                 or {} for the one address",
                net.trunc(),
                net.addr(),
                len = net.prefix_len()
            ));
        }
        net
    } else {
        let ip: IpAddr = raw
            .parse()
            .map_err(|_| format!("cidr {raw:?} is not an address: {hint}"))?;
        IpNet::from(ip)
    };
    Ok(normalize_net(net))
}

/// Networks inside ::ffff:0:0/96 are IPv4 networks written the IPv6 way, and an
/// IPv4-compatible address is an IPv4 address: flows are checked by their normalized address,
/// so the rule is normalized too.
fn normalize_net(net: IpNet) -> IpNet {
    let IpNet::V6(v6) = net else {
        return net;
    };
    let v4 = match v6.addr().to_ipv4_mapped() {
        Some(v4) if v6.prefix_len() >= 96 => Ipv4Net::new(v4, v6.prefix_len() - 96).ok(),
        _ if v6.prefix_len() == 128 => match normalize(IpAddr::V6(v6.addr())) {
            IpAddr::V4(v4) => Ipv4Net::new(v4, 32).ok(),
            IpAddr::V6(_) => None,
        },
        _ => None,
    };
    v4.map_or(net, IpNet::V4)
}

type PortError = (usize, String);

fn port_list(ports: Spanned<Vec<Spanned<toml::Value>>>) -> Result<Vec<(u16, u16)>, PortError> {
    let list_at = ports.span().start;
    let ports = ports.into_inner();
    if ports.is_empty() {
        return Err((
            list_at,
            "`ports = []` matches nothing: leave `ports` out for any port, or list ports".into(),
        ));
    }
    if ports.len() > MAX_PORTS {
        return Err((
            list_at,
            format!("more than {MAX_PORTS} ports in one rule: use ranges such as \"8000-8999\""),
        ));
    }
    let mut out = Vec::with_capacity(ports.len());
    for port in ports {
        let port_at = port.span().start;
        out.push(port_range(port.get_ref()).map_err(|m| (port_at, m))?);
    }
    Ok(out)
}

/// One `ports` entry: a number, or a `"LOW-HIGH"` (or `"N"`) string.
pub(super) fn port_range(value: &toml::Value) -> Result<(u16, u16), String> {
    let one = |n: i64| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {n} is out of range: ports are 1-65535"))
    };
    match value {
        toml::Value::Integer(n) => {
            let p = one(*n)?;
            Ok((p, p))
        }
        toml::Value::String(s) => {
            let bad = || {
                format!(
                    "port range {s:?} is malformed: write \"LOW-HIGH\" with 1 <= LOW <= HIGH <= \
                     65535, e.g. \"8000-8999\""
                )
            };
            let number = |t: &str| -> Result<u16, String> {
                let t = t.trim();
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) || t.len() > 5 {
                    return Err(bad());
                }
                t.parse::<i64>().map_err(|_| bad()).and_then(one)
            };
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (number(lo)?, number(hi)?),
                None => {
                    let p = number(s)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!(
                    "port range {s:?} is backwards: write \"{hi}-{lo}\""
                ));
            }
            Ok((lo, hi))
        }
        other => Err(format!(
            "port {other} is neither a number nor a range: write 443 or \"8000-8999\""
        )),
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}
