fn main() {
    std::process::exit(sdlora::cli::main());
}
