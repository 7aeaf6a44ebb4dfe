//! `check_purpose` never panics, and an accepted purpose holds no Luhn-valid
//! run of 12–19 digits, written bare or in groups joined by spaces/hyphens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::domain::data::check_purpose;
use tokenvault::domain::pan::luhn_valid;

/// Splits `s` into chains of digit groups: a group is a maximal run of ASCII
/// digits; consecutive groups separated only by spaces/hyphens form a chain.
fn chains(s: &str) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut chain: Vec<Vec<u8>> = Vec::new();
    let mut group: Vec<u8> = Vec::new();
    for b in s.bytes() {
        match b {
            b'0'..=b'9' => group.push(b),
            b' ' | b'-' => {
                if !group.is_empty() {
                    chain.push(std::mem::take(&mut group));
                }
            }
            _ => {
                if !group.is_empty() {
                    chain.push(std::mem::take(&mut group));
                }
                if !chain.is_empty() {
                    out.push(std::mem::take(&mut chain));
                }
            }
        }
    }
    if !group.is_empty() {
        chain.push(group);
    }
    if !chain.is_empty() {
        out.push(chain);
    }
    out
}

fuzz_target!(|s: &str| {
    let Ok(p) = check_purpose(s) else {
        return;
    };
    // Every contiguous sequence of whole groups in a chain is something a
    // reader would take as one number: `12 4111111111111111` holds a card
    // number even though the whole chain (18 digits) fails Luhn.
    for chain in chains(p) {
        for start in 0..chain.len() {
            let mut digits = Vec::new();
            for g in &chain[start..] {
                digits.extend_from_slice(g);
                if digits.len() > 19 {
                    break;
                }
                assert!(
                    !((12..=19).contains(&digits.len()) && luhn_valid(&digits)),
                    "accepted purpose {p:?} holds a Luhn-valid {}-digit number",
                    digits.len()
                );
            }
        }
    }
});
