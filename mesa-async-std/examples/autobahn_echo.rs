//! A WebSocket echo server on smol with exactly the transport layer and limits of a
//! Mesa server (`mesa_driver::echo`, behind its test-support feature `test-echo`), for the Autobahn TestSuite's fuzzing client
//! (`autobahn/run`).
//!
//! ```sh
//! cargo run -p mesa-async-std --example autobahn_echo_smol -- --listen 127.0.0.1:9002 --max-message-bytes 16777216
//! ```

use std::process::ExitCode;

use mesa_async_std::Smol;
use mesa_driver::echo::EchoOptions;

fn main() -> ExitCode {
    let options = match EchoOptions::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(usage) => {
            eprintln!("autobahn_echo: {usage}");
            return ExitCode::from(2);
        }
    };
    match smol::block_on(options.serve(Smol)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("autobahn_echo: {error}");
            ExitCode::FAILURE
        }
    }
}
