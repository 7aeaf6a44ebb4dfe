//! `Token::parse` accepts exactly one spelling per token: anything accepted
//! re-encodes to the input byte for byte and parses back to the same token.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::domain::Token;

fuzz_target!(|s: &str| {
    if let Ok(t) = Token::parse(s) {
        let wire = t.to_string();
        assert_eq!(wire, s, "accepted a non-canonical spelling");
        let again = Token::parse(&wire).unwrap_or_else(|e| panic!("re-parse failed: {e}"));
        assert_eq!(again, t);
        assert_eq!(again.as_bytes(), t.as_bytes());
        let _ = t.created_unix_ms();
    }
});
