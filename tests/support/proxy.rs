//! A TCP proxy in front of a local server that the test can take down and
//! bring back: while down, connections are refused and open ones are cut,
//! as when the server process is stopped, but the server keeps its data
//! (moto holds its tables in memory only, so stopping moto itself would
//! lose them).

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let up = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (up2, stop2) = (up.clone(), stop.clone());
        std::thread::spawn(move || serve(listener, port, target, up2, stop2));
        Proxy { port, up, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Refuse new connections and cut the open ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    listener: TcpListener,
    port: u16,
    target: SocketAddr,
    up: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let mut listener = Some(listener);
    while !stop.load(Ordering::SeqCst) {
        if !up.load(Ordering::SeqCst) {
            // Closing the listener makes connects fail with ECONNREFUSED.
            listener = None;
            for s in open.lock().expect("proxy lock").drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let Some(l) = &listener else {
            // std sets SO_REUSEADDR, so the port can be bound again at once.
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => {
                    l.set_nonblocking(true).expect("nonblocking listener");
                    listener = Some(l);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            continue;
        };
        l.set_nonblocking(true).expect("nonblocking listener");
        match l.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut guard = open.lock().expect("proxy lock");
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        guard.push(c);
                    }
                }
                pipe(&client, &server);
                pipe(&server, &client);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}
