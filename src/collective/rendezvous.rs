//! How the processes of a run on several machines find each other: the leader (node 0) publishes the NCCL
//! unique id (128 opaque bytes) and every other node reads it, through a file on a shared file system or a
//! TCP port of node 0 — torchrun's `--rdzv-endpoint` and llm.c's shared-file / TCP init, reduced to what
//! NCCL needs. The id is then given to `ncclCommInitRank` by every GPU's thread.
//!
//! Through a file, the exchange is a handshake, so that every node knows the others are there before any
//! of them enters `ncclCommInitRank` (which waits forever for a rank that never comes):
//! 1. node 0 writes `PATH` saying "waiting", with a nonce of its own (a random number naming this run's
//!    rendezvous);
//! 2. node k reads it and answers in `PATH.node<k>`: node 0's nonce, k, the node's own nonce and its shape;
//! 3. once every node has answered with node 0's nonce and the run's shape, node 0 takes the answers
//!    (renames each to `PATH.node<k>.taken`: a node leaving from then on finds its answer gone and stays
//!    for the "go") and rewrites `PATH` as "go": the NCCL id and the nodes' nonces; a node takes the id only
//!    from a "go" that lists its own nonce. A node that leaves before that (timeout, error, signal) removes
//!    its answer, so node 0 never counts it.
//!
//! So a file left by a crashed run can delay a node but never hand it a dead run's id (it does not list
//! the node's nonce), node 0 gives up after `--rendezvous-timeout` naming the nodes that did not answer
//! (and removes its file) instead of waiting in NCCL, and the nodes may start in any order.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bytes exchanged (an `ncclUniqueId`).
pub const ID_BYTES: usize = 128;
/// TCP, version 3: the id comes with the run's shape, which every node checks against its own. The version
/// also stands for the messages the nodes exchange after it (src/collective/wire.rs): a node of another
/// version is refused here, not misread later (3: windows sent without padding).
const MAGIC: &[u8; 12] = b"bertqa-rdzv3";
/// The file handshake (see the module doc), version 4: node 0's file and the nodes' answers (versioned
/// with the wire format as [`MAGIC`] is).
const FILE_MAGIC: &[u8; 12] = b"bertqa-rdzf4";
/// The nonces that name one rendezvous (node 0's) and one node's process (each other node's).
type Nonce = [u8; 16];
/// How often a file rendezvous looks again.
const POLL: Duration = Duration::from_millis(100);
/// How long a node whose answer node 0 has taken waits past its timeout for the "go" (node 0 writes it
/// right after taking the answers).
const COMMITTED_GRACE: Duration = Duration::from_secs(60);

/// A rendezvous file this process wrote — node 0's file, or a node's answer — and removes when it is done
/// or ends: its path, and the nonce at byte `at` that makes it this process's (another process may have
/// replaced it since: that one is left alone).
struct Owned {
    path: PathBuf,
    nonce: Nonce,
    at: usize,
}

/// Where node 0's nonce sits in its file, and a node's own nonce in its answer.
const NODE0_NONCE_AT: usize = 13;
const ANSWER_NONCE_AT: usize = 36;

/// The rendezvous files this process owns and has not removed yet: removed by [`retire_published`], which
/// the paths that end the process with `std::process::exit` (no destructors run there) call first — a
/// signal while node 0 waits for the others, or while a node waits for node 0, say.
static PUBLISHED: Mutex<Vec<Owned>> = Mutex::new(Vec::new());

fn published() -> std::sync::MutexGuard<'static, Vec<Owned>> {
    PUBLISHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Remove `o.path` if it is still this process's; whether it was removed.
fn remove_if_ours(o: &Owned) -> bool {
    std::fs::read(&o.path).is_ok_and(|b| b.get(o.at..o.at + 16) == Some(&o.nonce[..]))
        && std::fs::remove_file(&o.path).is_ok()
}

/// Remove (if still ours) and forget the owned files at `p` — of one nonce, or any.
fn retire_file(p: &Path, nonce: Option<&Nonce>) {
    let mut list = published();
    let mut i = 0;
    while i < list.len() {
        if list[i].path == p && nonce.is_none_or(|n| *n == list[i].nonce) {
            remove_if_ours(&list.remove(i));
        } else {
            i += 1;
        }
    }
}

/// Remove every rendezvous file this process owns (see [`PUBLISHED`]).
pub fn retire_published() {
    for o in std::mem::take(&mut *published()) {
        remove_if_ours(&o);
    }
}

/// Create `p` holding `bytes`, whole, failing if it exists — even when another process creates it at the
/// same moment: written under a temporary name, then hard-linked to `p` (atomic and exclusive, NFS
/// included). Where hard links are not supported, checked and renamed (not exclusive).
fn create_exclusive(p: &Path, bytes: &[u8], tag: &Nonce) -> Result<()> {
    use std::io::Write;
    let exists = || {
        anyhow::anyhow!(
            "rendezvous file {} exists already (another run's, or left by a crashed one): remove it, or \
             give another path",
            p.display()
        )
    };
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}-{:02x}{:02x}{:02x}{:02x}",
        p.file_name().and_then(|n| n.to_str()).unwrap_or("rdzv"),
        std::process::id(),
        tag[0],
        tag[1],
        tag[2],
        tag[3]
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ok();
    }
    let linked = std::fs::hard_link(&tmp, p);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
        Err(_) => {
            if p.exists() {
                return Err(exists());
            }
            crate::util::write_atomic(p, bytes)
        }
    }
}

/// End the process with `code`, removing its rendezvous files first ([`retire_published`]):
/// `std::process::exit` runs no destructors, so every early exit of a training process goes through here.
pub fn exit(code: i32) -> ! {
    // held to the end: a node cannot write (or re-write) an answer between the removal and the exit
    let mut owned = published();
    for o in std::mem::take(&mut *owned) {
        remove_if_ours(&o);
    }
    std::process::exit(code)
}

/// Fresh random bytes from the standard library's per-process hash keys (drawn from the OS), the time
/// and the process id: a nonce nobody else's run will hold.
fn nonce() -> Nonce {
    use std::hash::{BuildHasher, Hasher};
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(t);
        h.write_u32(std::process::id());
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

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

    /// Node 0: hand `id` (and the run's `shape`) to the `shape.nnodes - 1` other nodes, waiting up to
    /// `timeout` until each has it (a file: until each has answered, see the module doc; TCP: connected). A
    /// node of another shape is refused, and told why; node 0 goes on waiting for the right one.
    pub fn publish(&self, id: &[u8; ID_BYTES], shape: RunShape, timeout: Duration) -> Result<()> {
        let nnodes = shape.nnodes;
        match self {
            Rendezvous::File(p) => publish_file(p, id, shape, timeout),
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
                            Err(e) => crate::say!("rendezvous: ignoring {peer}: {e:#}"),
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
            retire_file(p, None);
        }
    }

    /// Node `node` (≥ 1) of a run of `shape`: the id node 0 published, waiting up to `timeout` for it; an
    /// error when node 0's run has another shape.
    pub fn fetch(&self, node: usize, shape: RunShape, timeout: Duration) -> Result<[u8; ID_BYTES]> {
        let t0 = Instant::now();
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
            Rendezvous::File(p) => fetch_file(p, node, shape, timeout),
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

/// Node 0's file: "waiting" (its nonce and the run's shape), then "go" (with the NCCL id and the nonces of
/// the nodes that answered). Layout: FILE_MAGIC, state (0 waiting, 1 go), node 0's nonce, the shape; for
/// "go" then the id, the number of nodes' nonces (u64) and the nonces.
#[derive(Debug, PartialEq, Eq)]
struct NodeZeroFile {
    nonce: Nonce,
    shape: RunShape,
    go: Option<([u8; ID_BYTES], Vec<Nonce>)>,
}

const FILE_HEAD: usize = 12 + 1 + 16 + 16;

impl NodeZeroFile {
    fn bytes(&self) -> Vec<u8> {
        let mut b = FILE_MAGIC.to_vec();
        b.push(u8::from(self.go.is_some()));
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.shape.bytes());
        if let Some((id, nodes)) = &self.go {
            b.extend_from_slice(id);
            b.extend_from_slice(&(nodes.len() as u64).to_le_bytes());
            for n in nodes {
                b.extend_from_slice(n);
            }
        }
        b
    }

    fn parse(b: &[u8], src: &Path) -> Result<NodeZeroFile> {
        let bad = || {
            anyhow::anyhow!(
                "rendezvous: {} does not hold a bertqa rendezvous of this version ({} bytes; a file of \
                 another bertqa version, or not bertqa's)",
                src.display(),
                b.len()
            )
        };
        if b.len() < FILE_HEAD || &b[..12] != FILE_MAGIC {
            return Err(bad());
        }
        let nonce: Nonce = b[13..29].try_into()?;
        let shape = RunShape::from_bytes(&b[29..45]);
        let go = match b[12] {
            0 if b.len() == FILE_HEAD => None,
            1 if b.len() >= FILE_HEAD + ID_BYTES + 8 => {
                let rest = &b[FILE_HEAD..];
                let id: [u8; ID_BYTES] = rest[..ID_BYTES].try_into()?;
                let n = u64::from_le_bytes(rest[ID_BYTES..ID_BYTES + 8].try_into()?) as usize;
                let nonces = &rest[ID_BYTES + 8..];
                if Some(nonces.len()) != n.checked_mul(16) {
                    return Err(bad());
                }
                let nodes = nonces
                    .chunks(16)
                    .map(|c| c.try_into().expect("16 bytes"))
                    .collect();
                Some((id, nodes))
            }
            _ => return Err(bad()),
        };
        Ok(NodeZeroFile { nonce, shape, go })
    }
}

/// Node k's answer to node 0's "waiting" file, in `PATH.node<k>`: FILE_MAGIC, node 0's nonce, k, the
/// node's own nonce, its shape.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    leader: Nonce,
    node: u64,
    own: Nonce,
    shape: RunShape,
}

impl Answer {
    fn bytes(&self) -> Vec<u8> {
        let mut b = FILE_MAGIC.to_vec();
        b.extend_from_slice(&self.leader);
        b.extend_from_slice(&self.node.to_le_bytes());
        b.extend_from_slice(&self.own);
        b.extend_from_slice(&self.shape.bytes());
        b
    }

    /// None for anything else (an unfinished or foreign file is simply not an answer yet).
    fn read(path: &Path) -> Option<Answer> {
        let b = std::fs::read(path).ok()?;
        if b.len() != 12 + 16 + 8 + 16 + 16 || &b[..12] != FILE_MAGIC {
            return None;
        }
        Some(Answer {
            leader: b[12..28].try_into().ok()?,
            node: u64::from_le_bytes(b[28..36].try_into().ok()?),
            own: b[36..52].try_into().ok()?,
            shape: RunShape::from_bytes(&b[52..68]),
        })
    }
}

/// Where node 0 moves node `node`'s answer when it takes it (see [`take_answers`]).
fn taken_path(p: &Path, node: usize) -> PathBuf {
    let mut name = answer_path(p, node).into_os_string();
    name.push(".taken");
    PathBuf::from(name)
}

/// Node 0, once every node has answered: move each answer to its taken name (a rename: the node can
/// then no longer withdraw it, see [`withdraw`]), checking it is still the answer that was read; the
/// nodes' nonces in node order. None — every answer put back — if one was withdrawn or replaced in the
/// meantime.
fn take_answers(p: &Path, nnodes: usize, leader: Nonce, read: &[Nonce]) -> Option<Vec<Nonce>> {
    let mut taken = vec![];
    let ok = (1..nnodes).zip(read).all(|(k, own)| {
        if std::fs::rename(answer_path(p, k), taken_path(p, k)).is_err() {
            return false;
        }
        taken.push(k);
        Answer::read(&taken_path(p, k)).is_some_and(|a| a.leader == leader && a.own == *own)
    });
    if ok {
        return Some(read.to_vec());
    }
    for k in taken {
        let _ = std::fs::rename(taken_path(p, k), answer_path(p, k));
    }
    None
}

/// A node leaving before "go": remove its answer, unless node 0 has taken it (then the node is part of
/// the run: true, and it must wait for the "go" that follows).
fn withdraw(p: &Path, node: usize, own: &Nonce) -> bool {
    let answer = Owned {
        path: answer_path(p, node),
        nonce: *own,
        at: ANSWER_NONCE_AT,
    };
    let _guard = published();
    !remove_if_ours(&answer) && Answer::read(&taken_path(p, node)).is_some_and(|a| a.own == *own)
}

/// Where node `node` answers: `PATH.node<node>`, beside node 0's file.
fn answer_path(p: &Path, node: usize) -> PathBuf {
    let mut name = p.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".node{node}"));
    p.with_file_name(name)
}

/// Node 0's side of the file handshake (see the module doc): returns once every node has answered and
/// the "go" is written; gives up after `timeout`, naming the nodes that did not answer, and removes its
/// file.
fn publish_file(p: &Path, id: &[u8; ID_BYTES], shape: RunShape, timeout: Duration) -> Result<()> {
    let leader = nonce();
    let waiting = NodeZeroFile {
        nonce: leader,
        shape,
        go: None,
    };
    // owned before it exists: a signal right after it is written removes it
    published().push(Owned {
        path: p.to_path_buf(),
        nonce: leader,
        at: NODE0_NONCE_AT,
    });
    if let Err(e) = create_exclusive(p, &waiting.bytes(), &leader) {
        retire_file(p, Some(&leader)); // not ours: left alone
        return Err(e);
    }
    let res = wait_for_answers(p, id, shape, timeout, leader);
    if res.is_err() {
        retire_file(p, Some(&leader));
    }
    res
}

/// Node 0 after writing "waiting": every node's answer, then "go" (see [`publish_file`]).
fn wait_for_answers(
    p: &Path,
    id: &[u8; ID_BYTES],
    shape: RunShape,
    timeout: Duration,
    leader: Nonce,
) -> Result<()> {
    let t0 = Instant::now();
    // nodes refused for their shape, and why (told once; such a node may come back with the right one)
    let mut refused = std::collections::BTreeMap::new();
    loop {
        let (mut nodes, mut missing) = (vec![], vec![]);
        for k in 1..shape.nnodes {
            match Answer::read(&answer_path(p, k)) {
                // an answer to another rendezvous (an earlier run's) is no answer
                Some(a) if a.leader == leader && a.node == k as u64 => {
                    match shape.mismatch(&a.shape, &format!("node {k}")) {
                        None => {
                            refused.remove(&k);
                            nodes.push(a.own);
                        }
                        Some(why) => {
                            if refused.insert(k, why.clone()).as_ref() != Some(&why) {
                                crate::say!("rendezvous: refusing {why}");
                            }
                            missing.push(k);
                        }
                    }
                }
                _ => missing.push(k),
            }
        }
        // every node answered: take the answers (a node can no longer withdraw one), then say go
        if missing.is_empty() {
            if let Some(nodes) = take_answers(p, shape.nnodes, leader, &nodes) {
                let go = NodeZeroFile {
                    nonce: leader,
                    shape,
                    go: Some((*id, nodes)),
                };
                let written = crate::util::write_atomic(p, &go.bytes())
                    .with_context(|| format!("writing the rendezvous file {}", p.display()));
                for k in 1..shape.nnodes {
                    let _ = std::fs::remove_file(taken_path(p, k));
                }
                return written;
            }
            // a node withdrew its answer in the meantime: wait on
            continue;
        }
        if t0.elapsed() > timeout {
            let why: Vec<String> = missing
                .iter()
                .filter_map(|k| refused.get(k).map(|w| format!("; refused {w}")))
                .collect();
            bail!(
                "rendezvous: node(s) {} of {} did not answer through {} within {:?} (started with the same \
                 --rendezvous and --node-rank 1..{}?){}; the file is removed",
                missing
                    .iter()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                shape.nnodes,
                p.display(),
                timeout,
                shape.nnodes - 1,
                why.concat()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Node `node`'s side of the file handshake: answers node 0's "waiting" file (again whenever it names
/// another rendezvous), and takes the id from a "go" that lists this process's nonce.
fn fetch_file(p: &Path, node: usize, shape: RunShape, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    let own = nonce();
    let answer = answer_path(p, node);
    // this node's answer goes when it does — success, error, timeout, or an exit on a signal — so that node
    // 0 never counts a node that has left (the answer of a node of another shape stays: node 0 names it)
    published().push(Owned {
        path: answer.clone(),
        nonce: own,
        at: ANSWER_NONCE_AT,
    });
    struct Leave(PathBuf, Nonce);
    impl Drop for Leave {
        fn drop(&mut self) {
            retire_file(&self.0, Some(&self.1));
        }
    }
    let leave = Leave(answer.clone(), own);
    let t0 = Instant::now();
    // node 0's nonce this node answered
    let mut answered: Option<Nonce> = None;
    // node 0 took this node's answer as the timeout came: it waits for the go that follows
    let mut committed = false;
    // what the file said last, for the message when node 0 never says "go" to this node
    let mut seen: &str;
    loop {
        match std::fs::read(p) {
            Ok(b) => {
                let f = NodeZeroFile::parse(&b, p)?;
                match &f.go {
                    None => {
                        if answered != Some(f.nonce) {
                            let a = Answer {
                                leader: f.nonce,
                                node: node as u64,
                                own,
                                shape,
                            };
                            {
                                // under the lock: an exit on a signal removes it, or it is not written
                                let _guard = published();
                                crate::util::write_atomic(&answer, &a.bytes()).with_context(
                                    || {
                                        format!(
                                            "rendezvous: answering node 0 beside {}",
                                            p.display()
                                        )
                                    },
                                )?;
                            }
                            answered = Some(f.nonce);
                        }
                        // (node 0 is told too: the answer, left in place, carries this node's shape)
                        if let Some(why) = shape.mismatch(&f.shape, "node 0") {
                            published().retain(|o| o.nonce != own);
                            std::mem::forget(leave);
                            bail!("rendezvous ({}): {why}", p.display());
                        }
                        seen = "node 0 is waiting for the other nodes' answers (are all --nnodes nodes \
                                started? a file left by a crashed run waits forever: remove it and restart \
                                node 0)";
                    }
                    Some((id, nodes)) => {
                        if answered == Some(f.nonce) && nodes.contains(&own) {
                            return Ok(*id);
                        }
                        seen = "it belongs to a run that started without this node (a file left by a \
                                crashed run: remove it and restart node 0; or another node was started \
                                with this --node-rank)";
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                seen = "no such file (is node 0 running with the same --rendezvous?)";
            }
            // NFS: the file was replaced while being read ("go" renamed over "waiting"): read it again
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                seen = "the file kept changing while being read (ESTALE)";
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the rendezvous file {}", p.display()))
            }
        }
        if t0.elapsed() > timeout && !committed {
            // leaving: unless node 0 has just taken this node's answer — then its "go" follows at once
            if answered.is_some() && withdraw(p, node, &own) {
                committed = true;
                continue;
            }
            bail!(
                "rendezvous: no go from node 0 through {} within {:?}: {seen}",
                p.display(),
                timeout
            );
        }
        if committed && t0.elapsed() > timeout + COMMITTED_GRACE {
            bail!(
                "rendezvous: no go from node 0 through {} within {:?} of its taking this node's answer",
                p.display(),
                COMMITTED_GRACE
            );
        }
        std::thread::sleep(POLL);
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

    const SHAPE2: RunShape = RunShape {
        nnodes: 2,
        devices_per_node: 1,
    };

    /// Wait (up to 10 s) until `cond` holds: another thread's rendezvous step has happened.
    fn wait_for(cond: impl Fn() -> bool) {
        let t = Instant::now();
        while !cond() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
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
        // through a file: the wrong node is refused at once; node 0 says so and waits for the right one
        let (dir, f) = temp_file_rdzv("shape");
        std::thread::scope(|s| {
            let node0 = s.spawn(|| f.publish(&id, two, Duration::from_secs(20)));
            let e = f
                .fetch(1, RunShape { nnodes: 3, ..two }, Duration::from_secs(20))
                .unwrap_err();
            assert!(format!("{e:#}").contains("node 0 runs --nnodes 2"), "{e:#}");
            assert_eq!(f.fetch(1, two, Duration::from_secs(20)).unwrap(), id);
            node0.join().unwrap().unwrap();
        });
        f.retire();
        // and when the right one never comes, node 0's error says why the one that came was refused
        std::thread::scope(|s| {
            let node0 = s.spawn(|| f.publish(&id, two, Duration::from_secs(2)));
            let e = f
                .fetch(1, RunShape { nnodes: 3, ..two }, Duration::from_secs(20))
                .unwrap_err();
            assert!(format!("{e:#}").contains("node 0 runs --nnodes 2"), "{e:#}");
            let e = format!("{:#}", node0.join().unwrap().unwrap_err());
            assert!(
                e.contains("node(s) 1 of 2 did not answer")
                    && e.contains("refused node 1 runs --nnodes 3"),
                "{e}"
            );
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A fresh directory and a file rendezvous in it.
    fn temp_file_rdzv(tag: &str) -> (PathBuf, Rendezvous) {
        let dir = std::env::temp_dir().join(format!("bertqa-rdzv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let r = Rendezvous::parse(&format!("file:{}", dir.join("x.rdzv").display())).unwrap();
        (dir, r)
    }

    fn path(r: &Rendezvous) -> &Path {
        match r {
            Rendezvous::File(p) => p,
            Rendezvous::Tcp(_) => unreachable!("a file rendezvous"),
        }
    }

    /// Node 0 returns only when every node has the id, whatever the order they start in; the answers are
    /// cleaned up; the file stays until the run ends (retire).
    #[test]
    fn file_handshake_waits_for_every_node_in_any_order() {
        let (dir, r) = temp_file_rdzv("order");
        let id = [5u8; ID_BYTES];
        let late = Duration::from_millis(700);
        std::thread::scope(|s| {
            // node 1 before node 0, node 2 well after it
            let n1 = s.spawn(|| r.fetch(1, SHAPE3, Duration::from_secs(20)));
            std::thread::sleep(Duration::from_millis(200));
            let t0 = Instant::now();
            let (r0, id0) = (&r, &id);
            let node0 = s.spawn(move || {
                r0.publish(id0, SHAPE3, Duration::from_secs(20))
                    .map(|()| t0.elapsed())
            });
            std::thread::sleep(late);
            let n2 = r.fetch(2, SHAPE3, Duration::from_secs(20)).unwrap();
            let waited = node0.join().unwrap().unwrap();
            assert!(
                waited >= late,
                "node 0 went on after {waited:?}, before node 2 came"
            );
            assert_eq!(n1.join().unwrap().unwrap(), id);
            assert_eq!(n2, id);
        });
        assert!(path(&r).exists());
        for k in 1..3 {
            assert!(!answer_path(path(&r), k).exists(), "answer {k} left");
        }
        r.retire();
        assert!(!path(&r).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A node that never comes: node 0 gives up after the timeout (instead of entering NCCL, which would
    /// wait forever), names it and removes its file; the node that came says what it waited for.
    #[test]
    fn node_zero_gives_up_naming_the_nodes_that_did_not_answer() {
        let (dir, r) = temp_file_rdzv("missing");
        let id = [6u8; ID_BYTES];
        std::thread::scope(|s| {
            let n1 = s.spawn(|| r.fetch(1, SHAPE3, Duration::from_secs(3)));
            let e = format!(
                "{:#}",
                r.publish(&id, SHAPE3, Duration::from_secs(1)).unwrap_err()
            );
            assert!(
                e.contains("node(s) 2 of 3 did not answer") && e.contains("the file is removed"),
                "{e}"
            );
            assert!(!path(&r).exists());
            let e = format!("{:#}", n1.join().unwrap().unwrap_err());
            assert!(e.contains("no go from node 0"), "{e}");
        });
        assert!(!published().iter().any(|o| o.path == path(&r)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file left by a crashed run (its "go", or a "waiting" whose node 0 died) never hands a node a dead
    /// run's id: the node waits, and takes the id of the next node 0 once the file is replaced.
    #[test]
    fn a_file_left_by_a_crashed_run_delays_a_node_but_never_hands_it_the_dead_runs_id() {
        let (dir, r) = temp_file_rdzv("stale");
        let two = SHAPE2;
        let (dead, live) = ([1u8; ID_BYTES], [2u8; ID_BYTES]);
        // a whole rendezvous whose node 0 then crashed (its file stays)
        std::thread::scope(|s| {
            let n1 = s.spawn(|| r.fetch(1, two, Duration::from_secs(20)));
            r.publish(&dead, two, Duration::from_secs(20)).unwrap();
            assert_eq!(n1.join().unwrap().unwrap(), dead);
        });
        published().retain(|o| o.path != path(&r));
        // a node of the next run does not take it...
        let e = format!("{:#}", r.fetch(1, two, Duration::from_secs(1)).unwrap_err());
        assert!(e.contains("started without this node"), "{e}");
        // ...and node 0 refuses to start over it
        let e = format!(
            "{:#}",
            r.publish(&live, two, Duration::from_secs(1)).unwrap_err()
        );
        assert!(e.contains("exists already"), "{e}");
        // once it is removed and node 0 restarted, the waiting node joins the new run
        std::thread::scope(|s| {
            let n1 = s.spawn(|| r.fetch(1, two, Duration::from_secs(20)));
            std::thread::sleep(Duration::from_millis(400));
            assert!(!n1.is_finished(), "node 1 took the dead run's id");
            std::fs::remove_file(path(&r)).unwrap();
            r.publish(&live, two, Duration::from_secs(20)).unwrap();
            assert_eq!(n1.join().unwrap().unwrap(), live);
        });
        r.retire();
        // a node 0 that died while waiting: the node answers it, and answers the next one again
        let stale = NodeZeroFile {
            nonce: [3u8; 16],
            shape: two,
            go: None,
        };
        std::fs::write(path(&r), stale.bytes()).unwrap();
        std::thread::scope(|s| {
            let n1 = s.spawn(|| r.fetch(1, two, Duration::from_secs(20)));
            let answer = answer_path(path(&r), 1);
            wait_for(|| answer.exists());
            assert_eq!(Answer::read(&answer).map(|a| a.leader), Some([3u8; 16]));
            std::fs::remove_file(path(&r)).unwrap();
            r.publish(&live, two, Duration::from_secs(20)).unwrap();
            assert_eq!(n1.join().unwrap().unwrap(), live);
        });
        r.retire();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A node that answered and then left (its timeout here; a signal or an error likewise) takes its
    /// answer with it: node 0 does not count it, so it never enters NCCL with a node that is gone (before:
    /// the answer stayed, node 0 said "go" once the last node came, and every node hung in NCCL).
    #[test]
    fn a_node_that_left_is_not_counted() {
        let (dir, r) = temp_file_rdzv("left");
        let id = [4u8; ID_BYTES];
        std::thread::scope(|s| {
            let node0 = s.spawn(|| r.publish(&id, SHAPE3, Duration::from_secs(4)));
            // node 1 answers, waits 1 s for a go that cannot come (node 2 is not there yet), and leaves
            let e = format!(
                "{:#}",
                r.fetch(1, SHAPE3, Duration::from_secs(1)).unwrap_err()
            );
            assert!(e.contains("no go from node 0"), "{e}");
            assert!(
                !answer_path(path(&r), 1).exists(),
                "node 1's answer outlived it"
            );
            // node 2 comes: node 0 still lacks node 1, and says so when it gives up
            let n2 = s.spawn(|| r.fetch(2, SHAPE3, Duration::from_secs(8)));
            let e = format!("{:#}", node0.join().unwrap().unwrap_err());
            assert!(e.contains("node(s) 1 of 3 did not answer"), "{e}");
            assert!(n2.join().unwrap().is_err());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A node whose timeout comes just as node 0 takes its answer (the moment between node 0 reading
    /// every answer and writing "go") stays for the go instead of leaving: node 0 would otherwise enter
    /// NCCL with a node that is gone. Node 0's side is played by hand here, to hold that moment open.
    #[test]
    fn a_node_whose_answer_was_taken_waits_for_the_go() {
        let (dir, r) = temp_file_rdzv("taken");
        let two = SHAPE2;
        let leader = [9u8; 16];
        let waiting = NodeZeroFile {
            nonce: leader,
            shape: two,
            go: None,
        };
        std::fs::write(path(&r), waiting.bytes()).unwrap();
        let id = [3u8; ID_BYTES];
        std::thread::scope(|s| {
            let n1 = s.spawn(|| r.fetch(1, two, Duration::from_millis(500)));
            let answer = answer_path(path(&r), 1);
            wait_for(|| Answer::read(&answer).is_some());
            let own = Answer::read(&answer).unwrap().own;
            // node 0 takes the answer... and is slow to say go: past node 1's timeout
            assert_eq!(take_answers(path(&r), 2, leader, &[own]), Some(vec![own]));
            std::thread::sleep(Duration::from_millis(1500));
            assert!(!n1.is_finished(), "node 1 left after its answer was taken");
            let go = NodeZeroFile {
                nonce: leader,
                shape: two,
                go: Some((id, vec![own])),
            };
            crate::util::write_atomic(path(&r), &go.bytes()).unwrap();
            assert_eq!(n1.join().unwrap().unwrap(), id);
        });
        // and one whose answer was not taken leaves at its timeout, taking the answer with it; an answer
        // withdrawn before node 0 takes it makes the taking fail (every answer put back)
        std::fs::write(path(&r), waiting.bytes()).unwrap();
        let e = format!(
            "{:#}",
            r.fetch(1, two, Duration::from_millis(300)).unwrap_err()
        );
        assert!(e.contains("no go from node 0"), "{e}");
        assert!(!answer_path(path(&r), 1).exists());
        assert_eq!(take_answers(path(&r), 2, leader, &[[0u8; 16]]), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A second node 0 on the same path (another run, or a node given rank 0 twice) is refused, and its
    /// refusal leaves the first one's file alone (before: its error path could remove the live file).
    #[test]
    fn a_second_node_zero_is_refused_and_leaves_the_first_ones_file() {
        let (dir, r) = temp_file_rdzv("twice");
        let two = SHAPE2;
        let (first, second) = ([1u8; ID_BYTES], [2u8; ID_BYTES]);
        std::thread::scope(|s| {
            let node0 = s.spawn(|| r.publish(&first, two, Duration::from_secs(20)));
            wait_for(|| path(&r).exists());
            let e = format!(
                "{:#}",
                r.publish(&second, two, Duration::from_secs(1)).unwrap_err()
            );
            assert!(e.contains("exists already"), "{e}");
            assert!(path(&r).exists(), "the first node 0's file was removed");
            assert_eq!(r.fetch(1, two, Duration::from_secs(20)).unwrap(), first);
            node0.join().unwrap().unwrap();
        });
        r.retire();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The files' layouts read back as written; anything else is refused by name (node 0's file) or not
    /// taken for an answer.
    #[test]
    fn file_layouts_round_trip_and_garbage_is_named() {
        let go = NodeZeroFile {
            nonce: [8u8; 16],
            shape: SHAPE3,
            go: Some(([4u8; ID_BYTES], vec![[1u8; 16], [2u8; 16]])),
        };
        let p = Path::new("/x/run.rdzv");
        assert_eq!(NodeZeroFile::parse(&go.bytes(), p).unwrap(), go);
        let mut cut = go.bytes();
        cut.pop();
        for bad in [&cut[..], b"hello", &[0u8; 300][..]] {
            let e = format!("{:#}", NodeZeroFile::parse(bad, p).unwrap_err());
            assert!(
                e.contains("/x/run.rdzv does not hold a bertqa rendezvous"),
                "{e}"
            );
        }
        assert_eq!(answer_path(p, 2), Path::new("/x/run.rdzv.node2"));
        let (dir, r) = temp_file_rdzv("layout");
        std::fs::write(path(&r), b"not a rendezvous").unwrap();
        let e = format!(
            "{:#}",
            r.fetch(1, SHAPE3, Duration::from_secs(5)).unwrap_err()
        );
        assert!(e.contains("does not hold a bertqa rendezvous"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
