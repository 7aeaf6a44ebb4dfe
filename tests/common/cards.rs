//! Luhn-valid test card numbers, computed independently of the vault's own
//! card-number code.

/// The Luhn check digit (0–9) completing `body` (ASCII digits).
pub fn luhn_check_digit(body: &str) -> u32 {
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    (10 - sum % 10) % 10
}

/// `body` followed by its Luhn check digit.
pub fn with_luhn(body: &str) -> String {
    let pan = format!("{body}{}", luhn_check_digit(body));
    debug_assert!(luhn_valid(pan.as_bytes()));
    pan
}

/// Luhn check over ASCII digits (the check digit included).
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &b) in digits.iter().rev().enumerate() {
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

/// The `n`th distinct Luhn-valid 16-digit Visa number of a series: `4`, 14
/// digits of `base + n`, check digit.
pub fn visa_pan(base: u64, n: u64) -> String {
    with_luhn(&format!("4{:014}", base + n))
}
