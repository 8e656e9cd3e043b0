//! Passwords are stored as etcd stores them: bcrypt hashes (`$2a$<cost>$...`), so a store
//! moved between etcd and Flotilla keeps working logins. Hashing and checking are slow by
//! design (about 50 ms at the default cost): callers run them off the async runtime.

/// etcd's `--bcrypt-cost` default (Go's bcrypt.DefaultCost).
pub const DEFAULT_BCRYPT_COST: u32 = 10;
/// bcrypt's bounds.
pub const BCRYPT_COST_MIN: u32 = 4;
pub const BCRYPT_COST_MAX: u32 = 31;

/// The bcrypt hash of `password` at `cost`.
pub fn hash(password: &str, cost: u32) -> Result<String, String> {
    bcrypt::hash_with_result(password, cost)
        .map(|parts| parts.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| format!("hashing the password: {e}"))
}

/// Whether `password` matches `hash` (a malformed hash matches nothing).
pub fn matches(password: &str, hash: &[u8]) -> bool {
    std::str::from_utf8(hash)
        .ok()
        .and_then(|hash| bcrypt::verify(password, hash).ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_accepts_its_password_only() {
        let hashed = hash("secret", BCRYPT_COST_MIN).unwrap();
        assert!(hashed.starts_with("$2a$04$"), "{hashed}");
        assert!(matches("secret", hashed.as_bytes()));
        assert!(!matches("Secret", hashed.as_bytes()));
        assert!(!matches("secret", b"not a hash"));
        assert!(!matches("", b""));
    }

    /// A hash made by Go's bcrypt (golang.org/x/crypto/bcrypt, which etcd uses; cost 10,
    /// password "pw") verifies here.
    #[test]
    fn hashes_made_by_go_verify() {
        let go_hash = b"$2a$10$M4K5nePpejeHL23tuokLa.cEj0NO8q6XstnCHj8H3gzekQg3bewAO";
        assert!(matches("pw", go_hash));
        assert!(!matches("pw2", go_hash));
    }
}
