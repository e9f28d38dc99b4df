//! The `llm4dsr` command line: a thin layer that parses flags (command line or config file),
//! sets up logging and the communicator, and calls the stage functions of the library crates.

pub mod cli;
pub mod cmd;
pub mod config;
pub mod logging;
pub mod sharded;
