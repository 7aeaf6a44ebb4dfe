//! `Config::parse` on arbitrary TOML-ish text never panics; a parsed config's
//! pure derived views (grants, timeout) don't either. `validate` is skipped:
//! it touches the filesystem.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::config::Config;

fuzz_target!(|s: &str| {
    if let Ok(cfg) = Config::parse(s) {
        let _ = cfg.grants();
        let _ = cfg.limits.request_timeout();
    }
});
