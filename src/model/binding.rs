//! Device-bound sessions, after Chrome's Device Bound Session Credentials (DBSC): a session
//! registered with the public half of a key the client keeps (ideally in a TPM) gets short-lived
//! tokens, and a new one only against a proof signed with the private half. A stolen token then
//! dies within the tenant's `bound_token_ttl`, and the thief cannot refresh it.
//!
//! Here: the key (a JWK, EC P-256, checked to be a point on the curve), the challenges, and the
//! proof (a compact JWS, ES256 over `header.payload`, RFC 7518 section 3.4). `ring` verifies
//! signatures (its assembly P-256 is several times faster than RustCrypto's here); RustCrypto's
//! `p256` checks that a registered key is a point on the curve; `hmac` seals challenges. Nothing
//! here is hand-written cryptography. Pure: no I/O, no clock.
//!
//! A challenge is sealed rather than stored: a random nonce, its expiry and the session's refresh
//! generation (its rotation count when the challenge was made), with an HMAC over them and the
//! session id under a key derived from the installation's secret. Handing one out writes nothing
//! (any replica can, at the cost of a read), and one made for another session or altered is
//! refused. Single use follows from the generation: a refresh requires the session's current one
//! and moves it on, in the same atomic write that renews the token, so every challenge made
//! before is dead. No list of used challenges, no limit on how often a device refreshes, and no
//! clock between replicas to agree on.
//!
//! Challenges sealed before the generation was (75 characters, no generation) still open until
//! they expire; those alone are made single use by the list of consumed nonces the session keeps.

use std::time::Duration;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use p256::ecdsa::VerifyingKey;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::clock::Timestamp;

/// How long a challenge may be answered.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);
/// How far a proof's `iat` may be from the server's clock.
pub const MAX_IAT_SKEW: Duration = Duration::from_secs(60);
/// Challenges without a generation (sealed by an earlier version) consumed and remembered per
/// session until they expire: more refreshes with such challenges than this are refused.
pub const MAX_USED_CHALLENGES: usize = 32;
/// Longest JWK accepted, in bytes.
pub const MAX_JWK_BYTES: usize = 1024;
/// Longest proof accepted, in bytes.
pub const MAX_PROOF_BYTES: usize = 4096;

/// A session's binding: its device's key, when its current token was issued and when it stops
/// validating (`bound_token_ttl` later, or sooner if the policy tightens), and the challenges
/// refreshes consumed that have not expired yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub key: BindingKey,
    pub token_issued_at: Timestamp,
    pub token_expires_at: Timestamp,
    pub used: Vec<Challenge>,
}

/// A challenge: its nonce, when it stops being answerable, and the session's refresh generation
/// it answers for (`None`: sealed before generations, single use by the session's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: [u8; 16],
    pub expires_at: Timestamp,
    pub generation: Option<u32>,
}

type HmacSha256 = Hmac<Sha256>;

/// Seals and opens challenges: an HMAC key derived from the installation's secret, so every
/// replica of one deployment agrees and no other deployment's challenge opens.
#[derive(Clone)]
pub struct ChallengeSeal {
    key: [u8; 32],
}

impl ChallengeSeal {
    pub fn new(installation_secret: &[u8; 32]) -> Self {
        let key = Sha256::new()
            .chain_update(b"session-authority dbsc challenge key\0")
            .chain_update(installation_secret)
            .finalize()
            .into();
        Self { key }
    }

    fn mac(
        &self,
        session_id: &str,
        expires_at: Timestamp,
        generation: Option<u32>,
        nonce: &[u8; 16],
    ) -> HmacSha256 {
        // A 32-byte key is always a valid HMAC key.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(session_id.as_bytes());
        mac.update(&expires_at.as_millis().to_be_bytes());
        if let Some(generation) = generation {
            // After the fixed-length expiry, so no legacy input can equal this one.
            mac.update(b"\0generation");
            mac.update(&generation.to_be_bytes());
        }
        mac.update(nonce);
        mac
    }

    /// The text of `challenge` for `session_id`: base64url of expiry, generation, nonce and MAC
    /// (80 characters; 75 for one without a generation).
    pub fn seal(&self, session_id: &str, challenge: &Challenge) -> String {
        let tag = self
            .mac(
                session_id,
                challenge.expires_at,
                challenge.generation,
                &challenge.nonce,
            )
            .finalize()
            .into_bytes();
        let mut raw = Vec::with_capacity(60);
        raw.extend_from_slice(&challenge.expires_at.as_millis().to_be_bytes());
        if let Some(generation) = challenge.generation {
            raw.extend_from_slice(&generation.to_be_bytes());
        }
        raw.extend_from_slice(&challenge.nonce);
        raw.extend_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The challenge `text` seals, if it was sealed here for `session_id` (expiry not checked).
    pub fn open(&self, session_id: &str, text: &str) -> Option<Challenge> {
        let with_generation = match text.len() {
            80 => true,
            75 => false,
            _ => return None,
        };
        let raw = URL_SAFE_NO_PAD.decode(text).ok()?;
        let (expires, mut rest) = raw.split_first_chunk::<8>()?;
        let mut generation = None;
        if with_generation {
            let (g, after) = rest.split_first_chunk::<4>()?;
            generation = Some(u32::from_be_bytes(*g));
            rest = after;
        }
        let (nonce, tag) = rest.split_first_chunk::<16>()?;
        let expires_at = Timestamp::from_millis(u64::from_be_bytes(*expires));
        // Constant-time comparison of the tag.
        self.mac(session_id, expires_at, generation, nonce)
            .verify_slice(tag)
            .ok()?;
        Some(Challenge {
            nonce: *nonce,
            expires_at,
            generation,
        })
    }
}

/// A P-256 public key, as the SEC1 uncompressed point `04 || x || y`, known to be on the curve.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BindingKey([u8; 65]);

impl std::fmt::Debug for BindingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BindingKey({}…)", hex::encode(&self.0[1..9]))
    }
}

/// Why a JWK was refused: the message for INVALID_ARGUMENT on `binding_key`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadKey(&'static str);

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    crv: String,
    x: String,
    y: String,
    /// A private key must never be sent; refusing it keeps a careless client from doing so twice.
    d: Option<serde::de::IgnoredAny>,
}

/// A coordinate: base64url without padding of exactly 32 bytes, in its one canonical spelling.
fn coordinate(text: &str) -> Result<[u8; 32], BadKey> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| BadKey("x and y must be base64url without padding"))?;
    bytes
        .try_into()
        .map_err(|_| BadKey("x and y must be 32 bytes each (P-256)"))
}

impl BindingKey {
    /// A public key from its JWK (RFC 7517/7518: `{"kty":"EC","crv":"P-256","x":..,"y":..}`).
    pub fn from_jwk(jwk: &str) -> Result<Self, BadKey> {
        if jwk.len() > MAX_JWK_BYTES {
            return Err(BadKey("must be at most 1024 bytes"));
        }
        let jwk: Jwk = serde_json::from_str(jwk)
            .map_err(|_| BadKey("must be a JSON JWK with kty, crv, x and y"))?;
        if jwk.kty != "EC" || jwk.crv != "P-256" {
            return Err(BadKey(
                "must be an EC P-256 key (kty \"EC\", crv \"P-256\")",
            ));
        }
        if jwk.d.is_some() {
            return Err(BadKey(
                "must be the public key only: it holds a private key (d)",
            ));
        }
        let mut point = [0u8; 65];
        point[0] = 4;
        point[1..33].copy_from_slice(&coordinate(&jwk.x)?);
        point[33..].copy_from_slice(&coordinate(&jwk.y)?);
        Self::from_sec1(&point).ok_or(BadKey("is not a point on the P-256 curve"))
    }

    /// From the stored form; `None` if it is not a point on the curve.
    pub fn from_sec1(bytes: &[u8]) -> Option<Self> {
        let key = Self::from_stored(bytes)?;
        VerifyingKey::from_sec1_bytes(&key.0).ok()?;
        Some(key)
    }

    /// From a store's record, checked on the curve when it was registered: only its shape is
    /// checked here, because every read of a bound session decodes it (a curve check costs more
    /// than the rest of a validation). A corrupted point still verifies no proof.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        let point: [u8; 65] = bytes.try_into().ok()?;
        (point[0] == 4).then_some(Self(point))
    }

    pub fn as_sec1(&self) -> &[u8; 65] {
        &self.0
    }

    /// The key as a JWK, for display.
    pub fn to_jwk(&self) -> String {
        format!(
            r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(&self.0[1..33]),
            URL_SAFE_NO_PAD.encode(&self.0[33..])
        )
    }
}

/// What a proof claims, once its signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The challenge it answers.
    pub jti: String,
    /// The session it is for.
    pub sub: String,
    /// When it was signed, in Unix seconds.
    pub iat: i64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    typ: String,
}

#[derive(Deserialize)]
struct Claims {
    jti: String,
    sub: String,
    iat: i64,
}

/// A proof that failed; deliberately without detail (the caller is told nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadProof;

/// Checks a compact JWS proof's form and its ES256 signature under `key`, and returns its
/// claims. Whether the claims fit (the challenge, the session, the time) is the caller's to
/// check.
pub fn verify_proof(key: &BindingKey, proof: &str) -> Result<Proof, BadProof> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(BadProof);
    }
    let mut parts = proof.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadProof);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| BadProof);
    let header: Header = serde_json::from_slice(&decode(header)?).map_err(|_| BadProof)?;
    if header.alg != "ES256" || header.typ != "dbsc+jwt" {
        return Err(BadProof);
    }
    // Raw r || s, 64 bytes (RFC 7518 section 3.4), not DER: ring's FIXED encoding.
    let signature = decode(signature)?;
    if signature.len() != 64 {
        return Err(BadProof);
    }
    let signed = &proof[..proof.len() - parts_len_of_signature(proof)];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.0[..])
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| BadProof)?;
    let claims: Claims = serde_json::from_slice(&decode(payload)?).map_err(|_| BadProof)?;
    Ok(Proof {
        jti: claims.jti,
        sub: claims.sub,
        iat: claims.iat,
    })
}

/// The length of `.signature` at the end of a three-part JWS.
fn parts_len_of_signature(proof: &str) -> usize {
    proof.rfind('.').map_or(0, |dot| proof.len() - dot)
}

/// Whether `iat` (Unix seconds) is within [`MAX_IAT_SKEW`] of `now`.
pub fn iat_is_fresh(iat: i64, now: Timestamp) -> bool {
    let now_secs = i64::try_from(now.as_millis() / 1000).unwrap_or(i64::MAX);
    let skew = i64::try_from(MAX_IAT_SKEW.as_secs()).unwrap_or(i64::MAX);
    now_secs.abs_diff(iat) <= skew.unsigned_abs()
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::{signature::Signer, Signature, SigningKey};
    use proptest::prelude::*;

    use super::*;

    fn key_pair(seed: u8) -> (SigningKey, String) {
        let signing = SigningKey::from_slice(&[seed.max(1); 32]).expect("key");
        let point = signing.verifying_key().to_encoded_point(false);
        let jwk = format!(
            r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(point.x().expect("x")),
            URL_SAFE_NO_PAD.encode(point.y().expect("y"))
        );
        (signing, jwk)
    }

    fn sign(signing: &SigningKey, header: &str, payload: &str) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature: Signature = signing.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    const HEADER: &str = r#"{"alg":"ES256","typ":"dbsc+jwt"}"#;
    const PAYLOAD: &str =
        r#"{"jti":"challenge","sub":"0123456789abcdef0123456789abcdef","iat":1767225600}"#;

    #[test]
    fn a_proof_signed_by_the_registered_key_verifies_and_others_do_not() {
        let (signing, jwk) = key_pair(7);
        let key = BindingKey::from_jwk(&jwk).expect("jwk");
        assert_eq!(BindingKey::from_jwk(&key.to_jwk()), Ok(key));
        let proof = verify_proof(&key, &sign(&signing, HEADER, PAYLOAD)).expect("valid");
        assert_eq!(proof.jti, "challenge");
        assert_eq!(proof.iat, 1_767_225_600);
        let (other, _) = key_pair(8);
        assert_eq!(
            verify_proof(&key, &sign(&other, HEADER, PAYLOAD)),
            Err(BadProof)
        );
        for header in [
            r#"{"alg":"none","typ":"dbsc+jwt"}"#,
            r#"{"alg":"ES256","typ":"JWT"}"#,
            r#"{"alg":"HS256","typ":"dbsc+jwt"}"#,
        ] {
            assert_eq!(
                verify_proof(&key, &sign(&signing, header, PAYLOAD)),
                Err(BadProof)
            );
        }
        assert!(iat_is_fresh(100, Timestamp::from_millis(160_000)));
        assert!(!iat_is_fresh(100, Timestamp::from_millis(161_000)));
        assert!(!iat_is_fresh(i64::MIN, Timestamp::from_millis(0)));
    }

    #[test]
    fn keys_that_are_not_public_p256_points_are_refused() {
        let (_, jwk) = key_pair(3);
        let private = jwk.replace('}', r#","d":"AAAA"}"#);
        assert!(BindingKey::from_jwk(&private).is_err());
        assert!(BindingKey::from_jwk(&jwk.replace("P-256", "P-384")).is_err());
        assert!(BindingKey::from_jwk(r#"{"kty":"RSA","n":"AQAB","e":"AQAB"}"#).is_err());
        assert!(BindingKey::from_jwk("").is_err());
    }

    #[test]
    fn a_sealed_challenge_opens_only_for_its_session_and_unaltered() {
        let seal = ChallengeSeal::new(&[1; 32]);
        // With a generation, and without (sealed by an earlier version).
        for (generation, len) in [(Some(3), 80), (None, 75)] {
            let c = Challenge {
                nonce: [7; 16],
                expires_at: Timestamp::from_millis(123_456),
                generation,
            };
            let text = seal.seal("s1", &c);
            assert_eq!(text.len(), len);
            assert_eq!(seal.open("s1", &text), Some(c));
            assert_eq!(seal.open("s2", &text), None, "another session's");
            assert_eq!(ChallengeSeal::new(&[2; 32]).open("s1", &text), None);
            for i in 0..text.len() {
                let mut bytes = text.clone().into_bytes();
                bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
                let altered = String::from_utf8(bytes).expect("ascii");
                assert_eq!(seal.open("s1", &altered), None, "{altered}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn jwk_parsing_never_panics(text in ".{0,300}") {
            let _ = BindingKey::from_jwk(&text);
        }

        #[test]
        fn proof_parsing_never_panics(text in "[A-Za-z0-9_.-]{0,400}") {
            let (_, jwk) = key_pair(5);
            let key = BindingKey::from_jwk(&jwk).expect("jwk");
            let _ = verify_proof(&key, &text);
        }

        #[test]
        fn every_one_byte_mutation_of_a_jwk_is_refused(seed in 1u8..255, at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let (_, jwk) = key_pair(seed);
            let mut bytes = jwk.into_bytes();
            let i = at.index(bytes.len());
            prop_assume!(bytes[i] != to);
            bytes[i] = to;
            if let Ok(mutated) = String::from_utf8(bytes) {
                prop_assert!(BindingKey::from_jwk(&mutated).is_err(), "{mutated}");
            }
        }

        #[test]
        fn every_one_byte_mutation_of_a_proof_is_refused(seed in 1u8..255, at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let (signing, jwk) = key_pair(seed);
            let key = BindingKey::from_jwk(&jwk).expect("jwk");
            let mut bytes = sign(&signing, HEADER, PAYLOAD).into_bytes();
            let i = at.index(bytes.len());
            prop_assume!(bytes[i] != to);
            bytes[i] = to;
            if let Ok(mutated) = String::from_utf8(bytes) {
                prop_assert_eq!(verify_proof(&key, &mutated), Err(BadProof));
            }
        }
    }

    #[test]
    fn every_one_byte_mutation_is_refused_exhaustively() {
        let (signing, jwk) = key_pair(11);
        let key = BindingKey::from_jwk(&jwk).expect("jwk");
        let proof = sign(&signing, HEADER, PAYLOAD);
        for (text, is_proof) in [(jwk.as_str(), false), (proof.as_str(), true)] {
            for i in 0..text.len() {
                for to in [b'A', b'_', b'.', b'"'] {
                    let mut bytes = text.as_bytes().to_vec();
                    if bytes[i] == to {
                        continue;
                    }
                    bytes[i] = to;
                    let mutated = String::from_utf8(bytes).expect("ascii");
                    if is_proof {
                        assert_eq!(verify_proof(&key, &mutated), Err(BadProof), "{mutated}");
                    } else {
                        assert!(BindingKey::from_jwk(&mutated).is_err(), "{mutated}");
                    }
                }
            }
        }
    }
}
