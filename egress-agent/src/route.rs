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
/// Order: the original destination address against the always-denied set (node addresses,
/// the actor's gateways and `extra` included) unless an allow rule names that exact address;
/// an always-denied name; then, when the PEP decides and the template does not pre-filter,
/// the PEP; else the template's deny list, then its allow list, nothing matched = deny.
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
    if let Some(reason) = policy::always_denied(ip, extra) {
        if policy.names_exact(ip, port).is_none() {
            return Route::Deny {
                rule: format!("always denied: {reason} {ip}"),
            };
        }
    }
    if let Host::Name(name) = &authority.host {
        if let Some(reason) = policy::always_denied_name(name) {
            return Route::Deny {
                rule: format!("always denied: {reason} {name}"),
            };
        }
    }
    let via_pep = has_pep && policy.pep;
    if via_pep && !policy.prefilter {
        return Route::Pep { rule: None };
    }
    let decision = match &authority.host {
        Host::Name(name) => policy.decide_name(name, authority.port),
        Host::Ip(ip) => policy.decide_ip(*ip, authority.port),
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
