//! A TCP proxy in front of a server, for the tests of what a client misses: it cuts
//! every connection it carries at once (a dropped network, not a close), refuses
//! new ones while it is held, and can send new connections to another server (the
//! client's replica was killed; the load balancer picks another).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug)]
struct Route {
    target: SocketAddr,
    held: bool,
}

/// The proxy; it stops with the test's runtime.
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    route: Arc<Mutex<Route>>,
    /// Bumped at each cut: every connection carried then ends.
    cuts: watch::Sender<u64>,
}

impl CutProxy {
    /// Listen on a free port of 127.0.0.1, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        let route = Arc::new(Mutex::new(Route {
            target,
            held: false,
        }));
        let cuts = watch::channel(0).0;
        let (routes, cutter) = (route.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, held) = {
                    let route = routes.lock().expect("route lock");
                    (route.target, route.held)
                };
                if held {
                    continue;
                }
                tokio::spawn(carry(client, target, cutter.subscribe()));
            }
        });
        CutProxy { addr, route, cuts }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cut every connection now, and refuse new ones until [`resume`](Self::resume).
    pub fn cut(&self) {
        self.route.lock().expect("route lock").held = true;
        self.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Accept connections again, forwarding them to `target`.
    pub fn resume(&self, target: SocketAddr) {
        let mut route = self.route.lock().expect("route lock");
        route.target = target;
        route.held = false;
    }
}

/// Carry one connection until either side closes, or a cut.
async fn carry(mut client: TcpStream, target: SocketAddr, mut cut: watch::Receiver<u64>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.changed() => {}
    }
}
