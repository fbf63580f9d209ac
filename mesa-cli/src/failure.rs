//! How a command ends: the error that stops it (message and exit code), the tokio
//! runtime its work runs on, and the files its flags name. Shared by `mesa` and
//! `mesa-bench` (which includes this file by path: an unpublished crate may not be a
//! dependency of this published one).

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

/// Why a command stops with an error: the message for stderr and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) code: u8,
}

impl Failure {
    /// Flags that do not go together: exit code 2, as clap's own usage errors.
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 2,
        }
    }
}

impl From<String> for Failure {
    /// Anything else: exit code 1.
    fn from(message: String) -> Self {
        Failure { message, code: 1 }
    }
}

/// Run `work` on a multi-threaded tokio runtime and turn its outcome into the exit
/// code, printing a failure as `program: error: message`.
pub(crate) fn run_to_exit(
    program: &str,
    work: impl Future<Output = Result<ExitCode, Failure>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{program}: error: cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("{program}: error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// The contents of the file `flag` names.
pub(crate) fn read(path: &Path, flag: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {flag} {}: {error}", path.display()))
}
