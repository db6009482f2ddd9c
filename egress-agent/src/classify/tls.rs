//! SNI from a TLS ClientHello.
//!
//! tls-parser parses one record at a time, but a ClientHello may be split across several
//! handshake records (RFC 8446 5.1), so the records are walked here and the handshake message
//! is reassembled before tls-parser sees it. Post-quantum key shares (X25519MLKEM768, 1216
//! bytes) push hellos past one MTU, so split records and split reads are normal, not exotic.

use std::borrow::Cow;

use tls_parser::{
    SNIType, TlsExtension, TlsExtensionType, TlsHandshakeType, TlsMessage, TlsMessageHandshake,
    TlsRecordType, parse_tls_extension_sni_content, parse_tls_extension_unknown,
    parse_tls_message_handshake,
};

use super::{DEFAULT_MAX_BYTES, Sniff, normalize_name};

/// Record header: content type (1), legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
/// Handshake header: message type (1), length (3).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Largest plaintext record fragment (RFC 8446 5.1); a ClientHello is always plaintext.
const MAX_PLAINTEXT_LEN: usize = 1 << 14;
/// Highest legacy record version minor we accept (0x0300 SSL 3.0 .. 0x0304).
const MAX_VERSION_MINOR: u8 = 4;

/// SNI from a ClientHello at the start of `buf`, the handshake bounded by the default
/// [`Limits::max_bytes`](super::Limits).
pub fn sniff(buf: &[u8]) -> Sniff {
    sniff_bounded(buf, DEFAULT_MAX_BYTES)
}

/// [`sniff`], refusing a ClientHello whose records cannot fit in `max_bytes` as soon as its
/// claimed length says so.
pub(crate) fn sniff_bounded(buf: &[u8], max_bytes: usize) -> Sniff {
    match client_hello(buf, max_bytes) {
        Hello::Incomplete => Sniff::Incomplete,
        Hello::NotMatched => Sniff::NotMatched,
        Hello::Message(message) => server_name(&message),
    }
}

/// The legacy version of the first record of a whole ClientHello (with or without SNI) at the
/// start of `buf`, or `None` when `buf` does not start with one: a refused TLS flow is
/// answered with an alert in the version the client used.
pub(crate) fn client_hello_version(buf: &[u8]) -> Option<u16> {
    let Hello::Message(message) = client_hello(buf, buf.len()) else {
        return None;
    };
    match parse_tls_message_handshake(&message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(_)))) => {}
        _ => return None,
    }
    match buf {
        [_, major, minor, ..] => Some(u16::from_be_bytes([*major, *minor])),
        _ => None,
    }
}

/// State of the ClientHello handshake message at the start of a buffer.
enum Hello<'a> {
    Incomplete,
    NotMatched,
    /// The whole handshake message, header included; borrowed when it sits in one record.
    Message(Cow<'a, [u8]>),
}

/// Reassembles the first handshake message from consecutive handshake records.
fn client_hello(buf: &[u8], max_bytes: usize) -> Hello<'_> {
    let mut payload: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut pos = 0;
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        // The header is judged byte by byte, so other protocols are refused from their first
        // byte instead of after five. Any other record type before the hello is complete is
        // refused too: handshake messages must not be interleaved with other records.
        match rest.first() {
            None => return Hello::Incomplete,
            Some(&kind) if kind != TlsRecordType::Handshake.0 => return Hello::NotMatched,
            Some(_) => {}
        }
        if rest.get(1).is_some_and(|&major| major != 3)
            || rest.get(2).is_some_and(|&minor| minor > MAX_VERSION_MINOR)
        {
            return Hello::NotMatched;
        }
        let Some(&[hi, lo]) = rest.get(3..RECORD_HEADER_LEN) else {
            return Hello::Incomplete;
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        // Zero-length handshake fragments are forbidden (RFC 8446 5.1).
        if len == 0 || len > MAX_PLAINTEXT_LEN {
            return Hello::NotMatched;
        }
        let body = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let fragment = body.get(..len).unwrap_or(body);
        if pos == 0 {
            payload = Cow::Borrowed(fragment);
        } else {
            payload.to_mut().extend_from_slice(fragment);
        }

        if payload
            .first()
            .is_some_and(|&kind| kind != TlsHandshakeType::ClientHello.0)
        {
            return Hello::NotMatched;
        }
        // Until the handshake header is in, all we know is that 4 bytes are needed.
        let need = match payload.get(1..HANDSHAKE_HEADER_LEN) {
            Some(&[a, b, c]) => {
                HANDSHAKE_HEADER_LEN
                    + ((usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c))
            }
            _ => HANDSHAKE_HEADER_LEN,
        };
        if payload.len() >= need {
            return Hello::Message(match payload {
                Cow::Borrowed(bytes) => Cow::Borrowed(bytes.get(..need).unwrap_or(bytes)),
                Cow::Owned(mut bytes) => {
                    bytes.truncate(need);
                    Cow::Owned(bytes)
                }
            });
        }
        // Fewest bytes on the wire that can complete the message: the rest of this record,
        // then at least one more header. Beyond max_bytes the caller would give up anyway,
        // so say so now instead of making it wait for bytes it will never look at.
        let missing = need - payload.len();
        let record_left = len - fragment.len();
        let body_start = pos + RECORD_HEADER_LEN;
        let wire_needed = if missing <= record_left {
            body_start + fragment.len() + missing
        } else {
            body_start + len + RECORD_HEADER_LEN + (missing - record_left)
        };
        if wire_needed > max_bytes {
            return Hello::NotMatched;
        }
        if fragment.len() < len {
            return Hello::Incomplete;
        }
        pos = body_start + len;
    }
}

/// The one valid host_name of a complete ClientHello message.
fn server_name(message: &[u8]) -> Sniff {
    let hello = match parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => hello,
        _ => return Sniff::NotMatched,
    };
    let Some(mut extensions) = hello.ext else {
        return Sniff::NotMatched;
    };
    let mut found = None;
    while !extensions.is_empty() {
        // Walked as opaque (type, data) pairs: tls-parser's typed list parser stops silently
        // at the first extension whose contents it rejects, which would hide a later SNI.
        let Ok((rest, TlsExtension::Unknown(TlsExtensionType(kind), data))) =
            parse_tls_extension_unknown(extensions)
        else {
            return Sniff::NotMatched;
        };
        extensions = rest;
        if kind != TlsExtensionType::ServerName.0 {
            continue;
        }
        // A repeated extension is illegal (RFC 8446 4.2); which copy a server would honour
        // is anyone's guess, so neither is trusted.
        if found.is_some() {
            return Sniff::NotMatched;
        }
        found = Some(data);
    }
    let Some(data) = found else {
        return Sniff::NotMatched;
    };
    let Ok((rest, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(data) else {
        return Sniff::NotMatched;
    };
    if !rest.is_empty() {
        return Sniff::NotMatched;
    }
    // At most one name per type (RFC 6066 3); two host_names are as ambiguous as two
    // extensions. normalize_name also refuses IP literals, which SNI must not carry.
    let mut host_names = names.iter().filter(|(kind, _)| *kind == SNIType::HostName);
    match (host_names.next(), host_names.next()) {
        (Some((_, name)), None) => normalize_name(name).map_or(Sniff::NotMatched, Sniff::Name),
        _ => Sniff::NotMatched,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tls_parser::parse_tls_client_hello_extensions;

    use super::*;

    use crate::classify::fixtures::{
        CURL_HELLO, MLKEM_HELLO, MLKEM_HELLO_2, MLKEM_HELLO_3, NO_SNI_HELLO, OPENSSL_HELLO,
        PYTHON_HELLO,
    };

    const PQ_NAME: &str = "pq.fixture.egress.test";
    /// X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem): 1184-byte ML-KEM-768 key + 32-byte X25519.
    const X25519MLKEM768: (u16, usize) = (0x11ec, 1216);
    const X25519: (u16, usize) = (0x001d, 32);
    /// Where the built 2- and 3-record fixtures cut the handshake message.
    const CUTS_2: &[usize] = &[1000];
    const CUTS_3: &[usize] = &[300, 1200];

    /// Every stored ClientHello and the name it must give.
    const FIXTURES: &[(&str, &[u8], Option<&str>)] = &[
        ("curl", CURL_HELLO, Some("curl.fixture.egress.test")),
        (
            "openssl",
            OPENSSL_HELLO,
            Some("openssl.fixture.egress.test"),
        ),
        ("python", PYTHON_HELLO, Some("python.fixture.egress.test")),
        ("openssl -noservername", NO_SNI_HELLO, None),
        ("mlkem", MLKEM_HELLO, Some(PQ_NAME)),
        ("mlkem 2 records", MLKEM_HELLO_2, Some(PQ_NAME)),
        ("mlkem 3 records", MLKEM_HELLO_3, Some(PQ_NAME)),
    ];

    fn expected(name: Option<&str>) -> Sniff {
        name.map_or(Sniff::NotMatched, |n| Sniff::Name(n.to_string()))
    }

    // ---- ClientHello builder (test only; also made the mlkem_* fixtures) ----

    /// Deterministic bytes standing in for randoms and key material.
    fn filler(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(167).wrapping_add(seed))
            .collect()
    }

    fn u16_len(len: usize) -> [u8; 2] {
        u16::try_from(len).expect("fits in u16").to_be_bytes()
    }

    /// `body` with a 2-byte length prefix.
    fn vec16(body: &[u8]) -> Vec<u8> {
        [&u16_len(body.len())[..], body].concat()
    }

    /// One extension: type, length, data.
    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        [&kind.to_be_bytes()[..], &vec16(data)].concat()
    }

    /// server_name extension data listing `names` as host_name entries.
    fn sni_data<N: AsRef<[u8]>>(names: &[N]) -> Vec<u8> {
        let list: Vec<u8> = names
            .iter()
            .flat_map(|name| [&[0u8][..], &vec16(name.as_ref())].concat())
            .collect();
        vec16(&list)
    }

    /// A TLS 1.3 ClientHello handshake message (header included) shaped like a current
    /// browser's: GREASE, one server_name extension per `sni` entry (its data), and
    /// `key_shares` (group, key length) announced in supported_groups and key_share.
    fn client_hello(sni: &[Vec<u8>], key_shares: &[(u16, usize)]) -> Vec<u8> {
        let mut exts = ext(0x3a3a, &[]); // GREASE
        for data in sni {
            exts.extend(ext(0x0000, data));
        }
        exts.extend(ext(0x0017, &[])); // extended_master_secret
        exts.extend(ext(0xff01, &[0])); // renegotiation_info
        let mut groups: Vec<u8> = key_shares
            .iter()
            .flat_map(|(g, _)| g.to_be_bytes())
            .collect();
        groups.extend([0x00, 0x17, 0x00, 0x18]); // secp256r1, secp384r1
        exts.extend(ext(0x000a, &vec16(&groups))); // supported_groups
        exts.extend(ext(0x000b, &[1, 0])); // ec_point_formats
        exts.extend(ext(0x0023, &[])); // session_ticket
        exts.extend(ext(0x0010, &vec16(b"\x02h2\x08http/1.1"))); // ALPN
        exts.extend(ext(0x0005, &[1, 0, 0, 0, 0])); // status_request
        let sigalgs = [
            0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x05, 0x03, 0x08, 0x05, 0x05, 0x01,
        ];
        exts.extend(ext(0x000d, &vec16(&sigalgs))); // signature_algorithms
        exts.extend(ext(0x0012, &[])); // signed_certificate_timestamp
        let shares: Vec<u8> = key_shares
            .iter()
            .enumerate()
            .flat_map(|(i, &(group, len))| {
                [&group.to_be_bytes()[..], &vec16(&filler(len, i as u8))].concat()
            })
            .collect();
        exts.extend(ext(0x0033, &vec16(&shares))); // key_share
        exts.extend(ext(0x002d, &[1, 1])); // psk_key_exchange_modes
        exts.extend(ext(0x002b, &[4, 0x03, 0x04, 0x03, 0x03])); // supported_versions
        exts.extend(ext(0x001b, &[2, 0x00, 0x02])); // compress_certificate
        exts.extend(ext(0x44cd, &[0, 3, 2, b'h', b'2'])); // application_settings
        // encrypted_client_hello, GREASE-style as browsers send it when they have no ECH
        // config: outer type, KDF/AEAD, config id, 32-byte enc, 144-byte payload.
        let ech = [
            &[0u8, 0, 1, 0, 1, 0x2a][..],
            &vec16(&filler(32, 3)),
            &vec16(&filler(144, 4)),
        ]
        .concat();
        exts.extend(ext(0xfe0d, &ech));
        exts.extend(ext(0x4a4a, &[0])); // GREASE

        let mut body = vec![0x03, 0x03]; // legacy_version TLS 1.2
        body.extend(filler(32, 1)); // random
        body.push(32);
        body.extend(filler(32, 2)); // legacy_session_id
        let suites = [
            0x2a2a, 0x1301u16, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8,
            0xc013, 0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
        ];
        let suites: Vec<u8> = suites.iter().flat_map(|s| s.to_be_bytes()).collect();
        body.extend(vec16(&suites));
        body.extend([1, 0]); // compression: null
        body.extend(vec16(&exts));

        let len = u32::try_from(body.len()).expect("fits").to_be_bytes();
        [&[1u8, len[1], len[2], len[3]][..], &body].concat()
    }

    /// `message` in handshake records, cut at the offsets `cuts` (ascending).
    fn records(message: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([message.len()].iter()) {
            // First record 0x0301 like real clients, later ones 0x0303.
            let version: &[u8] = if start == 0 { &[3, 1] } else { &[3, 3] };
            out.extend([22]);
            out.extend(version);
            out.extend(u16_len(end - start));
            out.extend(&message[start..end]);
            start = end;
        }
        out
    }

    fn pq_hello() -> Vec<u8> {
        client_hello(
            &[sni_data(&[PQ_NAME.as_bytes()])],
            &[X25519MLKEM768, X25519],
        )
    }

    fn hello_with(sni: &[Vec<u8>]) -> Vec<u8> {
        records(&client_hello(sni, &[X25519]), &[])
    }

    // ---- Fixtures ----

    #[test]
    fn fixtures_give_their_name() {
        for (what, bytes, name) in FIXTURES {
            assert_eq!(sniff(bytes), expected(*name), "{what}");
            // Trailing bytes (say, early data) change nothing.
            let more = [bytes, &b"\x17\x03\x03\x00\x01x"[..]].concat();
            assert_eq!(sniff(&more), expected(*name), "{what} + more");
        }
    }

    #[test]
    fn fixtures_are_whole_client_hellos_with_their_record_version() {
        for (what, bytes, _) in FIXTURES {
            let version = u16::from_be_bytes([bytes[1], bytes[2]]);
            assert!(
                (0x0301..=0x0303).contains(&version),
                "{what}: {version:#06x}"
            );
            assert_eq!(client_hello_version(bytes), Some(version), "{what}");
            // A hello cut short is no hello (yet).
            assert_eq!(
                client_hello_version(&bytes[..bytes.len() - 1]),
                None,
                "{what}"
            );
        }
        // A record claiming TLS 1.0 is answered in TLS 1.0.
        let mut v10 = CURL_HELLO.to_vec();
        v10[2] = 1;
        assert_eq!(client_hello_version(&v10), Some(0x0301));
        // A handshake record that is not a ClientHello is none.
        let mut server_hello = CURL_HELLO.to_vec();
        server_hello[5] = 2;
        assert_eq!(client_hello_version(&server_hello), None);
        for other in [
            &b""[..],
            b"\x16",
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x15\x03\x03\x00\x02\x02\x31",
        ] {
            assert_eq!(client_hello_version(other), None, "{other:?}");
        }
    }

    #[test]
    fn fixtures_every_strict_prefix_is_incomplete() {
        for (what, bytes, _) in FIXTURES {
            for cut in 0..bytes.len() {
                assert_eq!(
                    sniff(&bytes[..cut]),
                    Sniff::Incomplete,
                    "{what} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn built_fixtures_match_the_builder() {
        let message = pq_hello();
        assert_eq!(records(&message, &[]), MLKEM_HELLO);
        assert_eq!(records(&message, CUTS_2), MLKEM_HELLO_2);
        assert_eq!(records(&message, CUTS_3), MLKEM_HELLO_3);
        assert!(MLKEM_HELLO.len() > 1500, "{} bytes", MLKEM_HELLO.len());
        assert_eq!(MLKEM_HELLO_2.len(), MLKEM_HELLO.len() + RECORD_HEADER_LEN);
        assert_eq!(
            MLKEM_HELLO_3.len(),
            MLKEM_HELLO.len() + 2 * RECORD_HEADER_LEN
        );
    }

    /// Regenerates the built fixtures: `cargo test -p egress-agent -- --ignored write_built`.
    #[test]
    #[ignore = "writes tests/fixtures; run by hand after changing the builder"]
    fn write_built_fixtures() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let message = pq_hello();
        for (file, cuts) in [
            ("mlkem_client_hello.bin", &[][..]),
            ("mlkem_client_hello_2records.bin", CUTS_2),
            ("mlkem_client_hello_3records.bin", CUTS_3),
        ] {
            std::fs::write(format!("{dir}/{file}"), records(&message, cuts)).unwrap();
        }
    }

    #[test]
    fn built_hello_is_well_formed() {
        // Cross-check the builder with tls-parser's own full parse.
        let message = pq_hello();
        let Ok((rest, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
            parse_tls_message_handshake(&message)
        else {
            panic!("not a ClientHello");
        };
        assert!(rest.is_empty());
        let (rest, exts) = parse_tls_client_hello_extensions(hello.ext.unwrap()).unwrap();
        assert!(rest.is_empty());
        let share = exts
            .iter()
            .find_map(|e| match e {
                TlsExtension::KeyShare(data) => Some(*data),
                _ => None,
            })
            .unwrap();
        // client_shares length, then the first entry: group 0x11ec, key length 1216 (0x04c0).
        assert_eq!(&share[2..6], &[0x11, 0xec, 0x04, 0xc0]);
        assert_eq!(share.len(), 2 + (4 + 1216) + (4 + 32));
    }

    #[test]
    fn hello_split_across_records_anywhere() {
        let message = pq_hello();
        // Including cuts inside the 4-byte handshake header, and many tiny records.
        let many: Vec<usize> = (1..message.len()).step_by(97).collect();
        let every: Vec<usize> = (1..message.len()).collect();
        for cuts in [
            &[1][..],
            &[2],
            &[3],
            &[4],
            &[1, 2, 3],
            &[600, 601],
            many.as_slice(),
            every.as_slice(),
        ] {
            let wire = records(&message, cuts);
            assert_eq!(
                sniff_bounded(&wire, wire.len()),
                Sniff::Name(PQ_NAME.into()),
                "{cuts:?}"
            );
            for cut in [0, 1, 5, 6, 9, wire.len() / 2, wire.len() - 1] {
                assert_eq!(sniff_bounded(&wire[..cut], wire.len()), Sniff::Incomplete);
            }
        }
    }

    #[test]
    fn max_bytes_bounds_the_hello() {
        for wire in [MLKEM_HELLO, MLKEM_HELLO_2, MLKEM_HELLO_3] {
            assert_eq!(sniff_bounded(wire, wire.len()), Sniff::Name(PQ_NAME.into()));
            // One byte short of room: refused before the last byte could arrive.
            let short = wire.len() - 1;
            assert_eq!(sniff_bounded(&wire[..short], short), Sniff::NotMatched);
            assert_eq!(sniff_bounded(&wire[..short], wire.len()), Sniff::Incomplete);
        }
        // The claimed length alone rules it out: no need to wait for the rest.
        assert_eq!(sniff_bounded(&MLKEM_HELLO[..9], 1000), Sniff::NotMatched);
        assert_eq!(sniff_bounded(&MLKEM_HELLO[..9], 5000), Sniff::Incomplete);
        // 16 KiB handshake in the default bound: 5 + 4 + hl must be <= 16,389.
        let claim = |hl: u32| {
            let l = hl.to_be_bytes();
            vec![22, 3, 1, 0x40, 0x00, 1, l[1], l[2], l[3]]
        };
        assert_eq!(sniff(&claim(16_380)), Sniff::Incomplete);
        assert_eq!(sniff(&claim(16_381)), Sniff::NotMatched);
        assert_eq!(sniff(&claim(0xff_ffff)), Sniff::NotMatched);
    }

    #[test]
    fn not_tls_is_refused_early() {
        for bytes in [
            &b"G"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"\x17",                     // application data
            b"\x15\x03\x03",             // alert
            b"\x80\x2e\x01\x03\x01",     // SSLv2-compatible hello: no SNI possible
            b"\x16\x02",                 // bad major
            b"\x16\x03\x05",             // bad minor
            b"\x16\x03\x01\x00\x00",     // empty record
            b"\x16\x03\x01\x40\x01",     // record over 2^14
            b"\x16\x03\x01\x00\x30\x02", // ServerHello
            b"\x16\x03\x01\x00\x30\x0b", // Certificate
        ] {
            assert_eq!(sniff(bytes), Sniff::NotMatched, "{bytes:?}");
        }
    }

    #[test]
    fn interleaved_or_broken_records_are_refused() {
        let message = pq_hello();
        let mut wire = records(&message[..500], &[]);
        wire.extend(b"\x14\x03\x03\x00\x01\x01"); // ChangeCipherSpec in the middle
        wire.extend(records(&message[500..], &[]));
        assert_eq!(sniff(&wire), Sniff::NotMatched);

        // A handshake header claiming 0 bytes, or fewer than the hello holds.
        assert_eq!(
            sniff(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00"),
            Sniff::NotMatched
        );
        let mut short = message.clone();
        short[3] = 40;
        short[2] = 0;
        short[1] = 0;
        assert_eq!(sniff(&records(&short, &[])), Sniff::NotMatched);
    }

    #[test]
    fn sni_edge_cases() {
        let name = |s: &str| Sniff::Name(s.to_string());
        let one = |n: &[u8]| hello_with(&[sni_data(&[n])]);
        assert_eq!(
            sniff(&one(b"Mixed.Case.Example")),
            name("mixed.case.example")
        );
        assert_eq!(sniff(&one(b"dot.example.")), name("dot.example"));
        assert_eq!(
            sniff(&one(b"under_score.example")),
            name("under_score.example")
        );
        for bad in [
            &b"192.0.2.1"[..],
            b"::1",
            b"bad!.example",
            b"sp ace.example",
            b"nul\0.example",
            b"",
            b"..",
            b"caf\xc3\xa9.example",
        ] {
            assert_eq!(sniff(&one(bad)), Sniff::NotMatched, "{bad:?}");
        }
        let long = [&b"a".repeat(250)[..], b".com"].concat();
        assert_eq!(sniff(&one(&long)), Sniff::NotMatched);

        // Two host_names in one extension, two extensions, an empty one, none at all.
        assert_eq!(
            sniff(&hello_with(&[sni_data(&[b"a.example", b"b.example"])])),
            Sniff::NotMatched
        );
        let twice = [sni_data(&[b"a.example"]), sni_data(&[b"b.example"])];
        assert_eq!(sniff(&hello_with(&twice)), Sniff::NotMatched);
        assert_eq!(sniff(&hello_with(&[Vec::new()])), Sniff::NotMatched);
        assert_eq!(sniff(&hello_with(&[])), Sniff::NotMatched);
        // A name type other than host_name (0) is not a host name.
        let other_type = vec16(&[&[1u8][..], &vec16(b"a.example")].concat());
        assert_eq!(sniff(&hello_with(&[other_type])), Sniff::NotMatched);
        // Bytes after the server_name_list, or a list longer than the extension.
        let trailing = [sni_data(&[b"a.example"]), vec![0]].concat();
        assert_eq!(sniff(&hello_with(&[trailing])), Sniff::NotMatched);
        let mut overlong = sni_data(&[b"a.example"]);
        overlong[1] += 1;
        assert_eq!(sniff(&hello_with(&[overlong])), Sniff::NotMatched);
    }

    #[test]
    fn hello_without_extensions_has_no_name() {
        // TLS 1.0 style: no extension block at all.
        let mut body = vec![3, 1];
        body.extend(filler(32, 0));
        body.extend([0, 0, 2, 0x00, 0x2f, 1, 0]);
        let message = [&[1u8, 0, 0, body.len() as u8][..], &body].concat();
        assert_eq!(sniff(&records(&message, &[])), Sniff::NotMatched);
    }

    #[test]
    fn extension_walk_survives_contents_tls_parser_rejects() {
        // An ALPN extension whose contents tls-parser cannot parse, before the SNI: its typed
        // list parser silently stops there, the opaque walk still finds the name.
        let message = client_hello(&[], &[X25519]);
        let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) =
            parse_tls_message_handshake(&message)
        else {
            panic!("not a ClientHello");
        };
        let exts = [
            ext(0x0010, &[0xff]),
            ext(0x0000, &sni_data(&[b"late.example"])),
            hello.ext.unwrap().to_vec(),
        ]
        .concat();
        let (_, typed) = parse_tls_client_hello_extensions(&exts).unwrap();
        assert!(!typed.iter().any(|e| matches!(e, TlsExtension::SNI(_))));

        let prefix_len = message.len() - hello.ext.unwrap().len() - 2;
        let mut body = message[HANDSHAKE_HEADER_LEN..prefix_len].to_vec();
        body.extend(vec16(&exts));
        let len = (body.len() as u32).to_be_bytes();
        let rebuilt = [&[1u8, len[1], len[2], len[3]][..], &body].concat();
        assert_eq!(
            sniff(&records(&rebuilt, &[])),
            Sniff::Name("late.example".into())
        );

        // A truncated extension (length past the block) is malformed: no name.
        let mut body = message[HANDSHAKE_HEADER_LEN..prefix_len].to_vec();
        let broken = [
            ext(0x0000, &sni_data(&[b"a.example"])),
            vec![0x00, 0x10, 0x00, 0x09, 1],
        ]
        .concat();
        body.extend(vec16(&broken));
        let len = (body.len() as u32).to_be_bytes();
        let rebuilt = [&[1u8, len[1], len[2], len[3]][..], &body].concat();
        assert_eq!(sniff(&records(&rebuilt, &[])), Sniff::NotMatched);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = sniff(&bytes);
        }

        #[test]
        fn arbitrary_handshake_bodies_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..2048),
            max_bytes in 0usize..20_000,
        ) {
            // Past the header checks, so the parsers really see the random bytes.
            let len = (body.len() as u32).to_be_bytes();
            let message = [&[1u8, len[1], len[2], len[3]][..], &body].concat();
            let wire = records(&message, &[]);
            if let Sniff::Name(name) = sniff_bounded(&wire, max_bytes) {
                prop_assert_eq!(normalize_name(name.as_bytes()), Some(name));
            }
        }

        #[test]
        fn mutated_fixtures_never_panic(
            which in 0..FIXTURES.len(),
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = FIXTURES[which].1.to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            if let Sniff::Name(name) = sniff(&bytes) {
                prop_assert_eq!(normalize_name(name.as_bytes()), Some(name));
            }
            let _ = client_hello_version(&bytes);
        }

        #[test]
        fn pq_hello_in_arbitrary_records(cuts in proptest::collection::btree_set(1usize..2000, 0..20)) {
            let message = pq_hello();
            let cuts: Vec<usize> = cuts.into_iter().filter(|&c| c < message.len()).collect();
            let wire = records(&message, &cuts);
            prop_assert_eq!(sniff_bounded(&wire, wire.len()), Sniff::Name(PQ_NAME.into()));
            prop_assert_eq!(sniff_bounded(&wire[..wire.len() - 1], wire.len()), Sniff::Incomplete);
        }
    }
}
