//! TLS identities: a node's ed25519 [`NodeKey`] is its TLS identity, presented as an RFC 7250 raw
//! public key (no certificate, no CA).
//!
//! Both sides authenticate (mutual TLS). Each side presents its ed25519 public key as a
//! `SubjectPublicKeyInfo` and signs the TLS 1.3 handshake transcript with the matching secret key.
//! The verifiers here accept only ed25519 keys and only the `ed25519` signature scheme, and always check
//! the handshake signature with the crypto provider's [`verify_tls13_signature_with_raw_key`]: the
//! key a peer shows is only believed once the peer has proven it holds the secret half.
//!
//! - The dialing side knows the [`NodeId`] it wants ([`ExpectedServer`]): any other key fails the
//!   handshake, and the key actually seen is kept so the caller can say which node answered.
//! - The accepting side takes any valid ed25519 key ([`AnyClient`]); the remote [`NodeId`] is read from
//!   the connection afterwards ([`node_id_from_identity`]).
//!
//! Raw public keys rather than self-signed certificates: the key is all we check, so a certificate
//! would only add parsing (and rcgen) around the same 32 bytes. rustls 0.23 supports RFC 7250 on both
//! sides, and QUIC does not care which certificate type TLS negotiated.
//!
//! Session resumption and 0-RTT are off, so every connection runs the full handshake through these
//! verifiers.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use crowdsurf_proto::{ALPN, NodeId, NodeKey};
use quinn::rustls::{
    self, CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls13_signature_with_raw_key},
    pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    sign::CertifiedKey,
};

use super::NetError;

/// The DER prefix of an ed25519 `SubjectPublicKeyInfo` (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (0 unused bits) }, followed by the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The DER prefix of an ed25519 PKCS#8 v1 private key (RFC 8410): SEQUENCE { INTEGER 0, SEQUENCE { OID
/// 1.3.101.112 }, OCTET STRING { OCTET STRING (32 bytes) } }, followed by the 32 secret bytes.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// The server name every dialer sends. It means nothing: the node id is checked instead.
pub(crate) const SERVER_NAME: &str = "crowdsurf.invalid";

/// The ed25519 `SubjectPublicKeyInfo` DER for a node id.
pub(crate) fn spki_for(id: &NodeId) -> Vec<u8> {
    let mut out = Vec::with_capacity(ED25519_SPKI_PREFIX.len() + 32);
    out.extend_from_slice(&ED25519_SPKI_PREFIX);
    out.extend_from_slice(id.as_bytes());
    out
}

/// The node id in an ed25519 `SubjectPublicKeyInfo`, or `None` if it is anything else (another key type,
/// trailing bytes, not a point on the curve).
pub(crate) fn node_id_from_spki(spki: &[u8]) -> Option<NodeId> {
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let bytes: [u8; 32] = key.try_into().ok()?;
    let id = NodeId::from_bytes(bytes);
    id.verifying_key().ok()?;
    Some(id)
}

/// The remote node id from quinn's `peer_identity()` (the raw public keys rustls saw).
pub(crate) fn node_id_from_identity(identity: Option<Box<dyn Any>>) -> Option<NodeId> {
    let certs = identity?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    match certs.as_slice() {
        [only] => node_id_from_spki(only.as_ref()),
        _ => None,
    }
}

/// The crypto provider every config uses: ring, TLS 1.3 only (QUIC allows nothing else).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Our own identity as rustls wants it: the raw public key and a signer for the node key.
fn certified_key(key: &NodeKey, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, NetError> {
    let mut der = Vec::with_capacity(ED25519_PKCS8_PREFIX.len() + 32);
    der.extend_from_slice(&ED25519_PKCS8_PREFIX);
    der.extend_from_slice(&key.secret_bytes());
    let der = PrivatePkcs8KeyDer::from(der);
    let signer = provider
        .key_provider
        .load_private_key(der.into())
        .map_err(|e| NetError::Tls(format!("cannot load the node key: {e}")))?;
    let spki = CertificateDer::from(spki_for(&key.id()));
    Ok(Arc::new(CertifiedKey::new(vec![spki], signer)))
}

/// Checks a handshake signature against a raw ed25519 public key. Never skipped.
fn verify_signature(
    message: &[u8],
    spki: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, TlsError> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(TlsError::PeerMisbehaved(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme));
    }
    verify_tls13_signature_with_raw_key(message, &SubjectPublicKeyInfoDer::from(spki.as_ref()), dss, algorithms)
}

/// The dialer's verifier: the server must be the node we meant to reach.
#[derive(Debug)]
pub(crate) struct ExpectedServer {
    expected: NodeId,
    /// The key the server actually showed, kept for the error message when it is not `expected`.
    seen: Arc<OnceLock<NodeId>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        if !intermediates.is_empty() {
            return Err(TlsError::InvalidCertificate(CertificateError::BadEncoding));
        }
        let id = node_id_from_spki(end_entity.as_ref())
            .ok_or(TlsError::InvalidCertificate(CertificateError::BadEncoding))?;
        let _ = self.seen.set(id);
        if id != self.expected {
            tracing::debug!(expected = %self.expected.fmt_short(), actual = %id.fmt_short(), "server is another node");
            return Err(TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The acceptor's verifier: any node may connect, but it must prove an ed25519 key.
#[derive(Debug)]
pub(crate) struct AnyClient {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClient {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        if !intermediates.is_empty() || node_id_from_spki(end_entity.as_ref()).is_none() {
            return Err(TlsError::InvalidCertificate(CertificateError::BadEncoding));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        Err(TlsError::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Makes the TLS configurations of one node. The client side is made per dial, since it carries the
/// node id expected at the other end.
#[derive(Debug, Clone)]
pub(crate) struct TlsIdentity {
    provider: Arc<CryptoProvider>,
    key: Arc<CertifiedKey>,
    alpn: Vec<u8>,
}

impl TlsIdentity {
    /// The identity of `key`, speaking [`ALPN`].
    pub(crate) fn new(key: &NodeKey) -> Result<Self, NetError> {
        Self::with_alpn(key, ALPN)
    }

    /// The identity of `key` speaking another ALPN (tests of the mismatch error).
    pub(crate) fn with_alpn(key: &NodeKey, alpn: &[u8]) -> Result<Self, NetError> {
        let provider = provider();
        let key = certified_key(key, &provider)?;
        Ok(TlsIdentity { provider, key, alpn: alpn.to_vec() })
    }

    /// The server side: mutual authentication with any ed25519 key.
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig, NetError> {
        let verifier = Arc::new(AnyClient { algorithms: self.provider.signature_verification_algorithms });
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| NetError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(rustls::server::AlwaysResolvesServerRawPublicKeys::new(self.key.clone())));
        config.alpn_protocols = vec![self.alpn.clone()];
        config.max_early_data_size = 0;
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(config)
    }

    /// The client side for dialing `expected`. `seen` receives the key the server showed, whatever it is.
    pub(crate) fn client_config(
        &self,
        expected: NodeId,
        seen: Arc<OnceLock<NodeId>>,
    ) -> Result<rustls::ClientConfig, NetError> {
        let verifier =
            Arc::new(ExpectedServer { expected, seen, algorithms: self.provider.signature_verification_algorithms });
        let mut config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| NetError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(rustls::client::AlwaysResolvesClientRawPublicKeys::new(
                self.key.clone(),
            )));
        config.alpn_protocols = vec![self.alpn.clone()];
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_early_data = false;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spki_round_trips_and_refuses_other_keys() {
        let id = NodeKey::from_secret_bytes([3; 32]).id();
        let spki = spki_for(&id);
        assert_eq!(node_id_from_spki(&spki), Some(id));
        let mut longer = spki.clone();
        longer.push(0);
        assert_eq!(node_id_from_spki(&longer), None);
        assert_eq!(node_id_from_spki(&spki[..spki.len() - 1]), None);
        let mut other_oid = spki.clone();
        other_oid[8] = 0x71; // Ed448's OID ends in 113
        assert_eq!(node_id_from_spki(&other_oid), None);
    }

    #[test]
    fn spki_matches_what_the_provider_derives() {
        let key = NodeKey::from_secret_bytes([5; 32]);
        let provider = provider();
        let certified = certified_key(&key, &provider).unwrap();
        let derived = certified.key.public_key().unwrap();
        assert_eq!(derived.as_ref(), &spki_for(&key.id())[..]);
    }
}
