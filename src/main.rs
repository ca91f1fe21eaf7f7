//! `lockctl`: every geolock role, and its command-line client.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    geolock::cli::main()
}
