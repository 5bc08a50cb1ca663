fn main() {
    if let Err(e) = wgpu_mlkd::cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
