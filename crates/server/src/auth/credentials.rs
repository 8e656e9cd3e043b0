//! What a request presents as credentials: a token in gRPC metadata (`token`, as etcd's
//! clients send it, or `authorization`, as the JSON gateway passes the HTTP header), or the
//! common name of its verified TLS client certificate.

use tonic::metadata::MetadataMap;

/// etcd's metadata key for the token (rpctypes.TokenFieldNameGRPC).
pub const TOKEN_METADATA_KEY: &str = "token";
/// The gateway's (rpctypes.TokenFieldNameSwagger).
pub const AUTHORIZATION_METADATA_KEY: &str = "authorization";

/// The token a request carries, if any.
pub fn token_of(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get(TOKEN_METADATA_KEY)
        .or_else(|| metadata.get(AUTHORIZATION_METADATA_KEY))
        .and_then(|value| value.to_str().ok())
        .map(|value| value.strip_prefix("Bearer ").unwrap_or(value))
        .filter(|value| !value.is_empty())
}

/// The common name of the client certificate of the TLS connection a request came on (the
/// handshake verified it against the trusted CA, since client certificates are only asked
/// for with --client-cert-auth).
pub fn common_name(extensions: &tonic::Extensions) -> Option<String> {
    let certificates = extensions
        .get::<crate::listener::ClientCertificates>()?
        .0
        .clone()?;
    let leaf = certificates.first()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let name = certificate
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    (!name.is_empty()).then_some(name)
}
