//! `Host` from an HTTP/1.x request (any method, any port).
//!
//! The whole header block must be in before a name is given: a later second `Host` header
//! would make the request ambiguous, and the answer must not change with more bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use httparse::{EMPTY_HEADER, Header, Request, Status};

use super::{Sniff, normalize_name};

/// Headers parsed on the stack; a request with more is parsed again with a heap array.
const STACK_HEADERS: usize = 64;
/// Most headers looked at: a request with more falls back to the IP (real clients send a few
/// dozen; the bound keeps a hostile client from costing an allocation per line on each read).
const MAX_HEADERS: usize = 256;
/// Longest method accepted; the longest registered one ("UPDATEREDIRECTREF") has 17 letters.
const MAX_METHOD_LEN: usize = 32;
/// Most digits in a port.
const MAX_PORT_DIGITS: usize = 5;

/// Host of an HTTP/1.x request at the start of `buf`: the `Host` header or, without one, the
/// absolute-form (or CONNECT authority-form) request-target.
pub fn sniff(buf: &[u8]) -> Sniff {
    match head(buf, host) {
        Head::Partial => Sniff::Incomplete,
        Head::Invalid => Sniff::NotMatched,
        Head::Complete(sniff) => sniff,
    }
}

/// Whether `buf` starts with a whole HTTP/1.x request head (whatever its Host): a refused
/// flow that sent one is answered `403 Forbidden`.
pub(crate) fn is_request(buf: &[u8]) -> bool {
    matches!(head(buf, |_| ()), Head::Complete(()))
}

/// A request head at the start of a buffer.
enum Head<T> {
    /// Not whole yet.
    Partial,
    /// Not HTTP/1.x, malformed, or too many headers.
    Invalid,
    /// Whole: what the caller made of it.
    Complete(T),
}

/// Parses the request head at the start of `buf` and, once it is whole, hands it to
/// `complete`.
fn head<T>(buf: &[u8], complete: impl Fn(&Request<'_, '_>) -> T) -> Head<T> {
    match method(buf) {
        Method::NotHttp => return Head::Invalid,
        Method::Partial => return Head::Partial,
        Method::Complete => {}
    }
    let mut headers = [EMPTY_HEADER; STACK_HEADERS];
    match parse(buf, &mut headers, &complete) {
        Ok(head) => head,
        Err(httparse::Error::TooManyHeaders) => {
            // Every header needs its own line, so the line count bounds them (and the
            // caller's max_bytes bounds the lines).
            let lines = buf.iter().filter(|&&b| b == b'\n').count();
            if lines > MAX_HEADERS {
                return Head::Invalid;
            }
            let mut headers = vec![EMPTY_HEADER; lines];
            parse(buf, &mut headers, &complete).unwrap_or(Head::Invalid)
        }
        Err(_) => Head::Invalid,
    }
}

/// Whether `buf` starts with something that can be a request method.
enum Method {
    Partial,
    NotHttp,
    Complete,
}

/// Checks the method before httparse runs, so a client-first protocol that is not HTTP is
/// refused after a few bytes instead of when its first line ends. RFC 9110 allows any token,
/// but methods in use are uppercase letters with '-' or '_'; the rest falls back to the IP.
fn method(buf: &[u8]) -> Method {
    for (i, &b) in buf.iter().enumerate() {
        if b == b' ' {
            return if i == 0 {
                Method::NotHttp
            } else {
                Method::Complete
            };
        }
        if i >= MAX_METHOD_LEN || !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return Method::NotHttp;
        }
    }
    Method::Partial
}

/// Parses the request head with `headers` as httparse's header array.
fn parse<'b, T>(
    buf: &'b [u8],
    headers: &mut [Header<'b>],
    complete: &impl Fn(&Request<'_, '_>) -> T,
) -> Result<Head<T>, httparse::Error> {
    let mut request = Request::new(headers);
    Ok(match request.parse(buf)? {
        Status::Partial => Head::Partial,
        Status::Complete(_) => Head::Complete(complete(&request)),
    })
}

/// The host a complete request head names.
fn host(request: &Request<'_, '_>) -> Sniff {
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Sniff::NotMatched;
    };
    let mut header = None;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            // More than one Host is a 400 (RFC 9112 3.2): no telling which one counts.
            if header.is_some() {
                return Sniff::NotMatched;
            }
            header = Some(h.value);
        }
    }
    let target = match request_target(method, target) {
        Target::Malformed => return Sniff::NotMatched,
        Target::NoAuthority => None,
        Target::Authority(authority) => Some(authority.as_bytes()),
    };
    // A Host or target that is present but invalid spoils the request even if the other one
    // is fine, and when both are present they must agree: a proxy would take the target, an
    // origin server may take the Host, and policy must see the one that is used.
    match (header.map(authority_host), target.map(authority_host)) {
        (Some(None), _) | (_, Some(None)) | (None, None) => Sniff::NotMatched,
        (Some(Some(host)), Some(Some(from_target))) if host != from_target => Sniff::NotMatched,
        (Some(Some(host)), _) | (None, Some(Some(host))) => Sniff::Name(host),
    }
}

/// What the request-target says about the authority.
enum Target<'a> {
    /// origin-form (`/path`) or asterisk-form (`*`).
    NoAuthority,
    /// The authority of an absolute-form target, or a CONNECT authority-form target.
    Authority(&'a str),
    Malformed,
}

/// Classifies the request-target (RFC 9112 3.2).
fn request_target<'a>(method: &str, target: &'a str) -> Target<'a> {
    if target.starts_with('/') || target == "*" {
        return Target::NoAuthority;
    }
    if method == "CONNECT" {
        return Target::Authority(target);
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Target::Malformed;
    };
    if !valid_scheme(scheme) {
        return Target::Malformed;
    }
    // `split` always yields a first piece (maybe empty, which authority_host refuses).
    Target::Authority(rest.split(['/', '?', '#']).next().unwrap_or_default())
}

/// scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) (RFC 3986 3.1).
fn valid_scheme(scheme: &str) -> bool {
    let mut bytes = scheme.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// The host of `host[:port]` / `[v6]:port`, without the port: a validated name, or the
/// canonical text of an IP literal.
fn authority_host(authority: &[u8]) -> Option<String> {
    let authority = authority.trim_ascii();
    // No userinfo in Host (RFC 9110 7.2), and it is deprecated in http URIs: `a@b` is the
    // classic way to make two parsers see two different hosts.
    if authority.contains(&b'@') {
        return None;
    }
    if let Some(bracketed) = authority.strip_prefix(b"[") {
        let close = bracketed.iter().position(|&b| b == b']')?;
        let (literal, after) = bracketed.split_at_checked(close)?;
        if !valid_port(after.get(1..)?) {
            return None;
        }
        // Only IPv6 goes in brackets; std refuses zone ids and IPvFuture, so do we. A
        // v4-mapped address is the IPv4 address it maps.
        let ip: Ipv6Addr = std::str::from_utf8(literal).ok()?.parse().ok()?;
        return Some(IpAddr::V6(ip).to_canonical().to_string());
    }
    let (host, port) = match authority.iter().position(|&b| b == b':') {
        Some(colon) => authority.split_at_checked(colon)?,
        None => (authority, &[][..]),
    };
    if !valid_port(port) {
        return None;
    }
    let ip = std::str::from_utf8(host)
        .ok()
        .and_then(|h| h.parse::<Ipv4Addr>().ok());
    match ip {
        Some(ip) => Some(ip.to_string()),
        None => normalize_name(host),
    }
}

/// Empty, or `:` and at most 5 digits up to 65535 (`port = *DIGIT`, so `host:` is valid).
fn valid_port(port: &[u8]) -> bool {
    if port.is_empty() {
        return true;
    }
    let Some(digits) = port.strip_prefix(b":") else {
        return false;
    };
    digits.len() <= MAX_PORT_DIGITS
        && digits.iter().all(u8::is_ascii_digit)
        && digits
            .iter()
            .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
            <= u32::from(u16::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    use crate::classify::fixtures::CURL_HTTP;

    fn name(s: &str) -> Sniff {
        Sniff::Name(s.to_string())
    }

    /// A request line plus `headers` (each without CRLF) and the blank line.
    fn req(line: &str, headers: &[&str]) -> Vec<u8> {
        let mut out = format!("{line}\r\n");
        for h in headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    #[test]
    fn curl_request() {
        assert_eq!(sniff(CURL_HTTP), name("curl.fixture.egress.test"));
        for cut in 0..CURL_HTTP.len() {
            assert_eq!(sniff(&CURL_HTTP[..cut]), Sniff::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn hand_written_requests() {
        let cases: &[(Vec<u8>, Sniff)] = &[
            (
                req("GET / HTTP/1.1", &["Host: example.com:8080"]),
                name("example.com"),
            ),
            (
                req("GET / HTTP/1.1", &["host: example.com"]),
                name("example.com"),
            ),
            (
                req("GET / HTTP/1.1", &["HOST: Example.COM."]),
                name("example.com"),
            ),
            (
                req("GET / HTTP/1.1", &["hOsT:\texample.com \t"]),
                name("example.com"),
            ),
            (
                req("GET / HTTP/1.1", &["Host: example.com:"]),
                name("example.com"),
            ),
            (
                req(
                    "POST /submit HTTP/1.1",
                    &["Content-Length: 3", "Host: api.example"],
                ),
                name("api.example"),
            ),
            (
                req("PROPFIND /dav HTTP/1.1", &["Host: dav.example"]),
                name("dav.example"),
            ),
            (
                req("M-SEARCH * HTTP/1.1", &["Host: upnp.example:1900"]),
                name("upnp.example"),
            ),
            (
                req("OPTIONS * HTTP/1.1", &["Host: example.com"]),
                name("example.com"),
            ),
            (
                req("GET / HTTP/1.0", &["Host: old.example"]),
                name("old.example"),
            ),
            // Absolute-form: the target's authority when there is no Host, or agreeing with it.
            (
                req("GET http://abs.example:8080/p?q HTTP/1.1", &[]),
                name("abs.example"),
            ),
            (
                req("GET HTTP://ABS.example HTTP/1.1", &[]),
                name("abs.example"),
            ),
            (
                req("GET http://abs.example?q=1 HTTP/1.1", &[]),
                name("abs.example"),
            ),
            (
                req(
                    "GET http://abs.example/ HTTP/1.1",
                    &["Host: abs.example:80"],
                ),
                name("abs.example"),
            ),
            (
                req("GET http://abs.example/ HTTP/1.0", &[]),
                name("abs.example"),
            ),
            (
                req("CONNECT tunnel.example:443 HTTP/1.1", &[]),
                name("tunnel.example"),
            ),
            (
                req(
                    "CONNECT tunnel.example:443 HTTP/1.1",
                    &["Host: tunnel.example:443"],
                ),
                name("tunnel.example"),
            ),
            // IP literals.
            (req("GET / HTTP/1.1", &["Host: [::1]:8080"]), name("::1")),
            (
                req("GET / HTTP/1.1", &["Host: [FD00::0001]"]),
                name("fd00::1"),
            ),
            (
                req("GET / HTTP/1.1", &["Host: [::ffff:192.0.2.1]"]),
                name("192.0.2.1"),
            ),
            (
                req("GET / HTTP/1.1", &["Host: 192.0.2.1:8080"]),
                name("192.0.2.1"),
            ),
            (
                req("GET http://[2001:db8::1]:81/ HTTP/1.1", &[]),
                name("2001:db8::1"),
            ),
            // No name to be had, or an ambiguous or invalid one.
            (req("GET / HTTP/1.0", &[]), Sniff::NotMatched),
            (req("GET / HTTP/1.1", &[]), Sniff::NotMatched),
            (req("GET / HTTP/1.1", &["Host:"]), Sniff::NotMatched),
            (
                req("GET / HTTP/1.1", &["Host: a.example", "Host: a.example"]),
                Sniff::NotMatched,
            ),
            (
                req("GET / HTTP/1.1", &["Host: a.example", "host: b.example"]),
                Sniff::NotMatched,
            ),
            (
                req("GET http://a.example/ HTTP/1.1", &["Host: b.example"]),
                Sniff::NotMatched,
            ),
            (
                req("GET http://a.example/ HTTP/1.1", &["Host: bad!"]),
                Sniff::NotMatched,
            ),
            (
                req("GET http://bad!/ HTTP/1.1", &["Host: a.example"]),
                Sniff::NotMatched,
            ),
            (req("GET http:///p HTTP/1.1", &[]), Sniff::NotMatched),
            (
                req("GET 1http://a.example/ HTTP/1.1", &[]),
                Sniff::NotMatched,
            ),
            (req("GET a.example HTTP/1.1", &[]), Sniff::NotMatched),
            (
                req("GET / HTTP/1.1", &["Host: user@a.example"]),
                Sniff::NotMatched,
            ),
            (
                req("GET http://user:pw@a.example/ HTTP/1.1", &[]),
                Sniff::NotMatched,
            ),
            (
                req("GET / HTTP/1.1", &["Host: a.example:http"]),
                Sniff::NotMatched,
            ),
            (
                req("GET / HTTP/1.1", &["Host: a.example:65536"]),
                Sniff::NotMatched,
            ),
            (
                req("GET / HTTP/1.1", &["Host: a.example:000080"]),
                Sniff::NotMatched,
            ),
            (
                req("GET / HTTP/1.1", &["Host: a.example:1:2"]),
                Sniff::NotMatched,
            ),
            (
                req("GET / HTTP/1.1", &["Host: a_b!.example"]),
                Sniff::NotMatched,
            ),
            (req("GET / HTTP/1.1", &["Host: ::1"]), Sniff::NotMatched),
            (req("GET / HTTP/1.1", &["Host: [::1"]), Sniff::NotMatched),
            (req("GET / HTTP/1.1", &["Host: [::1]x"]), Sniff::NotMatched),
            (
                req("GET / HTTP/1.1", &["Host: [fe80::1%25eth0]"]),
                Sniff::NotMatched,
            ),
            (
                req("GET / HTTP/1.1", &["Host: [192.0.2.1]"]),
                Sniff::NotMatched,
            ),
            (req("GET / HTTP/1.1", &["Host: 127.1"]), Sniff::NotMatched),
            (
                req("GET / HTTP/1.1", &["Host: a.example:8080", "Bad Header: x"]),
                Sniff::NotMatched,
            ),
            // Not HTTP/1.x at all.
            (
                req("GET / HTTP/2.0", &["Host: a.example"]),
                Sniff::NotMatched,
            ),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
                Sniff::NotMatched,
            ),
            (
                req("get / HTTP/1.1", &["Host: a.example"]),
                Sniff::NotMatched,
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(
                &sniff(request),
                expected,
                "{}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn header_block_cut_anywhere_is_incomplete() {
        let head = req(
            "POST http://a.example/upload HTTP/1.1",
            &[
                "User-Agent: test",
                "Host: a.example:8080",
                "Content-Length: 5",
            ],
        );
        let request = [&head[..], b"hello"].concat();
        for cut in 0..head.len() {
            assert_eq!(sniff(&request[..cut]), Sniff::Incomplete, "cut at {cut}");
        }
        for cut in head.len()..=request.len() {
            assert_eq!(sniff(&request[..cut]), name("a.example"), "cut at {cut}");
        }
    }

    #[test]
    fn not_http_is_refused_quickly() {
        for bytes in [
            &b" GET / HTTP/1.1\r\n"[..],
            b"SSH-2",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"\x16\x03\x01",
            b"\0",
            b"\r\nGET / HTTP/1.1\r\n",
            b"EHLO mail.example\r\n",
            b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", // 33 letters, no space
            b"GET / FTP/1.1\r\n",
            b"GET /\x01 HTTP/1.1\r\n",
        ] {
            assert_eq!(
                sniff(bytes),
                Sniff::NotMatched,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // 32 letters could still be a method.
        assert_eq!(sniff(&[b'A'; 32]), Sniff::Incomplete);
    }

    #[test]
    fn many_headers() {
        let filler: Vec<String> = (0..200).map(|i| format!("X-H{i}: {i}")).collect();
        let mut headers: Vec<&str> = filler.iter().map(String::as_str).collect();
        headers.push("Host: many.example");
        let request = req("GET / HTTP/1.1", &headers);
        assert_eq!(sniff(&request), name("many.example"));
        assert_eq!(sniff(&request[..request.len() - 1]), Sniff::Incomplete);
        // Beyond MAX_HEADERS the request is not looked at: the IP is used.
        let filler: Vec<String> = (0..MAX_HEADERS + 10)
            .map(|i| format!("X-H{i}: {i}"))
            .collect();
        let mut headers: Vec<&str> = filler.iter().map(String::as_str).collect();
        headers.push("Host: many.example");
        assert_eq!(sniff(&req("GET / HTTP/1.1", &headers)), Sniff::NotMatched);
    }

    #[test]
    fn a_whole_head_is_a_request_whatever_its_host() {
        let no_host = req("GET / HTTP/1.0", &[]);
        let two_hosts = req("GET / HTTP/1.1", &["Host: a.example", "Host: b.example"]);
        let many: Vec<String> = (0..200).map(|i| format!("X-H{i}: {i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let many = req("GET / HTTP/1.1", &many);
        for request in [CURL_HTTP, &no_host, &two_hosts, &many] {
            assert!(is_request(request), "{}", String::from_utf8_lossy(request));
            // Whatever follows the head (a body, a pipelined request) does not matter.
            assert!(is_request(&[request, b"body"].concat()));
        }
        assert_eq!(sniff(&no_host), Sniff::NotMatched);
        for partial in [
            &CURL_HTTP[..CURL_HTTP.len() - 1],
            b"GET / HTTP/1.1\r\n",
            b"GET",
            b"",
        ] {
            assert!(!is_request(partial), "{}", String::from_utf8_lossy(partial));
        }
        for other in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            b"\x16\x03\x01\x00\x05",
            b"GET / FTP/1.1\r\n\r\n",
        ] {
            assert!(!is_request(other), "{}", String::from_utf8_lossy(other));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = sniff(&bytes);
            let _ = is_request(&bytes);
        }

        #[test]
        fn arbitrary_host_values(value in proptest::collection::vec(any::<u8>(), 0..300)) {
            let request = [&b"GET / HTTP/1.1\r\nHost: "[..], &value, b"\r\n\r\n"].concat();
            match sniff(&request) {
                Sniff::Name(host) => prop_assert!(
                    normalize_name(host.as_bytes()).as_ref() == Some(&host)
                        || host.parse::<IpAddr>().is_ok(),
                    "{host:?}"
                ),
                Sniff::Incomplete => prop_assert!(false, "complete head is Incomplete"),
                Sniff::NotMatched => {}
            }
        }

        #[test]
        fn valid_names_come_back_lowercased(
            host in "[a-zA-Z0-9_-]{1,20}(\\.[a-zA-Z0-9_-]{1,20}){0,4}\\.[a-zA-Z][a-zA-Z0-9-]{0,10}",
            port in proptest::option::of(any::<u16>()),
            method in "[A-Z]{1,10}",
        ) {
            let authority = match port {
                Some(port) => format!("{host}:{port}"),
                None => host.clone(),
            };
            let request = req(&format!("{method} /x HTTP/1.1"), &[&format!("Host: {authority}")]);
            prop_assert_eq!(sniff(&request), Sniff::Name(host.to_ascii_lowercase()));
        }
    }
}
