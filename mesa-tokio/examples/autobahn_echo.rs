//! A WebSocket echo server on tokio with exactly the transport layer and limits of
//! `mesa serve` (`mesa_driver::echo`, behind its test-support feature `test-echo`), for the Autobahn TestSuite's fuzzing client
//! (`autobahn/run`).
//!
//! ```sh
//! cargo run -p mesa-tokio --example autobahn_echo -- --listen 127.0.0.1:9001 --max-message-bytes 16777216
//! ```

use std::process::ExitCode;

use mesa_driver::echo::EchoOptions;
use mesa_tokio::Tokio;

#[tokio::main]
async fn main() -> ExitCode {
    let options = match EchoOptions::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(usage) => {
            eprintln!("autobahn_echo: {usage}");
            return ExitCode::from(2);
        }
    };
    match options.serve(Tokio).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("autobahn_echo: {error}");
            ExitCode::FAILURE
        }
    }
}
