//! The single place where domain errors become gRPC status codes. Messages
//! come from `VaultError`'s `Display`, which never carries caller input or
//! secrets.

use tonic::{Code, Status};

use crate::domain::VaultError;

pub fn to_status(e: &VaultError) -> Status {
    let code = match e {
        VaultError::InvalidArgument(_) => Code::InvalidArgument,
        VaultError::NotFound => Code::NotFound,
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
}
