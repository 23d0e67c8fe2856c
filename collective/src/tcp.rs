//! The CPU backend: a star through rank 0 over TCP. Each rank sends its contribution to rank 0,
//! which checks that every rank called the same operation, computes the result (reductions in
//! rank order) and sends each rank its part. Rank 0 moves R times the data of one rank, linear in
//! R; it is the simple, deterministic choice for the CPU ranks of one box (a GPU box uses NCCL).

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use crate::error::{CollectiveError, Result};
use crate::rank::{CollectiveOptions, RankConfig};
use crate::wire::{
    self, check_reduce, kind_code, kind_from_code, read_frame, reduce_in_rank_order, tensor_bytes,
    tensor_from_bytes, write_frame, FrameTag, OpCode, OpHeader, ReadError,
};
use crate::{Backend, Collective, ReduceOp};

/// How long a rank waits between attempts to reach rank 0 before it listens, and how often rank
/// 0 checks for new connections while it waits for the group to form.
const JOIN_RETRY: Duration = Duration::from_millis(20);

/// The longest rank 0 waits for the hello of one new connection.
const HELLO_LIMIT: Duration = Duration::from_secs(10);

pub struct TcpCollective {
    rank: usize,
    world_size: usize,
    /// Rank 0: the connection to rank `i` at index `i - 1`. Other ranks: the one to rank 0.
    peers: Vec<TcpStream>,
    timeout: Duration,
    seq: u64,
    broken: Option<String>,
}

impl std::fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// What rank 0 computes for one operation: the reply to each rank, in rank order.
type Replies = Vec<Vec<u8>>;

impl TcpCollective {
    /// Joins the group described by `config`: rank 0 listens on `MASTER_ADDR:MASTER_PORT` and
    /// waits for the others; they connect (retrying while rank 0 is not up yet). Both sides give
    /// up after `options.connect_timeout`.
    pub fn connect(config: &RankConfig, options: &CollectiveOptions) -> Result<Self> {
        if config.world_size == 1 {
            return Ok(Self::new(0, 1, Vec::new(), options));
        }
        let addr = config.master_socket_addr()?;
        if config.rank == 0 {
            // Like torch's TCPStore, rank 0 listens on every interface unless the group is
            // local: MASTER_ADDR is often rank 0's host name, which /etc/hosts may map to a
            // loopback address that the other machines cannot reach.
            let bind = if addr.ip().is_loopback() {
                addr
            } else {
                let any: std::net::IpAddr = if addr.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                };
                SocketAddr::new(any, addr.port())
            };
            let listener = TcpListener::bind(bind).map_err(|e| {
                CollectiveError::io(
                    format!(
                        "rank 0 cannot listen on {bind} (MASTER_PORT {})",
                        addr.port()
                    ),
                    e,
                )
            })?;
            Self::accept_group(listener, config.world_size, options)
        } else {
            Self::join(addr, config.rank, config.world_size, options)
        }
    }

    /// `world_size` connected ranks over 127.0.0.1 in this process, rank `i` at index `i`.
    pub fn local_group(world_size: usize, options: &CollectiveOptions) -> Result<Vec<Self>> {
        if world_size == 0 {
            return Err(CollectiveError::InvalidConfig(
                "a group needs at least one rank".into(),
            ));
        }
        if world_size == 1 {
            return Ok(vec![Self::new(0, 1, Vec::new(), options)]);
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| CollectiveError::io("cannot listen on 127.0.0.1", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| CollectiveError::io("cannot read the listening address", e))?;
        std::thread::scope(|scope| {
            let joiners: Vec<_> = (1..world_size)
                .map(|rank| scope.spawn(move || Self::join(addr, rank, world_size, options)))
                .collect();
            let root = Self::accept_group(listener, world_size, options);
            let mut group = vec![root?];
            for joiner in joiners {
                group.push(joiner.join().map_err(|_| {
                    CollectiveError::InvalidConfig("a joining rank's thread panicked".into())
                })??);
            }
            Ok(group)
        })
    }

    fn new(
        rank: usize,
        world_size: usize,
        peers: Vec<TcpStream>,
        options: &CollectiveOptions,
    ) -> Self {
        TcpCollective {
            rank,
            world_size,
            peers,
            timeout: options.timeout,
            seq: 0,
            broken: None,
        }
    }

    fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    }

    /// Rank 0's side of start-up: accepts and checks one hello per rank.
    fn accept_group(
        listener: TcpListener,
        world_size: usize,
        options: &CollectiveOptions,
    ) -> Result<Self> {
        let deadline = Instant::now() + options.connect_timeout;
        listener
            .set_nonblocking(true)
            .map_err(|e| CollectiveError::io("cannot configure the listening socket", e))?;
        let mut slots: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
        let fail = |slots: &mut Vec<Option<TcpStream>>, err: CollectiveError| {
            for stream in slots.iter_mut().flatten() {
                let _ = write_frame(stream, FrameTag::Error, err.to_string().as_bytes());
                let _ = stream.shutdown(Shutdown::Write);
            }
            err
        };
        while slots.iter().any(Option::is_none) {
            let (mut stream, from) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        let err = CollectiveError::InvalidConfig(format!(
                            "rank 0: rank(s) {} did not join within {:.1} s (check that every \
                             rank was started with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE={world_size})",
                            missing.join(", "),
                            options.connect_timeout.as_secs_f64()
                        ));
                        return Err(fail(&mut slots, err));
                    }
                    std::thread::sleep(JOIN_RETRY);
                    continue;
                }
                Err(e) => {
                    return Err(fail(
                        &mut slots,
                        CollectiveError::io("rank 0 cannot accept a connection", e),
                    ))
                }
            };
            // A rank sends its hello as soon as it connects; a connection that stays silent
            // (not a rank) must not hold up the ranks queued behind it for long.
            let hello_wait = deadline
                .saturating_duration_since(Instant::now())
                .clamp(JOIN_RETRY, HELLO_LIMIT);
            Self::configure(&stream, hello_wait).map_err(|e| {
                CollectiveError::io(format!("cannot configure the connection from {from}"), e)
            })?;
            let hello = match read_frame(&mut stream) {
                Ok((FrameTag::Hello, payload)) => parse_hello(&payload),
                Ok((tag, _)) => Err(format!("sent {tag:?} instead of a hello")),
                Err(_) => Err("did not complete the hello".into()),
            };
            let (rank, their_world) = match hello {
                Ok(hello) => hello,
                Err(problem) => {
                    // Not an Atoll rank (a port scanner, a health check): ignore it.
                    let _ = write_frame(&mut stream, FrameTag::Error, problem.as_bytes());
                    tracing::warn!(%from, problem, "ignored a connection that is not a rank");
                    continue;
                }
            };
            let problem = if their_world != world_size {
                Some(format!(
                    "rank {rank} has WORLD_SIZE={their_world} but rank 0 has WORLD_SIZE={world_size}"
                ))
            } else if rank == 0 || rank >= world_size {
                Some(format!(
                    "a process claims RANK={rank}, outside 1..{world_size}"
                ))
            } else if slots[rank - 1].is_some() {
                Some(format!("two processes claim RANK={rank}"))
            } else {
                None
            };
            if let Some(problem) = problem {
                // A rank of a differently configured group: fail the start-up, naming it.
                let _ = write_frame(&mut stream, FrameTag::Error, problem.as_bytes());
                let err = CollectiveError::InvalidConfig(format!("rank 0: {problem}"));
                return Err(fail(&mut slots, err));
            }
            slots[rank - 1] = Some(stream);
        }
        let mut peers: Vec<TcpStream> = slots.into_iter().map(|s| s.expect("all joined")).collect();
        for (i, stream) in peers.iter_mut().enumerate() {
            Self::configure(stream, options.timeout)
                .and_then(|_| write_frame(stream, FrameTag::Welcome, &[]))
                .map_err(|e| {
                    CollectiveError::io(format!("rank 0 cannot welcome rank {}", i + 1), e)
                })?;
        }
        tracing::debug!(world_size, "collective group formed");
        Ok(Self::new(0, world_size, peers, options))
    }

    /// A non-zero rank's side of start-up.
    fn join(
        addr: SocketAddr,
        rank: usize,
        world_size: usize,
        options: &CollectiveOptions,
    ) -> Result<Self> {
        let deadline = Instant::now() + options.connect_timeout;
        let mut stream = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&addr, left.max(JOIN_RETRY)) {
                Ok(s) => break s,
                Err(e) if Instant::now() + JOIN_RETRY < deadline => {
                    tracing::trace!(rank, %addr, error = %e, "rank 0 not reachable yet");
                    std::thread::sleep(JOIN_RETRY);
                }
                Err(e) => {
                    return Err(CollectiveError::io(
                        format!(
                            "rank {rank}: cannot reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) within {:.1} s",
                            options.connect_timeout.as_secs_f64()
                        ),
                        e,
                    ))
                }
            }
        };
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(JOIN_RETRY);
        Self::configure(&stream, wait).map_err(|e| {
            CollectiveError::io(format!("rank {rank}: cannot configure its connection"), e)
        })?;
        let mut hello = MAGIC_HELLO.to_vec();
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world_size as u32).to_le_bytes());
        write_frame(&mut stream, FrameTag::Hello, &hello).map_err(|e| {
            CollectiveError::io(format!("rank {rank}: cannot send its hello to rank 0"), e)
        })?;
        match read_frame(&mut stream) {
            Ok((FrameTag::Welcome, _)) => {}
            Ok((FrameTag::Error, message)) => {
                return Err(CollectiveError::Remote {
                    rank,
                    message: String::from_utf8_lossy(&message).into_owned(),
                })
            }
            Ok((tag, _)) => {
                return Err(CollectiveError::InvalidConfig(format!(
                    "rank {rank}: rank 0 answered the hello with {tag:?}"
                )))
            }
            Err(e) => return Err(read_error(e, rank, 0, "start-up", wait)),
        }
        Self::configure(&stream, options.timeout).map_err(|e| {
            CollectiveError::io(format!("rank {rank}: cannot configure its connection"), e)
        })?;
        Ok(Self::new(rank, world_size, vec![stream], options))
    }

    fn check_usable(&self) -> Result<()> {
        match &self.broken {
            Some(reason) => Err(CollectiveError::Broken(reason.clone())),
            None => Ok(()),
        }
    }

    /// Marks the group unusable and ends this rank's sending side of every connection, so peers
    /// blocked on this rank fail at once instead of waiting for their timeout. Only the sending
    /// side: closing a socket with unread input makes TCP reset it, and a reset can discard the
    /// error report rank 0 has just sent before the peer reads it.
    fn break_with(&mut self, err: CollectiveError) -> CollectiveError {
        let message = err.to_string();
        for stream in &mut self.peers {
            if self.rank == 0 {
                let _ = write_frame(stream, FrameTag::Error, message.as_bytes());
            }
            let _ = stream.shutdown(Shutdown::Write);
        }
        self.broken = Some(err.to_string());
        err
    }

    /// Runs one operation: every rank contributes `data` under `header`; rank 0 checks the
    /// headers and computes each rank's reply with `compute` (given every rank's header and
    /// data, in rank order). Returns this rank's reply.
    fn exchange(
        &mut self,
        mut header: OpHeader,
        data: &[u8],
        compute: impl FnOnce(&[OpHeader], &[&[u8]]) -> Result<Replies>,
    ) -> Result<Vec<u8>> {
        self.check_usable()?;
        header.seq = self.seq;
        self.seq += 1;
        let op = header.op.name();
        if self.world_size == 1 {
            let mut replies = compute(std::slice::from_ref(&header), &[data])?;
            return Ok(replies.swap_remove(0));
        }
        let result = if self.rank == 0 {
            self.exchange_as_root(header, data, compute)
        } else {
            self.exchange_as_member(&header, data, op)
        };
        result.map_err(|e| match e {
            CollectiveError::Broken(_) => e,
            e => self.break_with(e),
        })
    }

    fn exchange_as_member(
        &mut self,
        header: &OpHeader,
        data: &[u8],
        op: &'static str,
    ) -> Result<Vec<u8>> {
        let (rank, timeout) = (self.rank, self.timeout);
        let stream = &mut self.peers[0];
        if let Err(e) = write_frame(stream, FrameTag::Contribution, &header.encode(data)) {
            return Err(write_error(e, rank, 0, op, timeout));
        }
        match read_frame(stream) {
            Ok((FrameTag::Reply, reply)) => Ok(reply),
            Ok((FrameTag::Error, message)) => Err(CollectiveError::Remote {
                rank,
                message: String::from_utf8_lossy(&message).into_owned(),
            }),
            Ok((tag, _)) => Err(CollectiveError::Mismatch {
                op,
                detail: format!("rank 0 answered with {tag:?}"),
            }),
            Err(e) => Err(read_error(e, rank, 0, op, timeout)),
        }
    }

    fn exchange_as_root(
        &mut self,
        header: OpHeader,
        data: &[u8],
        compute: impl FnOnce(&[OpHeader], &[&[u8]]) -> Result<Replies>,
    ) -> Result<Vec<u8>> {
        let op = header.op.name();
        let timeout = self.timeout;
        let mut received: Vec<Vec<u8>> = Vec::with_capacity(self.world_size - 1);
        for (i, stream) in self.peers.iter_mut().enumerate() {
            let peer = i + 1;
            match read_frame(stream) {
                Ok((FrameTag::Contribution, payload)) => received.push(payload),
                Ok((tag, _)) => {
                    return Err(CollectiveError::Mismatch {
                        op,
                        detail: format!("rank {peer} sent {tag:?} instead of a contribution"),
                    })
                }
                Err(e) => return Err(read_error(e, 0, peer, op, timeout)),
            }
        }
        let mut headers = vec![header];
        let mut datas: Vec<&[u8]> = vec![data];
        for (i, payload) in received.iter().enumerate() {
            let peer = i + 1;
            let (theirs, their_data) =
                OpHeader::decode(payload).map_err(|detail| CollectiveError::Mismatch {
                    op,
                    detail: format!("rank {peer} sent a malformed contribution: {detail}"),
                })?;
            if !same_call(&headers[0], &theirs) {
                return Err(CollectiveError::Mismatch {
                    op,
                    detail: format!(
                        "rank 0 called {} but rank {peer} called {}",
                        headers[0].describe(),
                        theirs.describe()
                    ),
                });
            }
            headers.push(theirs);
            datas.push(their_data);
        }
        let mut replies = compute(&headers, &datas)?;
        for (i, stream) in self.peers.iter_mut().enumerate() {
            if let Err(e) = write_frame(stream, FrameTag::Reply, &replies[i + 1]) {
                return Err(write_error(e, 0, i + 1, op, timeout));
            }
        }
        Ok(replies.swap_remove(0))
    }
}

impl Drop for TcpCollective {
    /// After an error, rank 0 reads and discards what the others still send until each has
    /// closed its side (they do once they have read rank 0's error report), at most
    /// [`DRAIN_LIMIT`]: closing a socket with unread input makes TCP reset the connection, which
    /// can discard that report before the peer reads it, leaving it with a vaguer error.
    fn drop(&mut self) {
        if self.rank != 0 || self.broken.is_none() {
            return;
        }
        let deadline = Instant::now() + self.timeout.min(DRAIN_LIMIT);
        let mut sink = vec![0u8; 64 << 10];
        for stream in &mut self.peers {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                    break;
                }
                match stream.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}

/// The longest rank 0's drop waits for the others to take in its error report.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

const MAGIC_HELLO: &[u8; 8] = wire::MAGIC;

fn parse_hello(payload: &[u8]) -> std::result::Result<(usize, usize), String> {
    if payload.len() != 16 || &payload[..8] != MAGIC_HELLO {
        return Err("not an Atoll collective hello".into());
    }
    let rank = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes")) as usize;
    let world = u32::from_le_bytes(payload[12..16].try_into().expect("4 bytes")) as usize;
    Ok((rank, world))
}

/// Whether two ranks' headers describe the same call (shapes may differ only for byte gathers).
fn same_call(a: &OpHeader, b: &OpHeader) -> bool {
    a.seq == b.seq
        && a.op == b.op
        && a.reduce == b.reduce
        && a.root == b.root
        && a.kind == b.kind
        && (a.op == OpCode::GatherBytes || a.shape == b.shape)
}

fn read_error(
    e: ReadError,
    rank: usize,
    peer: usize,
    op: &'static str,
    after: Duration,
) -> CollectiveError {
    match e {
        ReadError::Closed => CollectiveError::PeerClosed { rank, peer, op },
        ReadError::TimedOut => CollectiveError::Timeout {
            rank,
            peer,
            op,
            after,
        },
        ReadError::Io(e) => {
            CollectiveError::io(format!("rank {rank}: {op}: reading from rank {peer}"), e)
        }
        ReadError::Malformed(detail) => CollectiveError::Mismatch {
            op,
            detail: format!("rank {peer} sent a malformed frame ({detail})"),
        },
    }
}

fn write_error(
    e: std::io::Error,
    rank: usize,
    peer: usize,
    op: &'static str,
    after: Duration,
) -> CollectiveError {
    read_error(ReadError::from(e), rank, peer, op, after)
}

fn header_for(
    op: OpCode,
    tensor: Option<&Tensor>,
    reduce: Option<ReduceOp>,
    root: usize,
) -> Result<OpHeader> {
    let (kind, shape) = match tensor {
        Some(t) => (kind_code(t.f_kind()?)?, t.size()),
        None => (0, Vec::new()),
    };
    Ok(OpHeader {
        seq: 0,
        op,
        reduce,
        root: root as u32,
        kind,
        shape,
    })
}

/// Decodes every rank's contribution as a host tensor of the agreed kind and shape.
fn host_tensors(headers: &[OpHeader], datas: &[&[u8]]) -> Result<Vec<Tensor>> {
    let kind = kind_from_code(headers[0].kind).ok_or_else(|| CollectiveError::Mismatch {
        op: headers[0].op.name(),
        detail: format!("unknown kind code {}", headers[0].kind),
    })?;
    datas
        .iter()
        .map(|d| tensor_from_bytes(d, &headers[0].shape, kind))
        .collect()
}

fn kind_of(header: &OpHeader) -> Kind {
    kind_from_code(header.kind).expect("the kind was checked when the header was built")
}

/// Writes host `bytes` (of `tensor`'s kind and shape) into `tensor`, wherever it lives.
fn write_back(tensor: &mut Tensor, bytes: &[u8]) -> Result<()> {
    let result = tensor_from_bytes(bytes, &tensor.size(), tensor.f_kind()?)?;
    tch::no_grad(|| tensor.f_copy_(&result))?;
    Ok(())
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> Backend {
        Backend::Tcp
    }

    fn all_reduce_(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_reduce(tensor.f_kind()?, op)?;
        let header = header_for(OpCode::AllReduce, Some(&*tensor), Some(op), 0)?;
        let data = tensor_bytes(tensor)?;
        let world = self.world_size;
        let reply = self.exchange(header, &data, |headers, datas| {
            let parts = host_tensors(headers, datas)?;
            let reduced = reduce_in_rank_order(&parts, kind_of(&headers[0]), op)?;
            Ok(vec![tensor_bytes(&reduced)?; world])
        })?;
        write_back(tensor, &reply)
    }

    fn broadcast_(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidConfig(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size
            )));
        }
        let header = header_for(OpCode::Broadcast, Some(&*tensor), None, root)?;
        let data = if self.rank == root {
            tensor_bytes(tensor)?
        } else {
            Vec::new()
        };
        let world = self.world_size;
        let reply = self.exchange(header, &data, |_, datas| {
            Ok(vec![datas[root].to_vec(); world])
        })?;
        if self.rank != root {
            write_back(tensor, &reply)?;
        }
        Ok(())
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let header = header_for(OpCode::AllGather, Some(tensor), None, 0)?;
        let data = tensor_bytes(tensor)?;
        let world = self.world_size;
        let reply = self.exchange(header, &data, |_, datas| Ok(vec![datas.concat(); world]))?;
        let (kind, shape, device) = (tensor.f_kind()?, tensor.size(), tensor.device());
        let per_rank = data.len();
        (0..world)
            .map(|r| {
                let t = tensor_from_bytes(&reply[r * per_rank..(r + 1) * per_rank], &shape, kind)?;
                Ok(t.f_to_device(device)?)
            })
            .collect()
    }

    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let kind = input.f_kind()?;
        check_reduce(kind, op)?;
        let shard_shape = shard_shape(&input.size(), self.world_size)?;
        let header = header_for(OpCode::ReduceScatter, Some(input), Some(op), 0)?;
        let data = tensor_bytes(input)?;
        let world = self.world_size;
        let reply = self.exchange(header, &data, |headers, datas| {
            let parts = host_tensors(headers, datas)?;
            let reduced = tensor_bytes(&reduce_in_rank_order(&parts, kind_of(&headers[0]), op)?)?;
            let per_rank = reduced.len() / world;
            Ok((0..world)
                .map(|r| reduced[r * per_rank..(r + 1) * per_rank].to_vec())
                .collect())
        })?;
        Ok(tensor_from_bytes(&reply, &shard_shape, kind)?.f_to_device(input.device())?)
    }

    fn barrier(&mut self) -> Result<()> {
        let header = header_for(OpCode::Barrier, None, None, 0)?;
        let world = self.world_size;
        self.exchange(header, &[], |_, _| Ok(vec![Vec::new(); world]))?;
        Ok(())
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let header = header_for(OpCode::GatherBytes, None, None, 0)?;
        let world = self.world_size;
        let reply = self.exchange(header, bytes, |_, datas| {
            let mut packed = Vec::new();
            for d in datas {
                packed.extend_from_slice(&(d.len() as u64).to_le_bytes());
                packed.extend_from_slice(d);
            }
            Ok(vec![packed; world])
        })?;
        unpack_byte_lists(&reply, world)
    }
}

/// The shape of one rank's shard of a tensor of `shape` split along dimension 0.
pub(crate) fn shard_shape(shape: &[i64], world_size: usize) -> Result<Vec<i64>> {
    let rows = *shape.first().ok_or_else(|| {
        CollectiveError::InvalidTensor(
            "reduce_scatter needs a tensor with at least one dimension".into(),
        )
    })?;
    if rows % world_size as i64 != 0 {
        return Err(CollectiveError::InvalidTensor(format!(
            "reduce_scatter: dimension 0 of shape {shape:?} is not a multiple of the world size {world_size}"
        )));
    }
    let mut shard = shape.to_vec();
    shard[0] = rows / world_size as i64;
    Ok(shard)
}

fn unpack_byte_lists(packed: &[u8], world: usize) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(world);
    let mut at = 0;
    while out.len() < world {
        let malformed = || CollectiveError::Mismatch {
            op: "all_gather_bytes",
            detail: "rank 0 sent a malformed reply".into(),
        };
        let len_bytes = packed.get(at..at + 8).ok_or_else(malformed)?;
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        at += 8;
        out.push(packed.get(at..at + len).ok_or_else(malformed)?.to_vec());
        at += len;
    }
    Ok(out)
}
