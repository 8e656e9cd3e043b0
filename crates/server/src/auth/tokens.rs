//! Auth tokens: what `Authenticate` hands out and every later request carries (gRPC
//! metadata `token`, or the gateway's `Authorization` header).
//!
//! - **simple** (etcd's default): a random string, registered on every member when the
//!   Authenticate entry applies (so any member accepts it), valid for `--auth-token-ttl`
//!   after its last use. Tokens are member memory, not replicated state: a restarted member
//!   has none, and its clients authenticate again (they do so on "invalid auth token").
//! - **jwt**: a signed JSON Web Token carrying the user name, the auth revision it was
//!   issued at and its expiry; any member holding the key verifies it without shared state.
//!   Options as etcd's `--auth-token jwt,pub-key=F,priv-key=F,sign-method=M[,ttl=D]`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngExt as _;

/// At most this many simple tokens live at once; past it the one unused longest goes.
pub const SIMPLE_TOKENS_MAX: usize = 100_000;
/// etcd's default `--auth-token-ttl`.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);
const TOKEN_PREFIX_CHARS: usize = 16;

/// Whose a token is and the auth revision its permissions are judged at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub user: String,
    /// For a simple token: none (the store's current revision applies). For a JWT: the
    /// revision it was issued at; once the store moves past it the token is stale.
    pub revision: Option<u64>,
}

/// The kind of token this member issues.
#[derive(Debug)]
pub enum TokenKind {
    Simple,
    Jwt(Box<JwtKeys>),
}

#[derive(Debug)]
pub struct JwtKeys {
    algorithm: Algorithm,
    /// None when only a public key was given: this member verifies tokens but issues none.
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenConfigError {
    #[error("--auth-token: unknown token type {0:?} (simple or jwt)")]
    UnknownType(String),
    #[error("--auth-token: option {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("--auth-token: option {0:?} given twice")]
    Repeated(String),
    #[error("--auth-token: unknown option {0:?} (sign-method, pub-key, priv-key, ttl)")]
    UnknownOption(String),
    #[error("--auth-token jwt: {0}")]
    Jwt(String),
}

impl TokenKind {
    /// Parses etcd's `--auth-token` value.
    pub fn parse(value: &str) -> Result<TokenKind, TokenConfigError> {
        let mut parts = value.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut options = BTreeMap::new();
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| TokenConfigError::NotKeyValue(part.to_string()))?;
            if options.insert(key.to_string(), value.to_string()).is_some() {
                return Err(TokenConfigError::Repeated(key.to_string()));
            }
        }
        match kind {
            "simple" if options.is_empty() => Ok(TokenKind::Simple),
            "simple" => Err(TokenConfigError::UnknownOption(
                options.keys().next().cloned().unwrap_or_default(),
            )),
            "jwt" => Ok(TokenKind::Jwt(Box::new(JwtKeys::from_options(&options)?))),
            other => Err(TokenConfigError::UnknownType(other.to_string())),
        }
    }
}

impl JwtKeys {
    fn from_options(options: &BTreeMap<String, String>) -> Result<JwtKeys, TokenConfigError> {
        if let Some(unknown) = options
            .keys()
            .find(|k| !["sign-method", "pub-key", "priv-key", "ttl"].contains(&k.as_str()))
        {
            return Err(TokenConfigError::UnknownOption(unknown.clone()));
        }
        let error = |text: String| TokenConfigError::Jwt(text);
        let method = options
            .get("sign-method")
            .ok_or_else(|| error("sign-method=<RS256|ES256|HS256|...> is required".into()))?;
        let algorithm: Algorithm = method
            .parse()
            .map_err(|_| error(format!("unknown sign-method {method:?}")))?;
        let read = |option: &str| -> Result<Option<Vec<u8>>, TokenConfigError> {
            options
                .get(option)
                .map(|path| {
                    std::fs::read(path).map_err(|e| error(format!("reading {option} {path}: {e}")))
                })
                .transpose()
        };
        let (private, public) = (read("priv-key")?, read("pub-key")?);
        let ttl = match options.get("ttl") {
            None => DEFAULT_TOKEN_TTL,
            Some(text) => parse_duration(text)
                .ok_or_else(|| error(format!("ttl {text:?} is not a duration like 5m or 300s")))?,
        };
        let bad_key = |which: &str, e: jsonwebtoken::errors::Error| {
            error(format!("{which} is not a valid key for {method}: {e}"))
        };
        // An asymmetric method: the public key (required, to verify) and the private key
        // (optional: without it this member verifies tokens but issues none).
        type KeyResult<K> = Result<K, jsonwebtoken::errors::Error>;
        let pem_pair = |encoding: fn(&[u8]) -> KeyResult<EncodingKey>,
                        decoding: fn(&[u8]) -> KeyResult<DecodingKey>| {
            let public = public
                .as_deref()
                .ok_or_else(|| error(format!("{method} needs pub-key=<PEM file>")))?;
            let encoding = private
                .as_deref()
                .map(|pem| encoding(pem).map_err(|e| bad_key("priv-key", e)))
                .transpose()?;
            let decoding = decoding(public).map_err(|e| bad_key("pub-key", e))?;
            Ok::<_, TokenConfigError>((encoding, decoding))
        };
        let (encoding, decoding) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let secret = private.as_deref().ok_or_else(|| {
                    error(format!("{method} needs priv-key=<file with the secret>"))
                })?;
                if secret.is_empty() {
                    return Err(error("the priv-key secret file is empty".into()));
                }
                (
                    Some(EncodingKey::from_secret(secret).map_err(|e| bad_key("priv-key", e))?),
                    DecodingKey::from_secret(secret).map_err(|e| bad_key("priv-key", e))?,
                )
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => pem_pair(EncodingKey::from_rsa_pem, DecodingKey::from_rsa_pem)?,
            Algorithm::ES256 | Algorithm::ES384 => {
                pem_pair(EncodingKey::from_ec_pem, DecodingKey::from_ec_pem)?
            }
            Algorithm::EdDSA => pem_pair(EncodingKey::from_ed_pem, DecodingKey::from_ed_pem)?,
            _ => return Err(error(format!("sign-method {method} is not supported"))),
        };
        let keys = JwtKeys {
            algorithm,
            encoding,
            decoding,
            ttl,
        };
        // A key pair that does not match would issue tokens nobody accepts: find out now.
        if keys.encoding.is_some() {
            let token = keys
                .sign("flotilla-self-check", 1)
                .map_err(|e| error(format!("signing a test token: {e}")))?;
            keys.verify(&token).ok_or_else(|| {
                error("priv-key and pub-key do not match (a test token failed to verify)".into())
            })?;
        }
        Ok(keys)
    }

    pub fn sign(&self, user: &str, revision: u64) -> Result<String, String> {
        let encoding = self
            .encoding
            .as_ref()
            .ok_or("this member has only a public key: it verifies tokens but issues none")?;
        let expires = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.ttl)
            .as_secs();
        let claims = Claims {
            username: user.to_string(),
            revision,
            exp: expires,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, encoding)
            .map_err(|e| e.to_string())
    }

    fn verify(&self, token: &str) -> Option<TokenInfo> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        validation.required_spec_claims = ["exp".to_string()].into_iter().collect();
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        Some(TokenInfo {
            user: data.claims.username,
            revision: Some(data.claims.revision),
        })
    }
}

/// etcd's JWT claims.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// "5m", "300s", "1h", "1500ms" (Go durations, the forms etcd's ttl option is given in).
fn parse_duration(text: &str) -> Option<Duration> {
    let digits_end = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60)?),
        "h" => Duration::from_secs(number.checked_mul(3600)?),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

#[derive(Debug)]
struct SimpleToken {
    user: String,
    last_used: Instant,
}

/// The member's tokens: the simple ones registered by applied Authenticate entries, and
/// the JWT keys.
#[derive(Debug)]
pub struct Tokens {
    kind: TokenKind,
    simple_ttl: Duration,
    simple: Mutex<HashMap<String, SimpleToken>>,
}

impl Tokens {
    pub fn new(kind: TokenKind, simple_ttl: Duration) -> Tokens {
        Tokens {
            kind,
            simple_ttl,
            simple: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_jwt(&self) -> bool {
        matches!(self.kind, TokenKind::Jwt(_))
    }

    /// A random prefix for a simple token (the entry index is appended at apply).
    pub fn simple_prefix() -> String {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let mut rng = rand::rng();
        (0..TOKEN_PREFIX_CHARS)
            .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
            .collect()
    }

    /// A JWT for `user` at auth `revision`.
    pub fn sign_jwt(&self, user: &str, revision: u64) -> Result<String, String> {
        match &self.kind {
            TokenKind::Jwt(keys) => keys.sign(user, revision),
            TokenKind::Simple => Err("this member issues simple tokens".into()),
        }
    }

    /// Whose `token` is, if it is valid here; a simple token's life starts again.
    pub fn lookup(&self, token: &str) -> Option<TokenInfo> {
        if let TokenKind::Jwt(keys) = &self.kind
            && let Some(info) = keys.verify(token)
        {
            return Some(info);
        }
        let mut simple = self.simple.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = simple.get_mut(token)?;
        if now.duration_since(entry.last_used) > self.simple_ttl {
            simple.remove(token);
            return None;
        }
        entry.last_used = now;
        Some(TokenInfo {
            user: entry.user.clone(),
            revision: None,
        })
    }

    /// An applied Authenticate: `token` now belongs to `user`.
    pub fn register(&self, token: String, user: String) {
        let mut simple = self.simple.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if simple.len() >= SIMPLE_TOKENS_MAX {
            let ttl = self.simple_ttl;
            simple.retain(|_, t| now.duration_since(t.last_used) <= ttl);
        }
        if simple.len() >= SIMPLE_TOKENS_MAX
            && let Some(oldest) = simple
                .iter()
                .min_by_key(|(_, t)| t.last_used)
                .map(|(k, _)| k.clone())
        {
            simple.remove(&oldest);
        }
        simple.insert(
            token,
            SimpleToken {
                user,
                last_used: now,
            },
        );
    }

    /// A user was deleted or given a new password: its simple tokens are void. (A JWT stays
    /// valid until it expires or the auth revision moves, which such a change does.)
    pub fn revoke_user(&self, user: &str) {
        let mut simple = self.simple.lock().unwrap_or_else(|p| p.into_inner());
        simple.retain(|_, t| t.user != user);
    }

    /// Auth was disabled: every simple token is void.
    pub fn revoke_all(&self) {
        self.simple
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_expire_after_their_ttl_and_die_with_their_user() {
        let tokens = Tokens::new(TokenKind::Simple, Duration::from_millis(0));
        tokens.register("t.1".into(), "alice".into());
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(tokens.lookup("t.1"), None, "expired");

        let tokens = Tokens::new(TokenKind::Simple, DEFAULT_TOKEN_TTL);
        tokens.register("t.2".into(), "alice".into());
        tokens.register("t.3".into(), "bob".into());
        assert_eq!(tokens.lookup("t.2").unwrap().user, "alice");
        tokens.revoke_user("alice");
        assert_eq!(tokens.lookup("t.2"), None);
        assert_eq!(tokens.lookup("t.3").unwrap().user, "bob");
        assert_eq!(tokens.lookup("nonsense"), None);
    }

    #[test]
    fn a_jwt_carries_user_and_revision_and_a_forged_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"a shared secret for the test").unwrap();
        let kind = TokenKind::parse(&format!(
            "jwt,sign-method=HS256,priv-key={}",
            secret.display()
        ))
        .unwrap();
        let tokens = Tokens::new(kind, DEFAULT_TOKEN_TTL);
        let token = tokens.sign_jwt("alice", 7).unwrap();
        assert_eq!(
            tokens.lookup(&token),
            Some(TokenInfo {
                user: "alice".into(),
                revision: Some(7)
            })
        );
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(tokens.lookup(&forged), None);
    }

    #[test]
    fn bad_token_options_are_refused_with_the_reason() {
        let cases = [
            ("magic", "unknown token type"),
            ("jwt,sign-method", "not key=value"),
            ("jwt,ttl=5m,ttl=6m", "given twice"),
            ("jwt,colour=red", "unknown option"),
            ("jwt,ttl=5m", "sign-method"),
            ("jwt,sign-method=XX1", "unknown sign-method"),
            ("jwt,sign-method=RS256", "needs pub-key"),
            (
                "jwt,sign-method=HS256,priv-key=/nonexistent",
                "reading priv-key",
            ),
        ];
        for (value, expected) in cases {
            let error = TokenKind::parse(value).unwrap_err().to_string();
            assert!(error.contains(expected), "{value}: {error}");
        }
        assert!(matches!(TokenKind::parse("simple"), Ok(TokenKind::Simple)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("5 minutes"), None);
    }
}
