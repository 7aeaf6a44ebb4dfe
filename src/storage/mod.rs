//! Storage adapters implementing the core's [`crate::domain::Store`] port.

pub mod conformance;
pub mod sqlite;

pub use sqlite::{SqliteOptions, SqliteStore};
