fn main() {
    eprintln!("comatching-appliance: not built yet");
    std::process::exit(2);
}
