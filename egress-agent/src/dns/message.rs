//! What the forwarder reads from and builds into DNS messages, on hickory-proto's types: the
//! queried name as policy sees it, the answers the agent makes itself, the addresses an answer
//! gives for the queried name, and the removal of filtered addresses.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Header, Message, Query, ResponseCode},
    rr::{Name, RData, Record},
    serialize::binary::{BinDecodable as _, BinDecoder},
};

/// The EDNS payload size the agent announces in answers it makes itself (the 2020 DNS flag day
/// value: fits any path MTU without fragmentation).
const EDNS_PAYLOAD: u16 = 1232;

/// Most CNAME hops followed from the queried name to its addresses. Real chains are 1 to 4
/// long; the bound only stops a looping or hostile answer.
const MAX_CNAME_HOPS: usize = 16;

/// The 12-byte header, when `bytes` has one.
pub(super) fn header(bytes: &[u8]) -> Option<Header> {
    Header::read(&mut BinDecoder::new(bytes)).ok()
}

/// The queried name as policy sees it: lowercased, no trailing dot, validated like the
/// classifier's names (letters, digits, `-`, `_`; label and total length; not numeric). `None`
/// for anything else (the root, wildcards, labels holding dots or binary): such a name has no
/// text form that policy and a resolver would read the same way.
pub(super) fn hostname(name: &Name) -> Option<String> {
    let mut dotted = Vec::with_capacity(name.len());
    for label in name.iter() {
        // Checked per wire label: a label holding a dot must not pass as two labels.
        if !label
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        if !dotted.is_empty() {
            dotted.push(b'.');
        }
        dotted.extend_from_slice(label);
    }
    crate::classify::normalize_name(&dotted)
}

/// An answer the agent makes itself to `request`: its id and opcode, RD and CD copied, RA set,
/// the question echoed, and an OPT record when the query had one (RFC 6891 requires it).
pub(super) fn reply_to(request: &Message, rcode: ResponseCode) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.checking_disabled = request.metadata.checking_disabled;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

/// An answer to a query of which only the header could be read: same id and opcode, RD
/// copied, RA set, no question.
pub(super) fn reply_to_header(header: &Header, rcode: ResponseCode) -> Message {
    let mut reply = Message::response(header.metadata.id, header.metadata.op_code);
    reply.metadata.recursion_desired = header.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply
}

/// Whether `reply` answers the query sent upstream with `id` and `question`. A reply without a
/// question is accepted only as an error (REFUSED, SERVFAIL, ...): it then carries no records.
pub(super) fn answers_query(reply: &Message, id: u16, question: &Query) -> bool {
    if reply.metadata.id != id
        || reply.metadata.message_type != hickory_proto::op::MessageType::Response
    {
        return false;
    }
    match reply.queries.as_slice() {
        [q] => q == question,
        [] => reply.metadata.response_code != ResponseCode::NoError,
        _ => false,
    }
}

/// The addresses `reply`'s answer section gives for `qname`, following CNAMEs from it (the
/// records of other owners are ignored), each with the smallest TTL on its way from `qname`.
/// v4-mapped IPv6 addresses come back as IPv4.
pub(super) fn chain_addresses(reply: &Message, qname: &Name) -> Vec<(IpAddr, u32)> {
    // The names on the chain, each with the smallest TTL of the CNAMEs that led to it.
    let mut chain: Vec<(&Name, u32)> = vec![(qname, u32::MAX)];
    while chain.len() <= MAX_CNAME_HOPS {
        let Some(&(last, ttl)) = chain.last() else {
            break;
        };
        let next = reply.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == *last => Some((&target.0, ttl.min(r.ttl))),
            _ => None,
        });
        match next {
            Some((target, ttl)) if !chain.iter().any(|(n, _)| *n == target) => {
                chain.push((target, ttl))
            }
            _ => break,
        }
    }
    let mut addresses = Vec::new();
    for record in &reply.answers {
        let Some(ip) = address(record) else {
            continue;
        };
        if let Some((_, ttl)) = chain.iter().find(|(n, _)| **n == record.name) {
            addresses.push((ip, record.ttl.min(*ttl)));
        }
    }
    addresses
}

/// The address of an A or AAAA record, v4-mapped IPv6 as IPv4.
fn address(record: &Record) -> Option<IpAddr> {
    match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0).to_canonical()),
        _ => None,
    }
}

/// Removes, from every section of `reply`, the A and AAAA records whose address `filter`
/// objects to; returns each removed address with the filter's reason.
pub(super) fn remove_addresses(
    reply: &mut Message,
    filter: &(dyn Fn(IpAddr) -> Option<String> + Send + Sync),
) -> Vec<(IpAddr, String)> {
    let mut removed = Vec::new();
    let mut keep = |record: &Record| {
        let objection = address(record).and_then(|ip| filter(ip).map(|reason| (ip, reason)));
        let keep = objection.is_none();
        removed.extend(objection);
        keep
    };
    reply.answers.retain(&mut keep);
    reply.authorities.retain(&mut keep);
    reply.additionals.retain(&mut keep);
    removed
}
