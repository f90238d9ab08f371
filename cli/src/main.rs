//! `sigil`: the command-line tool for Sigil — administer a server over its
//! admin socket (this file), and (elsewhere) validate and fetch SVIDs.
//!
//! Exit codes: 0 success, 1 the operation failed (one line on stderr names
//! the reason), 2 usage error.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod admin;

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
    #[command(flatten)]
    Admin(admin::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
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
