use clap::Parser;

fn main() {
    let cli = bifs::cli::Cli::parse();
    let default = if matches!(
        cli.cmd,
        bifs::cli::Cmd::Mount { .. } | bifs::cli::Cmd::Serve { .. }
    ) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(bifs::cli::Exit(code, msg)) = bifs::cli::run(cli) {
        eprintln!("bifs: {msg}");
        std::process::exit(code);
    }
}
