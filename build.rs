//! Compiles the protobuf API with the pure-Rust `protox` compiler, so that no
//! `protoc` is needed on any machine, and keeps the descriptor set for gRPC
//! server reflection.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let protos = [
        "proto/vault/v1/token.proto",
        "proto/vault/v1/keys.proto",
        "proto/vault/v1/audit.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("vault_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost encoding, then the message's secret fields are wiped.
        .codec_path("crate::codec::WipingCodec")
        // Messages with a secret field get a redacting `Debug` by hand
        // (src/codec.rs) instead of prost's, which prints every field.
        .skip_debug([
            ".vault.v1.TokenizeRequest",
            ".vault.v1.DetokenizeResponse",
            ".vault.v1.UnsealRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
