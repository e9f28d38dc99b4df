//! One module per subcommand: its flags and the call into the library crates.

pub mod assets;
pub mod evaluate;
pub mod prepare;
pub mod train;
