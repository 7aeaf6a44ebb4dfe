//! The gRPC message codec: prost encoding, then the secret fields of the
//! message just encoded are wiped before it is freed.
//!
//! prost messages own their strings, and a message is dropped by tonic right
//! after it is encoded. Without this codec the card number of a Detokenize
//! response (server side) and of a Tokenize request, or the KEK share of an
//! Unseal request (client side), would go back to the allocator unwiped.
//! Every generated client and server uses this codec (`build.rs`,
//! `codec_path`). Decoding is prost's own. The three messages that carry a
//! secret also wipe it when dropped and redact it in `Debug`, so a decoded
//! request is wiped on every path out of its handler, cancellation included.
//!
//! The HTTP/2 and TLS layers still hold the encoded bytes briefly in their
//! own buffers (SECURITY.md, "Memory").

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;
use zeroize::Zeroize;

use crate::proto;

/// Clears a message's secret fields in place. Messages without secrets keep
/// the default, which does nothing.
pub trait Wipe {
    fn wipe(&mut self) {}
}

impl Wipe for proto::TokenizeRequest {
    fn wipe(&mut self) {
        self.pan.zeroize();
    }
}

impl Wipe for proto::DetokenizeResponse {
    fn wipe(&mut self) {
        self.pan.zeroize();
    }
}

impl Wipe for proto::UnsealRequest {
    fn wipe(&mut self) {
        self.share.zeroize();
    }
}

/// `Debug` for the messages that carry a secret (build.rs `skip_debug`
/// removes prost's, which would print it): the secret and the expiry are
/// shown only as present or absent, so a `{:?}` in a log line, an
/// `unwrap_err()` on a response or a test failure cannot print them.
macro_rules! redacted_debug {
    ($t:ident { $($field:ident),* }) => {
        impl std::fmt::Debug for proto::$t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    $(.field(stringify!($field), &Redacted::of(&self.$field)))*
                    .finish()
            }
        }
    };
}

/// What a redacted field shows: whether it holds anything.
struct Redacted(bool);

impl Redacted {
    fn of<F: Present>(field: &F) -> Self {
        Self(field.present())
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0 { "[redacted]" } else { "[empty]" })
    }
}

trait Present {
    fn present(&self) -> bool;
}

impl Present for String {
    fn present(&self) -> bool {
        !self.is_empty()
    }
}

impl<T> Present for Option<T> {
    fn present(&self) -> bool {
        self.is_some()
    }
}

/// The messages that carry a secret wipe it when dropped, wherever that
/// happens: after encoding, on an early return, or when a call is cancelled
/// with the message still held.
macro_rules! wipe_on_drop {
    ($($t:ident),*) => {
        $(impl Drop for proto::$t {
            fn drop(&mut self) {
                self.wipe();
            }
        })*
    };
}

wipe_on_drop!(TokenizeRequest, DetokenizeResponse, UnsealRequest);

redacted_debug!(TokenizeRequest { pan, expiry });
redacted_debug!(DetokenizeResponse { pan, expiry });
redacted_debug!(UnsealRequest { share });

/// Messages that carry nothing secret. A new message type must be added
/// here or get an `impl Wipe` of its own: until it is, the generated code
/// does not compile, so no message is added without that decision. (A new
/// secret field in a message listed here still needs its own `impl`.)
macro_rules! nothing_to_wipe {
    ($($t:ident),* $(,)?) => {
        $(impl Wipe for proto::$t {})*
    };
}

nothing_to_wipe!(
    TokenizeResponse,
    DetokenizeRequest,
    GetTokenMetadataRequest,
    GetTokenMetadataResponse,
    DeleteTokenRequest,
    DeleteTokenResponse,
    GetKeyStatusRequest,
    GetKeyStatusResponse,
    RotateDataKeyRequest,
    RotateDataKeyResponse,
    RotateKekRequest,
    PendingApproval,
    ApproveKekRotationRequest,
    RotateKekResponse,
    StartReencryptionRequest,
    GetJobRequest,
    Job,
    DestroyDataKeyRequest,
    DestroyDataKeyResponse,
    RequestTenantShredRequest,
    ShredRequest,
    ApproveTenantShredRequest,
    ApproveTenantShredResponse,
    SealRequest,
    GetSealStatusRequest,
    SealStatus,
    ListEventsRequest,
    ListEventsResponse,
    GetLatestCheckpointRequest,
    GetLatestCheckpointResponse,
    ExportLogRequest,
    ExportLine,
    GetPublicKeyRequest,
    GetPublicKeyResponse,
);

/// prost's codec, with the encoder wiping each message after encoding it.
#[derive(Debug)]
pub struct WipingCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WipingCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for WipingCodec<T, U>
where
    T: Message + Wipe + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WipingEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WipingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

#[derive(Debug)]
pub struct WipingEncoder<T>(PhantomData<T>);

impl<T: Message + Wipe> Encoder for WipingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, mut item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_then_wipe(&mut item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Encodes `item` into `buf`, then wipes it, whether encoding worked or not.
fn encode_then_wipe<T: Message + Wipe>(
    item: &mut T,
    buf: &mut impl prost::bytes::BufMut,
) -> Result<(), Status> {
    let res = item.encode(buf);
    item.wipe();
    // The message type is named, never its content.
    res.map_err(|_| Status::internal("message too large to encode"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codec wipes whatever the field holds; no card number is needed.
    const PAN: &str = "card-number-stand-in";

    #[test]
    fn a_detokenize_response_is_wiped_once_encoded() {
        let mut r = proto::DetokenizeResponse {
            pan: PAN.into(),
            expiry: None,
        };
        let mut buf = Vec::new();
        encode_then_wipe(&mut r, &mut buf).unwrap();
        assert!(r.pan.is_empty());
        // What was encoded is the card number, not the wiped field.
        let back = proto::DetokenizeResponse::decode(&buf[..]).unwrap();
        assert_eq!(back.pan, PAN);
    }

    #[test]
    fn requests_carrying_secrets_are_wiped_once_encoded() {
        let mut t = proto::TokenizeRequest {
            pan: PAN.into(),
            ..Default::default()
        };
        encode_then_wipe(&mut t, &mut Vec::new()).unwrap();
        assert!(t.pan.is_empty());

        let mut u = proto::UnsealRequest {
            share: "share text".into(),
        };
        encode_then_wipe(&mut u, &mut Vec::new()).unwrap();
        assert!(u.share.is_empty());
    }

    #[test]
    fn a_failed_encode_still_wipes_and_names_no_content() {
        let mut r = proto::DetokenizeResponse {
            pan: PAN.into(),
            expiry: None,
        };
        // A buffer with room for nothing.
        let mut space = [0u8; 0];
        let err = encode_then_wipe(&mut r, &mut &mut space[..]).unwrap_err();
        assert!(r.pan.is_empty());
        assert!(!err.message().contains(PAN));
    }

    /// Every field whose name says it may hold a secret is either one a
    /// `Wipe` impl clears or was looked at and is listed as not secret: a
    /// new `cvv`, `share` or `pan` field cannot slip in unwiped.
    #[test]
    fn every_secret_looking_field_is_wiped() {
        const WIPED: [&str; 3] = [
            "vault.v1.TokenizeRequest.pan",
            "vault.v1.DetokenizeResponse.pan",
            "vault.v1.UnsealRequest.share",
        ];
        const SECRET_WORDS: [&str; 9] = [
            "pan",
            "cvv",
            "cvc",
            "card",
            "share",
            "secret",
            "password",
            "pin",
            "plaintext",
        ];
        let fds =
            prost_types::FileDescriptorSet::decode(crate::server::FILE_DESCRIPTOR_SET).unwrap();
        let mut found = Vec::new();
        for file in &fds.file {
            let package = file.package();
            for msg in &file.message_type {
                for field in &msg.field {
                    let name = field.name();
                    if name.split('_').any(|w| SECRET_WORDS.contains(&w)) {
                        found.push(format!("{package}.{}.{name}", msg.name()));
                    }
                }
            }
        }
        // Looked at, and not secret: a length, and paths on the vault host.
        const NOT_SECRET: [&str; 2] = [
            "vault.v1.CardMetadata.pan_length",
            "vault.v1.RotateKekResponse.share_files",
        ];
        for f in &found {
            assert!(
                WIPED.contains(&f.as_str()) || NOT_SECRET.contains(&f.as_str()),
                "{f}: wipe it (an `impl Wipe`) or list it as not secret"
            );
        }
        for w in WIPED {
            assert!(found.iter().any(|f| f == w), "{w} is gone from the API");
        }
    }

    #[test]
    fn debug_of_a_message_with_a_secret_shows_no_secret() {
        let expiry = Some(proto::Expiry {
            month: 7,
            year: 2031,
        });
        let shown = [
            format!(
                "{:?}",
                proto::TokenizeRequest {
                    pan: PAN.into(),
                    expiry,
                }
            ),
            format!(
                "{:?}",
                proto::DetokenizeResponse {
                    pan: PAN.into(),
                    expiry,
                }
            ),
            format!("{:?}", proto::UnsealRequest { share: PAN.into() }),
        ];
        for s in &shown {
            assert!(!s.contains(PAN) && !s.contains("2031"), "{s}");
            assert!(s.contains("[redacted]"), "{s}");
        }
        assert_eq!(
            format!("{:?}", proto::UnsealRequest::default()),
            "UnsealRequest { share: [empty] }"
        );
    }

    #[test]
    fn messages_without_secrets_are_left_alone() {
        let mut r = proto::DetokenizeRequest {
            token: "tok_x".into(),
            purpose: "charge".into(),
        };
        encode_then_wipe(&mut r, &mut Vec::new()).unwrap();
        assert_eq!(r.token, "tok_x");
        assert_eq!(r.purpose, "charge");
    }
}
