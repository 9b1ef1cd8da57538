//! How the processes of a run on several machines find each other: the leader (node 0) publishes the NCCL
//! unique id (128 opaque bytes) and every other node reads it, through a file on a shared file system or a
//! TCP port of node 0 — torchrun's `--rdzv-endpoint` and llm.c's shared-file / TCP init, reduced to what
//! NCCL needs. The id is then given to `ncclCommInitRank` by every GPU's thread.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// The bytes exchanged (an `ncclUniqueId`).
pub const ID_BYTES: usize = 128;
const MAGIC: &[u8; 12] = b"bertqa-rdzv1";

/// Where the id is exchanged (`--rendezvous file:PATH` or `tcp:HOST:PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    File(PathBuf),
    Tcp(String),
}

impl Rendezvous {
    pub fn parse(s: &str) -> Result<Rendezvous> {
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                bail!("--rendezvous file: needs a path (file:/shared/run1.rdzv)");
            }
            return Ok(Rendezvous::File(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    return Ok(Rendezvous::Tcp(a.to_string()))
                }
                _ => bail!("--rendezvous {s:?}: expected tcp:HOST:PORT (e.g. tcp:node0:29500)"),
            }
        }
        bail!("--rendezvous {s:?}: expected file:PATH (a shared file system) or tcp:HOST:PORT")
    }

    /// Node 0: hand `id` to the `nnodes - 1` other nodes (TCP: waits until each has connected).
    pub fn publish(&self, id: &[u8; ID_BYTES], nnodes: usize, timeout: Duration) -> Result<()> {
        match self {
            Rendezvous::File(p) => {
                if p.exists() {
                    bail!(
                        "rendezvous file {} exists already (from an earlier run?): remove it, or give \
                         another path, so that the other nodes cannot read a stale id",
                        p.display()
                    );
                }
                let mut body = MAGIC.to_vec();
                body.extend_from_slice(id);
                // written whole under another name, then renamed: a reader sees all of it or nothing
                crate::util::write_atomic(p, &body)
                    .with_context(|| format!("writing the rendezvous file {}", p.display()))
            }
            Rendezvous::Tcp(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("rendezvous: listening on {addr}"))?;
                l.set_nonblocking(true)?;
                let t0 = Instant::now();
                let mut served = vec![];
                while served.len() + 1 < nnodes {
                    match l.accept() {
                        Ok((s, peer)) => match Self::serve_one(s, id, nnodes, &served) {
                            Ok(node) => served.push(node),
                            // a stray connection (a port scan, a client of something else) is not a node
                            Err(e) => eprintln!("rendezvous: ignoring {peer}: {e:#}"),
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if t0.elapsed() > timeout {
                                bail!(
                                    "rendezvous: {} of {} nodes connected to {addr} within {:?}",
                                    served.len() + 1,
                                    nnodes,
                                    timeout
                                );
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => return Err(e).context("rendezvous: accept"),
                    }
                }
                Ok(())
            }
        }
    }

    /// Node 0's side of one TCP connection: the node's hello, then the id; the node's number.
    fn serve_one(
        mut s: std::net::TcpStream,
        id: &[u8; ID_BYTES],
        nnodes: usize,
        served: &[u64],
    ) -> Result<u64> {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = [0u8; 20];
        s.read_exact(&mut hello).context("reading its hello")?;
        if &hello[..12] != MAGIC {
            bail!("not a bertqa node");
        }
        let node = u64::from_le_bytes(hello[12..20].try_into()?);
        if node == 0 || node as usize >= nnodes || served.contains(&node) {
            bail!(
                "it says it is node {node} (expected 1..{} once each)",
                nnodes - 1
            );
        }
        s.write_all(MAGIC)?;
        s.write_all(id)?;
        Ok(node)
    }

    /// Node 0, at the end of a run: remove the rendezvous file (a later run must not find this id).
    pub fn retire(&self) {
        if let Rendezvous::File(p) = self {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Node `node` (≥ 1): the id node 0 published, waiting up to `timeout` for it.
    pub fn fetch(&self, node: usize, timeout: Duration) -> Result<[u8; ID_BYTES]> {
        let t0 = Instant::now();
        let started = SystemTime::now();
        let parse = |b: &[u8], src: &str| -> Result<[u8; ID_BYTES]> {
            if b.len() != MAGIC.len() + ID_BYTES || &b[..MAGIC.len()] != MAGIC {
                bail!(
                    "rendezvous: {src} does not hold a bertqa rendezvous id ({} bytes)",
                    b.len()
                );
            }
            Ok(b[MAGIC.len()..].try_into()?)
        };
        match self {
            Rendezvous::File(p) => loop {
                if let Ok(meta) = std::fs::metadata(p) {
                    // a file much older than this process is a previous run's
                    let fresh = meta
                        .modified()
                        .map(|m| m + Duration::from_secs(600) >= started)
                        .unwrap_or(true);
                    if fresh {
                        let b = std::fs::read(p).with_context(|| {
                            format!("reading the rendezvous file {}", p.display())
                        })?;
                        return parse(&b, &p.display().to_string());
                    }
                }
                if t0.elapsed() > timeout {
                    bail!(
                        "rendezvous: no (fresh) {} after {:?}: is node 0 running with the same --rendezvous?",
                        p.display(),
                        timeout
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            },
            Rendezvous::Tcp(addr) => loop {
                match std::net::TcpStream::connect(addr) {
                    Ok(mut s) => {
                        s.set_read_timeout(Some(timeout))?;
                        let mut hello = MAGIC.to_vec();
                        hello.extend_from_slice(&(node as u64).to_le_bytes());
                        s.write_all(&hello)?;
                        let mut b = vec![0u8; MAGIC.len() + ID_BYTES];
                        s.read_exact(&mut b)
                            .with_context(|| format!("rendezvous: reading the id from {addr}"))?;
                        return parse(&b, addr);
                    }
                    Err(e) => {
                        if t0.elapsed() > timeout {
                            return Err(e).with_context(|| {
                                format!("rendezvous: could not reach node 0 at {addr} within {timeout:?}")
                            });
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(
            Rendezvous::parse("file:/shared/x").unwrap(),
            Rendezvous::File("/shared/x".into())
        );
        assert_eq!(
            Rendezvous::parse("tcp:node0:29500").unwrap(),
            Rendezvous::Tcp("node0:29500".into())
        );
        for bad in ["node0:29500", "tcp:node0", "tcp::1", "file:", "tcp:h:99999"] {
            assert!(Rendezvous::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tcp_hands_the_id_to_every_node() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = Rendezvous::parse(&format!("tcp:127.0.0.1:{port}")).unwrap();
        let id = [7u8; ID_BYTES];
        let got: Vec<[u8; ID_BYTES]> = std::thread::scope(|s| {
            let hs: Vec<_> = (1..3)
                .map(|node| {
                    let r = r.clone();
                    s.spawn(move || r.fetch(node, Duration::from_secs(20)).unwrap())
                })
                .collect();
            r.publish(&id, 3, Duration::from_secs(20)).unwrap();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| g == &id));
    }
}
