pub fn bench(_a: crate::args::BenchArgs) -> crate::CliResult {
    Err(crate::CliError::Usage("bench: not yet".into()))
}
