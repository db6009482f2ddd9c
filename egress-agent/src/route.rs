//! Where a classified connection goes: refused at once, through the PEP, or dialled by the agent
//! itself. One function, [`route`], holds the evaluation order docs/policy.md describes.
use std::net::{IpAddr, SocketAddr};

use crate::{
    classify::{Authority, Host, Source},
    direct::Dial,
    policy::{self, RuleKind, TemplatePolicy},
};

/// The decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Refuse the actor's connection ([`crate::refuse`]): `rule` says what denied it.
    Deny {
        /// The rule (or always-denied reason) that decided.
        rule: String,
    },
    /// Tunnel through the PEP, which decides. `rule` is the local allow rule when the
    /// template pre-filters.
    Pep {
        /// The pre-filter rule that allowed it, if the template pre-filters.
        rule: Option<String>,
    },
    /// The agent dials upstream itself (no PEP for this actor).
    Direct {
        /// The allow rule that decided.
        rule: String,
        /// What to dial.
        dial: Dial,
    },
}

impl Route {
    /// The rule to log with the connection ("" when the PEP decided alone).
    pub fn rule(&self) -> &str {
        match self {
            Route::Deny { rule } | Route::Direct { rule, .. } => rule,
            Route::Pep { rule } => rule.as_deref().unwrap_or(""),
        }
    }
}

/// Decides one connection of an actor whose template has `policy`.
///
/// Order: the original destination address against the always-denied set (`extra`: the
/// node's addresses and the actor's gateways) unless an allow rule names that exact address;
/// then, when the PEP decides and the template does not pre-filter, the PEP (an
/// always-denied name still denied); else the template's decision for the name or the
/// address (always-denied names, deny list, allow list, nothing matched = deny).
/// `has_pep`: whether the agent has a PEP at all.
pub fn route(
    policy: &TemplatePolicy,
    has_pep: bool,
    authority: &Authority,
    original_dst: SocketAddr,
    extra: &[IpAddr],
) -> Route {
    let ip = policy::normalize(original_dst.ip());
    let port = original_dst.port();
    if let Some(reason) = policy::always_denied(ip, extra)
        && policy.names_exact(ip, port).is_none()
    {
        return Route::Deny {
            rule: format!("always denied: {reason} {ip}"),
        };
    }
    // An address in the Host header must be the address connected to: otherwise one address
    // would be decided (or asked of the PEP) and another dialled.
    if let Host::Ip(named) = &authority.host
        && policy::normalize(*named) != ip
    {
        return Route::Deny {
            rule: format!(
                "the request names address {named} but the connection is to {ip}: refused"
            ),
        };
    }
    let via_pep = has_pep && policy.pep;
    if via_pep && !policy.prefilter {
        // The PEP decides; an always-denied name stays denied all the same.
        if let Host::Name(name) = &authority.host
            && let Some(reason) = policy::always_denied_name(name)
        {
            return Route::Deny {
                rule: format!("always denied: {reason} {name}"),
            };
        }
        return Route::Pep { rule: None };
    }
    let decision = match (&authority.host, authority.source) {
        // A name the actor's own lookup tied to this address: it is dialled at that address,
        // so the address's rules count too. A deny rule of either denies; an allow rule of
        // either allows.
        (Host::Name(name), Source::Dns) => {
            let by_name = policy.decide_name(name, authority.port);
            let by_ip = policy.decide_ip_with(ip, authority.port, extra);
            let explicit_deny = |d: &policy::Decision| {
                !d.allowed && matches!(d.rule.kind(), RuleKind::Deny | RuleKind::AlwaysDenied)
            };
            if explicit_deny(&by_name) {
                by_name
            } else if explicit_deny(&by_ip) || by_ip.allowed && !by_name.allowed {
                by_ip
            } else {
                by_name
            }
        }
        (Host::Name(name), _) => policy.decide_name(name, authority.port),
        (Host::Ip(ip), _) => policy.decide_ip_with(*ip, authority.port, extra),
    };
    let rule = decision.rule.to_string();
    if !decision.allowed {
        return Route::Deny { rule };
    }
    if via_pep {
        return Route::Pep { rule: Some(rule) };
    }
    let dial = match (&authority.host, authority.source) {
        (Host::Name(name), Source::Sni | Source::Host) => Dial::Name {
            name: name.clone(),
            port: authority.port,
        },
        _ => Dial::Addr(original_dst),
    };
    Route::Direct { rule, dial }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::Policy;

    const POLICY: &str = r#"
[[template]]
name = "coder"
allow = [
  { host = "web.egress.test", ports = [8443] },
  { host = "*" , ports = [443] },
  { cidr = "10.0.0.0/8", ports = [22] },
  { cidr = "169.254.169.254", ports = [80] },
]

[[template]]
name = "viapep"

[[template]]
name = "prefilter"
prefilter = true
allow = [ { host = "web.egress.test" } ]
"#;

    fn policy() -> Policy {
        Policy::parse(POLICY, Path::new("policy.toml")).unwrap()
    }

    fn name(n: &str, port: u16, source: Source) -> Authority {
        Authority {
            host: Host::Name(n.into()),
            port,
            source,
        }
    }

    fn ip(a: &str, port: u16) -> Authority {
        Authority {
            host: Host::Ip(a.parse().unwrap()),
            port,
            source: Source::Ip,
        }
    }

    fn dst(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sni_names_are_dialled_by_name_dns_names_by_address() {
        let p = policy();
        let t = p.template("", "coder");
        let r = route(
            t,
            false,
            &name("web.egress.test", 8443, Source::Sni),
            dst("10.9.9.9:8443"),
            &[],
        );
        assert!(
            matches!(r, Route::Direct { dial: Dial::Name { ref name, port: 8443 }, .. } if name == "web.egress.test"),
            "{r:?}"
        );
        let r = route(
            t,
            false,
            &name("web.egress.test", 8443, Source::Dns),
            dst("10.9.9.9:8443"),
            &[],
        );
        assert_eq!(
            r,
            Route::Direct {
                rule: r.rule().into(),
                dial: Dial::Addr(dst("10.9.9.9:8443"))
            }
        );
    }

    #[test]
    fn always_denied_destination_beats_a_wildcard_but_not_an_exact_rule() {
        let p = policy();
        let t = p.template("", "coder");
        let r = route(
            t,
            false,
            &name("anything.test", 443, Source::Sni),
            dst("[::ffff:169.254.169.254]:443"),
            &[],
        );
        assert!(
            matches!(r, Route::Deny { ref rule } if rule.contains("always denied")),
            "{r:?}"
        );
        let r = route(
            t,
            false,
            &ip("169.254.169.254", 80),
            dst("169.254.169.254:80"),
            &[],
        );
        assert!(matches!(r, Route::Direct { .. }), "{r:?}");
        // The node's own address (in `extra`) is denied even for an allowed IP rule.
        let r = route(
            t,
            false,
            &ip("10.1.2.3", 22),
            dst("10.1.2.3:22"),
            &["10.1.2.3".parse().unwrap()],
        );
        assert!(matches!(r, Route::Deny { .. }), "{r:?}");
        let r = route(
            t,
            false,
            &ip("10.1.2.4", 22),
            dst("10.1.2.4:22"),
            &["10.1.2.3".parse().unwrap()],
        );
        assert!(matches!(r, Route::Direct { .. }), "{r:?}");
    }

    #[test]
    fn pep_decides_unless_prefiltered_or_opted_out() {
        let p = policy();
        let a = name("other.test", 443, Source::Sni);
        let d = dst("10.9.9.9:443");
        // No rules, PEP decides.
        assert_eq!(
            route(p.template("", "viapep"), true, &a, d, &[]),
            Route::Pep { rule: None }
        );
        // Same template without a PEP: deny all.
        assert!(matches!(
            route(p.template("", "viapep"), false, &a, d, &[]),
            Route::Deny { .. }
        ));
        // Pre-filtered: denied locally, or allowed and then the PEP.
        assert!(matches!(
            route(p.template("", "prefilter"), true, &a, d, &[]),
            Route::Deny { .. }
        ));
        let ok = name("web.egress.test", 443, Source::Sni);
        assert!(matches!(
            route(p.template("", "prefilter"), true, &ok, d, &[]),
            Route::Pep { rule: Some(_) }
        ));
        // Always-denied addresses stay denied with a PEP.
        assert!(matches!(
            route(
                p.template("", "viapep"),
                true,
                &a,
                dst("169.254.169.254:443"),
                &[]
            ),
            Route::Deny { .. }
        ));
        assert!(matches!(
            route(
                p.template("", "viapep"),
                true,
                &name("metadata.google.internal", 80, Source::Host),
                dst("10.9.9.9:80"),
                &[]
            ),
            Route::Deny { .. }
        ));
    }

    #[test]
    fn a_host_address_other_than_the_destination_is_refused_pep_or_not() {
        let p = policy();
        let a = Authority {
            host: Host::Ip("169.254.169.254".parse().unwrap()),
            port: 80,
            source: Source::Host,
        };
        let d = dst("10.9.9.9:80");
        for (template, has_pep) in [("viapep", true), ("coder", false), ("prefilter", true)] {
            let r = route(p.template("", template), has_pep, &a, d, &[]);
            assert!(
                matches!(r, Route::Deny { ref rule } if rule.contains("names address")),
                "{template}: {r:?}"
            );
        }
        // Allowed by a cidr rule, but the dialled address is another one.
        let a = Authority {
            host: Host::Ip("10.1.1.1".parse().unwrap()),
            port: 22,
            source: Source::Host,
        };
        let r = route(p.template("", "coder"), false, &a, dst("192.0.2.7:22"), &[]);
        assert!(matches!(r, Route::Deny { .. }), "{r:?}");
        // The same address in Host and destination is decided as usual.
        let r = route(p.template("", "coder"), false, &a, dst("10.1.1.1:22"), &[]);
        assert!(
            matches!(
                r,
                Route::Direct {
                    dial: Dial::Addr(_),
                    ..
                }
            ),
            "{r:?}"
        );
    }

    #[test]
    fn a_dns_name_does_not_lift_a_cidr_deny_nor_drop_a_cidr_allow() {
        let p = Policy::parse(
            r#"
[[template]]
name = "t"
deny = [ { cidr = "10.0.0.0/8" } ]
allow = [ { host = "*", ports = [22] }, { cidr = "192.0.2.0/24", ports = [22] }, { host = "git.corp", ports = [443] } ]
"#,
            Path::new("p.toml"),
        )
        .unwrap();
        let t = p.template("", "t");
        // `*` allows the name, but the address it was dialled at is denied by cidr.
        let r = route(
            t,
            false,
            &name("ten.example", 22, Source::Dns),
            dst("10.0.0.5:22"),
            &[],
        );
        assert!(
            matches!(r, Route::Deny { ref rule } if rule.contains("deny")),
            "{r:?}"
        );
        // git.corp is not allowed on 22, but its address is (cidr): allowed.
        let r = route(
            t,
            false,
            &name("git.corp", 22, Source::Dns),
            dst("192.0.2.9:22"),
            &[],
        );
        let r2 = route(
            t,
            false,
            &name("git.corp", 2222, Source::Dns),
            dst("192.0.2.9:2222"),
            &[],
        );
        assert!(matches!(r, Route::Direct { .. }), "{r:?}");
        assert!(matches!(r2, Route::Deny { .. }), "{r2:?}");
    }
}
