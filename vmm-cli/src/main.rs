//! The `vmm` command line tool.

fn main() {
    eprintln!("vmm: not built yet (see the open issues)");
    std::process::exit(2);
}
