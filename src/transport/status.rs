//! The single place where domain errors become gRPC status codes. Messages
//! come from `VaultError`'s `Display`, which never carries caller input or
//! secrets.

use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::domain::{Caller, VaultError};

/// Logs the outcome of a call (method, caller, outcome code — never a
/// request or response body) and maps a failure to its status. Denials are
/// logged at info, integrity and internal failures at warn, the rest at
/// debug.
pub fn logged<T>(
    method: &'static str,
    caller: &Caller,
    res: Result<T, VaultError>,
) -> Result<T, Status> {
    match res {
        Ok(v) => {
            debug!(method, caller = %caller.identity, outcome = "success", "call");
            Ok(v)
        }
        Err(e) => Err(fail(method, caller, e)),
    }
}

/// Logs a failed call and maps it to its status.
pub fn fail(method: &'static str, caller: &Caller, e: VaultError) -> Status {
    let code = e.code();
    match e {
        VaultError::PermissionDenied(_)
        | VaultError::OutOfScope(_)
        | VaultError::Unauthenticated => {
            info!(method, caller = %caller.identity, outcome = code, "call denied");
        }
        VaultError::DataLoss | VaultError::Internal => {
            warn!(method, caller = %caller.identity, outcome = code, "call failed");
        }
        _ => debug!(method, caller = %caller.identity, outcome = code, "call"),
    }
    to_status(&e)
}

pub fn to_status(e: &VaultError) -> Status {
    let code = match e {
        VaultError::InvalidArgument(_) => Code::InvalidArgument,
        // Out of scope answers exactly as missing: same code, same message.
        VaultError::NotFound | VaultError::NoSuch(_) | VaultError::OutOfScope(_) => Code::NotFound,
        VaultError::Unauthenticated => Code::Unauthenticated,
        VaultError::PermissionDenied(_) => Code::PermissionDenied,
        VaultError::FailedPrecondition(_) => Code::FailedPrecondition,
        VaultError::ResourceExhausted(_) => Code::ResourceExhausted,
        VaultError::DataLoss => Code::DataLoss,
        VaultError::Unavailable(_) | VaultError::Sealed => Code::Unavailable,
        VaultError::Internal => Code::Internal,
    };
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_code() {
        let cases = [
            (
                VaultError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (VaultError::NotFound, Code::NotFound),
            (VaultError::NoSuch("x".into()), Code::NotFound),
            (VaultError::OutOfScope("x".into()), Code::NotFound),
            (VaultError::Unauthenticated, Code::Unauthenticated),
            (
                VaultError::PermissionDenied("x".into()),
                Code::PermissionDenied,
            ),
            (
                VaultError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (
                VaultError::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (VaultError::DataLoss, Code::DataLoss),
            (VaultError::Unavailable("x".into()), Code::Unavailable),
            (VaultError::Sealed, Code::Unavailable),
            (VaultError::Internal, Code::Internal),
        ];
        for (e, c) in cases {
            assert_eq!(to_status(&e).code(), c);
        }
    }

    #[test]
    fn out_of_scope_reads_exactly_as_missing() {
        let shown = "no such data key";
        let missing = to_status(&VaultError::NoSuch(shown.into()));
        let hidden = to_status(&VaultError::OutOfScope(shown.into()));
        assert_eq!(
            (missing.code(), missing.message()),
            (hidden.code(), hidden.message())
        );
    }
}
