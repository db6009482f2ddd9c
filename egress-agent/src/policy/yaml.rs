//! Agent Substrate's `EgressPolicy` documents (YAML) as the embedded policy, so one policy file
//! serves both the Substrate PEP and this agent:
//!
//! ```yaml
//! apiVersion: substrate.agent/v1alpha1   # any apiVersion
//! kind: EgressPolicy
//! metadata: { name: coder, namespace: team-a }
//! spec:
//!   rules:                               # ordered allow rules; first match wins; none = deny all
//!     - hostnames: ["api.example.test", "*.github.test"]
//!       ports: [443]
//!     - cidrs: ["10.0.0.0/8", "fd00::/8"]
//!     - all: {}
//! ```
//!
//! Each document is one template entry (`metadata.name` the template, `metadata.namespace` its
//! namespace, none = any), compiled into the same [`TemplatePolicy`] the TOML file gives: its
//! rules are allow rules in order, with the TOML's matching (`host` for `hostnames`, `cidr` for
//! `cidrs`, both for `all`), and the always-denied list applies as always.
//!
//! Values are checked while they are read, so serde_yaml_ng marks an error with the line and
//! column of the value (or of the rule or document) at fault.
use std::{collections::HashMap, fmt, marker::PhantomData, path::Path};

use ipnet::IpNet;
use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor},
};

use super::{
    Error, NamePattern, Policy, Rule, RuleKind, RuleRef, Target, TemplatePolicy,
    file::{
        MAX_PORTS, MAX_RULES, MAX_TEMPLATES, check_identity, host_pattern, network, port_range,
        shown_ports,
    },
};

/// The only `kind` read.
const KIND: &str = "EgressPolicy";

/// Whether the policy file at `origin` holding `text` is EgressPolicy YAML: its name ends in
/// `.yaml` or `.yml`, or its first document says `kind: EgressPolicy` at its top level (which
/// no TOML file can: TOML writes `kind = ...`).
pub(super) fn is_yaml(origin: &Path, text: &str) -> bool {
    let by_name = origin
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
    by_name || first_document_is_egress_policy(text)
}

/// Whether the first YAML document of `text` has a top-level `kind: EgressPolicy` line.
fn first_document_is_egress_policy(text: &str) -> bool {
    let mut started = false;
    for line in text.lines() {
        let content = line.split(" #").next().unwrap_or(line).trim_end();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if content == "---" || content.starts_with("--- ") {
            if started {
                return false;
            }
            started = true;
            continue;
        }
        if content == "..." {
            return false;
        }
        started = true;
        if let Some(value) = content.strip_prefix("kind:") {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            return unquoted == KIND;
        }
    }
    false
}

/// Parses every document of `text` (empty documents are skipped) into a policy.
pub(super) fn parse(text: &str, origin: &Path) -> Result<Policy, Error> {
    let invalid = |e: serde_yaml_ng::Error| {
        let (line, col) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
        Error::Invalid {
            origin: origin.to_path_buf(),
            line,
            col,
            // serde_yaml_ng appends " at line L column C": the prefix says it already.
            message: e
                .to_string()
                .replacen(&format!(" at line {line} column {col}"), "", 1),
        }
    };
    let mut seen = HashMap::new();
    let mut policy = Policy::new(
        origin,
        TemplatePolicy::empty("default (no EgressPolicy names the template)"),
    );
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let seed = DocumentSeed {
            seen: &mut seen,
            index,
        };
        let Some(Document {
            name,
            namespace,
            rules,
        }) = seed.deserialize(document).map_err(invalid)?
        else {
            continue;
        };
        let rules = compile(&Document::label(&name, namespace.as_deref()), rules);
        policy.add(namespace, name, rules);
    }
    Ok(policy)
}

/// One `EgressPolicy` document, checked.
struct Document {
    name: String,
    namespace: Option<String>,
    rules: Vec<RuleDoc>,
}

impl Document {
    /// `EgressPolicy team-a/coder`, `EgressPolicy coder`.
    fn label(name: &str, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) => format!("{KIND} {ns}/{name}"),
            None => format!("{KIND} {name}"),
        }
    }

    /// How many compiled rules the document's rules make.
    fn compiled_len(rules: &[RuleDoc]) -> usize {
        rules
            .iter()
            .map(|r| match &r.target {
                TargetDoc::Hostnames(h) => h.len(),
                TargetDoc::Cidrs(c) => c.len(),
                TargetDoc::All => 3,
            })
            .sum()
    }
}

/// The template entry `label` (`EgressPolicy team-a/coder`) with `rules` as its allow rules, in
/// order; each compiled rule names its YAML rule (`... rules[1] cidrs 10.0.0.0/8`).
fn compile(label: &str, rules: Vec<RuleDoc>) -> TemplatePolicy {
    let mut allow = Vec::with_capacity(Document::compiled_len(&rules));
    for (index, rule) in rules.into_iter().enumerate() {
        let ports = rule.ports.as_deref().map(shown_ports).unwrap_or_default();
        let rule_ref = |shown: &str| {
            RuleRef::new(
                RuleKind::Allow,
                format!("{label} rules[{index}] {shown}{ports}"),
            )
        };
        let mut push = |target, rule_ref| {
            allow.push(Rule {
                target,
                ports: rule.ports.clone(),
                rule_ref,
            })
        };
        match rule.target {
            TargetDoc::Hostnames(patterns) => {
                for pattern in patterns {
                    let shown = match &pattern {
                        NamePattern::Any => "*".to_string(),
                        NamePattern::Exact(h) => h.clone(),
                        NamePattern::Suffix(s) => format!("*{s}"),
                    };
                    push(
                        Target::Name(pattern),
                        rule_ref(&format!("hostnames {shown}")),
                    );
                }
            }
            TargetDoc::Cidrs(nets) => {
                for net in nets {
                    let shown = if net.prefix_len() == net.max_prefix_len() {
                        net.addr().to_string()
                    } else {
                        net.to_string()
                    };
                    push(Target::Net(net), rule_ref(&format!("cidrs {shown}")));
                }
            }
            TargetDoc::All => {
                // Every name and every address; the always-denied list still applies (no
                // exact address or name here).
                let all = rule_ref("all");
                push(Target::Name(NamePattern::Any), all.clone());
                for net in ["0.0.0.0/0", "::/0"] {
                    if let Ok(net) = net.parse::<IpNet>() {
                        push(Target::Net(net), all.clone());
                    }
                }
            }
        }
    }
    TemplatePolicy::new(label, true, false, Vec::new(), allow)
}

/// Reads one document (or nothing, for an empty one), checking it against the documents read
/// before (`seen`: each template entry with the number of its document, from 1).
struct DocumentSeed<'a> {
    seen: &'a mut HashMap<(Option<String>, String), usize>,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Option<Document>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Option<Document>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an EgressPolicy document (apiVersion, kind, metadata, spec)")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        const FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
        let mut api_version = false;
        let mut kind = false;
        let mut metadata: Option<Metadata> = None;
        let mut spec: Option<Spec> = None;
        while let Some(key) = map.next_key_seed(KeySeed(FIELDS))? {
            match key {
                "apiVersion" => {
                    if api_version {
                        return Err(de::Error::duplicate_field("apiVersion"));
                    }
                    // Any version: the shape is what counts.
                    map.next_value::<String>()?;
                    api_version = true;
                }
                "kind" => {
                    if kind {
                        return Err(de::Error::duplicate_field("kind"));
                    }
                    map.next_value::<Kind>()?;
                    kind = true;
                }
                "metadata" => {
                    if metadata.is_some() {
                        return Err(de::Error::duplicate_field("metadata"));
                    }
                    metadata = Some(map.next_value()?);
                }
                "spec" => {
                    if spec.is_some() {
                        return Err(de::Error::duplicate_field("spec"));
                    }
                    spec = Some(map.next_value()?);
                }
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            }
        }
        if !kind {
            return Err(de::Error::custom(format!(
                "missing `kind: {KIND}`: this policy file holds {KIND} documents only"
            )));
        }
        let Some(metadata) = metadata else {
            return Err(de::Error::custom(
                "missing `metadata`: write `metadata: { name: TEMPLATE }` (and `namespace: \
                 NAMESPACE` for one namespace only)",
            ));
        };
        // No spec, or no rules: nothing is reachable.
        let rules = spec.map(|s| s.rules).unwrap_or_default();
        let (name, namespace) = (metadata.name.0, metadata.namespace.map(|n| n.0));
        let label = Document::label(&name, namespace.as_deref());
        if self.index >= MAX_TEMPLATES {
            return Err(de::Error::custom(format!(
                "more than {MAX_TEMPLATES} {KIND} documents: give templates that share rules one \
                 document without `namespace`"
            )));
        }
        if Document::compiled_len(&rules) > MAX_RULES {
            return Err(de::Error::custom(format!(
                "{label}: its rules name more than {MAX_RULES} hostnames and cidrs: use \
                 wildcards (`*.example.com`) or wider networks"
            )));
        }
        let number = self.index + 1;
        if let Some(first) = self.seen.insert((namespace.clone(), name.clone()), number) {
            return Err(de::Error::custom(format!(
                "{label} is given twice (documents {first} and {number}): merge their rules into \
                 one document"
            )));
        }
        Ok(Some(Document {
            name,
            namespace,
            rules,
        }))
    }
}

/// `kind`, which must be `EgressPolicy`.
struct Kind;

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "the string EgressPolicy", |kind| {
            if kind == KIND {
                Ok(Kind)
            } else {
                Err(format!(
                    "kind {kind:?} is not read here: a policy file holds {KIND} documents only \
                     (one format per file)"
                ))
            }
        })
    }
}

/// `metadata`: which template (and namespace) the document is for. `labels` and
/// `annotations` are allowed (Kubernetes objects carry them) and ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: TemplateName,
    namespace: Option<TemplateNamespace>,
    #[serde(default, rename = "labels")]
    _labels: Option<IgnoredAny>,
    #[serde(default, rename = "annotations")]
    _annotations: Option<IgnoredAny>,
}

/// `metadata.name`: the actor template.
struct TemplateName(String);

impl<'de> Deserialize<'de> for TemplateName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a template name", |s| {
            check_identity("name", s).map(|()| TemplateName(s.to_string()))
        })
    }
}

/// `metadata.namespace`: the template namespace.
struct TemplateNamespace(String);

impl<'de> Deserialize<'de> for TemplateNamespace {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a template namespace", |s| {
            check_identity("namespace", s).map(|()| TemplateNamespace(s.to_string()))
        })
    }
}

/// `spec`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

/// One allow rule.
struct RuleDoc {
    target: TargetDoc,
    /// `None`: any port.
    ports: Option<Vec<(u16, u16)>>,
}

/// What a rule matches.
enum TargetDoc {
    /// Names (`host` rules of the TOML).
    Hostnames(Vec<NamePattern>),
    /// Addresses (`cidr` rules of the TOML).
    Cidrs(Vec<IpNet>),
    /// Every name and every address.
    All,
}

/// `all: {}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllDoc {}

impl<'de> Deserialize<'de> for RuleDoc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RuleVisitor)
    }
}

struct RuleVisitor;

impl<'de> Visitor<'de> for RuleVisitor {
    type Value = RuleDoc;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a rule: `hostnames`, `cidrs` or `all`, and optionally `ports`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RuleDoc, A::Error> {
        const FIELDS: &[&str] = &["hostnames", "cidrs", "all", "ports"];
        let mut target: Option<TargetDoc> = None;
        let mut ports: Option<Vec<(u16, u16)>> = None;
        while let Some(key) = map.next_key_seed(KeySeed(FIELDS))? {
            match key {
                "hostnames" | "cidrs" | "all" => {
                    if target.is_some() {
                        return Err(de::Error::custom(
                            "a rule has exactly one of `hostnames`, `cidrs` and `all`: split it \
                             into one rule each",
                        ));
                    }
                    target = Some(match key {
                        "hostnames" => {
                            let names: Vec<Hostname> = map.next_value()?;
                            if names.is_empty() {
                                return Err(de::Error::custom(
                                    "`hostnames: []` matches nothing: list names, or remove the \
                                     rule",
                                ));
                            }
                            TargetDoc::Hostnames(names.into_iter().map(|h| h.0).collect())
                        }
                        "cidrs" => {
                            let nets: Vec<Cidr> = map.next_value()?;
                            if nets.is_empty() {
                                return Err(de::Error::custom(
                                    "`cidrs: []` matches nothing: list networks, or remove the \
                                     rule",
                                ));
                            }
                            TargetDoc::Cidrs(nets.into_iter().map(|c| c.0).collect())
                        }
                        _ => {
                            map.next_value::<AllDoc>()?;
                            TargetDoc::All
                        }
                    });
                }
                "ports" => {
                    if ports.is_some() {
                        return Err(de::Error::duplicate_field("ports"));
                    }
                    let list: Vec<Port> = map.next_value()?;
                    if list.is_empty() {
                        return Err(de::Error::custom(
                            "`ports: []` matches nothing: leave `ports` out for any port, or list \
                             ports",
                        ));
                    }
                    if list.len() > MAX_PORTS {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_PORTS} ports in one rule: use ranges such as \
                             \"8000-8999\""
                        )));
                    }
                    ports = Some(list.into_iter().map(|p| p.0).collect());
                }
                other => return Err(de::Error::unknown_field(other, FIELDS)),
            }
        }
        let Some(target) = target else {
            return Err(de::Error::custom(
                "a rule needs `hostnames: [...]` (names, `*.suffix` or `*`), `cidrs: [...]` \
                 (addresses or networks) or `all: {}`",
            ));
        };
        Ok(RuleDoc { target, ports })
    }
}

/// One `hostnames` entry.
struct Hostname(NamePattern);

impl<'de> Deserialize<'de> for Hostname {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "a host name, \"*.suffix\" or \"*\"", |s| {
            host_pattern(s).map(Hostname)
        })
    }
}

/// One `cidrs` entry.
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, "an address or network", |s| network(s).map(Cidr))
    }
}

/// One `ports` entry: 443 or "8000-8999", as in the TOML.
struct Port((u16, u16));

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortVisitor)
    }
}

struct PortVisitor;

impl<'de> Visitor<'de> for PortVisitor {
    type Value = Port;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port such as 443 or a range such as \"8000-8999\"")
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Port, E> {
        port_range(&toml::Value::Integer(n))
            .map(Port)
            .map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Port, E> {
        // Out of i64 is out of range all the same.
        self.visit_i64(i64::try_from(n).unwrap_or(i64::MAX))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Port, E> {
        port_range(&toml::Value::String(s.to_string()))
            .map(Port)
            .map_err(E::custom)
    }
}

/// A mapping key that must be one of the `fields`, checked where it stands (so an unknown one
/// is marked with its own line and column).
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let fields = self.0;
        checked_str(d, "a field name", |key| {
            fields.iter().find(|f| **f == key).copied().ok_or_else(|| {
                let expected: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
                format!(
                    "unknown field `{key}`, expected one of {}",
                    expected.join(", ")
                )
            })
        })
    }
}

/// A string checked by `check` inside the visitor, so that serde_yaml_ng marks an error with
/// the value's own line and column.
fn checked_str<'de, D, T, F>(d: D, expecting: &'static str, check: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    struct Checked<T, F>(F, &'static str, PhantomData<T>);

    impl<'de, T, F: FnOnce(&str) -> Result<T, String>> Visitor<'de> for Checked<T, F> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.1)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
    }

    d.deserialize_str(Checked(check, expecting, PhantomData))
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, SocketAddr},
        path::PathBuf,
    };

    use proptest::prelude::*;

    use super::*;
    use crate::{
        classify::{Authority, Host, Source},
        policy::Shared,
        route::{Route, route},
    };

    const ORIGIN: &str = "policy.yaml";

    const EXAMPLE: &str = r#"# Substrate's shape, two templates.
apiVersion: substrate.agent/v1alpha1
kind: EgressPolicy
metadata: { name: coder, namespace: team-a }
spec:
  rules:
    - hostnames: ["api.example.test", "*.github.test"]
    - cidrs: ["10.0.0.0/8", "fd00::/8"]
      ports: [22, "8000-8999"]
---
apiVersion: v1
kind: EgressPolicy
metadata:
  name: coder
  labels: { team: a }
spec:
  rules:
    - hostnames: ["*.example.test"]
      ports: [443]
    - all: {}
---
"#;

    fn parse_ok(text: &str) -> Policy {
        Policy::parse(text, Path::new(ORIGIN)).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    fn parse_err(text: &str) -> String {
        match Policy::parse(text, Path::new(ORIGIN)) {
            Ok(_) => panic!("parsed, expected an error:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts the error points at `line:col` and mentions `needle`.
    fn assert_err_at(text: &str, line: usize, col: usize, needle: &str) {
        let err = parse_err(text);
        let prefix = format!("{ORIGIN}:{line}:{col}: ");
        assert!(err.starts_with(&prefix), "expected {prefix}, got: {err}");
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
        assert!(
            !err.contains(&format!(" at line {line} column {col}")),
            "the position once: {err}"
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// (allowed, rule text)
    fn name(t: &TemplatePolicy, name: &str, port: u16) -> (bool, String) {
        let d = t.decide_name(name, port);
        (d.allowed, d.rule.to_string())
    }

    fn addr(t: &TemplatePolicy, a: &str, port: u16) -> (bool, String) {
        let d = t.decide_ip(ip(a), port);
        (d.allowed, d.rule.to_string())
    }

    #[test]
    fn substrate_rules_compile_into_ordered_allow_rules() {
        let p = parse_ok(EXAMPLE);
        let a = p.template("team-a", "coder");
        assert_eq!(a.label(), "EgressPolicy team-a/coder");
        assert!(a.pep && !a.prefilter);
        assert_eq!(
            name(a, "api.example.test", 443),
            (
                true,
                "EgressPolicy team-a/coder rules[0] hostnames api.example.test".into()
            )
        );
        assert_eq!(
            name(a, "A.B.GitHub.test.", 80),
            (
                true,
                "EgressPolicy team-a/coder rules[0] hostnames *.github.test".into()
            )
        );
        // `*.` never matches the bare name; cidrs never match a name.
        assert!(!name(a, "github.test", 443).0);
        assert!(!name(a, "10.1.2.3.example", 22).0);
        assert_eq!(
            addr(a, "10.1.2.3", 22),
            (
                true,
                "EgressPolicy team-a/coder rules[1] cidrs 10.0.0.0/8 ports=22,8000-8999".into()
            )
        );
        assert!(addr(a, "fd00::1", 8080).0);
        assert!(!addr(a, "10.1.2.3", 443).0, "outside the rule's ports");
        let (allowed, rule) = addr(a, "192.0.2.1", 22);
        assert!(!allowed);
        assert_eq!(
            rule,
            "EgressPolicy team-a/coder: no allow rule matched (deny by default)"
        );

        // The entry without a namespace serves every other namespace; first match wins.
        let any = p.template("team-b", "coder");
        assert_eq!(any.label(), "EgressPolicy coder");
        assert_eq!(
            name(any, "web.example.test", 443).1,
            "EgressPolicy coder rules[0] hostnames *.example.test ports=443"
        );
        assert_eq!(
            name(any, "web.example.test", 80).1,
            "EgressPolicy coder rules[1] all"
        );
        assert_eq!(
            addr(any, "203.0.113.9", 5432).1,
            "EgressPolicy coder rules[1] all"
        );
        assert!(addr(any, "2001:db8::1", 443).0);
        // `all` never overrides the always-denied list.
        assert!(!addr(any, "169.254.169.254", 80).0);
        assert!(!name(any, "metadata.google.internal", 80).0);
        assert!(!name(any, "localhost", 80).0);

        // Any other template: deny all.
        let other = p.template("team-a", "other");
        let (allowed, rule) = name(other, "api.example.test", 443);
        assert!(!allowed);
        assert!(rule.contains("no allow rules (deny all)"), "{rule}");
    }

    #[test]
    fn no_rules_deny_everything() {
        for spec in ["spec: {}\n", "spec:\n  rules: []\n", "spec:\n", ""] {
            let text = format!("kind: EgressPolicy\nmetadata: {{ name: coder }}\n{spec}");
            let p = parse_ok(&text);
            let t = p.template("any", "coder");
            assert_eq!(t.label(), "EgressPolicy coder", "{text}");
            let (allowed, rule) = name(t, "web.example.test", 443);
            assert!(!allowed, "{text}");
            assert!(rule.ends_with("no allow rules (deny all)"), "{rule}");
            assert!(!addr(t, "10.0.0.1", 443).0);
        }
        // A file with no documents at all.
        for text in ["", "# nothing yet\n", "---\n---\n"] {
            let p = parse_ok(text);
            assert!(!name(p.template("a", "coder"), "x.test", 443).0);
        }
    }

    #[test]
    fn cidrs_decide_the_dialled_address_never_a_header() {
        let p = parse_ok(
            "kind: EgressPolicy\nmetadata: { name: coder }\nspec:\n  rules:\n    - cidrs: [\"10.0.0.0/8\"]\n",
        );
        let t = p.template("team-a", "coder");
        let dst: SocketAddr = "10.1.2.3:443".parse().unwrap();
        let outside: SocketAddr = "192.0.2.7:443".parse().unwrap();
        let ip_only = |d: SocketAddr| Authority {
            host: Host::Ip(d.ip()),
            port: d.port(),
            source: Source::Ip,
        };
        assert!(matches!(
            route(t, false, &ip_only(dst), dst, &[]),
            Route::Direct { .. }
        ));
        assert!(matches!(
            route(t, false, &ip_only(outside), outside, &[]),
            Route::Deny { .. }
        ));
        // A Host header naming an allowed address does not make another address allowed.
        let header = Authority {
            host: Host::Ip(dst.ip()),
            port: 443,
            source: Source::Host,
        };
        assert!(matches!(
            route(t, false, &header, outside, &[]),
            Route::Deny { .. }
        ));
        // A name (SNI) is decided by hostnames only, whatever address it was sent to.
        let sni = Authority {
            host: Host::Name("web.example.test".into()),
            port: 443,
            source: Source::Sni,
        };
        assert!(matches!(
            route(t, false, &sni, dst, &[]),
            Route::Deny { .. }
        ));
    }

    #[test]
    fn yaml_is_chosen_by_name_or_by_its_kind() {
        let doc = "apiVersion: v1\nkind: EgressPolicy\nmetadata: { name: coder }\n";
        for (origin, text, expected) in [
            ("p.yaml", "", true),
            ("p.YML", "", true),
            ("policy", doc, true),
            ("policy.conf", &format!("# comment\n---\n{doc}")[..], true),
            ("p.txt", "kind: 'EgressPolicy' # quoted\n", true),
            ("policy.toml", "[[template]]\nname = \"coder\"\n", false),
            ("policy.toml", "kind = \"EgressPolicy\"\n", false),
            // Indented, or in a later document: not the first document's kind.
            ("policy", "spec:\n  kind: EgressPolicy\n", false),
            ("policy", "kind: Other\n---\nkind: EgressPolicy\n", false),
        ] {
            assert_eq!(
                is_yaml(Path::new(origin), text),
                expected,
                "{origin}: {text:?}"
            );
        }
        // A YAML file named .toml is still read as YAML by its content.
        let p = Policy::parse(
            &format!("{doc}spec:\n  rules: [ {{ all: {{}} }} ]\n"),
            Path::new("policy.toml"),
        )
        .unwrap();
        assert!(name(p.template("x", "coder"), "a.test", 1).0);
    }

    #[test]
    fn errors_point_at_the_value_and_say_what_to_do() {
        let head = "kind: EgressPolicy\nmetadata: { name: coder }\nspec:\n  rules:\n";
        let at = |rules: &str, line, col, needle| {
            assert_err_at(&format!("{head}{rules}"), line, col, needle)
        };
        at(
            "    - cidrs: [\"10.0.0.1/8\"]\n",
            5,
            15,
            "write 10.0.0.0/8 for the network",
        );
        at(
            "    - hostnames: [ok.test, \"web.*.test\"]\n",
            5,
            28,
            "`*` is allowed only alone or as the whole first label",
        );
        at(
            "    - hostnames: [\"10.0.0.1\"]\n",
            5,
            19,
            "write it as `cidr",
        );
        at(
            "    - all: {}\n      ports: [443, \"9000-8000\"]\n",
            6,
            20,
            "is backwards",
        );
        at(
            "    - all: {}\n      ports: [0]\n",
            6,
            15,
            "ports are 1-65535",
        );
        at(
            "    - all: {}\n      ports: [true]\n",
            6,
            15,
            "a port such as 443",
        );
        at(
            "    - hostnames: [a.test]\n      port: [443]\n",
            6,
            7,
            "unknown field `port`, expected one of `hostnames`, `cidrs`, `all`, `ports`",
        );
        at(
            "    - all: {}\n    - hostnames: [a.test]\n      cidrs: [10.0.0.0/8]\n",
            6,
            7,
            "exactly one of `hostnames`, `cidrs` and `all`",
        );
        at("    - ports: [443]\n", 5, 7, "a rule needs `hostnames");
        at(
            "    - hostnames: []\n",
            5,
            7,
            "`hostnames: []` matches nothing",
        );
        at(
            "    - all: {}\n      ports: []\n",
            5,
            7,
            "`ports: []` matches nothing",
        );
        at(
            "    - all: { ports: [1] }\n",
            5,
            14,
            "unknown field `ports`",
        );
        assert_err_at(
            "kind: EgressPolicy\nmetadata: { name: coder }\nspec: { rule: [] }\n",
            3,
            9,
            "unknown field `rule`",
        );
        assert_err_at(
            "kind: EgressPolicy\nmetadata: { name: coder, team: a }\n",
            2,
            26,
            "unknown field `team`",
        );
        assert_err_at(
            "kind: EgressPolicy\nmetadata: { name: \"a b\" }\n",
            2,
            19,
            "template name \"a b\" is not one",
        );
        assert_err_at(
            "kind: EgressPolicy\nmetadata: { name: coder }\nstatus: {}\n",
            3,
            1,
            "unknown field `status`",
        );
        assert_err_at(
            "apiVersion: v1\nkind: NetworkPolicy\n",
            2,
            7,
            "kind \"NetworkPolicy\" is not read here",
        );
        assert_err_at(
            "metadata: { name: coder }\n",
            1,
            1,
            "missing `kind: EgressPolicy`",
        );
        assert_err_at("kind: EgressPolicy\n", 1, 1, "missing `metadata`");
        assert_err_at(
            "kind: EgressPolicy\nmetadata: { name: coder, namespace: a }\n---\nkind: EgressPolicy\nmetadata: { namespace: a, name: coder }\n",
            4,
            1,
            "EgressPolicy a/coder is given twice (documents 1 and 2)",
        );
        // Syntax errors carry libyaml's position.
        assert_err_at(
            "kind: EgressPolicy\nmetadata: { name: coder\n",
            3,
            1,
            "did not find expected ',' or '}', while parsing a flow mapping at line 2 column 11",
        );
        assert_err_at("- a\n- b\n", 1, 1, "expected an EgressPolicy document");
    }

    #[test]
    fn the_same_name_in_two_namespaces_and_without_one_is_fine() {
        let doc = |ns: &str| {
            format!(
                "---\nkind: EgressPolicy\nmetadata: {{ name: coder{ns} }}\nspec: {{ rules: [ {{ all: {{}} }} ] }}\n"
            )
        };
        let p = parse_ok(&[doc(""), doc(", namespace: a"), doc(", namespace: b")].concat());
        assert_eq!(p.template("a", "coder").label(), "EgressPolicy a/coder");
        assert_eq!(p.template("b", "coder").label(), "EgressPolicy b/coder");
        assert_eq!(p.template("c", "coder").label(), "EgressPolicy coder");
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_refused_not_expanded() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        bomb.push_str("kind: EgressPolicy\n");
        let start = std::time::Instant::now();
        assert!(Policy::parse(&bomb, Path::new(ORIGIN)).is_err());
        let deep = format!(
            "kind: EgressPolicy\nmetadata: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(Policy::parse(&deep, Path::new(ORIGIN)).is_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn a_yaml_file_loads_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("policy.yaml");
        let rules = |host: &str| {
            format!(
                "kind: EgressPolicy\nmetadata: {{ name: coder }}\nspec:\n  rules:\n    - hostnames: [{host}]\n"
            )
        };
        std::fs::write(&path, rules("a.test")).unwrap();
        let shared = Shared::new(Some(path.clone())).unwrap();
        let allowed = |host: &str| {
            shared
                .current()
                .template("x", "coder")
                .decide_name(host, 443)
                .allowed
        };
        assert!(allowed("a.test") && !allowed("b.test"));
        std::fs::write(&path, rules("b.test")).unwrap();
        shared.reload().unwrap();
        assert!(!allowed("a.test") && allowed("b.test"));
        // A bad file keeps the policy in force.
        std::fs::write(&path, rules("\"*.*.test\"")).unwrap();
        let err = shared.reload().unwrap_err().to_string();
        assert!(err.contains("policy.yaml:5:19:"), "{err}");
        assert!(allowed("b.test"));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "[ -~\n]{0,400}") {
            let _ = Policy::parse(&text, Path::new(ORIGIN));
        }

        #[test]
        fn arbitrary_rule_values_never_panic(value in "[ -~]{0,40}") {
            let text = format!(
                "kind: EgressPolicy\nmetadata: {{ name: coder }}\nspec:\n  rules:\n    - hostnames: [{value:?}]\n    - cidrs: [{value:?}]\n      ports: [{value:?}]\n"
            );
            let _ = Policy::parse(&text, Path::new(ORIGIN));
        }
    }
}
