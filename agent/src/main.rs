//! `sigil-agent`: the Sigil node agent.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "sigil-agent",
    version,
    about = "Sigil node agent: node attestation and the SPIFFE Workload API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start")]
enum Command {
    /// Attest to the server (first start) and serve the Workload API.
    Run(sigil_agent::run::RunArgs),
    /// TPM utilities.
    #[command(subcommand)]
    Tpm(TpmCommand),
}

#[derive(Debug, Subcommand)]
enum TpmCommand {
    /// Print this TPM's EK hash (lowercase hex SHA-256 of the EK's DER
    /// SubjectPublicKeyInfo): allow it on the server with `sigil tpm allow`;
    /// the agent will be spiffe://<td>/agent/tpm/<hash>. A TPM without a
    /// resource manager (swtpm) serves one client at a time: run this
    /// before the agent starts.
    EkHash {
        /// TCTI of the TPM, e.g. device:/dev/tpmrm0 or
        /// swtpm:host=127.0.0.1,port=2321.
        #[arg(long, value_name = "TCTI", default_value = "device:/dev/tpmrm0")]
        tpm: String,
    },
}

#[cfg(feature = "tpm")]
fn ek_hash(tcti: &str) -> anyhow::Result<()> {
    let tpm = sigil_agent::tpm::Tpm::open(tcti)?;
    println!("{}", tpm.ek_hash()?);
    Ok(())
}

#[cfg(not(feature = "tpm"))]
fn ek_hash(_tcti: &str) -> anyhow::Result<()> {
    anyhow::bail!("this sigil-agent was built without TPM support (rebuild with `--features tpm`)")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tss_esapi=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Command::Run(args) => rt.block_on(sigil_agent::run::run(args)),
        Command::Tpm(TpmCommand::EkHash { tpm }) => ek_hash(&tpm),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(1)
        }
    }
}
