//! `Pan::parse` on arbitrary UTF-8: accepted numbers satisfy every invariant,
//! and neither `Debug` nor error messages leak the digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::domain::Pan;
use tokenvault::domain::pan::luhn_valid;

fuzz_target!(|s: &str| {
    match Pan::parse(s) {
        Ok(pan) => {
            let d = pan.digits();
            assert!(d.bytes().all(|b| b.is_ascii_digit()), "non-digit kept");
            assert!((12..=19).contains(&d.len()), "length {}", d.len());
            assert_eq!(pan.len(), d.len());
            assert!(!pan.is_empty());
            assert!(luhn_valid(d.as_bytes()), "accepted a Luhn-invalid number");
            // The accepted digits are exactly the input's digits, in order.
            let input_digits: String = s.chars().filter(char::is_ascii_digit).collect();
            assert_eq!(d, input_digits);
            let dbg = format!("{pan:?}");
            let alt = format!("{pan:#?}");
            assert!(!dbg.contains(d), "Debug leaks the full PAN: {dbg}");
            assert!(!alt.contains(d), "alternate Debug leaks the full PAN: {alt}");
            // Exercise the other accessors (must not panic).
            let _ = pan.brand().as_str();
            let _ = pan.bin();
            let _ = pan.last4();
        }
        Err(e) => {
            let msg = e.to_string();
            let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_digit).collect();
            for w in digits.windows(4) {
                // Safe: windows of ASCII digits are valid UTF-8.
                let run = std::str::from_utf8(w).unwrap_or_default();
                assert!(
                    !msg.contains(run),
                    "error message {msg:?} echoes input digits {run:?}"
                );
            }
            let _ = e.rule();
        }
    }
});
