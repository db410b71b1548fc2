//! Plain or TLS connections: rustls with the system's roots and any CA file
//! the options name.

use std::fmt;
#[cfg(feature = "postgres-rustls")]
use std::sync::Arc;

use upsilon::backend::BackendError;

use super::options::{PostgresOptions, TlsChoice};

/// A connector for plain or TLS connections.
#[derive(Clone)]
pub(super) enum Connector {
    Plain,
    #[cfg(feature = "postgres-rustls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connector::Plain => f.write_str("Plain"),
            #[cfg(feature = "postgres-rustls")]
            Connector::Rustls(_) => f.write_str("Rustls"),
        }
    }
}

impl Connector {
    pub(super) fn new(options: &PostgresOptions) -> Result<Connector, BackendError> {
        match &options.tls {
            TlsChoice::Off => Ok(Connector::Plain),
            #[cfg(feature = "postgres-rustls")]
            TlsChoice::Rustls { ca_file } => rustls_connector(ca_file.as_deref()),
            TlsChoice::Unavailable => Err(BackendError::other(
                "TLS was asked for, and this build of upsilon-backends has no TLS: enable its `postgres-rustls` feature",
            )),
        }
    }
}

#[cfg(feature = "postgres-rustls")]
fn rustls_connector(ca_file: Option<&std::path::Path>) -> Result<Connector, BackendError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| {
                BackendError::other(format!(
                    "cannot read the CA certificates in {}: {e}",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(BackendError::other(format!(
                "{} holds no PEM certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                BackendError::other(format!(
                    "a CA certificate in {} is not usable: {e}",
                    path.display()
                ))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::other(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(
        tokio_postgres_rustls::MakeRustlsConnect::new(config),
    ))
}
