//! Data-parallel peers in separate processes or on separate machines (`--peers`, `--rank`):
//! a star all-reduce over TCP, one process per peer.
//!
//! Written here rather than taken from burn-collective's global (multi-node) mode because, in
//! Burn 0.21, that mode retries an unreachable orchestrator forever, panics inside its runtime
//! when a peer's connection drops (`expect("Peer closed download connection")`), has no
//! timeouts, and sums in an order set by which node registered first. A run here must instead
//! stop with a typed error naming the peer, within a timeout, and sum in a fixed order. Peers
//! inside one process (`--devices N`) still go through burn-collective.
//!
//! Rank 0 listens on the first address of `--peers`; every other rank connects to it, says
//! who it is and what it trains (a digest of its configuration and data), and is refused
//! unless all agree. Each collective operation is a frame from every worker to rank 0, which
//! adds the parts in rank order and sends the sum back, so every peer gets the same bits, and
//! the same bits from one run to the next. Frame sizes are checked against what the receiver
//! expects before anything is allocated: a stranger on the port cannot make a peer allocate.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::ParallelError;

/// Where the peers of a multi-process run are and how long to wait for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// `HOST:PORT` of every peer, rank order; rank 0 listens on the first.
    pub peers: Vec<String>,
    /// This process's rank: its index in `peers`.
    pub rank: usize,
    /// How long to wait for a peer to connect or to answer before calling it lost.
    pub timeout: Duration,
}

/// Default `--peer-timeout`: long enough for the leader's checkpoint writes between steps.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(300);

/// Bumped whenever the frames change, so mismatched builds refuse each other.
const PROTOCOL: u32 = 1;
const MAGIC: [u8; 4] = *b"DUET";
/// Fixed-size header of every frame: magic, kind, sequence number, payload length.
const HEADER: usize = 4 + 1 + 8 + 8;
/// A hello's payload: protocol, rank, world size, configuration digest.
const HELLO: usize = 4 + 4 + 4 + 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Hello = 1,
    Welcome = 2,
    Sum = 3,
    Agree = 4,
    /// Rank 0 stops the group: payload the rank (u32) whose failure stopped it.
    Abort = 5,
    /// Rank 0 refuses a worker: payload the reason (UTF-8).
    Refuse = 6,
}

impl Kind {
    fn of(byte: u8) -> Option<Kind> {
        [
            Kind::Hello,
            Kind::Welcome,
            Kind::Sum,
            Kind::Agree,
            Kind::Abort,
            Kind::Refuse,
        ]
        .into_iter()
        .find(|k| *k as u8 == byte)
    }
}

/// Longest payload read outside the collective operations (a refusal's reason).
const MAX_MESSAGE: u64 = 4096;
/// How long rank 0 waits for a new connection's hello before dropping it.
const HELLO_WAIT: Duration = Duration::from_secs(5);

/// This process's connections to the other peers: to rank 0 on a worker, to every worker on
/// rank 0 (index `r - 1` for rank `r`).
pub struct NetGroup {
    rank: usize,
    world: usize,
    links: Vec<TcpStream>,
    seq: u64,
}

impl NetGroup {
    /// Connects this process to its group, refusing peers that are missing after
    /// `spec.timeout` or that train something else (`digest` differs).
    pub fn connect(spec: &NetworkSpec, digest: [u8; 32]) -> Result<NetGroup, ParallelError> {
        let world = spec.peers.len();
        if world < 2 {
            return Err(ParallelError::BadPeers(format!(
                "--peers lists {world} address(es); a multi-process run needs at least 2"
            )));
        }
        if spec.rank >= world {
            return Err(ParallelError::BadPeers(format!(
                "--rank {} is not below the {world} peers of --peers",
                spec.rank
            )));
        }
        let group = if spec.rank == 0 {
            Self::gather(spec, digest)?
        } else {
            Self::join(spec, digest)?
        };
        tracing::info!(rank = spec.rank, world, "joined the data-parallel group");
        Ok(group)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0: accept one connection per other rank, check each, welcome all or refuse all.
    fn gather(spec: &NetworkSpec, digest: [u8; 32]) -> Result<NetGroup, ParallelError> {
        let world = spec.peers.len();
        let address = resolve(&spec.peers[0])?;
        let listener = TcpListener::bind(address).map_err(|e| ParallelError::Address {
            address: spec.peers[0].clone(),
            detail: format!("cannot listen there: {e}"),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| lost(0, "listening socket", e))?;
        let hosts: Vec<Vec<IpAddr>> = spec.peers.iter().map(|p| host_ips(p)).collect();
        let mut links: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let deadline = Instant::now() + spec.timeout;
        let mut refusal: Option<ParallelError> = None;
        while links.iter().any(Option::is_none) && refusal.is_none() {
            if Instant::now() >= deadline {
                let ranks = (1..world).filter(|r| links[r - 1].is_none()).collect();
                let missing = ParallelError::Missing {
                    ranks,
                    seconds: spec.timeout.as_secs_f64(),
                };
                // The ranks that did join learn why they were not welcomed.
                for link in links.iter_mut().flatten() {
                    let _ = write_frame(link, Kind::Refuse, 0, missing.to_string().as_bytes());
                }
                return Err(missing);
            }
            let (mut stream, from) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                // A connection reset or aborted before it was accepted is not a peer's.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(ParallelError::Address {
                        address: spec.peers[0].clone(),
                        detail: format!("accepting peers there: {e}"),
                    })
                }
            };
            // A connection that cannot be set up, or does not say hello at once (a worker says
            // hello as soon as it connects), is a stranger: dropped, not fatal.
            if let Err(e) = configure(&stream, spec.timeout) {
                tracing::warn!("ignored a connection from {from}: {e}");
                continue;
            }
            let until = deadline.min(Instant::now() + HELLO_WAIT);
            let hello =
                match read_frame(&mut Until(&mut stream, until), Kind::Hello, 0, HELLO as u64) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::warn!("ignored a connection from {from}: {e}");
                        continue;
                    }
                };
            let word = |i: usize| u32::from_le_bytes(hello[4 * i..4 * i + 4].try_into().unwrap());
            let (protocol, rank, their_world) = (word(0), word(1) as usize, word(2) as usize);
            let problem = if protocol != PROTOCOL {
                Some(format!(
                    "peer at {from} speaks protocol {protocol}, this build {PROTOCOL}: run the \
                     same duet-train on every peer"
                ))
            } else if their_world != world || rank == 0 || rank >= world {
                Some(format!(
                    "peer at {from} calls itself rank {rank} of {their_world}; this group has \
                     ranks 1..{world} besides rank 0: give every peer the same --peers"
                ))
            } else if links[rank - 1].is_some() {
                Some(format!(
                    "two peers call themselves rank {rank} (the second from {from})"
                ))
            } else if !hosts[rank].is_empty() && !hosts[rank].contains(&from.ip()) {
                Some(format!(
                    "a peer at {from} calls itself rank {rank}, whose address in --peers is {}",
                    spec.peers[rank]
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                let _ = write_frame(&mut stream, Kind::Refuse, 0, problem.as_bytes());
                refusal = Some(ParallelError::BadPeers(problem));
                continue;
            }
            if hello[12..44] != digest {
                let problem = format!(
                    "rank {rank}'s configuration, data or resumed checkpoint differ from rank \
                     0's: give every peer the same flags, the same --data, the same run folder \
                     to --resume and the same duet-train"
                );
                let _ = write_frame(&mut stream, Kind::Refuse, 0, problem.as_bytes());
                refusal = Some(ParallelError::Disagree {
                    rank,
                    what: "configuration, data or resumed checkpoint",
                });
                continue;
            }
            // Reading the hello left a short timeout on the stream: the peer's own from here.
            stream
                .set_read_timeout(Some(spec.timeout))
                .map_err(|e| lost(rank, "a new connection", e))?;
            links[rank - 1] = Some(stream);
        }
        let links: Vec<TcpStream> = links.into_iter().flatten().collect();
        if let Some(refusal) = refusal {
            for mut link in links {
                let _ = write_frame(
                    &mut link,
                    Kind::Refuse,
                    0,
                    format!("rank 0 stopped the group: {refusal}").as_bytes(),
                );
            }
            return Err(refusal);
        }
        let mut group = NetGroup {
            rank: 0,
            world,
            links,
            seq: 0,
        };
        for r in 1..world {
            let link = &mut group.links[r - 1];
            write_frame(link, Kind::Welcome, 0, &[]).map_err(|e| lost(r, "welcoming it", e))?;
        }
        Ok(group)
    }

    /// A worker: connect to rank 0 (retrying until the timeout), say hello, wait for welcome.
    fn join(spec: &NetworkSpec, digest: [u8; 32]) -> Result<NetGroup, ParallelError> {
        let address = resolve(&spec.peers[0])?;
        let deadline = Instant::now() + spec.timeout;
        let mut stream = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ParallelError::Unreachable {
                    address: spec.peers[0].clone(),
                    seconds: spec.timeout.as_secs_f64(),
                });
            }
            match TcpStream::connect_timeout(&address, left.min(Duration::from_secs(5))) {
                Ok(s) => break s,
                // Rank 0 may not listen yet: try again shortly.
                Err(_) => std::thread::sleep(Duration::from_millis(100).min(left)),
            }
        };
        configure(&stream, spec.timeout).map_err(|e| lost(0, "connecting", e))?;
        let mut hello = Vec::with_capacity(HELLO);
        hello.extend_from_slice(&PROTOCOL.to_le_bytes());
        hello.extend_from_slice(&(spec.rank as u32).to_le_bytes());
        hello.extend_from_slice(&(spec.peers.len() as u32).to_le_bytes());
        hello.extend_from_slice(&digest);
        write_frame(&mut stream, Kind::Hello, 0, &hello).map_err(|e| lost(0, "saying hello", e))?;
        read_frame(&mut stream, Kind::Welcome, 0, 0).map_err(|e| e.into_error(0))?;
        // A worker waits for rank 0's sum while rank 0 waits for the slowest worker: twice the
        // timeout, so rank 0 always gives up on a straggler first and names it to the others.
        stream
            .set_read_timeout(Some(spec.timeout.saturating_mul(2)))
            .map_err(|e| lost(0, "connecting", e))?;
        Ok(NetGroup {
            rank: spec.rank,
            world: spec.peers.len(),
            links: vec![stream],
            seq: 0,
        })
    }

    /// Replaces `values` by their element-wise sum over all peers, added in rank order on
    /// rank 0 (so every peer holds the same bits).
    pub fn sum(&mut self, values: &mut [f32]) -> Result<(), ParallelError> {
        self.seq += 1;
        let bytes = values.len() as u64 * 4;
        if self.rank == 0 {
            for r in 1..self.world {
                let part = read_frame(&mut self.links[r - 1], Kind::Sum, self.seq, bytes)
                    .map_err(|e| self.abort(r, e.into_error(r)))?;
                for (v, b) in values.iter_mut().zip(part.chunks_exact(4)) {
                    *v += f32::from_le_bytes(b.try_into().unwrap());
                }
            }
            let out = to_bytes(values);
            for r in 1..self.world {
                write_frame(&mut self.links[r - 1], Kind::Sum, self.seq, &out)
                    .map_err(|e| self.abort(r, lost(r, "sending the sum", e)))?;
            }
        } else {
            let link = &mut self.links[0];
            write_frame(link, Kind::Sum, self.seq, &to_bytes(values))
                .map_err(|e| lost(0, "sending its part", e))?;
            let sum = read_frame(link, Kind::Sum, self.seq, bytes).map_err(|e| e.into_error(0))?;
            for (v, b) in values.iter_mut().zip(sum.chunks_exact(4)) {
                *v = f32::from_le_bytes(b.try_into().unwrap());
            }
        }
        Ok(())
    }

    /// Checks that every peer holds the same `digest` of `what` (e.g. the initial weights).
    pub fn agree(&mut self, what: &'static str, digest: [u8; 32]) -> Result<(), ParallelError> {
        self.seq += 1;
        if self.rank == 0 {
            let mut differ = None;
            for r in 1..self.world {
                let theirs = read_frame(&mut self.links[r - 1], Kind::Agree, self.seq, 32)
                    .map_err(|e| self.abort(r, e.into_error(r)))?;
                if theirs != digest && differ.is_none() {
                    differ = Some(r);
                }
            }
            let verdict = (differ.map_or(u32::MAX, |r| r as u32)).to_le_bytes();
            for r in 1..self.world {
                write_frame(&mut self.links[r - 1], Kind::Agree, self.seq, &verdict)
                    .map_err(|e| self.abort(r, lost(r, "sending the verdict", e)))?;
            }
            match differ {
                Some(rank) => Err(ParallelError::Disagree { rank, what }),
                None => Ok(()),
            }
        } else {
            let link = &mut self.links[0];
            write_frame(link, Kind::Agree, self.seq, &digest)
                .map_err(|e| lost(0, "sending its digest", e))?;
            let verdict =
                read_frame(link, Kind::Agree, self.seq, 4).map_err(|e| e.into_error(0))?;
            match u32::from_le_bytes(verdict[..4].try_into().unwrap()) {
                u32::MAX => Ok(()),
                rank => Err(ParallelError::Disagree {
                    rank: rank as usize,
                    what,
                }),
            }
        }
    }

    /// Rank 0, on losing rank `failed`: tells the other workers which peer stopped the group
    /// (so they name it rather than rank 0), then returns `error`.
    fn abort(&mut self, failed: usize, error: ParallelError) -> ParallelError {
        let payload = (failed as u32).to_le_bytes();
        for (i, link) in self.links.iter_mut().enumerate() {
            if i + 1 != failed {
                let _ = write_frame(link, Kind::Abort, 0, &payload);
            }
        }
        error
    }
}

/// Why reading a frame failed.
#[derive(Debug)]
enum FrameError {
    Io(std::io::Error),
    /// The peer sent something other than the expected frame.
    Unexpected(String),
    /// Rank 0 stopped the group because of this rank.
    Aborted(usize),
    /// Rank 0 refused this worker.
    Refused(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::Unexpected(s) | FrameError::Refused(s) => f.write_str(s),
            FrameError::Aborted(r) => write!(f, "rank {r} stopped the group"),
        }
    }
}

impl FrameError {
    /// The error of a peer whose frame from `rank` failed.
    fn into_error(self, rank: usize) -> ParallelError {
        match self {
            FrameError::Io(e) => lost(rank, "waiting for it", e),
            FrameError::Unexpected(detail) => ParallelError::PeerLost { rank, detail },
            FrameError::Aborted(failed) => ParallelError::PeerLost {
                rank: failed,
                detail: "rank 0 stopped the group after losing it".into(),
            },
            FrameError::Refused(detail) => ParallelError::BadPeers(detail),
        }
    }
}

fn lost(rank: usize, doing: &str, e: std::io::Error) -> ParallelError {
    let detail = match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("no answer in time ({doing}): raise --peer-timeout if steps are this slow")
        }
        std::io::ErrorKind::UnexpectedEof => format!("connection closed ({doing})"),
        _ => format!("{doing}: {e}"),
    };
    ParallelError::PeerLost { rank, detail }
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

fn resolve(address: &str) -> Result<SocketAddr, ParallelError> {
    let bad = |detail: String| ParallelError::Address {
        address: address.to_string(),
        detail,
    };
    address
        .to_socket_addrs()
        .map_err(|e| bad(format!("not a HOST:PORT ({e})")))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))
}

/// The addresses a `--peers` entry resolves to (empty if it does not: then any is accepted).
fn host_ips(address: &str) -> Vec<IpAddr> {
    address
        .to_socket_addrs()
        .map(|a| a.map(|s| s.ip()).collect())
        .unwrap_or_default()
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_frame(
    stream: &mut TcpStream,
    kind: Kind,
    seq: u64,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut header = [0u8; HEADER];
    header[..4].copy_from_slice(&MAGIC);
    header[4] = kind as u8;
    header[5..13].copy_from_slice(&seq.to_le_bytes());
    header[13..21].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    stream.write_all(&header)?;
    stream.write_all(payload)?;
    stream.flush()
}

/// A stream whose reads give up at a deadline (a stream's own timeout bounds each read, not
/// a whole frame).
struct Until<'a>(&'a mut TcpStream, Instant);

impl Read for Until<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.1.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.0.set_read_timeout(Some(left))?;
        self.0.read(buf)
    }
}

/// Reads the frame `kind` number `seq` of exactly `len` payload bytes; an abort or refusal
/// from rank 0 instead is reported as such, anything else as unexpected.
fn read_frame(
    stream: &mut impl Read,
    kind: Kind,
    seq: u64,
    len: u64,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header).map_err(FrameError::Io)?;
    if header[..4] != MAGIC {
        return Err(FrameError::Unexpected("not a duet peer".into()));
    }
    let got = Kind::of(header[4]);
    let got_seq = u64::from_le_bytes(header[5..13].try_into().unwrap());
    let got_len = u64::from_le_bytes(header[13..21].try_into().unwrap());
    let allowed = match got {
        Some(Kind::Abort) => 4,
        Some(Kind::Refuse) => MAX_MESSAGE,
        _ => len,
    };
    if got_len > allowed {
        return Err(FrameError::Unexpected(format!(
            "a frame of {got_len} bytes where {len} were expected: the peers differ in model or \
             configuration"
        )));
    }
    let mut payload = vec![0u8; got_len as usize];
    stream.read_exact(&mut payload).map_err(FrameError::Io)?;
    match got {
        Some(Kind::Abort) if got_len == 4 => Err(FrameError::Aborted(u32::from_le_bytes(
            payload[..4].try_into().unwrap(),
        ) as usize)),
        Some(Kind::Refuse) => Err(FrameError::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        Some(k) if k == kind && got_seq == seq && got_len == len => Ok(payload),
        _ => Err(FrameError::Unexpected(format!(
            "expected operation {seq} ({kind:?}, {len} bytes), got {got:?} {got_seq} of \
             {got_len} bytes: the peers run different code paths"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16, rank: usize) -> NetworkSpec {
        NetworkSpec {
            peers: vec![
                format!("127.0.0.1:{port}"),
                format!("127.0.0.1:{}", port + 1),
            ],
            rank,
            timeout: Duration::from_secs(20),
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A stranger on rank 0's port (an HTTP request, then a frame claiming 1 TB) is dropped
    /// without allocating; the real worker joins after it; sums are added in rank order and
    /// equal on both sides; digests that differ are reported by both, naming the rank.
    #[test]
    fn strangers_are_dropped_and_the_group_sums_and_agrees() {
        let port = free_port();
        let leader = std::thread::spawn(move || -> Result<(), ParallelError> {
            let mut g = NetGroup::connect(&spec(port, 0), [7; 32])?;
            let mut v = [1.0f32, 2.0];
            g.sum(&mut v)?;
            assert_eq!(v, [4.0, 6.0]);
            g.agree("weights", [1; 32])?;
            g.agree("weights", [1; 32])
        });
        let address = format!("127.0.0.1:{port}");
        let mut stranger = loop {
            match TcpStream::connect(&address) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        stranger.shutdown(std::net::Shutdown::Write).unwrap();
        let mut huge = TcpStream::connect(&address).unwrap();
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(&MAGIC);
        header[4] = Kind::Hello as u8;
        header[13..21].copy_from_slice(&(1u64 << 40).to_le_bytes());
        huge.write_all(&header).unwrap();

        let mut g = NetGroup::connect(&spec(port, 1), [7; 32]).unwrap();
        let mut v = [3.0f32, 4.0];
        g.sum(&mut v).unwrap();
        assert_eq!(v, [4.0, 6.0]);
        g.agree("weights", [1; 32]).unwrap();
        let e = g.agree("weights", [2; 32]).unwrap_err();
        assert!(
            matches!(
                e,
                ParallelError::Disagree {
                    rank: 1,
                    what: "weights"
                }
            ),
            "{e}"
        );
        let e = leader.join().unwrap().unwrap_err();
        assert!(matches!(e, ParallelError::Disagree { rank: 1, .. }), "{e}");
    }

    /// When a rank never joins, rank 0 gives up after its timeout naming it, and tells the
    /// ranks that did join why (rather than leaving them to report rank 0 lost).
    #[test]
    fn a_missing_rank_is_named_on_every_side() {
        let port = free_port();
        let three = move |rank, seconds| NetworkSpec {
            peers: (0..3).map(|i| format!("127.0.0.1:{}", port + i)).collect(),
            rank,
            timeout: Duration::from_secs(seconds),
        };
        let leader = std::thread::spawn(move || NetGroup::connect(&three(0, 1), [7; 32]).err());
        let e = NetGroup::connect(&three(1, 10), [7; 32]).err().unwrap();
        assert!(e.to_string().contains("rank(s) [2] did not join"), "{e}");
        let e = leader.join().unwrap().unwrap();
        assert!(
            matches!(&e, ParallelError::Missing { ranks, .. } if ranks == &[2]),
            "{e}"
        );
    }

    /// A worker whose digest differs is refused by rank 0 with the reason, on both sides.
    #[test]
    fn a_worker_training_something_else_is_refused() {
        let port = free_port();
        let leader = std::thread::spawn(move || NetGroup::connect(&spec(port, 0), [7; 32]).err());
        let e = NetGroup::connect(&spec(port, 1), [8; 32]).err().unwrap();
        assert!(e.to_string().contains("differ from rank 0's"), "{e}");
        let e = leader.join().unwrap().unwrap();
        assert!(matches!(e, ParallelError::Disagree { rank: 1, .. }), "{e}");
    }
}
