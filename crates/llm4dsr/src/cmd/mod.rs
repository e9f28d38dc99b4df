//! One module per subcommand: its flags and the call into the library crates.

pub mod assets;
pub mod comm_check;
pub mod evaluate;
pub mod ground;
pub mod inspect;
pub mod model;
pub mod prepare;
pub mod run;
pub mod score;
pub mod train;
