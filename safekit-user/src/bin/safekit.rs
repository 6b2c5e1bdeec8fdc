//! `safekit`: the command line of a safekit node.

fn main() {
    std::process::exit(safekit::cli::main());
}
