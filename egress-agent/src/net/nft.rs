//! nftables: the `egress` table of a worker namespace.
//!
//! It redirects every TCP connection an actor opens through its veth to the agent's listener
//! in the worker namespace (the agent reads SO_ORIGINAL_DST), redirects its DNS (UDP 53, any
//! address) to the agent's DNS socket there (TCP 53 is TCP like any other), drops and counts
//! everything else the actor sends unless UDP is allowed, and DNATs configured inbound ports of
//! the worker to the actor. The table only matches our own veths, so the worker's own traffic
//! is untouched; it stays in force when the agent dies, and captured TCP and DNS then hit
//! closed ports (fail closed).
//!
//! The table is always replaced whole in one `nft -j -f -` transaction (add table; delete
//! table; add everything), run from a thread inside the worker namespace: the `nft` child
//! inherits that thread's network namespace.
use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
    fmt,
    io::{self, Write as _},
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    str::FromStr,
};

use nftables::{
    expr::{CT, PayloadField, SetItem},
    expr::{Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload},
    schema::{Chain, Counter as CounterObj, NfCmd, NfListObject, NfObject, Nftables, Rule, Table},
    stmt::{Counter as CounterRef, Match, NAT, NATFamily, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

/// The table's name (family inet).
pub const TABLE: &str = "egress";

/// DNS, the port whose UDP goes to the agent's DNS socket.
const DNS_PORT: u16 = egress_common::DNS_PORT;

/// Chain priorities as nft names them: dstnat, srcnat, filter.
const PRIO_DSTNAT: i32 = -100;
const PRIO_SRCNAT: i32 = 100;
const PRIO_FILTER: i32 = 0;

/// nft refuses rule comments longer than this (NFT_USERDATA_MAXLEN / 2).
const MAX_COMMENT: usize = 128;

/// A transport protocol of an inbound port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port of the worker that is forwarded to the actor: `tcp/8080`, `udp/4433`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Inbound {
    /// The protocol.
    pub proto: Proto,
    /// The port, the same on the worker and on the actor.
    pub port: u16,
}

impl fmt::Display for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.proto, self.port)
    }
}

impl FromStr for Inbound {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidInbound {
            input: s.to_string(),
            reason,
        };
        let (proto, port) = s.split_once('/').ok_or(invalid("no '/'"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(invalid("protocol is not tcp or udp")),
        };
        let port: u16 = port.parse().map_err(|_| invalid("port is not 1-65535"))?;
        if port == 0 {
            return Err(invalid("port is not 1-65535"));
        }
        Ok(Inbound { proto, port })
    }
}

impl TryFrom<String> for Inbound {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Inbound> for String {
    fn from(i: Inbound) -> String {
        i.to_string()
    }
}

/// One actor behind a veth of the worker namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// The actor's id, put in a comment on each of its rules.
    pub id: String,
    /// The worker end of the actor's veth pair (`egressN`).
    pub veth: String,
    /// The actor's address.
    pub addr: Ipv4Addr,
    /// The worker end's address, the actor's gateway.
    pub gateway: Ipv4Addr,
    /// Ports of the worker forwarded to the actor.
    pub inbound: Vec<Inbound>,
    /// Let the actor's UDP through (masqueraded) instead of dropping it.
    pub allow_udp: bool,
}

/// Everything the table of one worker namespace is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Worker {
    /// The agent's capture listener port in the worker namespace.
    pub listen_port: u16,
    /// The agent's DNS socket port (UDP) in the worker namespace.
    pub dns_port: u16,
    /// The actors.
    pub actors: Vec<Actor>,
}

/// A counter's values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted.
    pub bytes: u64,
}

/// Errors of the nft module; each names the namespace and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A string that is not `tcp/PORT` or `udp/PORT`.
    #[error(
        "invalid inbound port {input:?}: {reason}; expected tcp/PORT or udp/PORT, e.g. tcp/8080"
    )]
    InvalidInbound {
        /// The string given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two actors claim one worker port.
    #[error(
        "inbound {inbound} is configured for both actor {first} and actor {second}; a worker port can go to one actor only"
    )]
    InboundConflict {
        /// The port.
        inbound: Inbound,
        /// The first actor claiming it.
        first: String,
        /// The second actor claiming it.
        second: String,
    },
    /// `nft` could not be run (or the namespace entered).
    #[error(
        "running nft in network namespace {netns}: {source}; is nftables installed (`nft` on PATH) and does the namespace exist?"
    )]
    Spawn {
        /// The namespace.
        netns: String,
        /// The cause.
        source: io::Error,
    },
    /// `nft` ran and failed.
    #[error("`nft {args}` in network namespace {netns} failed: {stderr}")]
    Nft {
        /// The namespace.
        netns: String,
        /// The command line after `nft`.
        args: String,
        /// What nft printed.
        stderr: String,
    },
    /// `nft -j` printed something that is not the JSON we expect.
    #[error("reading the JSON of `nft {args}` in network namespace {netns}: {source}")]
    Json {
        /// The namespace.
        netns: String,
        /// The command line after `nft`.
        args: String,
        /// The cause.
        source: serde_json::Error,
    },
}

/// The name of the named counter of an actor's dropped packets.
pub fn counter_name(veth: &str) -> String {
    format!("dropped_{veth}")
}

/// Pure: the whole transaction that replaces the table with the one `w` describes (add table;
/// delete table; table, chains, counters, rules). Unit-tested without root.
pub fn ruleset(w: &Worker) -> Nftables<'static> {
    let mut objs = Vec::new();
    // `add` first so `delete` cannot fail on a missing table: the replace is one transaction.
    objs.push(NfObject::CmdObject(NfCmd::Add(
        NfListObject::Table(table()),
    )));
    objs.push(NfObject::CmdObject(NfCmd::Delete(NfListObject::Table(
        table(),
    ))));
    let mut add = |obj| objs.push(NfObject::CmdObject(NfCmd::Add(obj)));
    add(NfListObject::Table(table()));
    for (name, kind, hook, prio) in [
        (
            "prerouting",
            NfChainType::NAT,
            NfHook::Prerouting,
            PRIO_DSTNAT,
        ),
        (
            "postrouting",
            NfChainType::NAT,
            NfHook::Postrouting,
            PRIO_SRCNAT,
        ),
        ("forward", NfChainType::Filter, NfHook::Forward, PRIO_FILTER),
        ("input", NfChainType::Filter, NfHook::Input, PRIO_FILTER),
    ] {
        add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            // Accept: the table only ever drops traffic of our own veths.
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
    }
    for a in &w.actors {
        add(NfListObject::Counter(CounterObj {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: counter_name(&a.veth).into(),
            handle: None,
            packets: Some(0),
            bytes: Some(0),
        }));
    }
    for rule in rules(w) {
        add(NfListObject::Rule(rule));
    }
    Nftables {
        objects: objs.into(),
    }
}

/// The rules, chain by chain, in order.
fn rules(w: &Worker) -> Vec<Rule<'static>> {
    let mut out = Vec::new();
    let veths: BTreeSet<String> = w.actors.iter().map(|a| a.veth.clone()).collect();
    let mut rule = |chain: &'static str, comment: &str, expr: Vec<Statement<'static>>| {
        out.push(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: chain.into(),
            expr: expr.into(),
            comment: Some(truncate(comment).into()),
            ..Rule::default()
        });
    };

    // prerouting. DNS: UDP 53 to any address goes to the agent's DNS socket, which finds the
    // actor by the source address (IPv4 only: the socket is, and so is the forged-source
    // rule). TCP 53 is captured by the TCP redirect below like any TCP.
    for a in &w.actors {
        rule(
            "prerouting",
            &a.id,
            vec![
                iifname(&a.veth),
                is(meta(MetaKey::Nfproto), s("ipv4")),
                l4proto_in(&[Proto::Udp]),
                is(payload("th", "dport"), Expression::Number(DNS_PORT.into())),
                redirect(w.dns_port),
            ],
        );
    }
    for a in &w.actors {
        // meta l4proto, not `ip protocol`: in the inet family this captures IPv6 TCP too.
        rule(
            "prerouting",
            &a.id,
            vec![
                iifname(&a.veth),
                l4proto_in(&[Proto::Tcp]),
                redirect(w.listen_port),
            ],
        );
    }
    for a in &w.actors {
        for i in &a.inbound {
            // Not from any actor veth: an actor's TCP must be captured, never forwarded to
            // another actor, whatever the rule order.
            rule(
                "prerouting",
                &a.id,
                vec![
                    not_in(meta(MetaKey::Iifname), veths.iter().cloned()),
                    is(meta(MetaKey::Nfproto), s("ipv4")),
                    is(
                        Expression::Named(NamedExpression::Fib(Fib {
                            result: FibResult::Type,
                            flags: [FibFlag::Daddr].into(),
                        })),
                        s("local"),
                    ),
                    l4proto_in(&[i.proto]),
                    is(payload("th", "dport"), Expression::Number(i.port.into())),
                    dnat(a.addr),
                ],
            );
        }
    }

    // postrouting: the actor's forwarded packets (allowed UDP) leave as the worker.
    for a in &w.actors {
        rule(
            "postrouting",
            &a.id,
            vec![
                is(payload("ip", "saddr"), s(a.addr.to_string())),
                isnt(meta(MetaKey::Oifname), s(a.veth.clone())),
                Statement::Masquerade(None),
            ],
        );
    }

    // forward. First the guards that hold whatever the actors: nothing between two actor
    // veths (an actor allowed UDP must not reach another actor), and nothing through a veth of
    // ours that no registered actor owns (an agent that lost its state file, a pair made by
    // hand, an actor whose adoption failed): its traffic is dropped, never forwarded unfiltered.
    let ours = format!("{}*", super::veth::WORKER_IF_PREFIX);
    rule(
        "forward",
        BETWEEN,
        vec![iifname(&ours), oifname(&ours), drop()],
    );
    for key in [MetaKey::Iifname, MetaKey::Oifname] {
        rule("forward", ORPHAN, orphan(key, &ours, &veths));
    }
    for a in &w.actors {
        let counter = counter_name(&a.veth);
        let mut r = |expr| rule("forward", &a.id, expr);
        r(spoofed(a, &counter));
        r(vec![iifname(&a.veth), ct_state_established(), accept()]);
        r(vec![oifname(&a.veth), ct_state_established(), accept()]);
        if !a.inbound.is_empty() {
            r(vec![
                oifname(&a.veth),
                Statement::Match(Match {
                    left: ct("status"),
                    right: s("dnat"),
                    op: Operator::IN,
                }),
                accept(),
            ]);
        }
        if a.allow_udp {
            // IPv4 only: masquerade and the forged-source rule are IPv4.
            r(vec![
                iifname(&a.veth),
                is(meta(MetaKey::Nfproto), s("ipv4")),
                l4proto_in(&[Proto::Udp]),
                accept(),
            ]);
        }
        r(vec![
            iifname(&a.veth),
            Statement::Counter(CounterRef::Named(counter.clone().into())),
            drop(),
        ]);
        r(vec![oifname(&a.veth), drop()]);
    }

    // input. Veths of no registered actor reach nothing on the worker either.
    rule("input", ORPHAN, orphan(MetaKey::Iifname, &ours, &veths));
    // Nobody but loopback and the actors may reach the capture port and the DNS socket.
    if !w.actors.is_empty() {
        for (proto, port, comment) in [
            (
                Proto::Tcp,
                w.listen_port,
                "capture port only from actors and loopback",
            ),
            (
                Proto::Udp,
                w.dns_port,
                "DNS socket only from actors and loopback",
            ),
        ] {
            let allowed = std::iter::once("lo".to_string()).chain(veths.iter().cloned());
            rule(
                "input",
                comment,
                vec![
                    l4proto_in(&[proto]),
                    is(payload("th", "dport"), Expression::Number(port.into())),
                    not_in(meta(MetaKey::Iifname), allowed),
                    drop(),
                ],
            );
        }
    }
    for a in &w.actors {
        let counter = counter_name(&a.veth);
        let mut r = |expr| rule("input", &a.id, expr);
        r(spoofed(a, &counter));
        r(vec![
            iifname(&a.veth),
            l4proto_in(&[Proto::Tcp]),
            is(
                payload("th", "dport"),
                Expression::Number(w.listen_port.into()),
            ),
            accept(),
        ]);
        r(vec![
            iifname(&a.veth),
            is(meta(MetaKey::Nfproto), s("ipv4")),
            l4proto_in(&[Proto::Udp]),
            is(
                payload("th", "dport"),
                Expression::Number(w.dns_port.into()),
            ),
            accept(),
        ]);
        r(vec![iifname(&a.veth), ct_state_established(), accept()]);
        r(vec![
            iifname(&a.veth),
            Statement::Counter(CounterRef::Named(counter.into())),
            drop(),
        ]);
    }
    out
}

/// The comment of the rules for veths of ours that no registered actor owns.
const ORPHAN: &str = "egress veth of no registered actor";
/// The comment of the rule that keeps actors apart.
const BETWEEN: &str = "nothing between actor veths";

/// `<key> "egress*" <key> != { registered veths } drop` (no set when none is registered).
fn orphan(key: MetaKey, ours: &str, veths: &BTreeSet<String>) -> Vec<Statement<'static>> {
    let mut expr = vec![is(meta(key), s(ours.to_string()))];
    if !veths.is_empty() {
        expr.push(not_in(meta(key), veths.iter().cloned()));
    }
    expr.push(drop());
    expr
}

/// IPv4 from the actor's veth with another source address: the agent and the masquerade
/// rule identify the actor by its address, so a forged one is dropped (and counted).
fn spoofed(a: &Actor, counter: &str) -> Vec<Statement<'static>> {
    vec![
        iifname(&a.veth),
        isnt(payload("ip", "saddr"), s(a.addr.to_string())),
        Statement::Counter(CounterRef::Named(counter.to_string().into())),
        drop(),
    ]
}

fn table() -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    }
}

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn set(items: impl IntoIterator<Item = String>) -> Expression<'static> {
    let mut items: Vec<SetItem<'static>> =
        items.into_iter().map(|i| SetItem::Element(s(i))).collect();
    // A one-element anonymous set is just that value; nft lists it that way too.
    if items.len() == 1 {
        let SetItem::Element(only) = items.remove(0) else {
            unreachable!("built as elements")
        };
        return only;
    }
    Expression::Named(NamedExpression::Set(items))
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn isnt(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

fn not_in(
    left: Expression<'static>,
    items: impl IntoIterator<Item = String>,
) -> Statement<'static> {
    isnt(left, set(items))
}

fn iifname(veth: &str) -> Statement<'static> {
    is(meta(MetaKey::Iifname), s(veth))
}

fn oifname(veth: &str) -> Statement<'static> {
    is(meta(MetaKey::Oifname), s(veth))
}

fn l4proto_in(protos: &[Proto]) -> Statement<'static> {
    is(
        meta(MetaKey::L4proto),
        set(protos.iter().map(|p| p.as_str().to_string())),
    )
}

fn ct_state_established() -> Statement<'static> {
    Statement::Match(Match {
        left: ct("state"),
        right: Expression::List(vec![s("established"), s("related")]),
        op: Operator::IN,
    })
}

fn redirect(port: u16) -> Statement<'static> {
    Statement::Redirect(Some(NAT {
        addr: None,
        family: None,
        port: Some(Expression::Number(port.into())),
        flags: None,
    }))
}

fn dnat(to: Ipv4Addr) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(s(to.to_string())),
        family: Some(NATFamily::IP),
        port: None,
        flags: None,
    }))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn truncate(comment: &str) -> String {
    let mut end = comment.len().min(MAX_COMMENT);
    while !comment.is_char_boundary(end) {
        end -= 1;
    }
    comment[..end].to_string()
}

/// Refuses a worker port claimed by two actors: only one DNAT rule could win.
fn validate(w: &Worker) -> Result<(), Error> {
    let mut owners: HashMap<Inbound, &str> = HashMap::new();
    for a in &w.actors {
        for i in &a.inbound {
            if let Some(first) = owners.insert(*i, &a.id)
                && first != a.id
            {
                return Err(Error::InboundConflict {
                    inbound: *i,
                    first: first.to_string(),
                    second: a.id.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Atomically replaces the `egress` table in the worker namespace (`None`: the agent's own)
/// with [`ruleset`]`(w)`, never touching other tables. With no actors the table still holds
/// the guards that drop traffic of any `egress*` veth: [`remove`] it only once no such
/// interface is left.
///
/// Each actor's drop counter keeps its value across the replace (read just before it).
pub fn apply(worker_netns: Option<&Path>, w: &Worker) -> Result<(), Error> {
    validate(w)?;
    let previous = counters(worker_netns)?;
    let mut json = serde_json::to_value(ruleset(w)).map_err(|source| Error::Json {
        netns: crate::netns::label(worker_netns),
        args: "-j -f - (encoding the ruleset)".into(),
        source,
    })?;
    carry_counters(&mut json, &previous);
    let payload = json.to_string();
    nft(worker_netns, &["-j", "-f", "-"], Some(payload))?;
    Ok(())
}

/// Deletes the `egress` table; `Ok(false)` when there was none.
pub fn remove(worker_netns: Option<&Path>) -> Result<bool, Error> {
    Ok(nft_optional(worker_netns, &["delete", "table", "inet", TABLE])?.is_some())
}

/// Whether the `egress` table exists.
pub fn exists(worker_netns: Option<&Path>) -> Result<bool, Error> {
    Ok(list(worker_netns)?.is_some())
}

/// The drop counter of the actor behind `veth` (packets, bytes), `None` if absent.
pub fn dropped(worker_netns: Option<&Path>, veth: &str) -> Result<Option<Counter>, Error> {
    Ok(counters(worker_netns)?.remove(&counter_name(veth)))
}

/// The table as `nft list table inet egress` prints it (for docs and operators), `None` if
/// absent.
pub fn list(worker_netns: Option<&Path>) -> Result<Option<String>, Error> {
    nft_optional(worker_netns, &["list", "table", "inet", TABLE])
}

/// Every named counter of the table (by name, see [`counter_name`]); empty without a table.
pub fn counters(worker_netns: Option<&Path>) -> Result<HashMap<String, Counter>, Error> {
    let args = ["-j", "list", "table", "inet", TABLE];
    match nft_optional(worker_netns, &args)? {
        Some(out) => Ok(counter_objects(&parse_json(worker_netns, &args, &out)?)),
        None => Ok(HashMap::new()),
    }
}

/// Named counters in `nft -j` output, read as u64 (the nftables crate's schema has u32).
fn counter_objects(json: &serde_json::Value) -> HashMap<String, Counter> {
    let objects = json["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    objects
        .iter()
        .filter_map(|o| {
            let c = o.get("counter")?;
            Some((
                c["name"].as_str()?.to_string(),
                Counter {
                    packets: c["packets"].as_u64().unwrap_or(0),
                    bytes: c["bytes"].as_u64().unwrap_or(0),
                },
            ))
        })
        .collect()
}

/// Seeds the `add counter` objects of a transaction with the values from before.
fn carry_counters(json: &mut serde_json::Value, previous: &HashMap<String, Counter>) {
    let Some(objects) = json["nftables"].as_array_mut() else {
        return;
    };
    for o in objects {
        let Some(c) = o.pointer_mut("/add/counter") else {
            continue;
        };
        let Some(prev) = c["name"].as_str().and_then(|n| previous.get(n)) else {
            continue;
        };
        c["packets"] = prev.packets.into();
        c["bytes"] = prev.bytes.into();
    }
}

fn parse_json(
    worker_netns: Option<&Path>,
    args: &[&str],
    out: &str,
) -> Result<serde_json::Value, Error> {
    serde_json::from_str(out).map_err(|source| Error::Json {
        netns: crate::netns::label(worker_netns),
        args: args.join(" "),
        source,
    })
}

/// Like [`nft`], but "No such file or directory" (no such table or object) is `Ok(None)`.
fn nft_optional(worker_netns: Option<&Path>, args: &[&str]) -> Result<Option<String>, Error> {
    match nft(worker_netns, args, None) {
        Ok(out) => Ok(Some(out)),
        Err(Error::Nft { stderr, .. }) if stderr.contains("No such file or directory") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Runs `nft ARGS` (stdin: `input`) from a thread inside the worker namespace, so the child
/// inherits that namespace; returns stdout.
fn nft(worker_netns: Option<&Path>, args: &[&str], input: Option<String>) -> Result<String, Error> {
    let owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = crate::netns::run_in(worker_netns, move || {
        let mut child = Command::new("nft")
            .args(&owned)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            // Piped, unlike the nftables crate's helper, so the error says what nft said.
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    })
    .map_err(|source| Error::Spawn {
        netns: crate::netns::label(worker_netns),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Nft {
            netns: crate::netns::label(worker_netns),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn actor(n: u8, inbound: &[&str], allow_udp: bool) -> Actor {
        Actor {
            id: format!("actor-{n}"),
            veth: format!("egress{n}"),
            addr: Ipv4Addr::new(10, 200, 0, 4 * n + 2),
            gateway: Ipv4Addr::new(10, 200, 0, 4 * n + 1),
            inbound: inbound.iter().map(|i| i.parse().unwrap()).collect(),
            allow_udp,
        }
    }

    fn worker(actors: Vec<Actor>) -> Worker {
        Worker {
            listen_port: 15001,
            dns_port: 15053,
            actors,
        }
    }

    fn objects(w: &Worker) -> Vec<Value> {
        let v = serde_json::to_value(ruleset(w)).unwrap();
        v["nftables"].as_array().unwrap().clone()
    }

    /// The `expr` arrays of the added rules of `chain`, with their comments.
    fn chain_rules(w: &Worker, chain: &str) -> Vec<(Value, String)> {
        objects(w)
            .into_iter()
            .filter_map(|o| {
                let r = o.pointer("/add/rule")?;
                (r["chain"] == chain).then(|| {
                    (
                        r["expr"].clone(),
                        r["comment"].as_str().unwrap().to_string(),
                    )
                })
            })
            .collect()
    }

    fn has(expr: &Value, stmt: &Value) -> bool {
        expr.as_array().unwrap().contains(stmt)
    }

    #[test]
    fn inbound_parses_and_prints() {
        let i: Inbound = "tcp/8080".parse().unwrap();
        assert_eq!(
            i,
            Inbound {
                proto: Proto::Tcp,
                port: 8080
            }
        );
        assert_eq!(i.to_string(), "tcp/8080");
        assert_eq!("udp/4433".parse::<Inbound>().unwrap().proto, Proto::Udp);
        assert_eq!(serde_json::to_value(i).unwrap(), json!("tcp/8080"));
        assert_eq!(
            serde_json::from_value::<Inbound>(json!("udp/53")).unwrap(),
            "udp/53".parse().unwrap()
        );
        for bad in ["tcp", "sctp/1", "tcp/0", "tcp/65536", "tcp/x", "/80"] {
            let err = bad.parse::<Inbound>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn transaction_replaces_only_our_table() {
        let objs = objects(&worker(vec![actor(0, &[], false)]));
        let table = json!({"family": "inet", "name": "egress"});
        assert_eq!(objs[0], json!({"add": {"table": table}}));
        assert_eq!(objs[1], json!({"delete": {"table": table}}));
        assert_eq!(objs[2], json!({"add": {"table": table}}));
        // Nothing outside the table: no flush ruleset, no other table.
        for o in &objs {
            let s = o.to_string();
            assert!(!s.contains("flush"), "{s}");
            let inner = o.as_object().unwrap().values().next().unwrap();
            let obj = inner.as_object().unwrap().values().next().unwrap();
            let t = obj.get("table").or(obj.get("name")).unwrap();
            assert_eq!(t, "egress", "{s}");
        }
    }

    #[test]
    fn chains_hooks_and_priorities() {
        let chains: Vec<Value> = objects(&worker(vec![actor(0, &[], false)]))
            .into_iter()
            .filter_map(|o| o.pointer("/add/chain").cloned())
            .collect();
        let brief: Vec<(String, String, String, i64)> = chains
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().into(),
                    c["type"].as_str().unwrap().into(),
                    c["hook"].as_str().unwrap().into(),
                    c["prio"].as_i64().unwrap(),
                )
            })
            .collect();
        let want = [
            ("prerouting", "nat", "prerouting", -100),
            ("postrouting", "nat", "postrouting", 100),
            ("forward", "filter", "forward", 0),
            ("input", "filter", "input", 0),
        ];
        assert_eq!(
            brief,
            want.map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d))
        );
        assert!(chains.iter().all(|c| c["policy"] == "accept"));
    }

    #[test]
    fn dns_goes_to_the_agent_dns_socket() {
        let w = worker(vec![actor(0, &[], false), actor(1, &[], false)]);
        let pre = chain_rules(&w, "prerouting");
        let dns: Vec<&(Value, String)> = pre
            .iter()
            .filter(|(e, _)| e.to_string().contains("\"right\":53"))
            .collect();
        assert_eq!(dns.len(), 2, "{pre:#?}");
        let (dns0, comment) = dns[0];
        assert_eq!(comment, "actor-0");
        assert_eq!(
            dns0,
            &json!([
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": "egress0", "op": "=="}},
                {"match": {"left": {"meta": {"key": "nfproto"}}, "right": "ipv4", "op": "=="}},
                {"match": {"left": {"meta": {"key": "l4proto"}}, "right": "udp", "op": "=="}},
                {"match": {"left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53, "op": "=="}},
                {"redirect": {"port": 15053}}
            ]),
            "UDP 53 to any address goes to the agent"
        );
        // TCP 53 is captured like any TCP: no rule of its own, nothing sent to a resolver.
        let tcp = pre
            .iter()
            .find(|(e, c)| c == "actor-0" && e.to_string().contains("\"tcp\""))
            .expect("the TCP redirect");
        assert!(has(&tcp.0, &json!({"redirect": {"port": 15001}})));
        assert!(!tcp.0.to_string().contains("dport"), "{}", tcp.0);
        let all = serde_json::to_string(&ruleset(&w)).unwrap();
        assert!(!all.contains("dnat"), "no DNAT to a resolver: {all}");
        // The DNS socket is reached through input, from the actor's own address only.
        let input = chain_rules(&w, "input");
        let spoofed = input
            .iter()
            .position(|(e, c)| c == "actor-0" && e.to_string().contains("saddr"))
            .expect("the forged-source rule");
        let accept = input
            .iter()
            .position(|(e, c)| {
                c == "actor-0"
                    && e.to_string().contains("15053")
                    && has(e, &json!({"accept": null}))
            })
            .expect("the DNS socket accept");
        assert!(spoofed < accept, "{input:#?}");
        assert!(has(
            &input[accept].0,
            &json!({"match": {"left": {"meta": {"key": "nfproto"}}, "right": "ipv4", "op": "=="}})
        ));
    }

    #[test]
    fn inbound_dnat_excludes_every_actor_veth() {
        let w = worker(vec![
            actor(0, &["tcp/8080", "udp/4433"], false),
            actor(1, &[], false),
        ]);
        let pre = chain_rules(&w, "prerouting");
        let inbound: Vec<&Value> = pre
            .iter()
            .filter(|(e, _)| e.to_string().contains("fib"))
            .map(|(e, _)| e)
            .collect();
        assert_eq!(inbound.len(), 2);
        let not_actors = json!({"match": {"left": {"meta": {"key": "iifname"}},
            "right": {"set": ["egress0", "egress1"]}, "op": "!="}});
        assert!(inbound.iter().all(|e| has(e, &not_actors)));
        assert!(has(
            inbound[0],
            &json!({"match": {"left": {"fib": {"result": "type", "flags": ["daddr"]}},
                "right": "local", "op": "=="}})
        ));
        assert!(has(
            inbound[1],
            &json!({"match": {"left": {"meta": {"key": "l4proto"}}, "right": "udp", "op": "=="}})
        ));
        assert!(has(
            inbound[1],
            &json!({"dnat": {"addr": "10.200.0.2", "family": "ip"}})
        ));
        // The DNATed connection is let through to the actor.
        let fwd = chain_rules(&w, "forward");
        assert!(fwd.iter().any(|(e, c)| c == "actor-0"
            && has(
                e,
                &json!({"match": {"left": {"ct": {"key": "status"}}, "right": "dnat", "op": "in"}})
            )));
        assert!(
            !fwd.iter()
                .any(|(e, c)| c == "actor-1" && e.to_string().contains("status"))
        );
    }

    #[test]
    fn forward_ends_in_counted_drop_and_udp_only_if_allowed() {
        let w = worker(vec![actor(0, &[], false), actor(1, &[], true)]);
        let fwd = chain_rules(&w, "forward");
        for (n, veth) in ["egress0", "egress1"].iter().enumerate() {
            let mine: Vec<&Value> = fwd
                .iter()
                .filter(|(_, c)| *c == format!("actor-{n}"))
                .map(|(e, _)| e)
                .collect();
            let counted = json!({"counter": format!("dropped_{veth}")});
            let last_two = &mine[mine.len() - 2..];
            assert!(has(last_two[0], &counted), "{mine:#?}");
            assert!(has(last_two[0], &json!({"drop": null})));
            assert_eq!(
                last_two[1],
                &json!([{"match": {"left": {"meta": {"key": "oifname"}}, "right": veth, "op": "=="}},
                    {"drop": null}])
            );
            let udp_accept = mine.iter().any(|e| {
                has(
                    e,
                    &json!({"match": {"left": {"meta": {"key": "l4proto"}}, "right": "udp", "op": "=="}}),
                ) && has(e, &json!({"accept": null}))
            });
            assert_eq!(udp_accept, n == 1, "allow_udp of actor-{n}");
            assert!(mine.iter().any(|e| has(
                e,
                &json!({"match": {"left": {"ct": {"key": "state"}},
                    "right": ["established", "related"], "op": "in"}})
            )));
        }
    }

    #[test]
    fn input_guards_the_capture_port() {
        let w = worker(vec![actor(0, &[], false), actor(1, &[], false)]);
        let input = chain_rules(&w, "input");
        assert_eq!(input[0].1, ORPHAN);
        let (guard, _) = &input[1];
        assert_eq!(
            guard,
            &json!([
                {"match": {"left": {"meta": {"key": "l4proto"}}, "right": "tcp", "op": "=="}},
                {"match": {"left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 15001, "op": "=="}},
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": {"set": ["lo", "egress0", "egress1"]}, "op": "!="}},
                {"drop": null}
            ])
        );
        let (guard, comment) = &input[2];
        assert_eq!(comment, "DNS socket only from actors and loopback");
        assert_eq!(
            guard,
            &json!([
                {"match": {"left": {"meta": {"key": "l4proto"}}, "right": "udp", "op": "=="}},
                {"match": {"left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 15053, "op": "=="}},
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": {"set": ["lo", "egress0", "egress1"]}, "op": "!="}},
                {"drop": null}
            ])
        );
        for veth in ["egress0", "egress1"] {
            let last = input
                .iter()
                .rev()
                .find(|(e, _)| e.to_string().contains(&format!("\"{veth}\"")))
                .unwrap();
            assert!(has(&last.0, &json!({"counter": format!("dropped_{veth}")})));
        }
    }

    #[test]
    fn one_named_counter_per_actor_and_comments() {
        let w = worker(vec![actor(0, &["tcp/80"], false), actor(1, &[], true)]);
        let counters: Vec<Value> = objects(&w)
            .into_iter()
            .filter_map(|o| o.pointer("/add/counter").cloned())
            .collect();
        let names: Vec<&str> = counters
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["dropped_egress0", "dropped_egress1"]);
        // Every per-actor rule carries the id of the actor whose veth it names.
        for (chain, expr, comment) in ["prerouting", "postrouting", "forward", "input"]
            .into_iter()
            .flat_map(|c| chain_rules(&w, c).into_iter().map(move |(e, m)| (c, e, m)))
        {
            let s = expr.to_string();
            if comment.starts_with("capture port")
                || comment.starts_with("DNS socket")
                || comment == ORPHAN
                || comment == BETWEEN
                || s.contains("\"set\":[\"egress0\",\"egress1\"]")
            {
                continue;
            }
            let n = if s.contains("egress0") || s.contains("10.200.0.2\"") {
                0
            } else {
                1
            };
            assert_eq!(comment, format!("actor-{n}"), "{chain}: {s}");
        }
    }

    #[test]
    fn long_ids_are_truncated_for_comments() {
        let mut a = actor(0, &[], false);
        a.id = "é".repeat(100);
        let rules = chain_rules(&worker(vec![a]), "forward");
        assert!(
            rules
                .iter()
                .filter(|(_, c)| c != ORPHAN && c != BETWEEN)
                .all(|(_, c)| c.len() <= MAX_COMMENT && c.starts_with('é'))
        );
    }

    #[test]
    fn guards_come_first_and_hold_without_actors() {
        let w = worker(vec![actor(0, &[], false), actor(1, &[], false)]);
        let forward = chain_rules(&w, "forward");
        assert_eq!(forward[0].1, BETWEEN);
        assert_eq!(
            forward[0].0,
            json!([
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": "egress*", "op": "=="}},
                {"match": {"left": {"meta": {"key": "oifname"}}, "right": "egress*", "op": "=="}},
                {"drop": null}
            ])
        );
        for (i, key) in [(1, "iifname"), (2, "oifname")] {
            assert_eq!(forward[i].1, ORPHAN);
            assert_eq!(
                forward[i].0,
                json!([
                    {"match": {"left": {"meta": {"key": key}}, "right": "egress*", "op": "=="}},
                    {"match": {"left": {"meta": {"key": key}}, "right": {"set": ["egress0", "egress1"]}, "op": "!="}},
                    {"drop": null}
                ])
            );
        }
        // No actor left: the table keeps dropping whatever egress* veth remains.
        let empty = worker(vec![]);
        let forward = chain_rules(&empty, "forward");
        assert_eq!(forward.len(), 3, "{forward:?}");
        assert_eq!(
            forward[1].0,
            json!([
                {"match": {"left": {"meta": {"key": "iifname"}}, "right": "egress*", "op": "=="}},
                {"drop": null}
            ])
        );
        let input = chain_rules(&empty, "input");
        assert_eq!(input.len(), 1);
        assert_eq!(input[0].1, ORPHAN);
        assert!(chain_rules(&empty, "prerouting").is_empty());
    }

    #[test]
    fn allowed_udp_is_ipv4_only() {
        let w = worker(vec![actor(0, &[], true)]);
        let forward = chain_rules(&w, "forward");
        let udp = forward
            .iter()
            .find(|(e, _)| e.to_string().contains("\"udp\"") && e.to_string().contains("accept"))
            .expect("the allow_udp rule");
        assert!(udp.0.to_string().contains("\"ipv4\""), "{}", udp.0);
    }

    #[test]
    fn conflicting_inbound_is_refused() {
        let w = worker(vec![
            actor(0, &["tcp/80"], false),
            actor(1, &["tcp/80"], false),
        ]);
        let err = validate(&w).unwrap_err();
        assert!(err.to_string().contains("tcp/80"), "{err}");
        let ok = worker(vec![
            actor(0, &["tcp/80"], false),
            actor(1, &["udp/80"], false),
        ]);
        validate(&ok).unwrap();
    }

    #[test]
    fn counters_are_carried_over_as_u64() {
        let w = worker(vec![actor(0, &[], false), actor(1, &[], false)]);
        let mut json = serde_json::to_value(ruleset(&w)).unwrap();
        let big = Counter {
            packets: 7,
            bytes: 5_000_000_000,
        };
        carry_counters(&mut json, &[("dropped_egress1".to_string(), big)].into());
        let listing = json!({"nftables": json["nftables"].as_array().unwrap().iter()
            .filter_map(|o| o.get("add").cloned()).collect::<Vec<_>>()});
        let counters = counter_objects(&listing);
        assert_eq!(counters["dropped_egress1"], big);
        assert_eq!(counters["dropped_egress0"], Counter::default());
    }
}
