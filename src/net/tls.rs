//! TLS: the client API's identity from PEM files, and the peer listener's encrypted,
//! key-bound transport.
//!
//! # Peers
//! Replication runs over TLS 1.3 only. A node's certificate is a throwaway (a fresh ECDSA key and
//! a self-signed certificate each start) and no certificate is checked: what authenticates a peer
//! is its node key, proven in the replication handshake by a signature over the connection's
//! **channel binding** — [`CHANNEL_BINDING_LABEL`] exported from the TLS session (RFC 8446 §7.5,
//! as RFC 9266's `tls-exporter`). Both ends of one TLS session derive the same 32 bytes; two
//! sessions never do. So:
//! - a passive relay between two nodes carries only ciphertext: it can neither read a payload nor
//!   inject a byte that is accepted (TLS records are authenticated);
//! - an active relay that terminates TLS towards each side holds two sessions with two different
//!   bindings: the proofs it could forward name the wrong binding, and the handshake fails.
//!
//! This is the standard construction (TLS plus an authenticated channel binding); the
//! cryptography is rustls's and ed25519-dalek's.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use tokio_rustls::rustls::{self, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The exporter label of the peer channel binding.
pub const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-quire-peer-v3";

/// 32 bytes both ends of one TLS session derive and no other session shares: what the peer
/// handshake's proofs sign. All zeros on a plaintext connection (the benchmark's baseline only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding(pub [u8; 32]);

/// The client API's TLS identity from PEM files (certificate chain, private key), offering
/// HTTP/2 and HTTP/1.1 by ALPN. The error names the file and what is wrong with it.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()))
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|error| format!("{}: {error}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|error| format!("{}: {error}", key.display()))?
        .ok_or_else(|| format!("{} holds no PEM private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|error| {
            format!(
                "{} and {} do not make a TLS identity: {error}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The peer transport's TLS ends: an acceptor for the peer listener and a connector for dialing,
/// TLS 1.3 and HTTP/2 only. Cheap to clone.
#[derive(Clone)]
pub struct PeerTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Both ends, with a fresh key and self-signed certificate.
    pub fn generate() -> Result<PeerTls, String> {
        let key = rcgen::KeyPair::generate().map_err(|error| error.to_string())?;
        let certificate = rcgen::CertificateParams::new(vec!["quire-peer".to_string()])
            .and_then(|params| params.self_signed(&key))
            .map_err(|error| error.to_string())?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| error.to_string())?
            .with_no_client_auth()
            .with_single_cert(vec![certificate.der().clone()], key_der)
            .map_err(|error| error.to_string())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|error| error.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(PeerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// The peer listener's end.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Runs the client side of the TLS handshake over `io` (bounded by the caller) and returns
    /// the session with its channel binding.
    pub async fn connect<IO>(
        &self,
        io: IO,
    ) -> std::io::Result<(tokio_rustls::client::TlsStream<IO>, ChannelBinding)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from("quire-peer").expect("a valid DNS name");
        let stream = self.connector.connect(name, io).await?;
        let binding = export(stream.get_ref().1)?;
        Ok((stream, binding))
    }
}

/// The channel binding of an accepted TLS session.
pub fn server_binding<IO>(
    stream: &tokio_rustls::server::TlsStream<IO>,
) -> std::io::Result<ChannelBinding> {
    export(stream.get_ref().1)
}

fn export<Data>(connection: &rustls::ConnectionCommon<Data>) -> std::io::Result<ChannelBinding> {
    connection
        .export_keying_material([0u8; 32], CHANNEL_BINDING_LABEL, None)
        .map(ChannelBinding)
        .map_err(std::io::Error::other)
}

/// Accepts any server certificate while still checking the handshake's signature with the
/// certificate's key: peers are authenticated by node keys over the channel binding instead.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "peers speak TLS 1.3 only".to_string(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_ends_of_a_session_share_its_binding_and_two_sessions_differ() {
        let tls = PeerTls::generate().unwrap();
        let mut bindings = Vec::new();
        for _ in 0..2 {
            let (client, server) = tokio::io::duplex(64 << 10);
            let acceptor = tls.acceptor();
            let (accepted, connected) = tokio::join!(acceptor.accept(server), tls.connect(client));
            let (_stream, client_binding) = connected.unwrap();
            let server_binding = server_binding(&accepted.unwrap()).unwrap();
            assert_eq!(client_binding, server_binding);
            bindings.push(client_binding);
        }
        assert_ne!(bindings[0], bindings[1]);
    }
}
