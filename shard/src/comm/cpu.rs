//! The CPU communicator between shard processes on one host: a star over TCP at
//! `--master-addr:--master-port` (the rendezvous TGI's ranks use for torch.distributed). Rank 0
//! accepts one connection per peer; in a collective every peer sends its buffer to rank 0, which
//! combines them in rank order and sends the result back, so every rank ends with the same bytes.
//!
//! Invariants: each message carries the collective's kind and sequence number, so ranks that fall
//! out of step get an error instead of mixing tensors; every read and write has a deadline, so a
//! dead or stuck peer fails the collective quickly; after any failure the group is broken for good
//! (ranks cannot re-synchronise) and every later collective fails at once.

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

/// Where and how long to wait.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
    /// How long rank 0 waits for every peer, and a peer for rank 0, at startup.
    pub join_timeout: Duration,
    /// How long one read or write inside a collective may block.
    pub op_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
}

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

    /// Runs one collective under the lock; any error breaks the group.
    fn collective<T>(&self, op: Op, body: impl FnOnce(&mut [Link], u64) -> Result<T>) -> Result<T> {
        if self.broken.load(Ordering::Acquire) {
            return Err(comm_err(format!(
                "rank {}: the group is broken by an earlier failure; restart every shard",
                self.rank
            )));
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.seq += 1;
        let seq = state.seq;
        let result = body(&mut state.links, seq);
        if let Err(e) = &result {
            self.broken.store(true, Ordering::Release);
            tracing::error!("rank {}: {op:?} #{seq} failed: {e}", self.rank);
            // Closing every link makes the peers fail at once instead of at their timeout.
            for link in &state.links {
                let _ = link.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }
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
                return master.recv_into(Op::AllReduce, seq, buf);
            }
            let mut part = vec![0.0f32; buf.len()];
            for link in links.iter_mut() {
                link.recv_into(Op::AllReduce, seq, &mut part)?;
                for (a, b) in buf.iter_mut().zip(&part) {
                    *a += b;
                }
            }
            links
                .iter_mut()
                .try_for_each(|l| l.send(Op::AllReduce, seq, buf))
        })
    }

    fn all_gather_columns(&self, local: &[f32], rows: usize) -> Result<Vec<f32>> {
        let cols_of = |len: usize, rank: usize| -> Result<usize> {
            if rows == 0 || !len.is_multiple_of(rows) {
                return Err(comm_err(format!(
                    "all_gather: rank {rank} sent {len} values, not {rows} whole rows"
                )));
            }
            Ok(len / rows)
        };
        self.collective(Op::AllGather, |links, seq| {
            if self.rank != 0 {
                let master = &mut links[0];
                master.send(Op::AllGather, seq, local)?;
                return master.recv_vec(Op::AllGather, seq);
            }
            let mut blocks = vec![local.to_vec()];
            for link in links.iter_mut() {
                blocks.push(link.recv_vec(Op::AllGather, seq)?);
            }
            let widths = blocks
                .iter()
                .enumerate()
                .map(|(r, b)| cols_of(b.len(), r))
                .collect::<Result<Vec<_>>>()?;
            let total: usize = widths.iter().sum();
            let mut out = Vec::with_capacity(rows * total);
            for row in 0..rows {
                for (block, &w) in blocks.iter().zip(&widths) {
                    out.extend_from_slice(&block[row * w..(row + 1) * w]);
                }
            }
            links
                .iter_mut()
                .try_for_each(|l| l.send(Op::AllGather, seq, &out))?;
            Ok(out)
        })
    }
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
        let payload: &[u8] = bytemuck::cast_slice(data);
        self.buf.clear();
        self.buf.push(op as u8);
        self.buf.extend_from_slice(&seq.to_le_bytes());
        self.buf
            .extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(payload);
        let (stream, buf) = (&mut self.stream, &self.buf);
        stream.write_all(buf).map_err(|e| self.io("sending to", e))
    }

    /// Reads one message's header, checks it is collective `seq` of kind `op`, returns its length.
    fn recv_header(&mut self, op: Op, seq: u64) -> Result<usize> {
        let mut head = [0u8; 17];
        if let Err(e) = self.stream.read_exact(&mut head) {
            return Err(self.io("receiving from", e));
        }
        let got_seq = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(head[9..17].try_into().expect("8 bytes")) as usize;
        if head[0] != op as u8 || got_seq != seq {
            return Err(comm_err(format!(
                "rank {} is out of step: it sent collective #{got_seq} (kind {}) while this rank \
                 runs #{seq} ({op:?})",
                self.peer, head[0]
            )));
        }
        if !len.is_multiple_of(4) || len > MAX_MESSAGE {
            return Err(comm_err(format!(
                "rank {} announced {len} bytes (not whole f32 values under {MAX_MESSAGE})",
                self.peer
            )));
        }
        Ok(len / 4)
    }

    fn recv_into(&mut self, op: Op, seq: u64, out: &mut [f32]) -> Result<()> {
        let n = self.recv_header(op, seq)?;
        if n != out.len() {
            return Err(comm_err(format!(
                "rank {} sent {n} values where {} were expected",
                self.peer,
                out.len()
            )));
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        if let Err(e) = self.stream.read_exact(bytes) {
            return Err(self.io("receiving from", e));
        }
        Ok(())
    }

    fn recv_vec(&mut self, op: Op, seq: u64) -> Result<Vec<f32>> {
        let n = self.recv_header(op, seq)?;
        let mut out = vec![0.0f32; n];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        if let Err(e) = self.stream.read_exact(bytes) {
            return Err(self.io("receiving from", e));
        }
        Ok(out)
    }
}

/// Rank 0: listens and takes one hello from each of ranks 1..world.
fn accept_peers(world: usize, rdv: &Rendezvous) -> Result<Vec<Link>> {
    let addr = format!("{}:{}", rdv.master_addr, rdv.master_port);
    let listener = TcpListener::bind(&addr)
        .map_err(|e| comm_err(format!("rank 0 cannot listen on {addr}: {e}")))?;
    listener.set_nonblocking(true).map_err(comm_err)?;
    let deadline = Instant::now() + rdv.join_timeout;
    let mut peers: Vec<Option<Link>> = (1..world).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(comm_err)?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(comm_err)?;
                let Ok(peer) = read_hello(&mut stream, world) else {
                    continue; // not one of ours (a port scan, a stale run): ignore it
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

fn read_hello(stream: &mut TcpStream, world: usize) -> Result<usize> {
    let mut hello = [0u8; 20];
    stream.read_exact(&mut hello).map_err(comm_err)?;
    let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes"));
    let (rank, their_world) = (
        u64::from_le_bytes(hello[4..12].try_into().expect("8 bytes")) as usize,
        u64::from_le_bytes(hello[12..20].try_into().expect("8 bytes")) as usize,
    );
    if word(0) != MAGIC || their_world != world || rank == 0 || rank >= world {
        return Err(comm_err("bad hello"));
    }
    Ok(rank)
}

/// Ranks 1..world: connect to rank 0 (retrying until it listens), say who we are, await its ack.
fn connect_master(rank: usize, world: usize, rdv: &Rendezvous) -> Result<Link> {
    let deadline = Instant::now() + rdv.join_timeout;
    let target = (rdv.master_addr.as_str(), rdv.master_port);
    loop {
        let attempt = target
            .to_socket_addrs()
            .map_err(|e| comm_err(format!("{}: {e}", rdv.master_addr)))?
            .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
        if let Some(mut stream) = attempt {
            let mut hello = MAGIC.to_le_bytes().to_vec();
            hello.extend_from_slice(&(rank as u64).to_le_bytes());
            hello.extend_from_slice(&(world as u64).to_le_bytes());
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
                Err(e) => tracing::debug!("rank {rank}: hello to rank 0 failed: {e}"),
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
    fn a_missing_rank_fails_the_join_with_its_number() {
        let mut r = rdv(free_port(), Duration::from_secs(1));
        r.join_timeout = Duration::from_millis(300);
        let err = CpuComm::join(0, 3, &r).unwrap_err().to_string();
        assert!(err.contains("[1, 2]"), "{err}");
        let err = CpuComm::join(1, 2, &r).unwrap_err().to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
    }
}
