//! The CPU communicator between shard processes on one host: a star over TCP at
//! `--master-addr:--master-port` (the rendezvous TGI's ranks use for torch.distributed). Rank 0
//! accepts one connection per peer; in a collective every peer sends its buffer to rank 0, which
//! combines them in rank order and sends the result back, so every rank ends with the same bytes.
//!
//! Joining: rank 0 binds the rendezvous address (loopback unless told otherwise) and admits a
//! connection only when its hello carries the group's per-launch secret (compared in constant
//! time); anything else is logged and dropped while rank 0 keeps waiting for the real peer.
//!
//! Invariants: each message carries the collective's kind and sequence number, so ranks that fall
//! out of step get an error instead of mixing tensors; every read and write has a deadline, so a
//! dead or stuck peer fails the collective quickly. Every shape is a valid contribution, empty
//! ones included (a chunk-only forward gathers zero logit rows). When the buffers all arrived but
//! do not fit together (lengths disagree), rank 0 answers every peer with a refusal: that
//! collective fails on every rank and the group stays in step for the next one. Only a transport
//! failure (timeout, closed socket, out-of-step message) breaks the group for good (ranks cannot
//! re-synchronise), after which every later collective fails at once.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Comm;
use crate::{Error, Result};

const MAGIC: u32 = 0x5453_5241; // "TSRA"
/// Largest message a collective accepts (a corrupt length must not allocate without bound).
const MAX_MESSAGE: usize = 1 << 34;
/// Longest refusal text and longest secret a hello may carry.
const MAX_TEXT: usize = 4096;
const MAX_SECRET: usize = 256;
/// How long rank 0 gives one connection to say hello: a silent stranger delays the real peers
/// by at most this much.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// The environment variable through which the launcher hands every rank the group's secret
/// (never argv, which any local user can read in `/proc/PID/cmdline`).
pub const SECRET_ENV: &str = "TESSERA_TP_SECRET";

/// Where and how long to wait, and the group's secret.
#[derive(Clone)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
    /// How long rank 0 waits for every peer, and a peer for rank 0, at startup.
    pub join_timeout: Duration,
    /// How long one read or write inside a collective may block.
    pub op_timeout: Duration,
    /// Shared by the ranks of one launch; a connection that does not present it is refused.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("join_timeout", &self.join_timeout)
            .field("op_timeout", &self.op_timeout)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    /// Rank 0's answer when the contributions do not fit together; the payload is the reason.
    Refused = 3,
}

/// How one collective failed: `Refused` leaves every rank in step, `Broken` does not.
enum Fail {
    Refused(Error),
    Broken(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Broken(e)
    }
}

type OpResult<T> = std::result::Result<T, Fail>;

/// One peer connection with its reusable byte buffer.
struct Link {
    peer: usize,
    stream: TcpStream,
    buf: Vec<u8>,
}

struct State {
    /// Rank 0: links to ranks 1..world in order. Other ranks: the link to rank 0.
    links: Vec<Link>,
    seq: u64,
}

pub struct CpuComm {
    rank: usize,
    world: usize,
    state: Mutex<State>,
    broken: AtomicBool,
}

impl std::fmt::Debug for CpuComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuComm(rank {} of {})", self.rank, self.world)
    }
}

fn comm_err(msg: impl std::fmt::Display) -> Error {
    Error::Device(format!("tensor-parallel communicator: {msg}"))
}

impl CpuComm {
    /// Joins the group: blocks until all `world` ranks are connected or `join_timeout` passes.
    pub fn join(rank: usize, world: usize, rdv: &Rendezvous) -> Result<Self> {
        if world < 2 || rank >= world {
            return Err(comm_err(format!(
                "rank {rank} of world size {world}: a group needs 2 or more ranks"
            )));
        }
        let links = if rank == 0 {
            accept_peers(world, rdv)?
        } else {
            vec![connect_master(rank, world, rdv)?]
        };
        for link in &links {
            let s = &link.stream;
            s.set_nodelay(true).map_err(comm_err)?;
            s.set_read_timeout(Some(rdv.op_timeout)).map_err(comm_err)?;
            s.set_write_timeout(Some(rdv.op_timeout))
                .map_err(comm_err)?;
        }
        tracing::info!(
            "rank {rank} joined the tensor-parallel group of {world} at {}:{}",
            rdv.master_addr,
            rdv.master_port
        );
        Ok(CpuComm {
            rank,
            world,
            state: Mutex::new(State { links, seq: 0 }),
            broken: AtomicBool::new(false),
        })
    }

    /// Runs one collective under the lock; a transport failure breaks the group, a refusal
    /// fails only this collective.
    fn collective<T>(
        &self,
        op: Op,
        body: impl FnOnce(&mut [Link], u64) -> OpResult<T>,
    ) -> Result<T> {
        if self.broken.load(Ordering::Acquire) {
            return Err(comm_err(format!(
                "rank {}: the group is broken by an earlier failure; restart every shard",
                self.rank
            )));
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seq += 1;
        let seq = state.seq;
        match body(&mut state.links, seq) {
            Ok(v) => Ok(v),
            Err(Fail::Refused(e)) => {
                tracing::warn!("rank {}: {op:?} #{seq} refused: {e}", self.rank);
                Err(e)
            }
            Err(Fail::Broken(e)) => {
                self.broken.store(true, Ordering::Release);
                tracing::error!("rank {}: {op:?} #{seq} failed: {e}", self.rank);
                // Closing every link makes the peers fail at once instead of at their timeout.
                for link in &state.links {
                    let _ = link.stream.shutdown(std::net::Shutdown::Both);
                }
                Err(e)
            }
        }
    }
}

/// Rank 0's side of a refusal: every peer learns why, then this rank fails with the same reason.
fn refuse<T>(links: &mut [Link], seq: u64, reason: String) -> OpResult<T> {
    for link in links.iter_mut() {
        link.send_bytes(Op::Refused, seq, reason.as_bytes())?;
    }
    Err(Fail::Refused(comm_err(reason)))
}

impl Comm for CpuComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.collective(Op::AllReduce, |links, seq| {
            if self.rank != 0 {
                let master = &mut links[0];
                master.send(Op::AllReduce, seq, buf)?;
                let sum = master.recv_reply(Op::AllReduce, seq)?;
                if sum.len() != buf.len() {
                    return Err(Fail::Broken(comm_err(format!(
                        "rank 0 answered {} values for {}",
                        sum.len(),
                        buf.len()
                    ))));
                }
                buf.copy_from_slice(&sum);
                return Ok(());
            }
            let parts = links
                .iter_mut()
                .map(|l| l.recv_vec(Op::AllReduce, seq))
                .collect::<Result<Vec<_>>>()?;
            if let Some((r, p)) = (1..).zip(&parts).find(|(_, p)| p.len() != buf.len()) {
                let reason = format!(
                    "all_reduce: rank {r} sent {} values, rank 0 holds {}",
                    p.len(),
                    buf.len()
                );
                return refuse(links, seq, reason);
            }
            for part in &parts {
                for (a, b) in buf.iter_mut().zip(part) {
                    *a += b;
                }
            }
            for link in links.iter_mut() {
                link.send(Op::AllReduce, seq, buf)?;
            }
            Ok(())
        })
    }

    fn all_gather_columns(&self, local: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.collective(Op::AllGather, |links, seq| {
            if self.rank != 0 {
                let master = &mut links[0];
                master.send(Op::AllGather, seq, local)?;
                return master.recv_reply(Op::AllGather, seq);
            }
            let mut blocks = vec![local.to_vec()];
            for link in links.iter_mut() {
                blocks.push(link.recv_vec(Op::AllGather, seq)?);
            }
            let widths = match column_widths(&blocks, rows) {
                Ok(w) => w,
                Err(reason) => return refuse(links, seq, reason),
            };
            let total: usize = widths.iter().sum();
            let mut out = Vec::with_capacity(rows * total);
            for row in 0..rows {
                for (block, &w) in blocks.iter().zip(&widths) {
                    out.extend_from_slice(&block[row * w..(row + 1) * w]);
                }
            }
            for link in links.iter_mut() {
                link.send(Op::AllGather, seq, &out)?;
            }
            Ok(out)
        })
    }
}

/// Each rank's column count when every block is `rows` whole rows. Zero rows (a forward that
/// wants no logits) is valid when every block is empty; a rank may also hold zero columns.
fn column_widths(blocks: &[Vec<f32>], rows: usize) -> std::result::Result<Vec<usize>, String> {
    (0..)
        .zip(blocks)
        .map(|(rank, b)| match (rows, b.len()) {
            (0, 0) => Ok(0),
            (0, len) => Err(format!(
                "all_gather of 0 rows: rank {rank} sent {len} values"
            )),
            (rows, len) if len.is_multiple_of(rows) => Ok(len / rows),
            (rows, len) => Err(format!(
                "all_gather: rank {rank} sent {len} values, not {rows} whole rows"
            )),
        })
        .collect()
}

impl Link {
    fn io(&self, what: &str, e: std::io::Error) -> Error {
        let why = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".into(),
            std::io::ErrorKind::UnexpectedEof => "connection closed (is it still running?)".into(),
            _ => e.to_string(),
        };
        comm_err(format!("{what} rank {}: {why}", self.peer))
    }

    /// Header (op, seq, byte length) and payload in one write.
    fn send(&mut self, op: Op, seq: u64, data: &[f32]) -> Result<()> {
        self.send_bytes(op, seq, bytemuck::cast_slice(data))
    }

    fn send_bytes(&mut self, op: Op, seq: u64, payload: &[u8]) -> Result<()> {
        self.buf.clear();
        self.buf.push(op as u8);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf
            .extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(payload);
        let (stream, buf) = (&mut self.stream, &self.buf);
        stream.write_all(buf).map_err(|e| self.io("sending to", e))
    }

    /// Reads one message's header and checks it belongs to collective `seq`: its kind and byte
    /// length. `Refused` is accepted in place of `op` (rank 0's answer to a misfit).
    fn recv_header(&mut self, op: Op, seq: u64) -> Result<(u8, usize)> {
        let mut head = [0u8; 17];
        if let Err(e) = self.stream.read_exact(&mut head) {
            return Err(self.io("receiving from", e));
        }
        let kind = head[0];
        let got_seq = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes"));
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if (kind != op as u8 && kind != Op::Refused as u8) || got_seq != seq {
            return Err(comm_err(format!(
                "rank {} is out of step: it sent collective #{got_seq} (kind {kind}) while this \
                 rank runs #{seq} ({op:?})",
                self.peer
            )));
        }
        let fits = if kind == Op::Refused as u8 {
            len <= MAX_TEXT
        } else {
            len.is_multiple_of(4) && len <= MAX_MESSAGE
        };
        if !fits {
            return Err(comm_err(format!(
                "rank {} announced {len} bytes for kind {kind} (over the limit or not whole f32 \
                 values)",
                self.peer
            )));
        }
        Ok((kind, len))
    }

    fn read_payload(&mut self, bytes: &mut [u8]) -> Result<()> {
        self.stream
            .read_exact(bytes)
            .map_err(|e| self.io("receiving from", e))
    }

    /// A peer's contribution (rank 0 side): any number of values, checked by the caller.
    fn recv_vec(&mut self, op: Op, seq: u64) -> Result<Vec<f32>> {
        let (kind, len) = self.recv_header(op, seq)?;
        if kind != op as u8 {
            return Err(comm_err(format!(
                "rank {} sent a refusal; only rank 0 may",
                self.peer
            )));
        }
        let mut out = vec![0.0f32; len / 4];
        self.read_payload(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// Rank 0's answer (peer side): the result, or the refusal that fails this collective on
    /// every rank while keeping the group in step.
    fn recv_reply(&mut self, op: Op, seq: u64) -> OpResult<Vec<f32>> {
        let (kind, len) = self.recv_header(op, seq)?;
        if kind == Op::Refused as u8 {
            let mut text = vec![0u8; len];
            self.read_payload(&mut text)?;
            let reason = String::from_utf8_lossy(&text).into_owned();
            return Err(Fail::Refused(comm_err(format!("rank 0 refused: {reason}"))));
        }
        let mut out = vec![0.0f32; len / 4];
        self.read_payload(bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Rank 0: listens and admits one authenticated hello from each of ranks 1..world.
fn accept_peers(world: usize, rdv: &Rendezvous) -> Result<Vec<Link>> {
    let addr = format!("{}:{}", rdv.master_addr, rdv.master_port);
    let listener = TcpListener::bind(&addr)
        .map_err(|e| comm_err(format!("rank 0 cannot listen on {addr}: {e}")))?;
    listener.set_nonblocking(true).map_err(comm_err)?;
    let deadline = Instant::now() + rdv.join_timeout;
    let mut peers: Vec<Option<Link>> = (1..world).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let peer = match admit(&mut stream, world, &rdv.secret) {
                    Ok(peer) => peer,
                    Err(why) => {
                        // A port scan, a stale run, or someone without the launch's secret:
                        // drop it and keep waiting for the real peer.
                        tracing::warn!("rank 0 refused a connection from {from}: {why}");
                        continue;
                    }
                };
                if peers[peer - 1].is_some() {
                    return Err(comm_err(format!("two processes claim rank {peer}")));
                }
                stream.write_all(&MAGIC.to_le_bytes()).map_err(comm_err)?;
                peers[peer - 1] = Some(Link {
                    peer,
                    stream,
                    buf: Vec::new(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> =
                        (1..world).filter(|r| peers[r - 1].is_none()).collect();
                    return Err(comm_err(format!(
                        "rank 0 waited {:?} on {addr} for rank(s) {missing:?}",
                        rdv.join_timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(comm_err(format!("accept on {addr}: {e}"))),
        }
    }
    Ok(peers.into_iter().flatten().collect())
}

/// Reads a hello — magic, rank, world size, secret length (u32) and secret — and returns the
/// peer's rank when all of it matches this group.
fn admit(
    stream: &mut TcpStream,
    world: usize,
    secret: &[u8],
) -> std::result::Result<usize, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; 24];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("no hello within {HELLO_TIMEOUT:?}: {e}"))?;
    let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes"));
    let long = |i: usize| u64::from_le_bytes(hello[i..i + 8].try_into().expect("8 bytes"));
    let (rank, their_world, secret_len) = (long(4), long(12), word(20) as usize);
    if word(0) != MAGIC {
        return Err("not a tessera rank (bad magic)".into());
    }
    if their_world != world as u64 || rank == 0 || rank >= world as u64 {
        return Err(format!(
            "claims rank {rank} of {their_world}, this group has {world}"
        ));
    }
    if secret_len > MAX_SECRET {
        return Err(format!("secret of {secret_len} bytes"));
    }
    let mut theirs = vec![0u8; secret_len];
    stream
        .read_exact(&mut theirs)
        .map_err(|e| format!("secret cut short: {e}"))?;
    if !same_secret(&theirs, secret) {
        return Err("wrong secret".into());
    }
    Ok(rank as usize)
}

/// Constant-time equality, so the time to refuse says nothing about how much of a guess was
/// right (only the length, which is fixed per launcher).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Ranks 1..world: connect to rank 0 (retrying until it listens), say who we are with the
/// group's secret, await its ack.
fn connect_master(rank: usize, world: usize, rdv: &Rendezvous) -> Result<Link> {
    if rdv.secret.len() > MAX_SECRET {
        return Err(comm_err(format!(
            "the group secret is {} bytes, at most {MAX_SECRET}",
            rdv.secret.len()
        )));
    }
    let deadline = Instant::now() + rdv.join_timeout;
    let target = (rdv.master_addr.as_str(), rdv.master_port);
    let mut hello = MAGIC.to_le_bytes().to_vec();
    hello.extend_from_slice(&(rank as u64).to_le_bytes());
    hello.extend_from_slice(&(world as u64).to_le_bytes());
    hello.extend_from_slice(&(rdv.secret.len() as u32).to_le_bytes());
    hello.extend_from_slice(&rdv.secret);
    loop {
        let attempt = target
            .to_socket_addrs()
            .map_err(|e| comm_err(format!("{}: {e}", rdv.master_addr)))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
        if let Some(mut stream) = attempt {
            stream
                .set_read_timeout(Some(rdv.join_timeout))
                .map_err(comm_err)?;
            let mut ack = [0u8; 4];
            let greeted = stream
                .write_all(&hello)
                .and_then(|()| stream.read_exact(&mut ack));
            match greeted {
                Ok(()) if u32::from_le_bytes(ack) == MAGIC => {
                    return Ok(Link {
                        peer: 0,
                        stream,
                        buf: Vec::new(),
                    })
                }
                Ok(()) => return Err(comm_err("rank 0 answered with a bad ack")),
                Err(e) => tracing::debug!(
                    "rank {rank}: hello to rank 0 failed (wrong secret or a stranger on the \
                     port?): {e}"
                ),
            }
        }
        if Instant::now() >= deadline {
            return Err(comm_err(format!(
                "rank {rank} could not reach rank 0 at {}:{} within {:?}",
                rdv.master_addr, rdv.master_port, rdv.join_timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn rdv(port: u16, op_timeout: Duration) -> Rendezvous {
        Rendezvous {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            join_timeout: Duration::from_secs(10),
            op_timeout,
            secret: b"launch secret".to_vec(),
        }
    }

    /// Joins `world` ranks on threads of this process.
    fn group(world: usize, op_timeout: Duration) -> Vec<Arc<CpuComm>> {
        let port = free_port();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let r = rdv(port, op_timeout);
                std::thread::spawn(move || CpuComm::join(rank, world, &r).unwrap())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| Arc::new(h.join().unwrap()))
            .collect()
    }

    fn on_every_rank<T: Send + 'static>(
        comms: &[Arc<CpuComm>],
        f: impl Fn(&CpuComm) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                let (c, f) = (c.clone(), f.clone());
                std::thread::spawn(move || f(&c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        let comms = group(3, Duration::from_secs(10));
        let out = on_every_rank(&comms, |c| {
            let mut buf: Vec<f32> = (0..1000).map(|i| (i * (c.rank() + 1)) as f32).collect();
            c.all_reduce_sum(&mut buf).unwrap();
            buf
        });
        let want: Vec<f32> = (0..1000).map(|i| (i * 6) as f32).collect();
        for got in &out {
            assert_eq!(got, &want);
        }
    }

    #[test]
    fn all_gather_joins_uneven_column_blocks() {
        let comms = group(3, Duration::from_secs(10));
        // Rank r holds 2 rows of r + 1 columns, valued 10·row + r.
        let out = on_every_rank(&comms, |c| {
            let w = c.rank() + 1;
            let local: Vec<f32> = (0..2 * w)
                .map(|i| (10 * (i / w) + c.rank()) as f32)
                .collect();
            c.all_gather_columns(&local, 2).unwrap()
        });
        let want = vec![0., 1., 1., 2., 2., 2., 10., 11., 11., 12., 12., 12.];
        for got in &out {
            assert_eq!(got, &want);
        }
    }

    #[test]
    fn a_peer_that_leaves_fails_the_collective_and_breaks_the_group() {
        let mut comms = group(2, Duration::from_secs(30));
        drop(comms.pop()); // rank 1's socket closes, as when its process is killed
        let start = Instant::now();
        let mut buf = vec![1.0f32; 8];
        let err = comms[0].all_reduce_sum(&mut buf).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        assert!(err.contains("rank 1"), "{err}");
        let again = comms[0].all_reduce_sum(&mut buf).unwrap_err().to_string();
        assert!(again.contains("broken"), "{again}");
    }

    #[test]
    fn a_silent_peer_times_out() {
        let comms = group(2, Duration::from_millis(300));
        let start = Instant::now();
        let mut buf = vec![1.0f32; 8];
        let err = comms[1].all_reduce_sum(&mut buf).unwrap_err().to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn ranks_out_of_step_are_an_error_not_mixed_tensors() {
        let comms = group(2, Duration::from_secs(10));
        let start = Instant::now();
        let out = on_every_rank(&comms, |c| {
            if c.rank() == 0 {
                c.all_gather_columns(&[1.0], 1).map(|_| ())
            } else {
                c.all_reduce_sum(&mut [1.0]).map(|_| ())
            }
        });
        let err = out[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("out of step"), "{err}");
        // Rank 0 closed its links, so rank 1 failed at once rather than at its timeout.
        assert!(out[1].is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn empty_contributions_and_zero_rows_keep_the_group_working() {
        let comms = group(3, Duration::from_secs(10));
        let out = on_every_rank(&comms, |c| {
            let mut empty: [f32; 0] = [];
            c.all_reduce_sum(&mut empty).unwrap();
            // A forward that wants no logits: zero rows, nothing from anyone.
            let none = c.all_gather_columns(&[], 0).unwrap();
            // Rank 1 holds no columns at all.
            let w = [2, 0, 1][c.rank()];
            let some = c
                .all_gather_columns(&vec![c.rank() as f32; 3 * w], 3)
                .unwrap();
            let mut after = vec![1.0f32; 4];
            c.all_reduce_sum(&mut after).unwrap();
            (none, some, after)
        });
        for (none, some, after) in &out {
            assert!(none.is_empty());
            assert_eq!(some, &[0., 0., 2., 0., 0., 2., 0., 0., 2.]);
            assert_eq!(after, &[3.0; 4]);
        }
    }

    #[test]
    fn contributions_that_do_not_fit_fail_that_collective_on_every_rank_only() {
        let comms = group(2, Duration::from_secs(10));
        let out = on_every_rank(&comms, |c| {
            // Rank 1 claims rows where rank 0 has none, then sends a shorter all-reduce buffer.
            let local = if c.rank() == 0 { vec![] } else { vec![1.0] };
            let gather = c.all_gather_columns(&local, 0).map_err(|e| e.to_string());
            let mut buf = vec![1.0f32; 2 + c.rank()];
            let reduce = c.all_reduce_sum(&mut buf).map_err(|e| e.to_string());
            let mut next = vec![2.0f32; 3];
            c.all_reduce_sum(&mut next).unwrap();
            (gather, reduce, next)
        });
        for (gather, reduce, next) in &out {
            let gather = gather.as_ref().unwrap_err();
            assert!(gather.contains("0 rows: rank 1 sent 1 values"), "{gather}");
            let reduce = reduce.as_ref().unwrap_err();
            assert!(reduce.contains("rank 1 sent 3 values"), "{reduce}");
            assert_eq!(next, &[4.0; 3]);
        }
    }

    #[test]
    fn a_connection_without_the_secret_is_refused_and_the_group_still_forms() {
        let port = free_port();
        let master =
            std::thread::spawn(move || CpuComm::join(0, 2, &rdv(port, Duration::from_secs(5))));
        // A stranger who knows the protocol but not this launch's secret, then a silent one.
        let mut wrong = rdv(port, Duration::from_secs(5));
        wrong.secret = b"guessed secret".to_vec();
        wrong.join_timeout = Duration::from_millis(800);
        let err = CpuComm::join(1, 2, &wrong).unwrap_err().to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
        let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let real = CpuComm::join(1, 2, &rdv(port, Duration::from_secs(5))).unwrap();
        let master = master.join().unwrap().unwrap();
        drop(silent);
        let comms = vec![Arc::new(master), Arc::new(real)];
        let out = on_every_rank(&comms, |c| {
            let mut buf = vec![1.0f32; 2];
            c.all_reduce_sum(&mut buf).map(|()| buf)
        });
        for got in out {
            assert_eq!(got.unwrap(), vec![2.0; 2]);
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn a_missing_rank_fails_the_join_with_its_number() {
        let mut r = rdv(free_port(), Duration::from_secs(1));
        r.join_timeout = Duration::from_millis(300);
        let err = CpuComm::join(0, 3, &r).unwrap_err().to_string();
        assert!(err.contains("[1, 2]"), "{err}");
        let err = CpuComm::join(1, 2, &r).unwrap_err().to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
    }
}
