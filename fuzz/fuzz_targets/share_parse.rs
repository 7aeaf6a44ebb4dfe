//! `Share::parse` on arbitrary text: an accepted share re-serializes to text
//! that parses to the same header fields, and `Debug` never shows its data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::crypto::shamir::Share;

fuzz_target!(|s: &str| {
    let Ok(share) = Share::parse(s) else {
        return;
    };
    let text = share.to_text();
    let again =
        Share::parse(&text).unwrap_or_else(|e| panic!("to_text output does not parse: {e}"));
    assert_eq!(again.index(), share.index());
    assert_eq!(again.threshold(), share.threshold());
    assert_eq!(again.total(), share.total());
    assert_eq!(again.kek_id(), share.kek_id());
    assert_eq!(again.set_id(), share.set_id());
    assert_eq!(again.to_text().as_str(), text.as_str());

    let dbg = format!("{share:?}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("to_text has no data line"));
    assert!(!data.is_empty());
    assert!(!dbg.contains(data), "Debug leaks the share data");
});
