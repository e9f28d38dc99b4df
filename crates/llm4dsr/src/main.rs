use std::process::ExitCode;

fn main() -> ExitCode {
    match llm4dsr::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
