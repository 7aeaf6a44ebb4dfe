//! `verify_export` on arbitrary bytes as an export file: always returns a
//! verdict (pass or fail), never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::audit::verify::verify_export;

fuzz_target!(|data: &[u8]| {
    let verdict = verify_export(std::io::BufReader::new(data), &[7u8; 32]);
    let _ = verdict.ok();
    let _ = verdict.summary();
});
