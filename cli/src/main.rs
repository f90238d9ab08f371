//! `sigil`: the command-line tool for Sigil — validate SVIDs, fetch them from
//! the Workload API, and administer a server over its admin socket.
//!
//! Exit codes: 0 success, 1 the operation failed (one line on stderr names
//! the reason), 2 usage error.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod admin;
mod fetch;
mod validate;

#[derive(Debug, Parser)]
#[command(
    name = "sigil",
    version,
    about = "Sigil: SPIFFE workload identity for AI agents and their tools"
)]
struct Cli {
    /// The server's admin Unix socket (admin commands only).
    #[arg(long, global = true, env = "SIGIL_ADMIN_SOCKET", value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a JWT-SVID or an X.509-SVID chain against trust bundles.
    #[command(subcommand)]
    Validate(validate::Command),
    /// Fetch SVIDs and bundles from the Workload API ($SPIFFE_ENDPOINT_SOCKET).
    #[command(subcommand)]
    Fetch(fetch::Command),
    #[command(flatten)]
    Admin(admin::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(cmd) => validate::run(cmd),
        Command::Fetch(cmd) => fetch::run(cmd),
        Command::Admin(cmd) => admin::run(cli.admin_socket, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the reason only.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}
