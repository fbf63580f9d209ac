//! Ports for the processes the tests start. Only the standard library, so that the
//! `mesa` binary's tests can include this file by path too.

/// A port that was free a moment ago on 127.0.0.1 (another process may take it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port on 127.0.0.1")
        .port()
}
