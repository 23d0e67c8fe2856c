//! `atoll status`: a running job's membership, steps, fragment versions and traffic.

use super::runtime;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct StatusArgs {
    #[arg(long)]
    coordinator: String,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

pub fn run(args: StatusArgs) -> Result<()> {
    atoll_link::tls::install_crypto_provider();
    let secret = atoll_node::resolve_secret(None, args.secret_file.as_deref())?;
    let status = runtime()?.block_on(atoll_node::status::fetch(
        &args.coordinator,
        &args.ca,
        &secret,
    ))?;
    println!("{}", atoll_node::status::headline(&status));
    for line in atoll_node::status::learner_lines(&status) {
        println!("  {line}");
    }
    Ok(())
}
