//! `lockctl`: every geolock role, and its command-line client.

mod cli;
mod commands;
mod dev;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
