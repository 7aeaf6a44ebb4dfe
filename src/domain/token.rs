//! Generates and parses the opaque tokens handed out in place of card numbers.

use std::fmt;

/// Every token's wire form starts with this, so a token can never be mistaken
/// for (or accepted as) an all-digit card number.
pub const TOKEN_PREFIX: &str = "tok_";

const TIME_LEN: usize = 6;
const RANDOM_LEN: usize = 16;
const TOKEN_LEN: usize = TIME_LEN + RANDOM_LEN;
/// Largest timestamp the 6-byte prefix can hold (about the year 10889).
const MAX_TIME_MS: u64 = (1 << (8 * TIME_LEN)) - 1;
/// Checked before decoding to bound work on hostile input; a real token is at
/// most 34 characters.
const MAX_WIRE_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("operating system random number generator failed: {0}")]
    Rng(getrandom::Error),
    /// Deliberately does not echo the input: a caller may have pasted a card
    /// number where a token belongs.
    #[error("token is malformed: expected tok_ followed by base58")]
    Malformed,
}

/// A 22-byte token: 6-byte big-endian UNIX millisecond timestamp, then 16
/// bytes (128 bits) from the OS CSPRNG.
///
/// The time prefix keeps inserts into the storage B-tree append-friendly; the
/// random part makes tokens unguessable. Nothing is derived from the PAN, so a
/// token reveals nothing about it and tokens are not secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token([u8; TOKEN_LEN]);

impl Token {
    /// Creates a fresh token stamped with `now_unix_ms`.
    ///
    /// Times beyond the 48-bit range saturate rather than wrap, so ordering by
    /// time never goes backwards.
    pub fn generate(now_unix_ms: u64) -> Result<Token, TokenError> {
        let mut bytes = [0u8; TOKEN_LEN];
        let time = now_unix_ms.min(MAX_TIME_MS).to_be_bytes();
        bytes[..TIME_LEN].copy_from_slice(&time[8 - TIME_LEN..]);
        getrandom::fill(&mut bytes[TIME_LEN..]).map_err(TokenError::Rng)?;
        Ok(Token(bytes))
    }

    /// Parses the wire form strictly: exactly one encoding is accepted per
    /// token, so tokens can be compared and used as keys as strings.
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        if s.len() > MAX_WIRE_LEN {
            return Err(TokenError::Malformed);
        }
        let body = s.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Malformed)?;
        // Decoded on the stack: this runs on every call. Requiring exactly
        // TOKEN_LEN bytes is what makes the spelling unique. Base58 maps a
        // string to its leading '1's (one zero byte each) followed by the
        // minimal big-endian bytes of the number the other digits spell,
        // which never start with a zero byte; so the decoded bytes give back
        // the count of '1's and the number, hence the string. No second
        // spelling of a token (an extra leading '1', say) decodes to the same
        // TOKEN_LEN bytes. `canonical_spelling_is_the_only_one` checks this.
        let mut decoded = [0u8; MAX_WIRE_LEN];
        let n = bs58::decode(body)
            .onto(&mut decoded[..])
            .map_err(|_| TokenError::Malformed)?;
        let bytes: [u8; TOKEN_LEN] = decoded[..n].try_into().map_err(|_| TokenError::Malformed)?;
        Ok(Token(bytes))
    }

    pub fn from_bytes(b: [u8; TOKEN_LEN]) -> Token {
        Token(b)
    }

    pub fn as_bytes(&self) -> &[u8; TOKEN_LEN] {
        &self.0
    }

    /// The millisecond timestamp the token was generated with.
    pub fn created_unix_ms(&self) -> u64 {
        let mut time = [0u8; 8];
        time[8 - TIME_LEN..].copy_from_slice(&self.0[..TIME_LEN]);
        u64::from_be_bytes(time)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}", bs58::encode(self.0).into_string())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({self})")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000_123;

    fn wire(bytes: &[u8]) -> String {
        format!("{TOKEN_PREFIX}{}", bs58::encode(bytes).into_string())
    }

    #[test]
    fn generate_parse_round_trip() {
        let t = Token::generate(NOW).unwrap();
        let s = t.to_string();
        assert!(s.starts_with(TOKEN_PREFIX));
        assert!(s.len() <= TOKEN_PREFIX.len() + 30);
        assert_eq!(Token::parse(&s).unwrap(), t);
        assert_eq!(format!("{t:?}"), format!("Token({s})"));
    }

    #[test]
    fn generated_tokens_differ() {
        let a = Token::generate(NOW).unwrap();
        let b = Token::generate(NOW).unwrap();
        assert_ne!(a, b);
        assert_ne!(a.as_bytes()[TIME_LEN..], b.as_bytes()[TIME_LEN..]);
    }

    /// REQUIREMENTS 1 (PCI DSS 3.5.1): a million tokens, as one card
    /// tokenized a million times would get, are all distinct and their
    /// random bytes show no pattern. (Nothing of the card can be in them:
    /// `generate` is never given it.) Each of the 16 byte positions, and
    /// all of them together, must pass a chi-square test against uniform
    /// bytes; 400 on 255 degrees of freedom fails a fair source about once
    /// in 10^9 runs.
    #[test]
    fn a_million_tokens_are_distinct_and_uniformly_random() {
        const N: usize = 1_000_000;
        let mut seen = std::collections::HashSet::with_capacity(N);
        let mut counts = [[0u32; 256]; RANDOM_LEN];
        for _ in 0..N {
            let t = Token::generate(NOW).unwrap();
            let random: [u8; RANDOM_LEN] = t.as_bytes()[TIME_LEN..].try_into().unwrap();
            for (pos, b) in random.iter().enumerate() {
                counts[pos][usize::from(*b)] += 1;
            }
            assert!(seen.insert(random), "a random part repeated");
        }
        let chi2 = |c: &[u32; 256], n: f64| {
            let e = n / 256.0;
            c.iter()
                .map(|&o| (f64::from(o) - e).powi(2) / e)
                .sum::<f64>()
        };
        let mut all = [0u32; 256];
        for (pos, c) in counts.iter().enumerate() {
            let x = chi2(c, N as f64);
            assert!(x < 400.0, "byte {pos}: chi-square {x:.0}");
            for (a, v) in all.iter_mut().zip(c) {
                *a += v;
            }
        }
        let x = chi2(&all, (N * counts.len()) as f64);
        assert!(x < 400.0, "all bytes: chi-square {x:.0}");
    }

    #[test]
    fn tokens_never_look_like_card_numbers() {
        for _ in 0..100 {
            let s = Token::generate(NOW).unwrap().to_string();
            assert!(!s.chars().all(|c| c.is_ascii_digit()));
        }
        // All-digit strings, however long, never parse as tokens.
        for s in ["4111111111111111", "1234567890123456789", "0"] {
            assert_eq!(Token::parse(s), Err(TokenError::Malformed));
        }
    }

    #[test]
    fn parse_rejects_malformed() {
        let good = Token::generate(NOW).unwrap().to_string();
        let body = &good[TOKEN_PREFIX.len()..];
        let mut bad = vec![
            String::new(),
            TOKEN_PREFIX.to_string(),
            body.to_string(),
            format!("TOK_{body}"),
            format!("tok-{body}"),
            format!(" {good}"),
            format!("{good} "),
            format!("{good}\n"),
            wire(&[7u8; 21]),
            wire(&[7u8; 23]),
            // Leading '1' decodes to an extra zero byte: padding trick.
            format!("{TOKEN_PREFIX}1{body}"),
            "x".repeat(1000),
            format!("{TOKEN_PREFIX}{}", "2".repeat(996)),
        ];
        for c in ['0', 'O', 'I', 'l', '+', '/', 'é'] {
            let mut chars: Vec<char> = body.chars().collect();
            chars[3] = c;
            bad.push(format!(
                "{TOKEN_PREFIX}{}",
                chars.into_iter().collect::<String>()
            ));
        }
        for s in bad {
            let err = Token::parse(&s).unwrap_err();
            assert_eq!(err, TokenError::Malformed, "{s:?}");
            assert_eq!(
                err.to_string(),
                "token is malformed: expected tok_ followed by base58"
            );
        }
    }

    #[test]
    fn leading_zero_bytes_are_canonical() {
        let t = Token::from_bytes([0u8; TOKEN_LEN]);
        let s = t.to_string();
        assert_eq!(s, format!("{TOKEN_PREFIX}{}", "1".repeat(TOKEN_LEN)));
        assert_eq!(Token::parse(&s).unwrap(), t);
        // One '1' too many or too few changes the decoded length.
        assert!(Token::parse(&format!("{s}1")).is_err());
        assert!(Token::parse(&s[..s.len() - 1]).is_err());
    }

    #[test]
    fn timestamp_round_trip() {
        for ms in [0, 1, NOW, MAX_TIME_MS] {
            assert_eq!(Token::generate(ms).unwrap().created_unix_ms(), ms);
        }
        assert_eq!(
            Token::generate(u64::MAX).unwrap().created_unix_ms(),
            MAX_TIME_MS
        );
        let t = Token::generate(NOW).unwrap();
        assert_eq!(Token::parse(&t.to_string()).unwrap().created_unix_ms(), NOW);
    }

    #[test]
    fn tokens_sort_by_creation_time() {
        let tokens: Vec<Token> = (0..50).map(|i| Token::generate(NOW + i).unwrap()).collect();
        assert!(tokens.windows(2).all(|w| w[0] < w[1]));
        assert!(tokens.windows(2).all(|w| w[0].as_bytes() < w[1].as_bytes()));
    }

    #[test]
    fn bytes_round_trip() {
        let b = [42u8; TOKEN_LEN];
        assert_eq!(Token::from_bytes(b).as_bytes(), &b);
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = Token::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_tokenish_input(
            s in "tok_[1-9A-HJ-NP-Za-km-z0OIl]{0,40}"
        ) {
            if let Ok(t) = Token::parse(&s) {
                prop_assert_eq!(t.to_string(), s);
            }
        }

        /// Bodies of 24 to 34 characters around a token's 29 to 30, many of
        /// which decode to exactly TOKEN_LEN bytes, with runs of leading
        /// '1's (zero bytes): whatever parses must be the one spelling
        /// `Display` gives those bytes.
        #[test]
        fn canonical_spelling_is_the_only_one(
            ones in 0usize..4,
            rest in "[1-9A-HJ-NP-Za-km-z]{24,31}",
        ) {
            let s = format!("{TOKEN_PREFIX}{}{rest}", "1".repeat(ones));
            if let Ok(t) = Token::parse(&s) {
                prop_assert_eq!(t.to_string(), s);
            }
        }

        #[test]
        fn any_bytes_round_trip(b in any::<[u8; 22]>()) {
            let t = Token::from_bytes(b);
            let parsed = Token::parse(&t.to_string()).unwrap();
            prop_assert_eq!(parsed, t);
            prop_assert_eq!(parsed.as_bytes(), &b);
        }
    }
}
