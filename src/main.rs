//! `lockctl`: every geolock role, and its command-line client.

fn main() -> std::process::ExitCode {
    geolock::cli::main()
}
