//! `flottectl`: the admin CLI. Thin: see `flotte_server::ctl`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flotte_server::ctl::Cli::parse();
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(flotte_server::ctl::main(cli)),
        Err(error) => {
            eprintln!("flottectl: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}
