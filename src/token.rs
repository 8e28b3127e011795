//! Session secrets: generation, the token's wire form, and hashing.
//!
//! This module owns every byte of a secret. Nothing else formats, parses or compares one, and no
//! type here prints a secret through `Debug` or `Display`.
//!
//! A token is `sat_` followed by base64url (no padding) of 52 bytes:
//! `session id (16) || secret (32) || CRC-32 of the first 48 (4, big-endian)`.
//! Carrying the public session id (the "selector") lets a validate find the session with one key
//! lookup; the 256-bit secret (the "verifier") is checked against its stored SHA-256 hash in
//! constant time. The checksum rejects typos and truncation before any lookup. The prefix is not a
//! framework default (no `PHPSESSID`-style fingerprint) and makes leaked tokens easy to scan for.

use std::{fmt, str::FromStr, sync::Mutex};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::clock::Timestamp;

/// What every token starts with.
pub const TOKEN_PREFIX: &str = "sat_";
const ID_LEN: usize = 16;
/// The leading bytes of a session id that hold its creation's millisecond.
const TIME_LEN: usize = 6;
const SECRET_LEN: usize = 32;
const RAW_LEN: usize = ID_LEN + SECRET_LEN + 4;
/// Length of a well-formed token string.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + (RAW_LEN * 4).div_ceil(3);

/// The public handle of a session: its creation's millisecond and 80 random bits. Safe to show
/// and log; useless for authenticating.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId([u8; ID_LEN]);

impl SessionId {
    pub const LEN: usize = ID_LEN;

    pub fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// A byte of the id's random part, to spread ids over shards (its first bytes are the
    /// creation time, the same for every id of a while).
    pub fn spread_byte(&self) -> u8 {
        self.0[ID_LEN - 1]
    }

    /// Reads an id from a store key or record; `None` if the slice has the wrong length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// Why a string is not a session id.
#[derive(Debug, thiserror::Error)]
#[error("must be 32 lowercase hex characters")]
pub struct BadSessionId;

impl FromStr for SessionId {
    type Err = BadSessionId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != ID_LEN * 2 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(BadSessionId);
        }
        let mut out = [0u8; ID_LEN];
        hex::decode_to_slice(s, &mut out).map_err(|_| BadSessionId)?;
        Ok(Self(out))
    }
}

/// A session token as handed to the client. `Debug` and `Display` print a redaction; the text is
/// reachable only through [`SessionToken::expose`], which the gRPC layer calls once, to reply.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl SessionToken {
    /// The token's text, for the one reply that hands it to the caller.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionToken(<redacted>)")
    }
}

/// SHA-256 of a token's secret: what the store keeps instead of the token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Compares in constant time, so response timing says nothing about how much of a guess was
    /// right.
    pub fn matches(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A prefix is enough to correlate in a debugger and reveals nothing useful.
        write!(f, "TokenHash({}…)", hex::encode(&self.0[..4]))
    }
}

/// A token that passed the format and checksum checks. Holds the secret only long enough to hash
/// it.
pub struct ParsedToken {
    pub session_id: SessionId,
    pub hash: TokenHash,
}

impl fmt::Debug for ParsedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedToken")
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

/// Checks a token's shape and checksum and hashes its secret. `None` for anything malformed; the
/// caller must answer it exactly as it answers an unknown token.
pub fn parse(token: &str) -> Option<ParsedToken> {
    if token.len() != TOKEN_LEN {
        return None;
    }
    let body = token.strip_prefix(TOKEN_PREFIX)?;
    let mut raw = [0u8; RAW_LEN];
    let n = URL_SAFE_NO_PAD.decode_slice(body, &mut raw).ok()?;
    if n != RAW_LEN {
        return None;
    }
    let (payload, checksum) = raw.split_at(ID_LEN + SECRET_LEN);
    if crc32fast::hash(payload).to_be_bytes() != checksum {
        return None;
    }
    let (id, secret) = payload.split_at(ID_LEN);
    Some(ParsedToken {
        session_id: SessionId::from_slice(id)?,
        hash: hash_secret(secret),
    })
}

fn hash_secret(secret: &[u8]) -> TokenHash {
    TokenHash(Sha256::digest(secret).into())
}

fn encode(id: &SessionId, secret: &[u8; SECRET_LEN]) -> SessionToken {
    let mut raw = [0u8; RAW_LEN];
    raw[..ID_LEN].copy_from_slice(id.as_bytes());
    raw[ID_LEN..ID_LEN + SECRET_LEN].copy_from_slice(secret);
    let checksum = crc32fast::hash(&raw[..ID_LEN + SECRET_LEN]);
    raw[ID_LEN + SECRET_LEN..].copy_from_slice(&checksum.to_be_bytes());
    let mut text = String::with_capacity(TOKEN_LEN);
    text.push_str(TOKEN_PREFIX);
    URL_SAFE_NO_PAD.encode_string(raw, &mut text);
    SessionToken(text)
}

/// A freshly issued token and the hash that is stored in its place.
pub struct IssuedToken {
    pub token: SessionToken,
    pub hash: TokenHash,
}

/// The one source of randomness for ids and secrets: ChaCha20, seeded from the operating system.
pub struct TokenGenerator {
    rng: Mutex<ChaCha20Rng>,
}

/// The operating system could not provide a seed.
#[derive(Debug, thiserror::Error)]
#[error("cannot seed the session secret generator from the OS: {0}")]
pub struct SeedError(String);

impl TokenGenerator {
    /// Seeds from the OS (getrandom). The only constructor the server uses.
    pub fn from_os() -> Result<Self, SeedError> {
        let rng = ChaCha20Rng::try_from_rng(&mut getrandom::SysRng)
            .map_err(|e| SeedError(e.to_string()))?;
        Ok(Self {
            rng: Mutex::new(rng),
        })
    }

    /// A deterministic generator, for tests that need repeatable ids.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            rng: Mutex::new(ChaCha20Rng::from_seed(seed)),
        }
    }

    fn fill(&self, out: &mut [u8]) {
        // A poisoned lock only means another thread panicked mid-fill; the generator state is
        // still a valid ChaCha20 state, so keep using it.
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        rng.fill_bytes(out);
    }

    /// A new session id: the creation's millisecond (48 bits, big-endian), then 80 random bits.
    ///
    /// The id is the store's key for the session's record, so ids made in time order are appended
    /// at the right edge of sled's tree, whose leaves then fill up and stay cold, instead of
    /// landing in every leaf of a million (a random key costs a page-in on each write and keeps
    /// its leaf's fragments in memory and in the log). The id is public and never authenticates
    /// (the 256-bit secret does); its random part still makes an existing id unguessable.
    pub fn session_id(&self, now: Timestamp) -> SessionId {
        let mut id = [0u8; ID_LEN];
        id[..TIME_LEN].copy_from_slice(&now.as_millis().to_be_bytes()[8 - TIME_LEN..]);
        self.fill(&mut id[TIME_LEN..]);
        SessionId(id)
    }

    /// 128 random bits: the nonce of a device-bound session's refresh challenge.
    pub fn nonce(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        self.fill(&mut raw);
        raw
    }

    /// A new 256-bit secret for the session `id`, as a token and its hash.
    pub fn issue(&self, id: &SessionId) -> IssuedToken {
        let mut secret = [0u8; SECRET_LEN];
        self.fill(&mut secret);
        let issued = IssuedToken {
            token: encode(id, &secret),
            hash: hash_secret(&secret),
        };
        secret.fill(0);
        issued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Timestamp = Timestamp::from_millis(1_700_000_000_000);

    #[test]
    fn issued_token_parses_back_to_its_session_and_hash() {
        let generator = TokenGenerator::from_seed([7; 32]);
        let id = generator.session_id(AT);
        let issued = generator.issue(&id);
        assert_eq!(issued.token.expose().len(), TOKEN_LEN);
        assert!(issued.token.expose().starts_with(TOKEN_PREFIX));
        let parsed = parse(issued.token.expose()).expect("well-formed");
        assert_eq!(parsed.session_id, id);
        assert!(parsed.hash.matches(&issued.hash));
    }

    #[test]
    fn any_single_character_change_is_rejected_by_the_checksum() {
        let generator = TokenGenerator::from_seed([1; 32]);
        let token = generator.issue(&generator.session_id(AT)).token;
        let text = token.expose();
        for i in TOKEN_PREFIX.len()..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).expect("ascii");
            assert!(parse(&changed).is_none(), "position {i} accepted");
        }
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        for bad in [
            "",
            "sat_",
            "PHPSESSID=abc",
            &"x".repeat(TOKEN_LEN),
            "sat_ünïcode",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn debug_never_prints_the_token() {
        let generator = TokenGenerator::from_seed([2; 32]);
        let token = generator.issue(&generator.session_id(AT)).token;
        assert!(!format!("{token:?}").contains(&token.expose()[4..]));
    }

    #[test]
    fn ids_sort_by_their_creation_and_differ_within_a_millisecond() {
        let generator = TokenGenerator::from_seed([5; 32]);
        let ids: Vec<SessionId> = (0..1_000u64)
            .map(|i| generator.session_id(Timestamp::from_millis(1_700_000_000_000 + i / 10)))
            .collect();
        for pair in ids.windows(2) {
            let (a, b) = (pair[0].as_bytes(), pair[1].as_bytes());
            assert_ne!(a, b);
            assert!(a[..TIME_LEN] <= b[..TIME_LEN], "{a:?} then {b:?}");
        }
        assert!(ids[9] < ids[10], "a later millisecond sorts after");
        // The random part: no two of the same millisecond share it, and its bytes vary.
        let tails: std::collections::HashSet<_> = ids
            .iter()
            .map(|id| id.as_bytes()[TIME_LEN..].to_vec())
            .collect();
        assert_eq!(tails.len(), ids.len());
        let last_bytes: std::collections::HashSet<u8> =
            ids.iter().map(|id| id.as_bytes()[ID_LEN - 1]).collect();
        assert!(
            last_bytes.len() > 200,
            "{} distinct last bytes",
            last_bytes.len()
        );
    }

    #[test]
    fn os_seeded_generators_differ() {
        let a = TokenGenerator::from_os().expect("seed");
        let b = TokenGenerator::from_os().expect("seed");
        assert_ne!(a.session_id(AT), b.session_id(AT));
    }

    proptest::proptest! {
        /// Parsing never panics, whatever the input, and accepts only well-formed tokens.
        #[test]
        fn parse_never_panics_and_accepts_only_well_formed_tokens(s in ".{0,100}") {
            if let Some(parsed) = parse(&s) {
                proptest::prop_assert!(s.starts_with(TOKEN_PREFIX) && s.len() == TOKEN_LEN);
                let _ = parsed.session_id;
            }
        }

        /// Near-misses of a real token (one byte changed anywhere) never parse.
        #[test]
        fn mutated_tokens_are_rejected(seed in proptest::array::uniform32(0u8..), pos in 0usize..TOKEN_LEN, byte in 0x21u8..0x7f) {
            let generator = TokenGenerator::from_seed(seed);
            let token = generator.issue(&generator.session_id(AT)).token;
            let mut bytes = token.expose().as_bytes().to_vec();
            proptest::prop_assume!(bytes[pos] != byte);
            bytes[pos] = byte;
            let mutated = String::from_utf8(bytes).expect("ascii");
            proptest::prop_assert!(parse(&mutated).is_none());
        }

        #[test]
        fn session_id_parsing_never_panics(s in ".{0,40}") {
            let _ = s.parse::<SessionId>();
        }
    }

    #[test]
    fn session_id_round_trips_through_text() {
        let id = TokenGenerator::from_seed([3; 32]).session_id(AT);
        assert_eq!(id.to_string().parse::<SessionId>().ok(), Some(id));
        assert!("ABCDEF0123456789abcdef0123456789"
            .parse::<SessionId>()
            .is_err());
        assert!("abc".parse::<SessionId>().is_err());
    }
}
