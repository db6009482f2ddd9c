//! Where a classified connection goes: reset at once, through the PEP, or dialled by the agent
//! itself. One function, [`route`], holds the evaluation order docs/policy.md describes.
use std::net::{IpAddr, SocketAddr};

use crate::{
    classify::{Authority, Host, Source},
    direct::Dial,
    policy::{self, TemplatePolicy},
};

/// The decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Reset the actor's connection: `rule` says what denied it.
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
    let decision = match &authority.host {
        Host::Name(name) => policy.decide_name(name, authority.port),
        Host::Ip(ip) => policy.decide_ip_with(*ip, authority.port, extra),
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
}
