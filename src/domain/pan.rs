//! Validates a primary account number (PAN) and keeps it in memory that is wiped on drop.

use std::fmt;

use zeroize::Zeroizing;

/// Bound on raw input, checked before any scanning so hostile callers cannot make
/// us walk (or allocate for) megabytes of text. Generous enough for 19 digits
/// with a separator between every pair.
const MAX_INPUT_LEN: usize = 64;
const MIN_DIGITS: usize = 12;
const MAX_DIGITS: usize = 19;

/// Why a card number was rejected.
///
/// Messages name the rule that was broken and never echo input digits, so an
/// error can be logged or returned to a client without leaking cardholder data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PanError {
    #[error("card number is empty")]
    Empty,
    #[error("card number input is too long (more than {MAX_INPUT_LEN} characters)")]
    TooLong,
    #[error("card number must be {MIN_DIGITS} to {MAX_DIGITS} digits (got {len})")]
    Length { len: usize },
    #[error("card number may contain only digits, spaces and hyphens")]
    NonDigit,
    #[error("card number fails the Luhn checksum")]
    Checksum,
}

impl PanError {
    /// Stable short code for metrics and API error details; unlike the message
    /// text, clients may match on it.
    pub fn rule(&self) -> &'static str {
        match self {
            PanError::Empty => "empty",
            PanError::TooLong | PanError::Length { .. } => "length",
            PanError::NonDigit => "non_digit",
            PanError::Checksum => "checksum",
        }
    }
}

/// Card network, inferred from the issuer identification number (IIN) prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CardBrand {
    Unknown,
    Visa,
    Mastercard,
    Amex,
    Discover,
    Jcb,
    DinersClub,
    UnionPay,
    Maestro,
}

impl CardBrand {
    /// Stable identifier used in storage and on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            CardBrand::Unknown => "unknown",
            CardBrand::Visa => "visa",
            CardBrand::Mastercard => "mastercard",
            CardBrand::Amex => "amex",
            CardBrand::Discover => "discover",
            CardBrand::Jcb => "jcb",
            CardBrand::DinersClub => "diners_club",
            CardBrand::UnionPay => "unionpay",
            CardBrand::Maestro => "maestro",
        }
    }

    /// Inverse of [`CardBrand::as_str`].
    pub fn from_str_opt(s: &str) -> Option<CardBrand> {
        Some(match s {
            "unknown" => CardBrand::Unknown,
            "visa" => CardBrand::Visa,
            "mastercard" => CardBrand::Mastercard,
            "amex" => CardBrand::Amex,
            "discover" => CardBrand::Discover,
            "jcb" => CardBrand::Jcb,
            "diners_club" => CardBrand::DinersClub,
            "unionpay" => CardBrand::UnionPay,
            "maestro" => CardBrand::Maestro,
            _ => return None,
        })
    }

    /// Brand for a string of ASCII digits, judged by IIN prefix alone.
    ///
    /// Length is deliberately ignored: networks keep extending their allowed
    /// lengths, and a stale length rule would mislabel valid cards. The brand
    /// is informational, so a wrong-length card of a known prefix is still
    /// labelled with that brand.
    fn detect(digits: &str) -> CardBrand {
        BRAND_TABLE
            .iter()
            .find(|entry| entry.matches(digits))
            .map_or(CardBrand::Unknown, |entry| entry.brand)
    }
}

/// One IIN range: the first `digits` digits of the PAN, read as a number, lie in `lo..=hi`.
struct IinRange {
    digits: usize,
    lo: u32,
    hi: u32,
    brand: CardBrand,
}

impl IinRange {
    fn matches(&self, pan_digits: &str) -> bool {
        pan_digits
            .get(..self.digits)
            .and_then(|prefix| prefix.parse::<u32>().ok())
            .is_some_and(|p| (self.lo..=self.hi).contains(&p))
    }
}

const fn iin(digits: usize, lo: u32, hi: u32, brand: CardBrand) -> IinRange {
    IinRange {
        digits,
        lo,
        hi,
        brand,
    }
}

/// Ordered longest prefix first, so that a specific range carved out of a
/// broader one (Discover's 622126–622925 inside UnionPay's 62) wins. The first
/// match is taken; a test asserts the ordering.
static BRAND_TABLE: &[IinRange] = &[
    // 6 digits
    iin(6, 622_126, 622_925, CardBrand::Discover),
    // 4 digits
    iin(4, 2221, 2720, CardBrand::Mastercard),
    iin(4, 6011, 6011, CardBrand::Discover),
    iin(4, 3528, 3589, CardBrand::Jcb),
    iin(4, 3095, 3095, CardBrand::DinersClub),
    iin(4, 5018, 5018, CardBrand::Maestro),
    iin(4, 5020, 5020, CardBrand::Maestro),
    iin(4, 5038, 5038, CardBrand::Maestro),
    iin(4, 5893, 5893, CardBrand::Maestro),
    iin(4, 6304, 6304, CardBrand::Maestro),
    iin(4, 6759, 6759, CardBrand::Maestro),
    iin(4, 6761, 6763, CardBrand::Maestro),
    // 3 digits
    iin(3, 644, 649, CardBrand::Discover),
    iin(3, 300, 305, CardBrand::DinersClub),
    // 2 digits
    iin(2, 51, 55, CardBrand::Mastercard),
    iin(2, 34, 34, CardBrand::Amex),
    iin(2, 37, 37, CardBrand::Amex),
    iin(2, 65, 65, CardBrand::Discover),
    iin(2, 36, 36, CardBrand::DinersClub),
    iin(2, 38, 39, CardBrand::DinersClub),
    iin(2, 62, 62, CardBrand::UnionPay),
    iin(2, 81, 81, CardBrand::UnionPay),
    // 1 digit
    iin(1, 4, 4, CardBrand::Visa),
];

/// Luhn (mod 10) check over ASCII digits. Returns false for anything that is
/// not an ASCII digit, so callers need not pre-validate.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum: u32 = 0;
    for (i, &b) in digits.iter().rev().enumerate() {
        if !b.is_ascii_digit() {
            return false;
        }
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

/// A validated card number: 12 to 19 ASCII digits passing the Luhn check.
///
/// Deliberately has no `Display`, `Clone` or `Serialize`, so the full number
/// cannot end up in logs, copies or payloads by accident; [`Pan::digits`] is
/// the one explicit way out.
pub struct Pan {
    digits: Zeroizing<String>,
}

impl Pan {
    /// The only way to make a `Pan`. Spaces and hyphens are stripped; checks
    /// run in the order non-digit, empty, length, checksum.
    pub fn parse(input: &str) -> Result<Pan, PanError> {
        if input.len() > MAX_INPUT_LEN {
            return Err(PanError::TooLong);
        }
        // Reserved up front so the buffer never reallocates: a reallocation
        // would leave an un-wiped copy of the digits behind in freed memory.
        let mut digits = Zeroizing::new(String::with_capacity(input.len()));
        for c in input.chars() {
            match c {
                ' ' | '-' => {}
                '0'..='9' => digits.push(c),
                _ => return Err(PanError::NonDigit),
            }
        }
        let len = digits.len();
        if len == 0 {
            return Err(PanError::Empty);
        }
        if !(MIN_DIGITS..=MAX_DIGITS).contains(&len) {
            return Err(PanError::Length { len });
        }
        if !luhn_valid(digits.as_bytes()) {
            return Err(PanError::Checksum);
        }
        Ok(Pan { digits })
    }

    /// The full number. Only for encryption and for answering detokenize.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// Number of digits, always within 12..=19.
    pub fn len(&self) -> usize {
        self.digits.len()
    }

    /// Always false: a `Pan` holds at least 12 digits. Exists so the type
    /// follows the usual `len`/`is_empty` pairing.
    pub fn is_empty(&self) -> bool {
        self.digits.is_empty()
    }

    pub fn brand(&self) -> CardBrand {
        CardBrand::detect(&self.digits)
    }

    /// The BIN that may be stored alongside a token: 8 digits for PANs of 16+
    /// digits, 6 otherwise (PCI DSS 3.4.1, FAQ 1091), so that BIN plus last
    /// four never reveals too many digits of a short PAN.
    pub fn bin(&self) -> &str {
        let n = if self.len() >= 16 { 8 } else { 6 };
        &self.digits[..n]
    }

    pub fn last4(&self) -> &str {
        &self.digits[self.len() - 4..]
    }
}

impl fmt::Debug for Pan {
    /// Shows only the first 6 and last 4 digits, the most PCI DSS allows to be
    /// displayed, even for 16+ digit PANs whose stored BIN is 8 digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.len();
        write!(
            f,
            "Pan({}{}{})",
            &self.digits[..6],
            "*".repeat(len - 10),
            &self.digits[len - 4..]
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use proptest::prelude::*;

    /// Appends the Luhn check digit to `body`.
    fn with_check_digit(body: &str) -> String {
        (0..=9u8)
            .map(|d| format!("{body}{d}"))
            .find(|s| luhn_valid(s.as_bytes()))
            .unwrap()
    }

    /// True if `msg` contains any run of 4 consecutive digits taken from `input`'s digits.
    fn leaks_digits(msg: &str, input: &str) -> bool {
        let digits: Vec<char> = input.chars().filter(char::is_ascii_digit).collect();
        digits
            .windows(4)
            .any(|w| msg.contains(&w.iter().collect::<String>()))
    }

    #[test]
    fn public_test_cards_parse_with_expected_brand() {
        let cases = [
            ("4111111111111111", CardBrand::Visa),
            ("4012888888881881", CardBrand::Visa),
            ("4222222222222", CardBrand::Visa),
            ("5555555555554444", CardBrand::Mastercard),
            ("2223003122003222", CardBrand::Mastercard),
            ("378282246310005", CardBrand::Amex),
            ("6011111111111117", CardBrand::Discover),
            ("6445644564456445", CardBrand::Discover),
            ("3530111333300000", CardBrand::Jcb),
            ("36227206271667", CardBrand::DinersClub),
            ("30569309025904", CardBrand::DinersClub),
            ("6200000000000005", CardBrand::UnionPay),
            ("6759649826438453", CardBrand::Maestro),
        ];
        for (num, brand) in cases {
            let pan = Pan::parse(num).unwrap_or_else(|e| panic!("{num}: {e}"));
            assert_eq!(pan.digits(), num);
            assert_eq!(pan.len(), num.len());
            assert!(!pan.is_empty());
            assert_eq!(pan.brand(), brand, "{num}");
        }
    }

    #[test]
    fn computed_cards_parse_with_expected_brand() {
        let cases = [
            ("622126000000000", CardBrand::Discover),
            ("622925000000000", CardBrand::Discover),
            ("811234567890123", CardBrand::UnionPay),
            ("900000000000000", CardBrand::Unknown),
            ("501800000000000", CardBrand::Maestro),
            ("309500000000", CardBrand::DinersClub),
        ];
        for (body, brand) in cases {
            let num = with_check_digit(body);
            let pan = Pan::parse(&num).unwrap();
            assert_eq!(pan.brand(), brand, "{num}");
        }
    }

    #[test]
    fn every_rule_rejects() {
        let cases = [
            ("", PanError::Empty),
            ("   ", PanError::Empty),
            (" - - ", PanError::Empty),
            ("41111111111", PanError::Length { len: 11 }),
            ("41111111111111111111", PanError::Length { len: 20 }),
            ("4111111111111a11", PanError::NonDigit),
            ("4111111111111\u{663}11", PanError::NonDigit),
            ("4111_1111_1111_1111", PanError::NonDigit),
            ("4111111111111112", PanError::Checksum),
            ("4111111111111110", PanError::Checksum),
        ];
        for (input, want) in cases {
            assert_eq!(Pan::parse(input).err(), Some(want), "{input:?}");
        }
        let long = "4".repeat(65);
        assert_eq!(Pan::parse(&long).err(), Some(PanError::TooLong));
    }

    #[test]
    fn non_digit_is_reported_before_length_or_checksum() {
        assert_eq!(Pan::parse("x").err(), Some(PanError::NonDigit));
        assert_eq!(Pan::parse("41x").err(), Some(PanError::NonDigit));
    }

    #[test]
    fn rule_codes_are_stable() {
        assert_eq!(PanError::Empty.rule(), "empty");
        assert_eq!(PanError::TooLong.rule(), "length");
        assert_eq!(PanError::Length { len: 3 }.rule(), "length");
        assert_eq!(PanError::NonDigit.rule(), "non_digit");
        assert_eq!(PanError::Checksum.rule(), "checksum");
    }

    #[test]
    fn error_messages_name_the_rule() {
        assert_eq!(
            PanError::Length { len: 11 }.to_string(),
            "card number must be 12 to 19 digits (got 11)"
        );
        assert_eq!(PanError::Empty.to_string(), "card number is empty");
        assert_eq!(
            PanError::Checksum.to_string(),
            "card number fails the Luhn checksum"
        );
        assert_eq!(
            PanError::NonDigit.to_string(),
            "card number may contain only digits, spaces and hyphens"
        );
    }

    #[test]
    fn separators_are_stripped() {
        for input in [
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            " 4111 - 1111-1111 1111 ",
        ] {
            assert_eq!(Pan::parse(input).unwrap().digits(), "4111111111111111");
        }
    }

    #[test]
    fn bin_length_depends_on_pan_length() {
        let p16 = Pan::parse("4111111111111111").unwrap();
        assert_eq!(p16.bin(), "41111111");
        let p15 = Pan::parse("378282246310005").unwrap();
        assert_eq!(p15.bin(), "378282");
        let p14 = Pan::parse("36227206271667").unwrap();
        assert_eq!(p14.bin(), "362272");
        let p19 = Pan::parse(&with_check_digit("622126123456789012")).unwrap();
        assert_eq!(p19.bin(), "62212612");
    }

    #[test]
    fn last4() {
        assert_eq!(Pan::parse("378282246310005").unwrap().last4(), "0005");
    }

    #[test]
    fn debug_masks_the_middle() {
        let pan = Pan::parse("4012888888881881").unwrap();
        let dbg = format!("{pan:?}");
        assert_eq!(dbg, "Pan(401288******1881)");
        assert!(!dbg.contains("4012888888881881"));
        assert!(!dbg.contains("888888"));

        let short = Pan::parse("4222222222222").unwrap();
        assert_eq!(format!("{short:?}"), "Pan(422222***2222)");
        let amex = Pan::parse("378282246310005").unwrap();
        let dbg = format!("{amex:#?}");
        assert_eq!(dbg, "Pan(378282*****0005)");
        assert!(!dbg.contains("24631"));
    }

    #[test]
    fn rejected_inputs_never_leak_digits_in_messages() {
        let inputs = [
            "41111111111",
            "41111111111111111111",
            "4111111111111112",
            "4111 1111 1111 111x",
            "4111111111111\u{663}11",
        ];
        for input in inputs {
            let err = Pan::parse(input).unwrap_err();
            let msg = err.to_string();
            assert!(!leaks_digits(&msg, input), "{msg}");
            assert!(!leaks_digits(&format!("{err:?}"), input));
        }
        let long = "1234".repeat(20);
        let err = Pan::parse(&long).unwrap_err();
        assert!(!leaks_digits(&err.to_string(), &long));
    }

    #[test]
    fn brand_table_is_ordered_most_specific_first() {
        assert!(BRAND_TABLE.windows(2).all(|w| w[0].digits >= w[1].digits));
        assert!(BRAND_TABLE.iter().all(|e| e.lo <= e.hi));
    }

    #[test]
    fn brand_table_boundaries() {
        let cases = [
            ("2220", CardBrand::Unknown),
            ("2221", CardBrand::Mastercard),
            ("2720", CardBrand::Mastercard),
            ("2721", CardBrand::Unknown),
            ("3527", CardBrand::Unknown),
            ("3528", CardBrand::Jcb),
            ("3589", CardBrand::Jcb),
            ("3590", CardBrand::Unknown),
            ("622125", CardBrand::UnionPay),
            ("622126", CardBrand::Discover),
            ("622925", CardBrand::Discover),
            ("622926", CardBrand::UnionPay),
            ("299", CardBrand::Unknown),
            ("306", CardBrand::Unknown),
            ("3094", CardBrand::Unknown),
            ("643", CardBrand::Unknown),
            ("644", CardBrand::Discover),
            ("50", CardBrand::Unknown),
            ("56", CardBrand::Unknown),
            ("6760", CardBrand::Unknown),
            ("6764", CardBrand::Unknown),
            ("9", CardBrand::Unknown),
        ];
        for (prefix, brand) in cases {
            let padded = format!("{prefix:0<16}");
            assert_eq!(CardBrand::detect(&padded), brand, "{prefix}");
        }
    }

    #[test]
    fn brand_strings_round_trip() {
        let all = [
            CardBrand::Unknown,
            CardBrand::Visa,
            CardBrand::Mastercard,
            CardBrand::Amex,
            CardBrand::Discover,
            CardBrand::Jcb,
            CardBrand::DinersClub,
            CardBrand::UnionPay,
            CardBrand::Maestro,
        ];
        for b in all {
            assert_eq!(CardBrand::from_str_opt(b.as_str()), Some(b));
        }
        assert_eq!(CardBrand::from_str_opt("Visa"), None);
        assert_eq!(CardBrand::from_str_opt(""), None);
    }

    #[test]
    fn luhn_rejects_non_digits() {
        assert!(luhn_valid(b"4111111111111111"));
        assert!(!luhn_valid(b"4111111111111a11"));
        assert!(luhn_valid(b""));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = Pan::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_cardish_input(s in "[0-9 \\-a٣]{0,70}") {
            let _ = Pan::parse(&s);
        }

        #[test]
        fn valid_pans_round_trip(body in "[0-9]{11,18}") {
            let num = with_check_digit(&body);
            let pan = Pan::parse(&num).unwrap();
            prop_assert_eq!(pan.digits(), num.as_str());
            prop_assert_eq!(pan.last4(), &num[num.len() - 4..]);
        }

        #[test]
        fn single_digit_change_fails_checksum(
            body in "[0-9]{11,18}",
            pos in any::<prop::sample::Index>(),
            delta in 1u8..=9,
        ) {
            let num = with_check_digit(&body);
            let mut bytes = num.into_bytes();
            let i = pos.index(bytes.len());
            bytes[i] = b'0' + (bytes[i] - b'0' + delta) % 10;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(Pan::parse(&changed).err(), Some(PanError::Checksum));
        }

        #[test]
        fn errors_never_echo_input_digits(s in "[0-9 \\-x]{4,70}") {
            prop_assume!(s.chars().filter(char::is_ascii_digit).count() >= 4);
            if let Err(e) = Pan::parse(&s) {
                prop_assert!(!leaks_digits(&e.to_string(), &s));
                let dbg = format!("{e:?}");
                prop_assert!(!leaks_digits(&dbg, &s));
            }
        }
    }
}
