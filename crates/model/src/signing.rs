//! Signatures of control commands: an HMAC-SHA256 of the command's bytes
//! with a shared secret, in the Kafka header [`HEADER`], so that writing to
//! the control topic (ACLs) is not the only lock on running, pausing and
//! stopping maps.
//!
//! The header's value is `t=<unix seconds>,v1=<hex HMAC-SHA256>`; the HMAC
//! is over `<t>.` followed by the record's value (the Avro or JSON command)
//! exactly as sent. Any producer can sign, e.g. for a JSON command:
//! `printf '%s.%s' "$T" "$CMD" | openssl dgst -sha256 -hmac "$KEY"`.
//! The time bounds a replay: a signature older than the configured
//! `max_age_secs` (or more than that ahead of the clock) is refused.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The Kafka header carrying a command's signature.
pub const HEADER: &str = "dualwrite-signature";

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], at: i64, payload: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any size");
    m.update(format!("{at}.").as_bytes());
    m.update(payload);
    m
}

/// The header value signing `payload` at `at` (Unix seconds) with `key`.
pub fn sign(key: &[u8], at: i64, payload: &[u8]) -> String {
    let code = mac(key, at, payload).finalize().into_bytes();
    let hex: String = code.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={at},v1={hex}")
}

/// Checks a command's signature header against the keys (any may match)
/// at `now` (Unix seconds). `Err` says why it is refused.
pub fn verify(
    keys: &[&[u8]],
    header: Option<&[u8]>,
    payload: &[u8],
    now: i64,
    max_age_secs: u64,
) -> Result<(), String> {
    let Some(header) = header else {
        return Err(format!(
            "unsigned command: commands must be signed (header `{HEADER}`), as `dualwrite ctl` does with control.signing_keys"
        ));
    };
    let (at, code) = parse(header).ok_or_else(|| {
        format!(
            "malformed signature header `{HEADER}`: expected t=<unix seconds>,v1=<hex HMAC-SHA256>"
        )
    })?;
    let age = now.saturating_sub(at);
    let max = i64::try_from(max_age_secs).unwrap_or(i64::MAX);
    if age > max || -age > max {
        return Err(format!(
            "signature made at {at} is {age} s from now, outside control.max_age_secs ({max_age_secs}): a replayed or delayed command"
        ));
    }
    if keys
        .iter()
        .any(|k| mac(k, at, payload).verify_slice(&code).is_ok())
    {
        Ok(())
    } else {
        Err("wrong signature: it matches none of the configured signing keys".to_owned())
    }
}

/// `t=<at>,v1=<hex>` into its parts.
fn parse(header: &[u8]) -> Option<(i64, Vec<u8>)> {
    let text = std::str::from_utf8(header).ok()?;
    let (t, v) = text.trim().split_once(',')?;
    let at = t.strip_prefix("t=")?.parse().ok()?;
    let hex = v.strip_prefix("v1=")?;
    if hex.len() != 64 {
        return None;
    }
    let code = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((at, code))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD: &[u8] = b"retired-key-retired-key-retired-";

    #[test]
    fn a_signed_command_verifies_with_either_key() {
        let h = sign(KEY, 1000, b"cmd");
        assert!(h.starts_with("t=1000,v1="), "{h}");
        assert_eq!(verify(&[KEY], Some(h.as_bytes()), b"cmd", 1010, 60), Ok(()));
        assert_eq!(
            verify(&[OLD, KEY], Some(h.as_bytes()), b"cmd", 1010, 60),
            Ok(())
        );
    }

    #[test]
    fn the_openssl_recipe_gives_the_same_signature() {
        // printf '%s.%s' 1000 cmd | openssl dgst -sha256 -hmac 0123456789abcdef0123456789abcdef
        assert_eq!(
            sign(KEY, 1000, b"cmd"),
            "t=1000,v1=a1f528d72c053115b032333cdc952f466d5c9bb1dbbf28d21afad2d03e728ed1"
        );
    }

    #[test]
    fn unsigned_wrong_altered_and_stale_commands_are_refused() {
        let h = sign(KEY, 1000, b"cmd");
        let e = verify(&[KEY], None, b"cmd", 1000, 60).unwrap_err();
        assert!(e.starts_with("unsigned command"), "{e}");
        let e = verify(&[OLD], Some(h.as_bytes()), b"cmd", 1000, 60).unwrap_err();
        assert!(e.starts_with("wrong signature"), "{e}");
        let e = verify(&[KEY], Some(h.as_bytes()), b"cmd2", 1000, 60).unwrap_err();
        assert!(e.starts_with("wrong signature"), "{e}");
        let e = verify(&[KEY], Some(h.as_bytes()), b"cmd", 2000, 60).unwrap_err();
        assert!(e.contains("replayed"), "{e}");
        let e = verify(&[KEY], Some(h.as_bytes()), b"cmd", 100, 60).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        // A signature moved to another time does not match.
        let moved = h.replace("t=1000", "t=1001");
        assert!(verify(&[KEY], Some(moved.as_bytes()), b"cmd", 1001, 60).is_err());
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=zz"] {
            let e = verify(&[KEY], Some(bad.as_bytes()), b"cmd", 1, 60).unwrap_err();
            assert!(e.starts_with("malformed"), "{bad}: {e}");
        }
    }
}
