//! `vault client …`: the token service from the shell.

use std::io::Read;

use clap::Subcommand;
use tokenvault::codec::Wipe;
use tokenvault::proto;
use tokenvault::proto::token_service_client::TokenServiceClient;
use zeroize::Zeroizing;

use super::{Conn, status};

#[derive(Subcommand)]
pub enum Call {
    /// Tokenize the card number read from standard input (never from argv,
    /// which other users can see in the process list).
    Tokenize {
        #[arg(long, requires = "exp_year")]
        exp_month: Option<u32>,
        #[arg(long, requires = "exp_month")]
        exp_year: Option<u32>,
    },
    /// Print the card number behind a token.
    Detokenize {
        token: String,
        #[arg(long)]
        purpose: String,
    },
    /// Print a token's metadata.
    Metadata { token: String },
    /// Delete a token.
    Delete { token: String },
}

/// The most `vault client tokenize` reads from standard input.
const MAX_INPUT: usize = 256;

pub async fn run(conn: &Conn, call: Call) -> Result<(), String> {
    let default = match call {
        Call::Detokenize { .. } => "acme-payments",
        _ => "acme-checkout",
    };
    let mut client = TokenServiceClient::new(conn.channel(default).await?);
    match call {
        Call::Tokenize {
            exp_month,
            exp_year,
        } => {
            // Room reserved up front and the read bounded, so the buffer
            // never grows and leaves an unwiped copy behind; a card number
            // with separators and a newline fits many times over.
            let mut pan = Zeroizing::new(String::with_capacity(MAX_INPUT + 1));
            std::io::stdin()
                .take(MAX_INPUT as u64 + 1)
                .read_to_string(&mut pan)
                .map_err(|e| format!("cannot read standard input: {e}"))?;
            if pan.len() > MAX_INPUT {
                return Err(format!(
                    "standard input holds more than {MAX_INPUT} bytes; give one card number"
                ));
            }
            let expiry = exp_month
                .zip(exp_year)
                .map(|(month, year)| proto::Expiry { month, year });
            // The request's copy is wiped by the codec once encoded.
            let r = client
                .tokenize(proto::TokenizeRequest {
                    pan: pan.trim().to_owned(),
                    expiry,
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", r.token);
            if let Some(m) = r.metadata {
                print_metadata(&m);
            }
        }
        Call::Detokenize { token, purpose } => {
            let mut r = client
                .detokenize(proto::DetokenizeRequest { token, purpose })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", r.pan);
            if let Some(e) = r.expiry {
                println!("expiry: {:02}/{}", e.month, e.year);
            }
            r.wipe();
        }
        Call::Metadata { token } => {
            let r = client
                .get_token_metadata(proto::GetTokenMetadataRequest { token })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(m) = r.metadata {
                print_metadata(&m);
            }
        }
        Call::Delete { token } => {
            client
                .delete_token(proto::DeleteTokenRequest { token })
                .await
                .map_err(status)?;
            println!("deleted");
        }
    }
    Ok(())
}

fn print_metadata(m: &proto::CardMetadata) {
    let brand = proto::CardBrand::try_from(m.brand)
        .map(|b| {
            b.as_str_name()
                .trim_start_matches("CARD_BRAND_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "brand: {brand}\nbin: {}\nlast4: {}\nlength: {}",
        m.bin, m.last4, m.pan_length
    );
    if let Some(e) = &m.expiry {
        println!("expiry: {:02}/{}", e.month, e.year);
    }
    if let Some(t) = &m.created_at {
        println!("created: {} (unix seconds)", t.seconds);
    }
}
