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
/// Version 2: the id comes with the run's shape, which every node checks against its own.
const MAGIC: &[u8; 12] = b"bertqa-rdzv2";

/// What every node of a run must agree on before NCCL joins them (with another count, NCCL would wait for
/// ranks that never come, or fail obscurely): node 0's, published with the id, is checked by every other
/// node against its own command line, and (TCP) each node's by node 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunShape {
    /// --nnodes
    pub nnodes: usize,
    /// the --devices count of every node
    pub devices_per_node: usize,
}

impl RunShape {
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(self.nnodes as u64).to_le_bytes());
        b[8..].copy_from_slice(&(self.devices_per_node as u64).to_le_bytes());
        b
    }
    fn from_bytes(b: &[u8]) -> RunShape {
        let n = |r: &[u8]| u64::from_le_bytes(r.try_into().expect("8 bytes")) as usize;
        RunShape {
            nnodes: n(&b[..8]),
            devices_per_node: n(&b[8..16]),
        }
    }
    /// Why `theirs` (the other side's) cannot join this run, if it cannot.
    fn mismatch(&self, theirs: &RunShape, who: &str) -> Option<String> {
        (self != theirs).then(|| {
            format!(
                "{who} runs --nnodes {} with {} device(s) per node, this node --nnodes {} with {}: every node \
                 must give the same --nnodes and the same --devices count",
                theirs.nnodes, theirs.devices_per_node, self.nnodes, self.devices_per_node
            )
        })
    }
}

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

    /// Node 0: hand `id` (and the run's `shape`) to the `shape.nnodes - 1` other nodes (TCP: waits until each
    /// has connected; a node of another shape is refused, and told why).
    pub fn publish(&self, id: &[u8; ID_BYTES], shape: RunShape, timeout: Duration) -> Result<()> {
        let nnodes = shape.nnodes;
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
                body.extend_from_slice(&shape.bytes());
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
                        Ok((s, peer)) => match Self::serve_one(s, id, shape, &served) {
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
        shape: RunShape,
        served: &[u64],
    ) -> Result<u64> {
        let nnodes = shape.nnodes;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = [0u8; 12 + 8 + 16];
        s.read_exact(&mut hello).context("reading its hello")?;
        if &hello[..12] != MAGIC {
            bail!("not a bertqa node of this version");
        }
        let node = u64::from_le_bytes(hello[12..20].try_into()?);
        if node == 0 || node as usize >= nnodes || served.contains(&node) {
            bail!(
                "it says it is node {node} (expected 1..{} once each)",
                nnodes - 1
            );
        }
        // the reply: status (0: joined, 1: refused), the id (zeros when refused), node 0's shape
        let theirs = RunShape::from_bytes(&hello[20..36]);
        let refused = shape.mismatch(&theirs, &format!("node {node}"));
        s.write_all(MAGIC)?;
        s.write_all(&[u8::from(refused.is_some())])?;
        s.write_all(if refused.is_some() {
            &[0u8; ID_BYTES]
        } else {
            id
        })?;
        s.write_all(&shape.bytes())?;
        match refused {
            Some(why) => bail!("refused: {why}"),
            None => Ok(node),
        }
    }

    /// Node 0, at the end of a run: remove the rendezvous file (a later run must not find this id).
    pub fn retire(&self) {
        if let Rendezvous::File(p) = self {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Node `node` (≥ 1) of a run of `shape`: the id node 0 published, waiting up to `timeout` for it; an
    /// error when node 0's run has another shape.
    pub fn fetch(&self, node: usize, shape: RunShape, timeout: Duration) -> Result<[u8; ID_BYTES]> {
        let t0 = Instant::now();
        let started = SystemTime::now();
        let parse = |b: &[u8], src: &str| -> Result<[u8; ID_BYTES]> {
            if b.len() != MAGIC.len() + ID_BYTES + 16 || &b[..MAGIC.len()] != MAGIC {
                bail!(
                    "rendezvous: {src} does not hold a bertqa rendezvous id of this version ({} bytes)",
                    b.len()
                );
            }
            let theirs = RunShape::from_bytes(&b[MAGIC.len() + ID_BYTES..]);
            if let Some(why) = shape.mismatch(&theirs, "node 0") {
                bail!("rendezvous ({src}): {why}");
            }
            Ok(b[MAGIC.len()..MAGIC.len() + ID_BYTES].try_into()?)
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
                        hello.extend_from_slice(&shape.bytes());
                        s.write_all(&hello)?;
                        let mut b = vec![0u8; MAGIC.len() + 1 + ID_BYTES + 16];
                        s.read_exact(&mut b)
                            .with_context(|| format!("rendezvous: reading the id from {addr}"))?;
                        // node 0's status byte out of the way: a refusal shows as the shapes' difference
                        b.remove(MAGIC.len());
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

    /// A TCP rendezvous on a port of this machine that was free a moment ago.
    fn local_tcp() -> Rendezvous {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Rendezvous::parse(&format!("tcp:127.0.0.1:{port}")).unwrap()
    }

    #[test]
    fn tcp_hands_the_id_to_every_node() {
        let r = local_tcp();
        let id = [7u8; ID_BYTES];
        let got: Vec<[u8; ID_BYTES]> = std::thread::scope(|s| {
            let hs: Vec<_> = (1..3)
                .map(|node| {
                    let r = r.clone();
                    s.spawn(move || r.fetch(node, SHAPE3, Duration::from_secs(20)).unwrap())
                })
                .collect();
            r.publish(&id, SHAPE3, Duration::from_secs(20)).unwrap();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| g == &id));
    }

    const SHAPE3: RunShape = RunShape {
        nnodes: 3,
        devices_per_node: 2,
    };

    /// A node of another shape (another --nnodes or --devices count) is refused on both sides, saying so;
    /// node 0 goes on waiting for the right one.
    #[test]
    fn a_node_of_another_shape_is_refused() {
        let r = local_tcp();
        let id = [9u8; ID_BYTES];
        let two = RunShape {
            nnodes: 2,
            devices_per_node: 2,
        };
        std::thread::scope(|s| {
            let (r1, r2) = (r.clone(), r.clone());
            let wrong = s.spawn(move || {
                r1.fetch(
                    1,
                    RunShape {
                        devices_per_node: 4,
                        ..two
                    },
                    Duration::from_secs(20),
                )
            });
            let node0 = s.spawn(move || r2.publish(&id, two, Duration::from_secs(20)));
            let e = wrong.join().unwrap().unwrap_err();
            assert!(
                format!("{e:#}").contains("--nnodes 2 with 2 device(s) per node"),
                "{e:#}"
            );
            // the right node still joins
            assert_eq!(r.fetch(1, two, Duration::from_secs(20)).unwrap(), id);
            node0.join().unwrap().unwrap();
        });
        // through a file
        let dir = std::env::temp_dir().join(format!("bertqa-rdzv-shape-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = Rendezvous::parse(&format!("file:{}", dir.join("x.rdzv").display())).unwrap();
        f.publish(&id, two, Duration::from_secs(1)).unwrap();
        let e = f
            .fetch(1, RunShape { nnodes: 3, ..two }, Duration::from_secs(1))
            .unwrap_err();
        assert!(format!("{e:#}").contains("node 0 runs --nnodes 2"), "{e:#}");
        assert_eq!(f.fetch(1, two, Duration::from_secs(1)).unwrap(), id);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
