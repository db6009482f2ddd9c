//! What the PEP-contract tests and the demo share: the PEP's and the actors' CAs, the
//! runtime's side of the `files` certificate source, and the `[pep]` TOML that turns on a
//! profile with per-actor certificates.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::pki::{Issued, TestCa};

/// The PEP's CA, the PEP's certificate (SAN 127.0.0.1), and the CA of the actors' client
/// certificates (the one the PEP requires).
pub struct Pki {
    /// The CA the agent verifies the PEP with.
    pub pep_ca: TestCa,
    /// The PEP's certificate (SAN 127.0.0.1, pep.egress.test).
    pub pep_cert: PathBuf,
    /// Its key.
    pub pep_key: PathBuf,
    /// The CA of the actors' client certificates, the one the PEP requires.
    pub actors_ca: Arc<TestCa>,
}

/// A fresh [`Pki`].
pub fn pki() -> Pki {
    let pep_ca = TestCa::with_name("egress test PEP CA");
    let issued = pep_ca.issue(&["127.0.0.1", "pep.egress.test"]);
    let (pep_cert, pep_key) = pep_ca.write_issued("pep", &issued);
    // squid runs as `proxy`: its key must be readable by it (the dir is private to tests).
    std::fs::set_permissions(&pep_key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    Pki {
        pep_ca,
        pep_cert,
        pep_key,
        actors_ca: Arc::new(TestCa::with_name("egress test actors CA")),
    }
}

/// The runtime's side of the `files` source: `DIR/<dir name>/tls.crt` and `tls.key`.
pub struct CertDir {
    dir: tempfile::TempDir,
}

impl CertDir {
    /// An empty directory.
    pub fn new() -> CertDir {
        CertDir {
            dir: tempfile::Builder::new()
                .prefix("egress-test-certs-")
                .tempdir()
                .expect("cert dir"),
        }
    }

    /// The directory (the source's `dir`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `actor`'s pair the way a runtime rotates it: new files renamed over the old.
    pub fn write(&self, actor: &str, issued: &Issued) {
        let dir = self.dir.path().join(egress_agent::certs::dir_name(actor));
        std::fs::create_dir_all(&dir).expect("actor cert dir");
        for (name, content, mode) in [
            ("tls.key", &issued.key_pem, 0o600),
            ("tls.crt", &issued.cert_pem, 0o644),
        ] {
            let tmp = dir.join(format!(".{name}.new"));
            std::fs::write(&tmp, content).expect("write");
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
            std::fs::rename(&tmp, dir.join(name)).expect("rename");
        }
    }
}

/// A valid client certificate for `cn` from `ca`: from an hour ago for a day.
pub fn client_cert(ca: &TestCa, cn: &str) -> Issued {
    ca.issue_client(cn, time::Duration::hours(-1), time::Duration::days(1))
}

/// `[pep]` TOML: `profile`, `http`, TLS verified with `ca`, per-actor certificates from
/// `certs` (a `[pep.tls.actor_certs]` body).
pub fn pep_toml(profile: &str, http: &str, ca: &Path, certs: &str) -> String {
    format!(
        "[pep]\nprofile = \"{profile}\"\nhttp = \"{http}\"\n[pep.tls]\nca_file = \"{}\"\n\
         [pep.tls.actor_certs]\n{certs}\n",
        ca.display()
    )
}

/// The `files` source's TOML body for `dir`.
pub fn files_source(dir: &Path) -> String {
    format!("source = \"files\"\ndir = \"{}\"", dir.display())
}

impl Default for CertDir {
    fn default() -> Self {
        CertDir::new()
    }
}
