//! A test CA and the certificates it signs, made with rcgen, as PEM text and files in a
//! temporary directory: for the HTTPS simulator, client certificates, and TLS to Redis.

use std::path::PathBuf;

/// A test CA and the PEM files made with it, in a temporary directory (`ca.pem` from the
/// start).
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca_pem: String,
}

/// A certificate and its key, as PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

pub enum Usage {
    Server,
    Client,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_pem = params.self_signed(&key).expect("CA").pem();
        let pki = Pki {
            dir: tempfile::tempdir().expect("tempdir"),
            issuer: rcgen::Issuer::new(params, key),
            ca_pem,
        };
        pki.write("ca.pem", &pki.ca_pem);
        pki
    }

    /// A certificate for `names` (DNS names or IP addresses), valid now unless `expired`.
    pub fn leaf(&self, names: &[&str], usage: Usage, expired: bool) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.extended_key_usages = vec![match usage {
            Usage::Server => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        Leaf {
            cert: params.signed_by(&key, &self.issuer).expect("cert").pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate whose only subject alternative name is the URI `uri` (a SPIFFE
    /// ID).
    pub fn client_with_uri(&self, uri: &str) -> Leaf {
        self.client_with_uris(&[uri])
    }

    /// A client certificate whose subject alternative names are the URIs `uris`.
    pub fn client_with_uris(&self, uris: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = uris
            .iter()
            .map(|uri| {
                rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*uri).expect("ia5 uri"))
            })
            .collect();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "workload");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        Leaf {
            cert: params.signed_by(&key, &self.issuer).expect("cert").pem(),
            key: key.serialize_pem(),
        }
    }

    /// Writes `text` to `name` in the directory; its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}
