//! etcd's `--cipher-suites` and `--tls-min-version`, mapped onto rustls.
//!
//! As in Go, the cipher suite list applies to TLS 1.2; TLS 1.3's suites are always offered.
//! rustls implements only AEAD suites with forward secrecy and TLS 1.2 and later: a suite or
//! version it lacks is refused at start with the list of what it has.

use std::sync::Arc;

use anyhow::bail;
use rustls::crypto::CryptoProvider;
use rustls::{SupportedCipherSuite, SupportedProtocolVersion};

/// Which ciphers and versions a TLS endpoint accepts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsPolicy {
    /// Go's names (`TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`, ...); empty for rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// `TLS1.2` or `TLS1.3` (`TLS1.0` and `TLS1.1` mean TLS 1.2: rustls goes no lower);
    /// `None` for TLS 1.2.
    pub min_version: Option<String>,
}

impl TlsPolicy {
    /// The crypto provider with the chosen suites, or an error naming the unknown ones.
    pub fn provider(&self) -> anyhow::Result<Arc<CryptoProvider>> {
        let mut provider = crate::ring_provider();
        if !self.cipher_suites.is_empty() {
            let mut chosen: Vec<SupportedCipherSuite> = provider
                .cipher_suites
                .iter()
                .filter(|suite| matches!(suite, SupportedCipherSuite::Tls13(_)))
                .copied()
                .collect();
            for name in &self.cipher_suites {
                let suite = provider
                    .cipher_suites
                    .iter()
                    .find(|suite| {
                        matches!(suite, SupportedCipherSuite::Tls12(_))
                            && go_names(suite).iter().any(|go| go == name.trim())
                    })
                    .copied();
                match suite {
                    Some(suite) => chosen.push(suite),
                    None => bail!(
                        "--cipher-suites: {name:?} is not a TLS 1.2 cipher suite this server \
                         supports; supported: {}",
                        supported_tls12_names(&provider).join(", ")
                    ),
                }
            }
            provider.cipher_suites = chosen;
        }
        Ok(Arc::new(provider))
    }

    /// The protocol versions from the minimum up.
    pub fn versions(&self) -> anyhow::Result<&'static [&'static SupportedProtocolVersion]> {
        static BOTH: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self.min_version.as_deref().map(str::trim) {
            None | Some("" | "TLS1.0" | "TLS1.1" | "TLS1.2") => Ok(&BOTH),
            Some("TLS1.3") => Ok(&TLS13_ONLY),
            Some(other) => {
                bail!("--tls-min-version: {other:?} is not one of TLS1.0, TLS1.1, TLS1.2, TLS1.3")
            }
        }
    }
}

/// Go's names for a rustls suite: rustls writes `..._CHACHA20_POLY1305_SHA256` where Go also
/// accepts the name without `_SHA256`.
fn go_names(suite: &SupportedCipherSuite) -> Vec<String> {
    let name = format!("{:?}", suite.suite());
    let mut names = vec![name.clone()];
    if let Some(short) = name.strip_suffix("_CHACHA20_POLY1305_SHA256") {
        names.push(format!("{short}_CHACHA20_POLY1305"));
    }
    names
}

fn supported_tls12_names(provider: &CryptoProvider) -> Vec<String> {
    provider
        .cipher_suites
        .iter()
        .filter(|suite| matches!(suite, SupportedCipherSuite::Tls12(_)))
        .map(|suite| format!("{:?}", suite.suite()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names_choose_tls12_suites_and_tls13_stays() {
        let policy = TlsPolicy {
            cipher_suites: vec![
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into(),
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305".into(),
            ],
            min_version: None,
        };
        let provider = policy.provider().unwrap();
        let tls12 = supported_tls12_names(&provider);
        assert_eq!(
            tls12,
            vec![
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
            ]
        );
        assert!(
            provider
                .cipher_suites
                .iter()
                .any(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
        );
    }

    #[test]
    fn unknown_suites_and_versions_are_refused_with_what_is_supported() {
        let cbc = TlsPolicy {
            cipher_suites: vec!["TLS_RSA_WITH_AES_128_CBC_SHA".into()],
            min_version: None,
        };
        let error = cbc.provider().unwrap_err().to_string();
        assert!(error.contains("supported: TLS_ECDHE"), "{error}");
        let version = TlsPolicy {
            cipher_suites: Vec::new(),
            min_version: Some("SSL3".into()),
        };
        assert!(version.versions().is_err());
        let tls13 = TlsPolicy {
            cipher_suites: Vec::new(),
            min_version: Some("TLS1.3".into()),
        };
        assert_eq!(tls13.versions().unwrap().len(), 1);
    }
}
