//! The forwarder against a fake resolver on 127.0.0.1 that answers with hickory-proto-built
//! messages, and against the real `dig` client.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME},
    },
};
use proptest::prelude::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};

use super::*;

/// What the fake resolver sends back for one query: the datagrams (UDP) or the first of them
/// (TCP); none is silence.
type Behaviour = dyn Fn(&Message, Transport) -> Vec<Vec<u8>> + Send + Sync;

/// A resolver on 127.0.0.1 (UDP and TCP on the same port) counting what it is asked.
struct FakeUpstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl FakeUpstream {
    async fn start(
        behaviour: impl Fn(&Message, Transport) -> Vec<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        // The same port for both, as a real resolver has.
        let (tcp, udp) = loop {
            let tcp = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind fake resolver TCP");
            let port = tcp.local_addr().expect("local addr").port();
            if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)).await {
                break (tcp, udp);
            }
        };
        let addr = udp.local_addr().expect("local addr");
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let udp_task = {
            let (behaviour, seen) = (behaviour.clone(), udp_queries.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                loop {
                    let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    seen.fetch_add(1, Ordering::SeqCst);
                    for datagram in behaviour(&query, Transport::Udp) {
                        let _ = udp.send_to(&datagram, peer).await;
                    }
                }
            })
        };
        let tcp_task = {
            let (behaviour, seen) = (behaviour.clone(), tcp_queries.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = tcp.accept().await else {
                        return;
                    };
                    let Ok(len) = stream.read_u16().await else {
                        continue;
                    };
                    let mut buf = vec![0u8; usize::from(len)];
                    if stream.read_exact(&mut buf).await.is_err() {
                        continue;
                    }
                    let Ok(query) = Message::from_vec(&buf) else {
                        continue;
                    };
                    seen.fetch_add(1, Ordering::SeqCst);
                    if let Some(reply) = behaviour(&query, Transport::Tcp).into_iter().next() {
                        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&reply);
                        let _ = stream.write_all(&framed).await;
                    }
                }
            })
        };
        FakeUpstream {
            addr,
            udp_queries,
            tcp_queries,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn queries(&self) -> usize {
        self.udp_queries.load(Ordering::SeqCst) + self.tcp_queries.load(Ordering::SeqCst)
    }
}

fn name(s: &str) -> Name {
    Name::from_str(s).expect("test name")
}

fn a(owner: &str, ttl: u32, ip: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(ip.parse().expect("v4"))))
}

fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip.parse().expect("v6"))))
}

fn cname(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

/// A resolver's answer to `query` with `records` in the answer section.
fn response(query: &Message, rcode: ResponseCode, records: Vec<Record>) -> Message {
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply.add_queries(query.queries.iter().cloned());
    reply.add_answers(records);
    if query.edns.is_some() {
        reply.set_edns(Edns::new());
    }
    reply
}

/// A fake resolver answering every query with `records(qname)`.
async fn answering(records: impl Fn(&str) -> Vec<Record> + Send + Sync + 'static) -> FakeUpstream {
    FakeUpstream::start(move |query, _| {
        let qname = query.queries[0].name().to_ascii();
        vec![
            response(query, ResponseCode::NoError, records(&qname))
                .to_vec()
                .expect("encode"),
        ]
    })
    .await
}

fn query_bytes(qname: &str, qtype: RecordType, id: u16) -> Vec<u8> {
    let mut query = Message::query();
    query.metadata.id = id;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name(qname), qtype));
    query.to_vec().expect("encode query")
}

fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).expect("the forwarder's answer parses")
}

fn addresses(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers
        .iter()
        .filter_map(|r| r.data.ip_addr())
        .collect()
}

fn allow(_: &str) -> NameVerdict {
    NameVerdict::Allow
}

fn deny_evil(name: &str) -> NameVerdict {
    if name == "evil.test" || name.ends_with(".evil.test") {
        NameVerdict::Deny {
            reason: "template coder denies *.evil.test".into(),
        }
    } else {
        NameVerdict::Allow
    }
}

fn forwarder(upstream: &FakeUpstream, limits: Limits) -> Forwarder {
    Forwarder::new(upstream.addr, SocketFactory::new(0), limits)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test]
async fn relays_and_records_addresses_for_the_queried_name() {
    let up = answering(|_| {
        vec![
            a("Web.Test.", 300, "10.0.0.1"),
            a("web.test.", 300, "10.0.0.2"),
        ]
    })
    .await;
    let fwd = forwarder(&up, Limits::default());
    let reply = fwd
        .answer(
            "actor-1",
            &query_bytes("Web.TEST.", RecordType::A, 4242),
            &allow,
        )
        .await
        .expect("an answer");
    let reply = parse(&reply);
    assert_eq!(reply.metadata.id, 4242, "the actor's id is put back");
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&reply), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    assert_eq!(up.queries(), 1);
    assert_eq!(
        fwd.answers().lookup("actor-1", ip("10.0.0.1")).as_deref(),
        Some("web.test")
    );
    assert_eq!(
        fwd.answers().lookup("actor-1", ip("10.0.0.2")).as_deref(),
        Some("web.test")
    );
    assert_eq!(fwd.answers().lookup("actor-1", ip("10.0.0.3")), None);
    assert_eq!(fwd.answers().len(), 2);
}

#[tokio::test]
async fn entries_expire_after_the_clamped_ttl() {
    let up = answering(|_| vec![a("web.test.", 86_400, "10.0.0.1")]).await;
    let limits = Limits {
        min_ttl: Duration::from_millis(50),
        max_ttl: Duration::from_millis(300),
        ..Limits::default()
    };
    let fwd = forwarder(&up, limits);
    fwd.answer("a", &query_bytes("web.test.", RecordType::A, 1), &allow)
        .await
        .expect("answer");
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.0.1")).as_deref(),
        Some("web.test")
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.0.1")),
        None,
        "a day's TTL is clamped to max_ttl"
    );
}

#[test]
fn ttl_clamp() {
    let limits = Limits::default();
    assert_eq!(limits.clamp_ttl(0), Duration::from_secs(60));
    assert_eq!(limits.clamp_ttl(300), Duration::from_secs(300));
    assert_eq!(limits.clamp_ttl(u32::MAX), Duration::from_secs(3600));
    let inverted = Limits {
        min_ttl: Duration::from_secs(10),
        max_ttl: Duration::from_secs(5),
        ..Limits::default()
    };
    assert_eq!(
        inverted.clamp_ttl(7),
        Duration::from_secs(10),
        "no panic on min > max"
    );
}

#[tokio::test]
async fn a_cname_chain_is_recorded_under_the_queried_name() {
    let up = answering(|_| {
        vec![
            cname("www.app.test.", 600, "app.cdn.test."),
            cname("app.cdn.test.", 60, "edge.cdn.test."),
            a("edge.cdn.test.", 20, "10.0.0.7"),
            aaaa("edge.cdn.test.", 20, "fd00::7"),
            // Not on the chain: must not be attributed to the queried name.
            a("unrelated.test.", 600, "10.0.0.9"),
        ]
    })
    .await;
    let fwd = forwarder(&up, Limits::default());
    let reply = fwd
        .answer("a", &query_bytes("www.app.test.", RecordType::A, 7), &allow)
        .await;
    assert_eq!(
        parse(&reply.expect("answer")).answers.len(),
        5,
        "the answer is passed on whole"
    );
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.0.7")).as_deref(),
        Some("www.app.test")
    );
    assert_eq!(
        fwd.answers().lookup("a", ip("fd00::7")).as_deref(),
        Some("www.app.test")
    );
    assert_eq!(fwd.answers().lookup("a", ip("10.0.0.9")), None);
}

#[tokio::test]
async fn a_cname_loop_ends() {
    let up = answering(|_| {
        vec![
            cname("x.test.", 60, "y.test."),
            cname("y.test.", 60, "x.test."),
            a("y.test.", 60, "10.0.0.8"),
        ]
    })
    .await;
    let fwd = forwarder(&up, Limits::default());
    fwd.answer("a", &query_bytes("x.test.", RecordType::A, 7), &allow)
        .await
        .expect("answer");
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.0.8")).as_deref(),
        Some("x.test")
    );
}

#[tokio::test]
async fn v4_mapped_addresses_match_both_ways() {
    let up = answering(|_| {
        vec![
            aaaa("dual.test.", 300, "::ffff:10.0.0.3"),
            a("dual.test.", 300, "10.0.0.4"),
        ]
    })
    .await;
    let fwd = forwarder(&up, Limits::default());
    fwd.answer("a", &query_bytes("dual.test.", RecordType::AAAA, 7), &allow)
        .await
        .expect("answer");
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.0.3")).as_deref(),
        Some("dual.test")
    );
    assert_eq!(
        fwd.answers().lookup("a", ip("::ffff:10.0.0.4")).as_deref(),
        Some("dual.test")
    );
}

#[tokio::test]
async fn a_denied_name_gets_nxdomain_without_asking_upstream() {
    let up = answering(|_| vec![a("api.evil.test.", 300, "10.0.0.66")]).await;
    let fwd = forwarder(&up, Limits::default());
    let mut query = Message::query();
    query.metadata.id = 999;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name("API.Evil.Test."), RecordType::AAAA));
    query.set_edns(Edns::new());
    let reply = fwd
        .answer("a", &query.to_vec().expect("encode"), &deny_evil)
        .await
        .expect("an answer");
    let reply = parse(&reply);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(reply.metadata.id, 999);
    assert!(reply.metadata.recursion_available && reply.metadata.recursion_desired);
    assert_eq!(reply.queries, query.queries, "the question is echoed");
    assert!(
        reply.edns.is_some(),
        "an EDNS query gets an OPT record back"
    );
    assert!(reply.answers.is_empty());
    assert_eq!(up.queries(), 0, "the resolver never saw the denied name");
    assert!(fwd.answers().is_empty());
}

#[tokio::test]
async fn names_that_are_not_hostnames_are_refused_without_asking_upstream() {
    let up = answering(|_| vec![a("x.test.", 300, "10.0.0.1")]).await;
    let fwd = forwarder(&up, Limits::default());
    // A label holding a dot, a wildcard, the root, a numeric name.
    let dotted = Name::from_labels(vec![b"evil.test".to_vec(), b"com".to_vec()]).expect("name");
    for qname in [dotted, name("*.x.test."), Name::root(), name("10.0.0.1.")] {
        let mut query = Message::query();
        query.add_query(Query::query(qname.clone(), RecordType::A));
        let reply = fwd
            .answer("a", &query.to_vec().expect("encode"), &allow)
            .await;
        let reply = parse(&reply.expect("an answer"));
        assert_eq!(
            reply.metadata.response_code,
            ResponseCode::Refused,
            "{qname:?}"
        );
    }
    assert_eq!(up.queries(), 0);
}

#[tokio::test]
async fn the_address_filter_removes_addresses_or_denies_the_answer() {
    let up = answering(|qname| match qname {
        "mixed.test." => vec![
            cname("mixed.test.", 300, "edge.test."),
            a("edge.test.", 300, "169.254.169.254"),
            a("edge.test.", 300, "10.0.0.5"),
        ],
        _ => vec![
            a(qname, 300, "169.254.169.254"),
            aaaa(qname, 300, "::ffff:169.254.169.254"),
        ],
    })
    .await;
    let fwd = forwarder(&up, Limits::default()).with_address_filter(|ip| {
        (ip == IpAddr::from([169, 254, 169, 254]))
            .then(|| "link-local metadata address".to_string())
    });

    let reply = fwd
        .answer("a", &query_bytes("mixed.test.", RecordType::A, 5), &allow)
        .await;
    let reply = parse(&reply.expect("answer"));
    assert_eq!(reply.metadata.id, 5);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&reply), vec![ip("10.0.0.5")]);
    assert_eq!(reply.answers.len(), 2, "the CNAME stays");
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.0.5")).as_deref(),
        Some("mixed.test")
    );
    assert_eq!(fwd.answers().lookup("a", ip("169.254.169.254")), None);

    let reply = fwd
        .answer("a", &query_bytes("meta.test.", RecordType::A, 6), &allow)
        .await;
    let reply = parse(&reply.expect("answer"));
    assert_eq!(reply.metadata.id, 6);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(reply.answers.is_empty());
    assert_eq!(fwd.answers().lookup("a", ip("169.254.169.254")), None);
}

#[tokio::test]
async fn upstream_errors_are_passed_on_and_not_recorded() {
    let up = FakeUpstream::start(|query, _| {
        // NXDOMAIN with a stray record: nothing may be recorded from it.
        vec![
            response(
                query,
                ResponseCode::NXDomain,
                vec![a("gone.test.", 300, "10.0.0.1")],
            )
            .to_vec()
            .expect("encode"),
        ]
    })
    .await;
    let fwd = forwarder(&up, Limits::default());
    let reply = fwd
        .answer("a", &query_bytes("gone.test.", RecordType::A, 3), &allow)
        .await;
    assert_eq!(
        parse(&reply.expect("answer")).metadata.response_code,
        ResponseCode::NXDomain
    );
    assert!(fwd.answers().is_empty());
}

#[tokio::test]
async fn a_wrong_id_or_question_gets_servfail() {
    let up = FakeUpstream::start(|query, _| {
        let mut wrong_id = response(
            query,
            ResponseCode::NoError,
            vec![a("web.test.", 300, "10.0.0.1")],
        );
        wrong_id.metadata.id = query.metadata.id.wrapping_add(1);
        let mut other_question = Message::response(query.metadata.id, OpCode::Query);
        other_question.add_query(Query::query(name("other.test."), RecordType::A));
        other_question.add_answer(a("other.test.", 300, "10.0.0.2"));
        vec![
            wrong_id.to_vec().expect("encode"),
            other_question.to_vec().expect("encode"),
            b"garbage".to_vec(),
        ]
    })
    .await;
    let limits = Limits {
        upstream_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let fwd = forwarder(&up, limits);
    let reply = fwd
        .answer("a", &query_bytes("web.test.", RecordType::A, 3), &allow)
        .await;
    let reply = parse(&reply.expect("answer"));
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(reply.metadata.id, 3);
    assert!(
        fwd.answers().is_empty(),
        "nothing from a mismatched answer is recorded"
    );
}

#[tokio::test]
async fn a_silent_upstream_gets_servfail_within_the_bound() {
    let up = FakeUpstream::start(|_, _| Vec::new()).await;
    let limits = Limits {
        upstream_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let fwd = forwarder(&up, limits);
    let started = std::time::Instant::now();
    let reply = fwd
        .answer("a", &query_bytes("slow.test.", RecordType::A, 3), &allow)
        .await;
    let elapsed = started.elapsed();
    assert_eq!(
        parse(&reply.expect("answer")).metadata.response_code,
        ResponseCode::ServFail
    );
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(1),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn past_the_in_flight_bound_queries_get_servfail() {
    let up = answering(|_| vec![a("web.test.", 300, "10.0.0.1")]).await;
    let limits = Limits {
        max_in_flight: 0,
        ..Limits::default()
    };
    let fwd = forwarder(&up, limits);
    let reply = fwd
        .answer("a", &query_bytes("web.test.", RecordType::A, 3), &allow)
        .await;
    assert_eq!(
        parse(&reply.expect("answer")).metadata.response_code,
        ResponseCode::ServFail
    );
    assert_eq!(up.queries(), 0);
}

#[tokio::test]
async fn actors_do_not_see_each_others_answers() {
    let up = answering(|q| vec![a(q, 300, "10.0.0.1")]).await;
    let fwd = forwarder(&up, Limits::default());
    fwd.answer("actor-a", &query_bytes("a.test.", RecordType::A, 1), &allow)
        .await
        .expect("answer");
    assert_eq!(
        fwd.answers().lookup("actor-a", ip("10.0.0.1")).as_deref(),
        Some("a.test")
    );
    assert_eq!(fwd.answers().lookup("actor-b", ip("10.0.0.1")), None);
    fwd.answer("actor-b", &query_bytes("b.test.", RecordType::A, 1), &allow)
        .await
        .expect("answer");
    assert_eq!(
        fwd.answers().lookup("actor-a", ip("10.0.0.1")).as_deref(),
        Some("a.test")
    );
    assert_eq!(
        fwd.answers().lookup("actor-b", ip("10.0.0.1")).as_deref(),
        Some("b.test")
    );
    fwd.answers().forget_actor("actor-a");
    assert_eq!(fwd.answers().lookup("actor-a", ip("10.0.0.1")), None);
    assert_eq!(fwd.answers().len(), 1);
}

#[tokio::test]
async fn the_cache_bound_is_enforced() {
    let up = answering(|q| {
        (1..=10u8)
            .map(|i| a(q, 300, &format!("10.0.1.{i}")))
            .collect()
    })
    .await;
    let limits = Limits {
        max_answers_per_actor: 4,
        ..Limits::default()
    };
    let fwd = forwarder(&up, limits);
    fwd.answer("a", &query_bytes("many.test.", RecordType::A, 1), &allow)
        .await
        .expect("answer");
    assert_eq!(fwd.answers().len(), 4);
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.1.1")),
        None,
        "the oldest went"
    );
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.1.10")).as_deref(),
        Some("many.test")
    );
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_nothing() {
    let up = FakeUpstream::start(|_, _| Vec::new()).await;
    let fwd = forwarder(&up, Limits::default());
    // Too short for a header: nothing to answer.
    assert_eq!(fwd.answer("a", b"\x12\x34\x01", &allow).await, None);
    // A header that announces a question that is not there.
    let header_only = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let reply = parse(
        &fwd.answer("a", &header_only, &allow)
            .await
            .expect("FORMERR"),
    );
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(reply.metadata.id, 0x1234);
    // A response sent as a query: never answered (two forwarders could loop).
    let mut as_response = query_bytes("web.test.", RecordType::A, 1);
    as_response[2] |= 0x80;
    assert_eq!(fwd.answer("a", &as_response, &allow).await, None);
    // Two questions.
    let mut two = Message::query();
    two.add_query(Query::query(name("a.test."), RecordType::A));
    two.add_query(Query::query(name("b.test."), RecordType::A));
    let reply = parse(
        &fwd.answer("a", &two.to_vec().expect("encode"), &allow)
            .await
            .expect("answer"),
    );
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    // Another opcode (STATUS).
    let mut status = query_bytes("web.test.", RecordType::A, 1);
    status[2] = (status[2] & 0x87) | (2 << 3);
    let reply = parse(&fwd.answer("a", &status, &allow).await.expect("answer"));
    assert_eq!(reply.metadata.response_code, ResponseCode::NotImp);
    // Over the UDP size bound.
    let mut big = query_bytes("web.test.", RecordType::A, 1);
    big.resize(5000, 0);
    let reply = parse(&fwd.answer("a", &big, &allow).await.expect("answer"));
    assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(up.queries(), 0);
}

#[tokio::test]
async fn a_truncated_answer_is_passed_to_udp_clients_and_retried_over_tcp_for_tcp_clients() {
    let up = FakeUpstream::start(|query, transport| {
        let mut reply = response(
            query,
            ResponseCode::NoError,
            vec![a("big.test.", 300, "10.0.0.1")],
        );
        if transport == Transport::Udp {
            reply.answers.clear();
            reply.metadata.truncation = true;
        } else {
            reply.add_answer(a("big.test.", 300, "10.0.0.2"));
        }
        vec![reply.to_vec().expect("encode")]
    })
    .await;
    let fwd = forwarder(&up, Limits::default());
    let reply = parse(
        &fwd.answer("a", &query_bytes("big.test.", RecordType::A, 8), &allow)
            .await
            .expect("answer"),
    );
    assert!(
        reply.metadata.truncation,
        "a UDP client retries over TCP itself"
    );
    assert!(reply.answers.is_empty());
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 0);

    let (mut client, mut server) = tokio::io::duplex(4096);
    let serve = async {
        let stats = fwd.serve_tcp(&mut server, "a", &allow).await;
        drop(server);
        stats
    };
    let ask = async {
        write_framed(&mut client, &query_bytes("big.test.", RecordType::A, 9)).await;
        let reply = parse(&read_framed(&mut client).await);
        client.shutdown().await.expect("shutdown");
        reply
    };
    let (stats, reply) = tokio::join!(serve, ask);
    assert_eq!(stats.expect("serve").answers, 1);
    assert!(!reply.metadata.truncation);
    assert_eq!(reply.metadata.id, 9);
    assert_eq!(addresses(&reply), vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(
        fwd.answers().lookup("a", ip("10.0.0.2")).as_deref(),
        Some("big.test")
    );
}

async fn write_framed(stream: &mut (impl tokio::io::AsyncWrite + Unpin), message: &[u8]) {
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).await.expect("write");
}

async fn read_framed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let len = stream.read_u16().await.expect("read length");
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.expect("read message");
    buf
}

#[tokio::test]
async fn tcp_serves_several_queries_on_one_stream() {
    let up = answering(|q| vec![a(q, 300, "10.0.0.1")]).await;
    let fwd = forwarder(&up, Limits::default());
    let (mut client, mut server) = tokio::io::duplex(4096);
    let serve = async {
        let stats = fwd.serve_tcp(&mut server, "a", &deny_evil).await;
        drop(server);
        stats
    };
    let ask = async {
        // Both queries written before either answer is read, in one write.
        let mut both = Vec::new();
        for (qname, id) in [("one.test.", 1u16), ("x.evil.test.", 2)] {
            let q = query_bytes(qname, RecordType::A, id);
            both.extend_from_slice(&(q.len() as u16).to_be_bytes());
            both.extend_from_slice(&q);
        }
        client.write_all(&both).await.expect("write");
        let first = parse(&read_framed(&mut client).await);
        let second = parse(&read_framed(&mut client).await);
        client.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read to end");
        (first, second, rest)
    };
    let (stats, (first, second, rest)) = tokio::join!(serve, ask);
    assert_eq!(
        stats.expect("serve"),
        DnsTcpStats {
            queries: 2,
            answers: 2,
            idle_timeout: false
        }
    );
    assert_eq!(
        (first.metadata.id, first.metadata.response_code),
        (1, ResponseCode::NoError)
    );
    assert_eq!(addresses(&first), vec![ip("10.0.0.1")]);
    assert_eq!(
        (second.metadata.id, second.metadata.response_code),
        (2, ResponseCode::NXDomain)
    );
    assert!(rest.is_empty());
    assert_eq!(up.queries(), 1, "the denied name never went upstream");
}

#[tokio::test]
async fn tcp_rejects_an_oversize_length_and_times_out_idle_clients() {
    let up = FakeUpstream::start(|_, _| Vec::new()).await;
    let limits = Limits {
        max_tcp_message: 512,
        tcp_idle_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let fwd = forwarder(&up, limits);

    let (mut client, mut server) = tokio::io::duplex(4096);
    client
        .write_all(&600u16.to_be_bytes())
        .await
        .expect("write");
    let err = fwd
        .serve_tcp(&mut server, "a", &allow)
        .await
        .expect_err("oversize");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("600 bytes"), "{err}");

    let (mut client, mut server) = tokio::io::duplex(4096);
    client.write_all(&0u16.to_be_bytes()).await.expect("write");
    let err = fwd
        .serve_tcp(&mut server, "a", &allow)
        .await
        .expect_err("empty message");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);

    let (_client, mut server) = tokio::io::duplex(4096);
    let started = std::time::Instant::now();
    let stats = fwd
        .serve_tcp(&mut server, "a", &allow)
        .await
        .expect("idle end");
    assert!(stats.idle_timeout);
    assert!(started.elapsed() < Duration::from_secs(1));

    // A length, then a message that never completes: an error once the idle time is over.
    let (mut client, mut server) = tokio::io::duplex(4096);
    client.write_all(&[0, 40, 1, 2, 3]).await.expect("write");
    let err = fwd
        .serve_tcp(&mut server, "a", &allow)
        .await
        .expect_err("cut short");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert_eq!(up.queries(), 0);
}

/// Runs `dig ARGS` against `server` and returns its output.
async fn dig(server: SocketAddr, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("dig");
    cmd.arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+tries=1", "+time=3"])
        .args(args);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join dig")
        .unwrap_or_else(|e| {
            panic!("cannot run dig ({e}): install it (apt-get install bind9-dnsutils); this test needs a real DNS client")
        });
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_accepts_the_answers_over_udp_and_tcp() {
    let up = answering(|q| vec![a(q, 300, "10.0.0.1")]).await;
    let fwd = Arc::new(forwarder(&up, Limits::default()));
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = udp.local_addr().expect("addr");
    let tcp = TcpListener::bind(addr)
        .await
        .expect("bind the same port over TCP");
    let udp_task = {
        let fwd = fwd.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                if let Some(reply) = fwd.answer("dig", &buf[..n], &deny_evil).await {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        })
    };
    let tcp_task = {
        let fwd = fwd.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = tcp.accept().await else {
                    return;
                };
                let _ = fwd.serve_tcp(&mut stream, "dig", &deny_evil).await;
            }
        })
    };

    let out = dig(addr, &["web.test", "A"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("10.0.0.1"), "{out}");
    let out = dig(addr, &["api.evil.test", "A"]).await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let out = dig(addr, &["+tcp", "tcp.test", "A"]).await;
    assert!(
        out.contains("status: NOERROR") && out.contains("10.0.0.1"),
        "{out}"
    );
    let out = dig(addr, &["+tcp", "api.evil.test", "AAAA"]).await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert_eq!(
        fwd.answers().lookup("dig", ip("10.0.0.1")).as_deref(),
        Some("tcp.test")
    );
    assert_eq!(up.queries(), 2);
    udp_task.abort();
    tcp_task.abort();
}

/// Checks one forwarder answer to arbitrary bytes: nothing, or a response to them.
fn check_answer(query: &[u8], reply: Option<Vec<u8>>) -> Result<(), TestCaseError> {
    if let Some(reply) = reply {
        let reply = Message::from_vec(&reply)
            .map_err(|e| TestCaseError::fail(format!("answer does not parse: {e}")))?;
        prop_assert_eq!(
            reply.metadata.message_type,
            hickory_proto::op::MessageType::Response
        );
        prop_assert_eq!(reply.metadata.id.to_be_bytes(), [query[0], query[1]]);
    }
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #[test]
    fn any_query_bytes_get_no_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let rt = runtime();
        // Denies every hostname: nothing is relayed, so no resolver is needed.
        let fwd = Forwarder::new("127.0.0.1:9".parse().expect("addr"), SocketFactory::new(0), Limits::default());
        let reply = rt.block_on(fwd.answer("a", &bytes, &|_| NameVerdict::Deny { reason: "test".into() }));
        check_answer(&bytes, reply)?;
    }

    #[test]
    fn mutated_queries_get_no_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = query_bytes("www.example.test.", RecordType::AAAA, 77);
        for (at, byte) in edits {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let rt = runtime();
        let fwd = Forwarder::new("127.0.0.1:9".parse().expect("addr"), SocketFactory::new(0), Limits::default());
        let reply = rt.block_on(fwd.answer("a", &bytes, &|_| NameVerdict::Deny { reason: "test".into() }));
        check_answer(&bytes, reply)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the resolver sends back (a real answer with bytes changed after the id), the
    /// forwarder answers the actor and does not panic.
    #[test]
    fn mutated_upstream_answers_get_no_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let rt = runtime();
        let edits = Arc::new(edits);
        rt.block_on(async move {
            let up = FakeUpstream::start(move |query, _| {
                let reply = response(query, ResponseCode::NoError, vec![
                    cname("www.example.test.", 60, "edge.example.test."),
                    a("edge.example.test.", 60, "10.0.0.1"),
                ]);
                let mut bytes = reply.to_vec().expect("encode");
                for &(at, byte) in edits.iter() {
                    let at = 2 + at % (bytes.len() - 2);
                    bytes[at] = byte;
                }
                bytes.truncate(2.max(cut % (bytes.len() + 1)));
                vec![bytes]
            }).await;
            let limits = Limits { upstream_timeout: Duration::from_millis(50), ..Limits::default() };
            let fwd = forwarder(&up, limits).with_address_filter(|ip| (ip == IpAddr::from([10, 0, 0, 1])).then(|| "test".into()));
            let query = query_bytes("www.example.test.", RecordType::A, 5);
            let reply = fwd.answer("a", &query, &allow).await;
            prop_assert!(reply.is_some(), "a relayed query is always answered");
            check_answer(&query, reply)
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Mutated queries that pass the checks are re-encoded and relayed: no panic there either.
    #[test]
    fn mutated_queries_relayed_get_no_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = query_bytes("www.example.test.", RecordType::AAAA, 77);
        for (at, byte) in edits {
            // The id and flags stay: the query must still be one.
            let at = 4 + at % (bytes.len() - 4);
            bytes[at] = byte;
        }
        let rt = runtime();
        rt.block_on(async move {
            // Answers at once, without a question: accepted as an error, so no case waits.
            let up = FakeUpstream::start(|query, _| {
                vec![Message::error_msg(query.metadata.id, OpCode::Query, ResponseCode::Refused).to_vec().expect("encode")]
            }).await;
            let limits = Limits { upstream_timeout: Duration::from_millis(200), ..Limits::default() };
            let fwd = forwarder(&up, limits);
            let reply = fwd.answer("a", &bytes, &allow).await;
            check_answer(&bytes, reply)
        })?;
    }
}
