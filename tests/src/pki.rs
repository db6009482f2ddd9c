//! A throw-away certificate authority for the upstream servers (and any TLS peer a test needs).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// A self-signed CA made fresh per use; its PEM is written to a file for `curl --cacert`.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: tempfile::TempDir,
}

/// A leaf certificate and key issued by a [`TestCa`].
pub struct Issued {
    /// Certificate in DER.
    pub cert_der: Vec<u8>,
    /// Private key in PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// Certificate in PEM.
    pub cert_pem: String,
    /// Private key in PEM.
    pub key_pem: String,
}

impl TestCa {
    /// Generates the CA key and certificate.
    pub fn new() -> TestCa {
        TestCa::with_name("egress test CA")
    }

    /// A CA whose subject is `CN=name`: two CAs of one name look like the same issuer to a
    /// verifier (it then reports a bad signature rather than an unknown issuer).
    pub fn with_name(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("generate CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        let dir = private_readable_dir("egress-test-ca-");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
        TestCa { cert, key, dir }
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// Path of a file holding the CA certificate in PEM (lives as long as the CA).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses, as SANs).
    pub fn issue(&self, names: &[&str]) -> Issued {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("egress-test"),
        );
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign leaf");
        Issued {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Issues a client certificate (extended key usage clientAuth) with subject `CN=cn`,
    /// valid from `not_before` to `not_after` (offsets from now: negative for the past).
    pub fn issue_client(
        &self,
        cn: &str,
        not_before: time::Duration,
        not_after: time::Duration,
    ) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "egress tests");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + not_before;
        params.not_after = now + not_after;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("generate client key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign client certificate");
        Issued {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Signs a PKCS#10 request (PEM) as a client certificate (extended key usage
    /// clientAuth) with the request's subject and key, valid from 1 s ago for `lifetime`;
    /// returns the leaf in PEM, or why the request is unusable.
    pub fn sign_csr(&self, csr_pem: &str, lifetime: std::time::Duration) -> Result<String, String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("not a PEM PKCS#10 request: {e}"))?;
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::seconds(1);
        csr.params.not_after = now + lifetime;
        csr.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.signed_by(&self.cert, &self.key)
            .map(|cert| cert.pem())
            .map_err(|e| format!("cannot sign it: {e}"))
    }

    /// Writes an issued certificate and key as `NAME.pem` / `NAME.key` in the CA's directory.
    pub fn write_issued(&self, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert, &issued.cert_pem).expect("write cert");
        std::fs::write(&key, &issued.key_pem).expect("write key");
        (cert, key)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// A temporary directory under /tmp that other users (squid runs as `proxy`) can traverse and read.
pub(crate) fn private_readable_dir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create temp dir");
    // mkdtemp makes it 0700, which `proxy` cannot traverse.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    dir
}
