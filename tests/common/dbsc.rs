//! A DBSC client's side, for tests: a device key pair and the proofs it signs.

#![allow(dead_code)]

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use p256::ecdsa::{signature::Signer, Signature, SigningKey};

/// A device key pair: the private half and its public JWK.
pub fn key_pair(seed: u8) -> (SigningKey, String) {
    let signing = SigningKey::from_slice(&[seed; 32]).expect("key");
    let point = signing.verifying_key().to_encoded_point(false);
    let jwk = format!(
        r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(point.x().expect("x")),
        URL_SAFE_NO_PAD.encode(point.y().expect("y"))
    );
    (signing, jwk)
}

/// A DBSC proof: ES256 compact JWS over {"jti", "sub", "iat"}.
pub fn proof(key: &SigningKey, challenge: &str, session_id: &str, iat: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"dbsc+jwt"}"#);
    let payload = URL_SAFE_NO_PAD.encode(format!(
        r#"{{"jti":"{challenge}","sub":"{session_id}","iat":{iat}}}"#
    ));
    let input = format!("{header}.{payload}");
    let signature: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}
