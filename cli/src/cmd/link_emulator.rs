//! `atoll link-emulator`: UDP (QUIC) traffic relayed through an emulated WAN link.

use super::runtime;
use anyhow::{anyhow, Result};
use clap::Args;
use std::net::SocketAddr;

#[derive(Args)]
pub struct LinkEmulatorArgs {
    /// Where clients send (127.0.0.1 unless asked).
    #[arg(long)]
    listen: SocketAddr,
    /// The server the traffic goes to.
    #[arg(long)]
    forward: SocketAddr,
    /// Per direction, e.g. 2gbps, 200mbps (default: unlimited).
    #[arg(long)]
    rate: Option<String>,
    /// Round-trip delay, e.g. 40ms.
    #[arg(long, default_value = "0")]
    rtt: String,
    /// One-way delay variation, e.g. 2ms.
    #[arg(long, default_value = "0")]
    jitter: String,
    /// Loss per packet and direction, e.g. 0.1%.
    #[arg(long, default_value = "0")]
    loss: String,
    /// Bottleneck queue per direction, e.g. 4MB (default: one bandwidth-delay product).
    #[arg(long)]
    queue: Option<String>,
    /// An outage AT:FOR, e.g. 120s:30s (repeatable): every packet dropped meanwhile.
    #[arg(long = "outage", value_name = "AT:FOR")]
    outages: Vec<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The path MTU in bytes: larger datagrams are dropped (9000 for jumbo frames).
    #[arg(long, default_value_t = atoll_link::quic::DEFAULT_MTU)]
    mtu: u16,
    /// Print counters every this many seconds (0: only at the end).
    #[arg(long, default_value_t = 5)]
    report_every_s: u64,
}

pub fn run(args: LinkEmulatorArgs) -> Result<()> {
    use atoll_link::emulator::{
        parse_bytes, parse_duration, parse_percent, parse_rate, Emulator, EmulatorConfig, Outage,
    };
    let LinkEmulatorArgs {
        listen,
        forward,
        rate,
        rtt,
        jitter,
        loss,
        queue,
        outages,
        seed,
        mtu,
        report_every_s,
    } = args;
    let mtu = atoll_link::quic::check_mtu(mtu).map_err(|e| anyhow!("--mtu: {e}"))?;
    let mut config = EmulatorConfig::new(listen, forward);
    config.rate_bps = rate.as_deref().map(parse_rate).transpose()?;
    config.rtt = parse_duration(&rtt)?;
    config.jitter = parse_duration(&jitter)?;
    config.loss = parse_percent(&loss)?;
    config.queue_limit_bytes = queue.as_deref().map(parse_bytes).transpose()?;
    config.seed = seed;
    config.mtu = mtu;
    for o in &outages {
        let (at, dur) = o
            .split_once(':')
            .ok_or_else(|| anyhow!("--outage {o:?}: expected AT:FOR, e.g. 120s:30s"))?;
        config.outages.push(Outage {
            at: parse_duration(at)?,
            duration: parse_duration(dur)?,
        });
    }
    let emulator = Emulator::start(config)?;
    eprintln!(
        "link emulator on udp/{} -> {forward}; Ctrl-C to stop",
        emulator.local_addr()
    );
    runtime()?.block_on(async {
        let mut tick =
            tokio::time::interval(std::time::Duration::from_secs(report_every_s.max(1)));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick(), if report_every_s > 0 => {
                    eprintln!("{}", atoll_node::wan::stats_line(&emulator.stats(), emulator.elapsed()));
                }
            }
        }
    });
    let elapsed = emulator.elapsed();
    let stats = emulator.stop();
    println!("{}", atoll_node::wan::stats_line(&stats, elapsed));
    Ok(())
}
